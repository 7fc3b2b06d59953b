"""Weight-type recipes: which GGML type each tensor of a model gets, as data, under GGUF tensor names.

A recipe describes a file the way its release name does ("UD-Q2_K_XL", "Q4_K_M", or one type for every
matrix, "Q8_0"), so the same recipe makes random weights of a named shape on the device and describes
what a real file of that kind holds (the planner sizes both the same way). Rules are tried in order,
the first whose pattern matches the GGUF name wins; norms, the router and its bias are F32 in every
recipe, as llama.cpp's quantize keeps them.

A row whose length K is not a multiple of the chosen type's block (V2-Lite's experts have K = 1408, not
a multiple of 256) gets llama.cpp's fallback type, as `llama_tensor_get_type` in src/llama-quant.cpp
picks it: K-quants and i-quants of 256 go to a 32-block type, and F16 if even that does not divide K.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

Q = GGMLQuantizationType

# llama.cpp's fallback for rows its block does not divide (src/llama-quant.cpp, convert_incompatible_tensor)
FALLBACK = {
    Q.IQ2_XXS: Q.IQ4_NL,
    Q.IQ2_XS: Q.IQ4_NL,
    Q.IQ2_S: Q.IQ4_NL,
    Q.IQ3_XXS: Q.IQ4_NL,
    Q.IQ3_S: Q.IQ4_NL,
    Q.IQ1_S: Q.IQ4_NL,
    Q.IQ1_M: Q.IQ4_NL,
    Q.Q2_K: Q.IQ4_NL,
    Q.Q3_K: Q.IQ4_NL,
    Q.IQ4_XS: Q.IQ4_NL,
    Q.Q4_K: Q.Q5_0,
    Q.Q5_K: Q.Q5_1,
    Q.Q6_K: Q.Q8_0,
}

# Always F32, whatever the recipe: 1-D tensors and the router (routing is a discrete choice).
F32_PATTERN = r"(_norm\.weight|ffn_gate_inp\.weight|exp_probs_b\.bias)$"


@dataclass(frozen=True)
class Rule:
    pattern: str  # regex searched in the GGUF tensor name
    qtype: str  # GGML type name
    layers: str | None = None  # "more_bits": only llama.cpp's use_more_bits layers (else the rule is skipped)


@dataclass(frozen=True)
class Recipe:
    name: str
    rules: tuple[Rule, ...]
    description: str = ""

    def type_for(self, gguf_name: str, cols: int, layer: int | None, num_layers: int) -> Q:
        """The tensor's GGML type: the first matching rule's, then the fallback if its block does not
        divide the row length `cols` (K)."""
        if re.search(F32_PATTERN, gguf_name):
            return Q.F32
        for rule in self.rules:
            if not re.search(rule.pattern, gguf_name):
                continue
            if rule.layers == "more_bits" and (layer is None or not use_more_bits(layer, num_layers)):
                continue
            return compatible_type(Q[rule.qtype], cols)
        raise ValueError(f"recipe {self.name}: no rule for tensor {gguf_name!r}")


def use_more_bits(layer: int, num_layers: int) -> bool:
    """llama.cpp's choice of layers that get more bits (first and last eighth, every third between)."""
    return layer < num_layers // 8 or layer >= 7 * num_layers // 8 or (layer - num_layers // 8) % 3 == 2


def compatible_type(qtype: Q, cols: int) -> Q:
    if cols % GGML_QUANT_SIZES[qtype][0] == 0:
        return qtype
    fallback = FALLBACK.get(qtype, Q.F16)
    return fallback if cols % GGML_QUANT_SIZES[fallback][0] == 0 else Q.F16


def uniform(qtype: str) -> Recipe:
    """One type for every matrix (llama.cpp's --pure): what `--wtype q8_0` means."""
    return Recipe(qtype.upper(), (Rule(".", qtype.upper()),), f"every matrix {qtype.upper()}")


ROUTED_GATE_UP = r"ffn_(gate|up)_exps\."
ROUTED_DOWN = r"ffn_down_exps\."
SHARED = r"ffn_(gate|up|down)_shexp\."
DENSE_FFN = r"ffn_(gate|up|down)\."
ATTN_PROJ = r"attn_(q|q_a|q_b|kv_a_mqa|output)\."
ATTN_UP = r"attn_(kv_b|k_b|v_b)\."  # the MLA up-projections (absorbed W_UK / W_UV)

# Everything but the routed experts, shared by unsloth-style UD mixes.
_UD_NON_ROUTED = (
    Rule(SHARED, "Q6_K"),
    Rule(DENSE_FFN, "Q6_K"),
    Rule(ATTN_UP, "Q8_0"),
    Rule(ATTN_PROJ, "Q4_K"),
    Rule(r"^token_embd\.", "Q4_K"),
    Rule(r"^output\.", "Q6_K"),
)

RECIPES = {
    r.name.upper(): r
    for r in (
        Recipe(
            "UD-Q2_K_XL",
            (Rule(ROUTED_GATE_UP, "Q2_K"), Rule(ROUTED_DOWN, "Q3_K"), *_UD_NON_ROUTED),
            "like unsloth's DeepSeek-R1 UD-Q2_K_XL: routed gate/up Q2_K, down Q3_K, shared and dense FFN "
            "Q6_K, attention Q4_K, attn_k_b/v_b Q8_0, embedding Q4_K, output Q6_K",
        ),
        Recipe(
            "UD-IQ2_XXS",
            (Rule(r"ffn_(gate|up|down)_exps\.", "IQ2_XXS"), *_UD_NON_ROUTED),
            "routed experts IQ2_XXS, the rest as UD-Q2_K_XL",
        ),
        Recipe(
            "Q4_K_M",
            (
                Rule(ROUTED_GATE_UP, "Q4_K"),
                Rule(ROUTED_DOWN, "Q6_K", layers="more_bits"),
                Rule(ROUTED_DOWN, "Q4_K"),
                Rule(SHARED, "Q6_K"),
                Rule(DENSE_FFN, "Q6_K"),
                Rule(ATTN_UP, "Q8_0"),
                Rule(ATTN_PROJ, "Q6_K"),
                Rule(r"^token_embd\.", "Q4_K"),
                Rule(r"^output\.", "Q6_K"),
            ),
            "like DeepSeek-V3-0324 Q4_K_M: routed experts Q4_K (down Q6_K in llama.cpp's more-bits "
            "layers), attention and shared experts Q6_K, attn_k_b/v_b Q8_0, embedding Q4_K, output Q6_K",
        ),
    )
}

TYPE_NAMES = frozenset(t.name for t in Q)


def recipe_by_name(name: str) -> Recipe:
    """A named recipe, or a GGML type name (any case) meaning that type for every matrix."""
    key = name.upper()
    if key in RECIPES:
        return RECIPES[key]
    if key in TYPE_NAMES and key in {t.name for t in GGML_QUANT_SIZES}:
        return uniform(key)
    raise ValueError(
        f"unknown weight type or recipe {name!r}: a GGML type (q8_0, q4_k, bf16, ...) or one of "
        f"{', '.join(r.name for r in RECIPES.values())}"
    )


def tensor_bytes(qtype: Q, shape: tuple[int, ...]) -> int:
    """Bytes of a tensor of torch-order `shape` stored as `qtype` (rows of whole blocks)."""
    block_elems, block_bytes = GGML_QUANT_SIZES[qtype]
    count = 1
    for d in shape:
        count *= d
    if shape[-1] % block_elems:
        raise ValueError(f"a row of {shape[-1]} values is not whole {qtype.name} blocks of {block_elems}")
    return count // block_elems * block_bytes
