"""Which ggml tensor types load, and how an unloadable one is named in the error.

Loadable: every type `gguf`'s quants module dequantizes (F32/F16 natively), so every block layout is
decoded by gguf's own code (bit-exact with ggml). Type codes that only ik_llama.cpp defines (its
IQ*_K / IQ*_KS / IQ*_KT trellis types and the _R4/_R8 row-interleaved repacks, ggml.h of
ik_llama.cpp) are named so the error can say the file is ik_llama.cpp-specific (gguf's own reader
raises a bare ValueError on them; runtime/gguf_check.py reports them through `type_problem`).
"""

from __future__ import annotations

from gguf import GGMLQuantizationType as Q

SUPPORTED_TYPES = frozenset(
    getattr(Q, name)
    for name in [
        *("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"),
        *("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"),
        *("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_NL", "IQ4_XS"),
        *("TQ1_0", "TQ2_0", "MXFP4", "NVFP4"),
    ]
    if hasattr(Q, name)  # NVFP4 is in newer gguf releases only
)

# ik_llama.cpp's ggml_type codes that mainline ggml / gguf do not define (ik_llama.cpp ggml/include/ggml.h)
IK_ONLY_TYPES = {
    31: "Q4_0_4_4", 32: "Q4_0_4_8", 33: "Q4_0_8_8", 36: "I2_S",
    97: "Q8_0_X4", 98: "Q8_1_X4", 99: "Q8_2_X4", 133: "Q6_0", 134: "IQ1_BN", 135: "IQ2_BN",
    136: "Q8_K64", 137: "IQ2_K", 138: "IQ3_K", 139: "IQ4_K", 140: "IQ5_K", 141: "IQ6_K",
    144: "IQ4_KS", 145: "IQ2_KS", 146: "IQ4_KSS", 147: "Q8_K16", 148: "Q8_K32", 149: "Q8_KR8",
    150: "Q8_K128", 151: "Q8_KV", 152: "IQ5_KS", 153: "IQ2_KT", 154: "IQ3_KT", 155: "IQ4_KT",
    156: "IQ3_KS", 157: "IQ2_KL", 158: "IQ1_KT",
    202: "Q4_0_R8", 206: "Q5_0_R4", 208: "Q8_0_R8", 210: "Q2_K_R4", 211: "Q3_K_R4", 212: "Q4_K_R4",
    213: "Q5_K_R4", 214: "Q6_K_R4", 216: "IQ2_XXS_R4", 217: "IQ2_XS_R4", 218: "IQ3_XXS_R4",
    219: "IQ1_S_R4", 220: "IQ4_NL_R4", 221: "IQ3_S_R4", 222: "IQ2_S_R4", 223: "IQ4_XS_R8",
    229: "IQ1_M_R4", 230: "BF16_R16", 233: "Q6_0_R4", 335: "IQ2_BN_R4", 337: "IQ2_K_R4",
    338: "IQ3_K_R4", 339: "IQ4_K_R4", 340: "IQ5_K_R4", 344: "IQ4_KS_R4", 352: "IQ5_KS_R4",
    353: "MXFP4_R8", 397: "Q8_K_R16", 398: "Q8_KV_R8", 399: "Q8_K_R8",
}  # fmt: skip


def type_problem(tensor: str, code: int) -> str | None:
    """None if tensors of this ggml type code load; else the error text (without the file name)."""
    if code in IK_ONLY_TYPES:
        return (
            f"tensor {tensor!r} has type {IK_ONLY_TYPES[code]} (ggml type {code}), which only ik_llama.cpp "
            "defines: this file is ik_llama.cpp-specific; use a file quantized with mainline llama.cpp types"
        )
    try:
        qtype = Q(code)
    except ValueError:
        return f"tensor {tensor!r} has unknown ggml type code {code}"
    if qtype not in SUPPORTED_TYPES:
        supported = ", ".join(sorted(q.name for q in SUPPORTED_TYPES))
        return f"tensor {tensor!r} has unsupported type {qtype.name} (supported: {supported})"
    return None
