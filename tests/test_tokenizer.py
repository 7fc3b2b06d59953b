"""The tokenizer rebuilt from GGUF metadata against HF `tokenizers` and llama.cpp's conventions.

For each DeepSeek pre-tokenizer a BPE is trained on a multilingual corpus, written into a GGUF and read
back by GGUFTokenizer; HF `tokenizers` runs the same vocabulary from a tokenizer.json built in
tests/hf_tokenizer.py (patterns checked against llama.cpp's by digest). Encodings, decodings and the
pre-tokenizer's pieces must agree, the pieces also with llama.cpp's splitting rule replayed with the
`regex` module.
"""

import pathlib

import pytest
import regex

from mlapipe.runtime.gguf_model import GGUFModel
from mlapipe.runtime.gguf_writer import Vocab, write_gguf
from mlapipe.runtime.tiny_models import SPECIAL_TOKENS, random_state_dict, tiny_config, write_tiny_model
from mlapipe.runtime.tokenizer import (
    PRE_TOKENIZER_SPLITS,
    GGUFTokenizer,
    TokenizerError,
    deepseek_pre_tokenizer,
)
from tests.hf_tokenizer import CONTROL, LLAMA_CPP_SHA256, SPLITS, USER_DEFINED, hf_tokenizer, sha256

PRE_TOKENIZERS = ["deepseek-v3", "deepseek-llm"]
USER_TOKENS = ["<think>", "</think>"]

# One line per script or situation; the escapes are characters that Unicode normalization would change
# (U+1F7D, U+212A KELVIN SIGN, U+2126 OHM SIGN), the ones that broke the copied deepseek-llm pattern.
CORPUS = [
    "The quick brown fox jumps over the lazy dog. It's 3:45pm, isn't it? I'd say we'll see.",
    "def attention(q, k, v):\n    return softmax(q @ k.T / sqrt(d)) @ v  # scaled\n",
    "\tif (a != b && c[i] >= 0x1F) { x += y->z; } // C++ :: std::vector<int>",
    "Numbers: 1234567890 3.14159 1,000,000 -42 +7e-3 2026-12-02 \u0663\u0664\u0665 \uff14\uff15\uff16",
    "\u6df1\u5ea6\u6c42\u7d22\u516c\u53f8\u53d1\u5e03\u4e86\u65b0\u6a21\u578b\u3002\u65e5\u672c\u8a9e\u306e"
    "\u30c6\u30ad\u30b9\u30c8\u3001\u30ab\u30bf\u30ab\u30ca\u3002\ud55c\uad6d\uc5b4 \ud14d\uc2a4\ud2b8",
    "\u039a\u03b1\u03bb\u03b7\u03bc\u03ad\u03c1\u03b1 \u03ba\u03cc\u03c3\u03bc\u03b5, \u03ce\u03c1\u03b1 "
    "\u1f7d\u03c1\u03b1 \u1f00\u03bb\u03ae\u03b8\u03b5\u03b9\u03b1 \u1f10\u03bd",
    "\u041f\u0440\u0438\u0432\u0435\u0442, \u043c\u0438\u0440! \u0421\u044a\u0435\u0448\u044c \u0436\u0435 "
    "\u0435\u0449\u0451 \u044d\u0442\u0438\u0445 \u043c\u044f\u0433\u043a\u0438\u0445 \u0431\u0443\u043b\u043e\u043a.",
    "emoji \U0001f642\U0001f44d\U0001f3fd and \U0001f1eb\U0001f1f7 flags \u2728 done\U0001f680!",
    "300\u212a and 300K, 5\u2126 and 5\u03a9, 10\u00b5m, caf\u00e9 na\u00efve fa\u00e7ade \u00c5ngstr\u00f6m",
    "  two spaces\tand\ttabs\r\nCRLF\n\n\nthree newlines   \n trailing   ",
    "mixed\u4e2d\u6587English123\u6df7\u5408 \u201cquoted\u201d \u2018single\u2019 \uff08\u5168\u89d2\uff09\uff01",
    "<think>\nreasoning</think> answer <\uff5cUser\uff5c>hi<\uff5cAssistant\uff5c>",
]


def _trained_vocab(pre: str) -> Vocab:
    """A byte-level BPE trained on CORPUS with HF's trainer under the reference pre-tokenizer; the DeepSeek
    specials are CONTROL, USER_TOKENS are user-defined added tokens (as R1's `<think>` is)."""
    import json

    from tokenizers import Tokenizer, pre_tokenizers, trainers

    spec = json.loads(hf_tokenizer(Vocab(["a"], [1], [], 0, 0, pre=pre)).to_str())
    spec |= {"added_tokens": [], "model": {"type": "BPE", "vocab": {}, "merges": []}}
    tok = Tokenizer.from_str(json.dumps(spec))
    trainer = trainers.BpeTrainer(
        vocab_size=700,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 3, trainer=trainer)
    tokens = [t for t, _ in sorted(tok.get_vocab().items(), key=lambda item: item[1])] + USER_TOKENS
    merges = [m if isinstance(m, str) else " ".join(m) for m in json.loads(tok.to_str())["model"]["merges"]]
    types = [CONTROL if t in SPECIAL_TOKENS else USER_DEFINED if t in USER_TOKENS else 1 for t in tokens]
    return Vocab(tokens, types, merges, bos_token_id=0, eos_token_id=1, pre=pre)


@pytest.fixture(scope="module", params=PRE_TOKENIZERS)
def pair(request, tmp_path_factory):
    """(pre, ours read from a GGUF file, HF's from tokenizer.json) over the same trained vocabulary."""
    vocab = _trained_vocab(request.param)
    cfg = tiny_config("v2", len(vocab.tokens), num_hidden_layers=1)
    path = tmp_path_factory.mktemp("tok") / f"{request.param}.gguf"
    write_gguf(path, cfg, random_state_dict(cfg, seed=0), vocab, "F32")
    return request.param, GGUFTokenizer(GGUFModel(path).metadata), hf_tokenizer(vocab)


def test_patterns_are_llama_cpps_byte_for_byte():
    for pre in PRE_TOKENIZERS:
        assert [sha256(p) for p in SPLITS[pre]] == LLAMA_CPP_SHA256[pre], pre
        assert PRE_TOKENIZER_SPLITS[pre] == SPLITS[pre], pre


def test_tokenizer_source_is_ascii():
    """Non-ASCII in the patterns is written as escapes, so no editor or tool can normalize it."""
    source = pathlib.Path(__file__).parents[1] / "runtime" / "tokenizer.py"
    assert source.read_bytes().isascii()


@pytest.mark.parametrize("line", range(len(CORPUS)))
def test_encode_and_decode_match_hf(pair, line):
    pre, ours, hf = pair
    text = CORPUS[line]
    ids = ours.encode(text, add_bos=False)
    assert ids == hf.encode(text, add_special_tokens=False).ids
    assert ours.decode(ids) == hf.decode(ids)
    assert ours.decode(ids, skip_special_tokens=False) == hf.decode(ids, skip_special_tokens=False) == text


def test_corpus_as_one_text_matches_hf(pair):
    pre, ours, hf = pair
    text = "\n".join(CORPUS)
    ids = ours.encode(text, add_bos=False)
    assert ids == hf.encode(text, add_special_tokens=False).ids
    assert len(ids) < len(text.encode()) // 2  # the trained merges apply across every script


def _llama_cpp_split(text: str, patterns: list[str]) -> list[str]:
    """llama.cpp's unicode_regex_split: each pattern runs over every piece so far; a match and the text
    before it become pieces of their own."""
    pieces = [text]
    for pattern in patterns:
        compiled, out = regex.compile(pattern), []
        for piece in pieces:
            start = 0
            for m in compiled.finditer(piece):
                out += [piece[start : m.start()]] if m.start() > start else []
                out.append(m.group())
                start = m.end()
            out += [piece[start:]] if start < len(piece) else []
        pieces = out
    return pieces


@pytest.mark.parametrize("pre", PRE_TOKENIZERS)
def test_pieces_follow_llama_cpps_splitting(pre):
    from tokenizers import Regex, pre_tokenizers

    ours = deepseek_pre_tokenizer(pre)
    regex_only = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(p), behavior="isolated") for p in SPLITS[pre]]
    )
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    for text in CORPUS:
        pieces = [p for p, _ in regex_only.pre_tokenize_str(text)]
        assert pieces == _llama_cpp_split(text, SPLITS[pre]), text
        assert [p for p, _ in ours.pre_tokenize_str(text)] == [
            byte_level.pre_tokenize_str(p)[0][0] for p in pieces
        ]


def test_the_patterns_split_where_deepseek_llm_says():
    """Splits written out by hand. Letters of the big class keep their leading space, unless a later
    pattern splits them again: U+0800..U+4E00 (here U+1F7D and KELVIN SIGN) is in the CJK pattern's
    class, so that run loses its space, while U+03CE does not; digit and CJK runs and each newline are
    pieces of their own."""
    pieces = _llama_cpp_split(
        "Hi \u03ce\u03c1\u03b1 \u1f7d\u212a 123\u6df1\u5ea6\n\nx", SPLITS["deepseek-llm"]
    )
    assert pieces == [
        "Hi",
        " \u03ce\u03c1\u03b1",
        " ",
        "\u1f7d\u212a",
        " ",
        "123",
        "\u6df1\u5ea6",
        "\n",
        "\n",
        "x",
    ]


def test_user_defined_tokens_decode_as_written_and_control_ones_are_skipped(pair):
    pre, ours, hf = pair
    ids = ours.encode("<think>\nok</think><\uff5cend\u2581of\u2581sentence\uff5c>", add_bos=False)
    think, end_think, eos = ours.vocab_size - 2, ours.vocab_size - 1, 1  # USER_TOKENS come last
    assert ids[0] == think and ids[-2:] == [end_think, eos]
    assert ours.decode(ids) == hf.decode(ids) == "<think>\nok</think>"
    assert ours.decode(ids, skip_special_tokens=False).endswith("<\uff5cend\u2581of\u2581sentence\uff5c>")


def test_bos_follows_the_file(tmp_path):
    tok = GGUFTokenizer(GGUFModel(write_tiny_model(tmp_path / "m.gguf", "v3", num_hidden_layers=1)).metadata)
    assert tok.add_bos and tok.bos_token_id == 0
    assert tok.encode("hi")[0] == 0
    assert tok.encode("hi", add_bos=False)[0] != 0
    text = tok.apply_chat_template([{"role": "user", "content": "Hello"}])
    assert text == "<\uff5cbegin\u2581of\u2581sentence\uff5c><\uff5cUser\uff5c>Hello<\uff5cAssistant\uff5c>"
    ids = tok.encode(text, add_bos=False)
    assert ids[:2] == [0, SPECIAL_TOKENS.index("<\uff5cUser\uff5c>")]
    assert ids[-1] == SPECIAL_TOKENS.index("<\uff5cAssistant\uff5c>")
    assert tok.decode(ids) == "Hello"


def test_unknown_pre_tokenizer_is_refused():
    with pytest.raises(TokenizerError, match="unsupported pre-tokenizer 'gpt-42'"):
        deepseek_pre_tokenizer("gpt-42")


def test_mismatched_token_types_are_refused():
    meta = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.tokens": ["a", "b"],
        "tokenizer.ggml.token_type": [1],
    }
    with pytest.raises(TokenizerError, match="1 token types for 2 tokens"):
        GGUFTokenizer(meta)
