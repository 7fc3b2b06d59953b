"""What the shared quantized GEMMs need of a type (kernels/quant/types.py's row, its decoder and table),
and the dtype their tl.dot runs in."""

from __future__ import annotations

import os

import torch
import triton.language as tl

from mlapipe.kernels.quant import dequantize as _dequantize
from mlapipe.kernels.quant import tables
from mlapipe.kernels.quant.types import QUANT_TYPES, QuantType, quant_type

MIN_TILE_K = 32  # the decoders' smallest BLOCK_K; the GEMMs' reduction dim is a multiple of it
GPU_BLOCK_K = 64  # the GEMMs' widest reduction step on a GPU (the interpreter takes 256: it pays per call)
BLOCK_K_ENV = "MLAPIPE_QUANT_BLOCK_K"  # overrides it (sweeps; a different step can change the bits)
PREFETCH_ENV = "MLAPIPE_QUANT_PREFETCH"  # "0": split decoders run whole, no step-ahead loads (sweeps)


def kernel_type(qtype: int) -> QuantType:
    """The type's row, with a one-line error when it has no Triton decoder."""
    row = quant_type(qtype)
    if not row.has_kernel:
        raise ValueError(f"quant type {row.name} has no Triton decoder for the quantized GEMMs")
    return row


def largest_block_k(interpreted: bool, *kinds: QuantType) -> int:
    """The widest BLOCK_K a GEMM over weights of `kinds` may plan: no wider than a split decoder takes."""
    widest = 256 if interpreted else int(os.environ.get(BLOCK_K_ENV, GPU_BLOCK_K))
    for kind in kinds:
        if split_decoder(kind)[0] is not None and kind.fetch_block_k:
            widest = min(widest, kind.fetch_block_k)
    return widest


def split_decoder(kind: QuantType, block_k: int | None = None):
    """(fetch, convert) of a decoder split into loads and register math, for the GEMMs to load a step
    ahead (linear.prefetched_dot), when it takes tiles of block_k values; (None, None) otherwise."""
    if os.environ.get(PREFETCH_ENV) == "0" or kind.fetch is None:
        return None, None
    if block_k is not None and kind.fetch_block_k not in (0, block_k):
        return None, None
    return kind.fetch, kind.convert


def kernel_types() -> list[int]:
    """ggml type codes the shared GEMMs can decode, in the table's order."""
    return [code for code, row in QUANT_TYPES.items() if row.has_kernel]


def table_of(qtype: int, device: torch.device) -> torch.Tensor:
    return tables.device_table(qtype, device)


def compute_dtype(activation_dtype: torch.dtype):
    """bf16 activations: bf16 tensor-core dots (weights rounded to bf16, as dequantize-on-load does);
    anything else: fp32 dots with IEEE products, so results match the fp32 reference within rounding."""
    return tl.bfloat16 if activation_dtype == torch.bfloat16 else tl.float32


def dequantize(w, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Torch reference decode of a QuantTensor to its logical shape (bit-exact with gguf's numpy)."""
    return _dequantize.dequantize_reference(w, dtype)


def dequantize_on_device(w, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The Triton whole-tensor dequantization (kernels/quant/dequantize.py)."""
    return _dequantize.dequantize(w, dtype)
