"""The tokenizer rebuilt from GGUF metadata equals the BPE it was written from."""

import json

import pytest
from tokenizers import Tokenizer

from mlapipe.runtime.gguf_model import GGUFModel
from mlapipe.runtime.tiny_models import SPECIAL_TOKENS, build_vocab, write_tiny_model
from mlapipe.runtime.tokenizer import GGUFTokenizer, TokenizerError, deepseek_pre_tokenizer

TEXTS = [
    "Hello, world! What is the capital of France?",
    "def attention(query, key): return 12345 * 678",
    "  leading spaces\n\nand newlines\ttabs",
    "深度求索 日本語のテキスト",
    "emoji 🙂 and accents: café naïve",
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = write_tiny_model(tmp_path_factory.mktemp("tok") / "m.gguf", "v3", num_hidden_layers=1)
    return GGUFTokenizer(GGUFModel(path).metadata)


@pytest.fixture(scope="module")
def source_tokenizer():
    """A `tokenizers` BPE built straight from the trained vocab (not through GGUF)."""
    vocab = build_vocab()
    spec = {
        "version": "1.0",
        "added_tokens": [
            {
                "id": i,
                "content": t,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }
            for i, t in enumerate(vocab.tokens)
            if t in SPECIAL_TOKENS
        ],
        "model": {
            "type": "BPE",
            "vocab": {t: i for i, t in enumerate(vocab.tokens)},
            "merges": [m.split(" ", 1) for m in vocab.merges],
        },
    }
    tok = Tokenizer.from_str(json.dumps(spec))
    tok.pre_tokenizer = deepseek_pre_tokenizer("deepseek-v3")
    return tok


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_source_bpe_and_round_trips(tokenizer, source_tokenizer, text):
    ids = tokenizer.encode(text, add_bos=False)
    assert ids == source_tokenizer.encode(text, add_special_tokens=False).ids
    assert len(ids) < len(text.encode())  # merges were applied
    assert tokenizer.decode(ids) == text


def test_bos_follows_the_file(tokenizer):
    assert tokenizer.add_bos and tokenizer.bos_token_id == 0
    assert tokenizer.encode("hi")[0] == 0
    assert tokenizer.encode("hi", add_bos=False)[0] != 0


def test_special_tokens_are_single_ids(tokenizer):
    ids = tokenizer.encode("<｜User｜>hi<｜Assistant｜>", add_bos=False)
    assert ids[0] == SPECIAL_TOKENS.index("<｜User｜>")
    assert ids[-1] == SPECIAL_TOKENS.index("<｜Assistant｜>")
    assert tokenizer.decode(ids) == "hi"


def test_chat_template(tokenizer):
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hello"}])
    assert text == "<｜begin▁of▁sentence｜><｜User｜>Hello<｜Assistant｜>"


def test_unknown_pre_tokenizer_is_refused():
    with pytest.raises(TokenizerError, match="unsupported pre-tokenizer 'gpt-42'"):
        deepseek_pre_tokenizer("gpt-42")
