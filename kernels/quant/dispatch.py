"""What the shared quantized kernels need of a type: its Triton tile decoder, the smallest K tile it
decodes, its lookup table on the device, its torch reference decoder; and the dtype tl.dot runs in."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton.language as tl

from mlapipe.kernels.quant import _q8_0_stub


@dataclass(frozen=True)
class KernelType:
    name: str
    block_elems: int
    block_bytes: int
    tile_k: int  # smallest K tile the decoder handles (BLOCK_K is a multiple of it)
    decode: object  # @triton.jit (w_ptr, rows, row_bytes, k0, BLOCK_K, table_ptr) -> fp32 (rows, BLOCK_K)
    dequantize: object  # torch: (uint8 (..., row_bytes), cols) -> fp32 (..., cols)


def quant_type(qtype: int) -> KernelType:
    entry = _q8_0_stub.TYPES.get(int(qtype))
    if entry is None:
        raise ValueError(f"no quantized kernel for ggml type {qtype}")
    return KernelType(entry.name, entry.block_elems, entry.block_bytes, 32, entry.decode, entry.dequantize)


def table_of(qtype: int, device: torch.device) -> torch.Tensor:
    """The type's decode table on device; a 1-byte dummy for types without one (never read)."""
    return torch.zeros(1, dtype=torch.uint8, device=device)


def compute_dtype(activation_dtype: torch.dtype):
    """bf16 activations: bf16 tensor-core dots (weights rounded to bf16, as dequantize-on-load does);
    anything else: fp32 dots with IEEE products, so results match the fp32 reference within rounding."""
    return tl.bfloat16 if activation_dtype == torch.bfloat16 else tl.float32


def dequantize(w, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Torch reference decode of a QuantTensor to its logical shape."""
    return quant_type(w.qtype).dequantize(w.data, w.shape[-1]).reshape(w.shape).to(dtype)


def kernel_types() -> list[int]:
    """ggml type codes the shared kernels can decode."""
    return sorted(_q8_0_stub.TYPES)
