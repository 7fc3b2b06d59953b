"""GGUF gpt2-style BPE vocabulary -> a `tokenizers` Tokenizer with DeepSeek's pre-tokenizer; chat template.

The GGUF carries tokens, merges, token types, bos/eos ids, add_bos and (often) a jinja2 chat template.
`tokenizer.ggml.pre` names the pre-tokenizer. Its regexes are llama.cpp's (src/llama-vocab.cpp), which
are the Split patterns of DeepSeek's own tokenizer.json; each regex splits every piece the previous ones
left, keeping both its matches and the text between them (HF's `Isolated`, llama.cpp's
unicode_regex_split), then the pieces are byte-level encoded and BPE-merged.

The patterns are written with \\u / \\U escapes only: they hold characters (U+1F7D, U+212A KELVIN SIGN,
...) that Unicode normalization rewrites into others, which silently turns ranges into empty ones.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from tokenizers import Regex, Tokenizer, pre_tokenizers

# llama.cpp's llama_token_type / gguf.TokenType
TOKEN_TYPE_NORMAL = 1
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4

# tokenizer.ggml.pre -> regex splits applied in order (llama-vocab.cpp, byte for byte)
PRE_TOKENIZER_SPLITS: dict[str, list[str]] = {
    # LLAMA_VOCAB_PRE_TYPE_DEEPSEEK3_LLM: DeepSeek-V3, R1
    "deepseek-v3": [
        "\\p{N}{1,3}",
        "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
        "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+"
        "| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+",
    ],
    # LLAMA_VOCAB_PRE_TYPE_DEEPSEEK_LLM: DeepSeek-V2, V2-Lite (the cased-letter class below is a list of
    # Latin, Greek, Coptic, Cyrillic, Armenian, Georgian, Cherokee, ... letter ranges)
    "deepseek-llm": [
        "[\r\n]",
        "\\s?[A-Za-z\u00b5\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af"
        "\u0370-\u0373\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1\u03a3-\u03f5"
        "\u03f7-\u0481\u048a-\u052f\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5\u13f8-\u13fd\u1c90-\u1cba"
        "\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45"
        "\u1f48-\u1f4d\u1f50-\u1f57\u1f59\u1f5b\u1f5d\u1f5f-\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe"
        "\u1fc2-\u1fc4\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc"
        "\u2102\u2107\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128\u212a-\u212d\u212f-\u2134\u2139"
        "\u213c-\u213f\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee\u2cf2\u2cf3"
        "\ua640-\ua66d\ua680-\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf\ufb00-\ufb06"
        "\ufb13-\ufb17\uff21-\uff3a\uff41-\uff5a\U00010400-\U0001044f\U000104b0-\U000104d3"
        "\U000104d8-\U000104fb\U00010c80-\U00010cb2\U00010cc0-\U00010cf2\U000118a0-\U000118df"
        "\U0001e900-\U0001e943]+",
        "\\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+",
        "\\s+$",
        "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+",
        "\\p{N}+",
    ],
}


class TokenizerError(ValueError):
    """The GGUF's vocabulary cannot be turned into a tokenizer."""


def pre_tokenizer_spec(pre: str) -> dict[str, Any]:
    """The tokenizer.json `pre_tokenizer` entry DeepSeek's own files carry for `pre`."""
    if pre not in PRE_TOKENIZER_SPLITS:
        raise TokenizerError(
            f"unsupported pre-tokenizer {pre!r} (supported: {', '.join(PRE_TOKENIZER_SPLITS)})"
        )
    splits = [
        {"type": "Split", "pattern": {"Regex": p}, "behavior": "Isolated", "invert": False}
        for p in PRE_TOKENIZER_SPLITS[pre]
    ]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}
    return {"type": "Sequence", "pretokenizers": [*splits, byte_level]}


def deepseek_pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    spec = pre_tokenizer_spec(pre)
    splits = [
        pre_tokenizers.Split(Regex(s["pattern"]["Regex"]), behavior="isolated")
        for s in spec["pretokenizers"][:-1]
    ]
    return pre_tokenizers.Sequence(
        [*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )


def tokenizer_from_vocab(
    tokens: Sequence[str], types: Sequence[int], merges: Sequence[str], pre: str
) -> Tokenizer:
    """The `tokenizers` Tokenizer for a GGUF vocabulary, laid out as HF's tokenizer.json is: BPE over the
    byte-level tokens, CONTROL tokens as special added tokens (dropped by decode unless asked for) and
    USER_DEFINED ones (`<think>`, ...) as plain added tokens, matched whole in the text and decoded as
    written, as HF and llama.cpp render them."""
    added = {TOKEN_TYPE_CONTROL: True, TOKEN_TYPE_USER_DEFINED: False}
    spec = {
        "version": "1.0",
        "added_tokens": [
            {
                "id": i,
                "content": tok,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": added[kind],
            }
            for i, (tok, kind) in enumerate(zip(tokens, types))
            if kind in added
        ],
        "normalizer": None,
        "pre_tokenizer": pre_tokenizer_spec(pre),
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            # every token, added ones too: `tokenizers` gives an added token the id its text has here
            "vocab": {tok: i for i, tok in enumerate(tokens)},
            "merges": [m.split(" ", 1) for m in merges],
        },
    }
    try:
        return Tokenizer.from_str(json.dumps(spec))
    except Exception as e:  # tokenizers raises plain Exceptions with the Rust message
        raise TokenizerError(f"cannot build the tokenizer: {e}") from None


class GGUFTokenizer:
    def __init__(self, metadata: Mapping[str, Any]):
        model = metadata.get("tokenizer.ggml.model")
        if model != "gpt2":
            raise TokenizerError(f"unsupported tokenizer model {model!r}: deepseek2 files use 'gpt2' BPE")
        tokens: Sequence[str] = metadata["tokenizer.ggml.tokens"]
        types = [int(t) for t in metadata.get("tokenizer.ggml.token_type", [TOKEN_TYPE_NORMAL] * len(tokens))]
        if len(types) != len(tokens):
            raise TokenizerError(f"{len(types)} token types for {len(tokens)} tokens")
        self._tok = tokenizer_from_vocab(
            tokens,
            types,
            list(metadata.get("tokenizer.ggml.merges", [])),
            str(metadata.get("tokenizer.ggml.pre", "deepseek-v3")),
        )
        added = (TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED)  # written as text, not byte-level
        self._added_ids = {i for i, kind in enumerate(types) if kind in added}
        self.vocab_size = len(tokens)
        self.bos_token_id = _optional_int(metadata.get("tokenizer.ggml.bos_token_id"))
        self.eos_token_id = _optional_int(metadata.get("tokenizer.ggml.eos_token_id"))
        self.add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", self.bos_token_id is not None))
        self.chat_template = metadata.get("tokenizer.chat_template")
        self._tokens = tokens

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_token_id is not None:
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_text(self, token_id: int) -> str:
        return self._tokens[token_id]

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for (a piece of a UTF-8 character, for some); added tokens
        (control, user-defined) are their own text."""
        token = self._tokens[token_id]
        if token_id in self._added_ids or any(ch not in _BYTE_OF_CHAR for ch in token):
            return token.encode()
        return bytes(_BYTE_OF_CHAR[ch] for ch in token)

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise TokenizerError("this model file has no chat template (tokenizer.chat_template)")
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        template = env.from_string(self.chat_template)
        bos = self._tokens[self.bos_token_id] if self.bos_token_id is not None else ""
        eos = self._tokens[self.eos_token_id] if self.eos_token_id is not None else ""
        return template.render(
            messages=messages, add_generation_prompt=add_generation_prompt, bos_token=bos, eos_token=eos
        )

    def encode_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
        """The chat template's text as token ids. The template writes bos_token itself, so add_bos is not
        applied on top (a second BOS), as transformers' apply_chat_template(tokenize=True) does."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt), add_bos=False)


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet, inverted: the character each byte is written as in the
    vocabulary -> the byte (printable Latin-1 bytes stand for themselves, the others from U+0100 up)."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = [b for b in range(256) if b not in printable]
    return {chr(b): b for b in printable} | {chr(0x100 + i): b for i, b in enumerate(others)}


_BYTE_OF_CHAR = _byte_level_alphabet()  # a constant table, built once


def _optional_int(value: Any) -> int | None:
    return None if value is None else int(value)
