"""GGUF gpt2-style BPE vocabulary -> a `tokenizers` Tokenizer with DeepSeek's pre-tokenizer; chat template.

The GGUF carries tokens, merges, token types, bos/eos ids, add_bos and (often) a jinja2 chat template.
`tokenizer.ggml.pre` names the pre-tokenizer; its splits are llama.cpp's (llama-vocab.cpp) and HF's
tokenizer.json for the same models.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4

# tokenizer.ggml.pre -> regex splits applied in order, each isolating its matches
PRE_TOKENIZER_SPLITS: dict[str, list[str]] = {
    "deepseek-v3": [
        r"\p{N}{1,3}",
        r"[一-龥぀-ゟ゠-ヿ]+",
        r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
        r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    ],
    "deepseek-llm": [
        r"[\r\n]",
        r"\s?[A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ-ჅᎠ-Ᏽᏸ-ᏽᲐ-ᲺᲽ-Ჿᴀ-ᴫᵫ-ᵷᵹ-ᶚḀ-ἕἘ-Ἕἠ-ὅὈ-Ὅὐ-ὗὙὛὝὟ-ώᾀ-ᾴᾶ-ᾼιῂ-ῄῆ-ῌῐ-ΐῖ-Ίῠ-Ῥῲ-ῴῶ-ῼℂℇℊ-ℓℕℙ-ℝℤΩℨK-ℭℯ-ℴℹℼ-ℿⅅ-ⅉⅎↃↄⰀ-ⱻⱾ-ⳤⳫ-ⳮⳲⳳꙀ-ꙭꚀ-ꚛꜢ-ꝯꝱ-ꞇꞋ-ꞎꭰ-ꮿﬀ-ﬆﬓ-ﬗＡ-Ｚａ-ｚ𐐀-𐑏𐒰-𐓓𐓘-𐓻𐲀-𐲲𐳀-𐳲𑢠-𑣟𞤀-𞥃]+",
        r"\s?[!-/:-~！-／：-～‘-‟　-。]+",
        r"\s+$",
        r"[一-龥ࠀ-一가-퟿]+",
        r"\p{N}+",
    ],
}


class TokenizerError(ValueError):
    """The GGUF's vocabulary cannot be turned into a tokenizer."""


def deepseek_pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    if pre not in PRE_TOKENIZER_SPLITS:
        raise TokenizerError(
            f"unsupported pre-tokenizer {pre!r} (supported: {', '.join(PRE_TOKENIZER_SPLITS)})"
        )
    splits = [pre_tokenizers.Split(Regex(p), behavior="isolated") for p in PRE_TOKENIZER_SPLITS[pre]]
    return pre_tokenizers.Sequence(
        [*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )


class GGUFTokenizer:
    def __init__(self, metadata: Mapping[str, Any]):
        model = metadata.get("tokenizer.ggml.model")
        if model != "gpt2":
            raise TokenizerError(f"unsupported tokenizer model {model!r}: deepseek2 files use 'gpt2' BPE")
        tokens: Sequence[str] = metadata["tokenizer.ggml.tokens"]
        types = list(metadata.get("tokenizer.ggml.token_type", [1] * len(tokens)))
        merges = [tuple(m.split(" ", 1)) for m in metadata.get("tokenizer.ggml.merges", [])]
        vocab = {tok: i for i, tok in enumerate(tokens)}
        self._tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
        self._tok.pre_tokenizer = deepseek_pre_tokenizer(
            str(metadata.get("tokenizer.ggml.pre", "deepseek-v3"))
        )
        self._tok.decoder = decoders.ByteLevel()
        special = [
            AddedToken(tokens[i], special=True, normalized=False)
            for i, kind in enumerate(types)
            if kind in (TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED)
        ]
        self._tok.add_special_tokens(special)
        self._special_ids = {
            i for i, kind in enumerate(types) if kind in (TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED)
        }
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
        """The bytes one token stands for (a piece of a UTF-8 character, for some); special tokens
        are their own text."""
        token = self._tokens[token_id]
        if token_id in self._special_ids or any(ch not in _BYTE_OF_CHAR for ch in token):
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
