"""Random GGUF blocks for the quantized kernel tests: gguf's own quantizer where it has one, else random
bits with sane fp16 scales (random bits there could be inf/NaN), so decoded values stay finite."""

from __future__ import annotations

import gguf
import numpy as np
import torch

from mlapipe.kernels.quant.tensor import QuantTensor

Q = gguf.GGMLQuantizationType
# Byte offsets of each block's fp16 scales ("d", "dmin").
FP16_FIELDS = {
    Q.Q8_0: (0,), Q.Q4_0: (0,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,), Q.Q2_K: (80, 82),
    Q.Q3_K: (108,), Q.IQ4_XS: (0,), Q.IQ2_XXS: (0,), Q.IQ3_S: (0,), Q.IQ1_S: (0,),
}  # fmt: skip


def random_blocks(qtype: int, rows: int, cols: int, rng: np.random.Generator, scale: float) -> np.ndarray:
    """uint8 (rows, row_bytes) of valid blocks whose decoded values are roughly `scale` in size."""
    qtype = Q(qtype)
    try:
        values = (rng.standard_normal((rows, cols)) * scale).astype(np.float32)
        return gguf.quants.quantize(values, qtype)
    except NotImplementedError:
        block_elems, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
        raw = rng.integers(0, 256, (rows, cols // block_elems, block_bytes), dtype=np.uint8)
        for offset in FP16_FIELDS[qtype]:
            # tiny, ordinary and negative scales; all decode to finite values of about `scale`
            d = rng.choice([scale / 64, scale / 300, -scale / 300, scale * 1e-4], (rows, cols // block_elems))
            raw[:, :, offset : offset + 2] = d.astype(np.float16).view(np.uint8).reshape(rows, -1, 2)
        return raw.reshape(rows, -1)


def random_quant(qtype: int, shape: tuple[int, ...], rng: np.random.Generator, scale: float) -> QuantTensor:
    """A QuantTensor of logical shape (*lead, rows, cols) on the CPU."""
    rows = int(np.prod(shape[:-1]))
    raw = random_blocks(qtype, rows, shape[-1], rng, scale)
    data = torch.from_numpy(raw.copy()).reshape(*shape[:-1], raw.shape[-1])
    return QuantTensor(data, int(qtype), tuple(shape))
