"""HF `tokenizers` reference for DeepSeek vocabularies, built the way DeepSeek's own tokenizer.json files
are laid out (a Sequence of Isolated Split pre-tokenizers + ByteLevel, a ByteLevel decoder, BPE without
byte fallback, CONTROL tokens as special added tokens and user-defined ones as plain added tokens).

Nothing here comes from runtime/tokenizer.py: the patterns are rebuilt from code point tables and
checked against SHA-256 digests of the strings in llama.cpp's src/llama-vocab.cpp
(LLAMA_VOCAB_PRE_TYPE_DEEPSEEK_LLM and LLAMA_VOCAB_PRE_TYPE_DEEPSEEK3_LLM), so a regex that differs
from llama.cpp's by one code point, or is Unicode-normalized anywhere, fails the digest.
"""

from __future__ import annotations

import hashlib
import json

from mlapipe.runtime.gguf_writer import Vocab

CONTROL, USER_DEFINED = 3, 4  # llama.cpp's token types (gguf.TokenType)

# deepseek-llm's cased-letter class after "A-Za-z": a code point, or an inclusive (first, last) range
_DEEPSEEK_LLM_LETTERS = [
    0xB5, (0xC0, 0xD6), (0xD8, 0xF6), (0xF8, 0x1BA), (0x1BC, 0x1BF), (0x1C4, 0x293), (0x295, 0x2AF),
    (0x370, 0x373), 0x376, 0x377, (0x37B, 0x37D), 0x37F, 0x386, (0x388, 0x38A), 0x38C, (0x38E, 0x3A1),
    (0x3A3, 0x3F5), (0x3F7, 0x481), (0x48A, 0x52F), (0x531, 0x556), (0x10A0, 0x10C5), (0x13A0, 0x13F5),
    (0x13F8, 0x13FD), (0x1C90, 0x1CBA), (0x1CBD, 0x1CBF), (0x1D00, 0x1D2B), (0x1D6B, 0x1D77),
    (0x1D79, 0x1D9A), (0x1E00, 0x1F15), (0x1F18, 0x1F1D), (0x1F20, 0x1F45), (0x1F48, 0x1F4D),
    (0x1F50, 0x1F57), 0x1F59, 0x1F5B, 0x1F5D, (0x1F5F, 0x1F7D), (0x1F80, 0x1FB4), (0x1FB6, 0x1FBC), 0x1FBE,
    (0x1FC2, 0x1FC4), (0x1FC6, 0x1FCC), (0x1FD0, 0x1FD3), (0x1FD6, 0x1FDB), (0x1FE0, 0x1FEC),
    (0x1FF2, 0x1FF4), (0x1FF6, 0x1FFC), 0x2102, 0x2107, (0x210A, 0x2113), 0x2115, (0x2119, 0x211D), 0x2124,
    0x2126, 0x2128, (0x212A, 0x212D), (0x212F, 0x2134), 0x2139, (0x213C, 0x213F), (0x2145, 0x2149), 0x214E,
    0x2183, 0x2184, (0x2C00, 0x2C7B), (0x2C7E, 0x2CE4), (0x2CEB, 0x2CEE), 0x2CF2, 0x2CF3, (0xA640, 0xA66D),
    (0xA680, 0xA69B), (0xA722, 0xA76F), (0xA771, 0xA787), (0xA78B, 0xA78E), (0xAB70, 0xABBF),
    (0xFB00, 0xFB06), (0xFB13, 0xFB17), (0xFF21, 0xFF3A), (0xFF41, 0xFF5A), (0x10400, 0x1044F),
    (0x104B0, 0x104D3), (0x104D8, 0x104FB), (0x10C80, 0x10CB2), (0x10CC0, 0x10CF2), (0x118A0, 0x118DF),
    (0x1E900, 0x1E943),
]  # fmt: skip


def _char_class(items) -> str:
    return "".join(f"{chr(i[0])}-{chr(i[1])}" if isinstance(i, tuple) else chr(i) for i in items)


CR, LF = chr(0x0D), chr(0x0A)  # llama.cpp's patterns hold these characters themselves, not \r \n
SPLITS = {
    "deepseek-llm": [
        f"[{CR}{LF}]",
        "\\s?[A-Za-z" + _char_class(_DEEPSEEK_LLM_LETTERS) + "]+",
        "\\s?[!-/:-~"
        + _char_class([(0xFF01, 0xFF0F), (0xFF1A, 0xFF5E), (0x2018, 0x201F), (0x3000, 0x3002)])
        + "]+",
        "\\s+$",
        "[" + _char_class([(0x4E00, 0x9FA5), (0x800, 0x4E00), (0xAC00, 0xD7FF)]) + "]+",
        "\\p{N}+",
    ],
    "deepseek-v3": [
        "\\p{N}{1,3}",
        "[" + _char_class([(0x4E00, 0x9FA5), (0x3040, 0x309F), (0x30A0, 0x30FF)]) + "]+",
        "|".join(
            [
                "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+",
                f"[^{CR}{LF}\\p{{L}}\\p{{P}}\\p{{S}}]?[\\p{{L}}\\p{{M}}]+",
                f" ?[\\p{{P}}\\p{{S}}]+[{CR}{LF}]*",
                f"\\s*[{CR}{LF}]+",
                "\\s+(?!\\S)",
                "\\s+",
            ]
        ),
    ],
}

# sha256 of each pattern's UTF-8 bytes as llama.cpp's compiler sees the C string literals
LLAMA_CPP_SHA256 = {
    "deepseek-llm": [
        "5cada29124805d8e0454dc5b67225bbf87075cffd53418e9c56f674708220e2c",
        "38fd0b5eb7e66ecf05e5e89dd0272208b64a6d60fa009c4ea1be70e7b7e739d5",
        "ae6bc1cffa8363b9fcbc8425375b51beb4782b93c6bcc35129ad95e41974f239",
        "16f72e393af534b9e1af2f1521e289e7426a51f3a48f9ec1c1e8f8ddef318006",
        "a9e31f463e1bd653c3d89fb26abc9a610b23eb0447b1bfcac71c7949e72583e4",
        "c2254b6cf31ca13417a2e7f5fc091323e7e10cc201cc23c2fdd4d9b251983962",
    ],
    "deepseek-v3": [
        "37eeaf14e325fd50c91d4af3b63ab2b18738486e4ad64c66d0b5777032e9e9a9",
        "b17444129c80d563051e7b293e0a93351a65cd7722d7008bcdeecadbf02d12b3",
        "c903ee638e48e525ed7aefd8bcf804c5a88b80358403017a36f52702360a031c",
    ],
}


def sha256(pattern: str) -> str:
    return hashlib.sha256(pattern.encode("utf-8")).hexdigest()


def pre_tokenizer_json(pre: str) -> dict:
    return {
        "type": "Sequence",
        "pretokenizers": [
            *(
                {"type": "Split", "pattern": {"Regex": p}, "behavior": "Isolated", "invert": False}
                for p in SPLITS[pre]
            ),
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        ],
    }


def tokenizer_json(vocab: Vocab) -> str:
    """tokenizer.json text for `vocab`, as DeepSeek's HF repositories lay it out."""
    added = {CONTROL: True, USER_DEFINED: False}
    return json.dumps(
        {
            "version": "1.0",
            "truncation": None,
            "padding": None,
            "added_tokens": [
                {"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                 "normalized": True, "special": added[k]}
                for i, (t, k) in enumerate(zip(vocab.tokens, vocab.token_types))
                if k in added
            ],
            "normalizer": {"type": "Sequence", "normalizers": []},
            "pre_tokenizer": pre_tokenizer_json(vocab.pre),
            "post_processor": None,
            "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
            "model": {
                "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                "vocab": {t: i for i, t in enumerate(vocab.tokens)},
                "merges": [m.split(" ", 1) for m in vocab.merges],
            },
        }
    )  # fmt: skip


def hf_tokenizer(vocab: Vocab):
    from tokenizers import Tokenizer

    return Tokenizer.from_str(tokenizer_json(vocab))
