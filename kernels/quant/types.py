"""The GGUF block types we decode: one row per ggml type, like ggml's `type_traits[]`.

A row names the type, its block geometry (values per block, bytes per block, both read from gguf's
GGML_QUANT_SIZES), where its fp16 scales sit in a block, and its two decoders:
- `decoder`: the Triton tile decoder in kernels/quant/decoders.py (one shared signature, see there),
  which the shared kernels (dequantize, linear, fused MoE, embedding gather) take as a tl.constexpr;
- `reference`: the pure-torch decoder in kernels/quant/reference.py, block bytes -> fp32 values,
  bit-exact with gguf's numpy `gguf.quants.dequantize`.
Both are looked up by name on first use, so this module imports neither torch nor triton: the driver
(runtime/, planner and inspect) reads sizes from it without a GPU stack.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType


@dataclass(frozen=True)
class QuantType:
    code: int  # ggml type code (gguf.GGMLQuantizationType value)
    name: str  # ggml's name: "Q4_K"
    block_elems: int  # values per block (1 for the plain float types)
    block_bytes: int  # bytes per block
    # byte offsets inside a block of the fp16 scales: the multiplier "d" first, then "dmin" / "m" (the
    # offset of types that subtract or add one); IQ1_M spreads its d over 4 nibbles (see random_blocks)
    fp16_fields: tuple[int, ...]
    has_table: bool  # reads a lookup table (IQ grids, signs, non-linear values): see tables.py
    has_kernel: bool = True  # a Triton decoder exists
    # bytes the GEMMs move their row pointer per block_elems values: block_bytes where the blocks are
    # stored whole (every ggml type); block_elems for a layout repacked into planes (kernels/quant/planes.py)
    pointer_step: int = 0
    # the one BLOCK_K its split decoder (fetch_<name> / convert_<name>) takes; 0: any the GEMMs pick
    fetch_block_k: int = 0

    @property
    def step_bytes(self) -> int:
        return self.pointer_step or self.block_bytes

    @property
    def decoder(self):
        """The Triton tile decoder (a triton.JITFunction): decode_<name> in decoders.py, or in
        split_decoders.py for a layout the loader repacks."""
        name = f"decode_{self.name.lower()}"
        module = importlib.import_module("mlapipe.kernels.quant.decoders")
        if not hasattr(module, name):
            module = importlib.import_module("mlapipe.kernels.quant.split_decoders")
        return getattr(module, name)

    @property
    def fetch(self):
        """For a decoder split into loads and register math (fetch_<name>, convert_<name>), the loads;
        else None. The GEMMs then load each step's bytes a step ahead (linear.prefetched_dot)."""
        module = importlib.import_module("mlapipe.kernels.quant.split_decoders")
        return getattr(module, f"fetch_{self.name.lower()}", None)

    @property
    def convert(self):
        module = importlib.import_module("mlapipe.kernels.quant.split_decoders")
        return getattr(module, f"convert_{self.name.lower()}", None)

    @property
    def reference(self):
        """The torch decoder: uint8 (nblocks, block_bytes) -> fp32 (nblocks, block_elems)."""
        module = importlib.import_module("mlapipe.kernels.quant.reference")
        return getattr(module, f"decode_{self.name.lower()}")


def _row(
    name: str, fp16_fields: tuple[int, ...], has_table: bool = False, fetch_block_k: int = 0
) -> QuantType:
    code = GGMLQuantizationType[name]
    elems, nbytes = GGML_QUANT_SIZES[code]
    return QuantType(int(code), name, elems, nbytes, fp16_fields, has_table, fetch_block_k=fetch_block_k)


# In the order the kernels were written (most used by DeepSeek GGUFs first), then the rest gguf decodes.
QUANT_TYPES: dict[int, QuantType] = {
    row.code: row
    for row in (
        _row("Q8_0", (0,)),
        _row("Q4_K", (0, 2), fetch_block_k=64),
        _row("Q6_K", (208,), fetch_block_k=64),
        _row("Q5_K", (0, 2), fetch_block_k=64),
        _row("Q2_K", (80, 82), fetch_block_k=64),
        _row("Q3_K", (108,), fetch_block_k=64),
        _row("Q4_0", (0,), fetch_block_k=64),
        _row("IQ4_XS", (0,), has_table=True),
        _row("IQ2_XXS", (0,), has_table=True),
        _row("IQ3_S", (0,), has_table=True),
        _row("IQ1_S", (0,), has_table=True),
        _row("Q4_1", (0, 2), fetch_block_k=64),
        _row("Q5_0", (0,), fetch_block_k=64),
        _row("Q5_1", (0, 2), fetch_block_k=64),
        _row("IQ4_NL", (0,), has_table=True, fetch_block_k=64),
        _row("IQ2_XS", (0,), has_table=True),
        _row("IQ2_S", (0,), has_table=True),
        _row("IQ3_XXS", (0,), has_table=True),
        _row("IQ1_M", (), has_table=True),
        _row("TQ1_0", (52,)),
        _row("TQ2_0", (64,)),
        _row("MXFP4", (), has_table=True),  # e8m0 scale byte, see random_blocks
        _row("NVFP4", (), has_table=True),  # four ue4m3 scale bytes
        _row("BF16", ()),
        _row("F16", ()),
        _row("F32", ()),
    )
}


# Layouts the loader repacks ggml blocks into on the device (lossless, the same bytes; not file types,
# so codes outside ggml's range): kernels/quant/planes.py. Q8_0_PLANES: groups of 16 rows, quants then
# scales, so the GEMMs read 16-byte-aligned runs of int8 (kernels/NOTES-quant.md, v4).
Q8_0_PLANES = 4096 + int(GGMLQuantizationType.Q8_0)
REPACKED_TYPES: dict[int, QuantType] = {
    Q8_0_PLANES: QuantType(Q8_0_PLANES, "Q8_0_PLANES", 32, 34, (), False, pointer_step=32),
}


def quant_type(qtype: int) -> QuantType:
    """The table row of a ggml type code (or a repacked layout); a one-line error for a type we cannot
    decode."""
    row = QUANT_TYPES.get(int(qtype)) or REPACKED_TYPES.get(int(qtype))
    if row is None:
        try:
            name = GGMLQuantizationType(int(qtype)).name
        except ValueError:
            name = f"code {int(qtype)}"
        known = ", ".join(r.name for r in QUANT_TYPES.values())
        raise ValueError(f"quant type {name} has no block decoder (decodable: {known})")
    return row


def has_kernel(qtype: int) -> bool:
    """Whether the type has a Triton decoder (otherwise the loader keeps the tensor in bf16)."""
    row = QUANT_TYPES.get(int(qtype)) or REPACKED_TYPES.get(int(qtype))
    return row is not None and row.has_kernel


def row_bytes(qtype: int, cols: int) -> int:
    """Bytes of one row of `cols` values (cols must be a whole number of blocks)."""
    row = quant_type(qtype)
    if cols % row.block_elems:
        raise ValueError(f"{row.name} rows hold multiples of {row.block_elems} values, not {cols}")
    return cols // row.block_elems * row.block_bytes


def nbytes(qtype: int, shape: tuple[int, ...]) -> int:
    """Bytes of a tensor of logical torch-order shape (*lead, cols) stored as `qtype` blocks."""
    return math.prod(shape[:-1]) * row_bytes(qtype, shape[-1])
