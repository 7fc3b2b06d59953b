"""Pure-torch block decoders, one per type: uint8 (nblocks, block_bytes) -> fp32 (nblocks, block_elems).

Each is a transcription of gguf's numpy `dequantize_blocks` (gguf/quants.py) into torch with the same
fp32 operations in the same order, so the results are bit-identical to `gguf.quants.dequantize`; block
layouts follow ggml-common.h (the Triton decoders in decoders.py describe them). They run on any device
(the random-weight generator calibrates with them on the GPU). Integer fields are widened to int32 /
int64 before shifting (torch's uint16/uint32 have few ops), which changes no value.
"""

from __future__ import annotations

import torch
from gguf import GGMLQuantizationType as Q

from mlapipe.kernels.quant import tables
from mlapipe.kernels.quant.types import Q8_0_PLANES, quant_type

QK_K = 256


def dequantize_rows(data: torch.Tensor, qtype: int) -> torch.Tensor:
    """uint8 (..., row_bytes) rows of `qtype` blocks -> fp32 (..., cols). Q8_0 planes (whole groups of
    16 rows, kernels/quant/planes.py) are unpacked to their Q8_0 blocks first."""
    if qtype == Q8_0_PLANES:
        from mlapipe.kernels.quant.planes import unpack_rows

        data, qtype = unpack_rows(data), int(Q.Q8_0)
    row = quant_type(qtype)
    assert data.dtype == torch.uint8, f"quantized rows are uint8, got {data.dtype}"
    assert data.shape[-1] % row.block_bytes == 0, (
        f"{row.name}: row of {data.shape[-1]} bytes is not whole {row.block_bytes}-byte blocks"
    )
    lead = data.shape[:-1]
    blocks = data.reshape(-1, row.block_bytes)
    values = row.reference(blocks)
    return values.reshape(*lead, data.shape[-1] // row.block_bytes * row.block_elems)


# ---- field readers -----------------------------------------------------------------------------


def _f16(blocks: torch.Tensor, offset: int) -> torch.Tensor:
    """fp16 at byte `offset` of each block -> fp32 (n, 1)."""
    return blocks[:, offset : offset + 2].contiguous().view(torch.float16).float()


def _u16(blocks: torch.Tensor, offset: int, count: int) -> torch.Tensor:
    """`count` little-endian uint16 from byte `offset` -> int32 (n, count)."""
    b = blocks[:, offset : offset + 2 * count].to(torch.int32).reshape(-1, count, 2)
    return b[..., 0] | (b[..., 1] << 8)


def _u32(blocks: torch.Tensor, offset: int, count: int) -> torch.Tensor:
    """`count` little-endian uint32 from byte `offset` -> int64 (n, count)."""
    b = blocks[:, offset : offset + 4 * count].to(torch.int64).reshape(-1, count, 4)
    return b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16) | (b[..., 3] << 24)


def _shifts(*values: int, device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32, device=device)


def _nibbles(qs: torch.Tensor, group: int) -> torch.Tensor:
    """Bytes (n, m) -> their low nibbles then their high nibbles per run of `group` bytes: int32."""
    n = qs.shape[0]
    q = qs.to(torch.int32).reshape(n, -1, 1, group) >> _shifts(0, 4, device=qs.device).reshape(1, 1, 2, 1)
    return (q & 0x0F).reshape(n, -1)


def _bits(b: torch.Tensor) -> torch.Tensor:
    """Bytes (n, m) -> their 8 bits each, least significant first: int32 (n, m*8)."""
    n = b.shape[0]
    bits = b.to(torch.int32).reshape(n, -1, 1) >> torch.arange(8, dtype=torch.int32, device=b.device)
    return (bits & 1).reshape(n, -1)


def _signs(bits: torch.Tensor) -> torch.Tensor:
    return torch.where(bits == 0, 1.0, -1.0).float()


def _grid(qtype: int, device) -> torch.Tensor:
    return torch.from_numpy(tables.grid(qtype)).to(device)


def _ksigns(device) -> torch.Tensor:
    return torch.from_numpy(tables.ksigns()).to(device=device, dtype=torch.int32)


def _k_scale_min(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K / Q5_K 12 scale bytes -> eight 6-bit scales and mins (int32 (n, 8) each)."""
    s = scales.to(torch.int32).reshape(-1, 3, 4)
    d, m, m_d = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc, mn


# ---- 32-value blocks ---------------------------------------------------------------------------


def decode_q8_0(blocks: torch.Tensor) -> torch.Tensor:
    d = _f16(blocks, 0)
    x = blocks[:, 2:].contiguous().view(torch.int8).float()
    return x * d


def decode_q4_0(blocks: torch.Tensor) -> torch.Tensor:
    d = _f16(blocks, 0)
    q = _nibbles(blocks[:, 2:], 16) - 8
    return d * q.float()


def decode_q4_1(blocks: torch.Tensor) -> torch.Tensor:
    d, m = _f16(blocks, 0), _f16(blocks, 2)
    q = _nibbles(blocks[:, 4:], 16)
    return (d * q.float()) + m


def _q5_quants(blocks: torch.Tensor, qh_offset: int) -> torch.Tensor:
    qh = _bits(blocks[:, qh_offset : qh_offset + 4])  # the uint32 qh, bit i is value i's fifth bit
    ql = _nibbles(blocks[:, qh_offset + 4 :], 16)
    return ql | (qh << 4)


def decode_q5_0(blocks: torch.Tensor) -> torch.Tensor:
    d = _f16(blocks, 0)
    q = _q5_quants(blocks, 2) - 16
    return d * q.float()


def decode_q5_1(blocks: torch.Tensor) -> torch.Tensor:
    d, m = _f16(blocks, 0), _f16(blocks, 2)
    q = _q5_quants(blocks, 4)
    return (d * q.float()) + m


def decode_iq4_nl(blocks: torch.Tensor) -> torch.Tensor:
    d = _f16(blocks, 0)
    kv = torch.from_numpy(tables.kvalues()).to(blocks.device).float()
    q = _nibbles(blocks[:, 2:], 16)
    return d * kv[q]


# ---- K-quants (256-value super-blocks) ---------------------------------------------------------


def decode_q2_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    scales = blocks[:, :16].to(torch.int32)
    qs = blocks[:, 16:80].to(torch.int32)
    d, dmin = _f16(blocks, 80), _f16(blocks, 82)
    dl = (d * (scales & 0xF).float()).reshape(n, 16, 1)
    ml = (dmin * (scales >> 4).float()).reshape(n, 16, 1)
    shift = _shifts(0, 2, 4, 6, device=blocks.device).reshape(1, 1, 4, 1)
    q = ((qs.reshape(n, -1, 1, 32) >> shift) & 3).reshape(n, 16, 16).float()
    return (dl * q - ml).reshape(n, QK_K)


def decode_q3_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    dev = blocks.device
    hmask = blocks[:, :32].to(torch.int32)
    qs = blocks[:, 32:96].to(torch.int32)
    scales = blocks[:, 96:108].to(torch.int32)
    d = _f16(blocks, 108)
    lscales = (scales[:, :8].reshape(n, 1, 8) >> _shifts(0, 4, device=dev).reshape(1, 2, 1)).reshape(n, 16)
    hscales = scales[:, 8:].reshape(n, 1, 4) >> _shifts(0, 2, 4, 6, device=dev).reshape(1, 4, 1)
    hscales = hscales.reshape(n, 16)
    sc = ((lscales & 0x0F) | ((hscales & 0x03) << 4)) - 32
    dl = (d * sc.float()).reshape(n, 16, 1)
    ql = qs.reshape(n, -1, 1, 32) >> _shifts(0, 2, 4, 6, device=dev).reshape(1, 1, 4, 1)
    qh = hmask.reshape(n, -1, 1, 32) >> torch.arange(8, dtype=torch.int32, device=dev).reshape(1, 1, 8, 1)
    ql = ql.reshape(n, 16, 16) & 3
    qh = (qh.reshape(n, 16, 16) & 1) ^ 1  # the high bit set means no offset
    q = (ql - (qh << 2)).float()
    return (dl * q).reshape(n, QK_K)


def decode_q4_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    d, dmin = _f16(blocks, 0), _f16(blocks, 2)
    sc, m = _k_scale_min(blocks[:, 4:16])
    dl = (d * sc.float()).reshape(n, -1, 1)
    dm = (dmin * m.float()).reshape(n, -1, 1)
    q = _nibbles(blocks[:, 16:], 32).reshape(n, -1, 32).float()
    return (dl * q - dm).reshape(n, QK_K)


def decode_q5_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    d, dmin = _f16(blocks, 0), _f16(blocks, 2)
    sc, m = _k_scale_min(blocks[:, 4:16])
    dl = (d * sc.float()).reshape(n, -1, 1)
    dm = (dmin * m.float()).reshape(n, -1, 1)
    qh = blocks[:, 16:48].to(torch.int32).reshape(n, 1, 32)
    qh = (qh >> torch.arange(8, dtype=torch.int32, device=blocks.device).reshape(1, 8, 1)) & 1
    ql = _nibbles(blocks[:, 48:], 32).reshape(n, 8, 32)
    q = (ql | (qh << 4)).float()
    return (dl * q - dm).reshape(n, QK_K)


def decode_q6_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    ql = _nibbles(blocks[:, :128], 64)
    qh = blocks[:, 128:192].to(torch.int32).reshape(n, -1, 1, 32)
    qh = ((qh >> _shifts(0, 2, 4, 6, device=blocks.device).reshape(1, 1, 4, 1)) & 3).reshape(n, -1)
    scales = blocks[:, 192:208].contiguous().view(torch.int8).float()
    d = _f16(blocks, 208)
    dl = (d * scales).reshape(n, 16, 1)
    q = ((ql | (qh << 4)) - 32).reshape(n, 16, 16).float()
    return (dl * q).reshape(n, QK_K)


def decode_iq4_xs(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    dev = blocks.device
    d = _f16(blocks, 0)
    scales_h = _u16(blocks, 2, 1)  # (n, 1)
    scales_l = blocks[:, 4:8].to(torch.int32).reshape(n, -1, 1) >> _shifts(0, 4, device=dev).reshape(1, 1, 2)
    scales_l = scales_l.reshape(n, 8) & 0x0F
    scales_h = (scales_h >> (2 * torch.arange(8, dtype=torch.int32, device=dev))) & 0x03
    sc = (scales_l | (scales_h << 4)) - 32
    dl = (d * sc.float()).reshape(n, -1, 1)
    kv = torch.from_numpy(tables.kvalues()).to(dev).float()
    q = _nibbles(blocks[:, 8:], 16).reshape(n, -1, 32)
    return (dl * kv[q]).reshape(n, QK_K)


# ---- IQ2 / IQ3 / IQ1 (grids of 8 or 4 values, indices and signs per group) -----------------------


def decode_iq2_xxs(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    dev = blocks.device
    d = _f16(blocks, 0)
    words = _u32(blocks, 2, 16).reshape(n, 8, 2)  # per 32 values: 4 grid indices, then signs + scale
    aux = words[..., 1]
    db = (d * (0.5 + (aux >> 28).float()) * 0.25).reshape(n, -1, 1, 1)
    sign_idx = (aux.reshape(n, -1, 1) >> torch.tensor([0, 7, 14, 21], device=dev)) & 0x7F
    signs = _signs(_bits(_ksigns(dev)[sign_idx].reshape(n, -1))).reshape(n, -1, 4, 8)
    grid_idx = blocks[:, 2:66].reshape(n, 8, 8)[:, :, :4].to(torch.int64)  # the index bytes of each group
    grid = _grid(Q.IQ2_XXS, dev)[grid_idx].reshape(n, -1, 4, 8)
    return (db * grid * signs).reshape(n, QK_K)


def decode_iq2_xs(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    dev = blocks.device
    d = _f16(blocks, 0)
    qs = _u16(blocks, 2, 32)
    scales = _nibbles_pairs(blocks[:, 66:74])
    db = (d * (0.5 + scales.float()) * 0.25).reshape(n, -1, 1, 1)
    signs = _signs(_bits(_ksigns(dev)[(qs >> 9).long()])).reshape(n, -1, 2, 8)
    grid = _grid(Q.IQ2_XS, dev)[(qs & 511).long()].reshape(n, -1, 2, 8)
    return (db * grid * signs).reshape(n, QK_K)


def decode_iq2_s(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    dev = blocks.device
    d = _f16(blocks, 0)
    qs = blocks[:, 2:34].to(torch.int32)
    signs = _signs(_bits(blocks[:, 34:66])).reshape(n, -1, 2, 8)
    qh = blocks[:, 66:74].to(torch.int32).reshape(n, -1, 1) >> _shifts(0, 2, 4, 6, device=dev)
    scales = _nibbles_pairs(blocks[:, 74:82])
    db = (d * (0.5 + scales.float()) * 0.25).reshape(n, -1, 1, 1)
    idx = qs | ((qh.reshape(n, -1) & 0x03) << 8)
    grid = _grid(Q.IQ2_S, dev)[idx.long()].reshape(n, -1, 2, 8)
    return (db * grid * signs).reshape(n, QK_K)


def decode_iq3_xxs(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    dev = blocks.device
    d = _f16(blocks, 0)
    qs = blocks[:, 2:66].to(torch.int64)
    scales = _u32(blocks, 66, 8)
    db = (d * (0.5 + (scales >> 28).float()) * 0.5).reshape(n, -1, 1, 1)
    sign_idx = (scales.reshape(n, -1, 1) >> torch.tensor([0, 7, 14, 21], device=dev)) & 0x7F
    signs = _signs(_bits(_ksigns(dev)[sign_idx].reshape(n, -1))).reshape(n, -1, 4, 8)
    grid = _grid(Q.IQ3_XXS, dev)[qs].reshape(n, -1, 4, 8)
    return (db * grid * signs).reshape(n, QK_K)


def decode_iq3_s(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    dev = blocks.device
    d = _f16(blocks, 0)
    qs = blocks[:, 2:66].to(torch.int32)
    qh = _bits(blocks[:, 66:74])
    signs = _signs(_bits(blocks[:, 74:106])).reshape(n, -1, 4, 8)
    scales = _nibbles_pairs(blocks[:, 106:110])
    db = (d * (1 + 2 * scales).float()).reshape(n, -1, 1, 1)
    grid = _grid(Q.IQ3_S, dev)[(qs | (qh << 8)).long()].reshape(n, -1, 4, 8)
    return (db * grid * signs).reshape(n, QK_K)


IQ1_DELTA = 0.125  # gguf's IQ1_S.delta (ggml's IQ1S_DELTA)


def decode_iq1_s(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    dev = blocks.device
    d = _f16(blocks, 0)
    qs = blocks[:, 2:34].to(torch.int32)
    qh = _u16(blocks, 34, 8)
    dl = (d * (2 * ((qh >> 12) & 7) + 1).float()).reshape(n, -1, 1, 1)
    delta = torch.where((qh & 0x8000) == 0, IQ1_DELTA, -IQ1_DELTA).float().reshape(n, -1, 1, 1)
    hi = (qh.reshape(n, -1, 1) >> _shifts(0, 3, 6, 9, device=dev)) & 7
    idx = qs | (hi.reshape(n, -1) << 8)
    grid = _grid(Q.IQ1_S, dev)[idx.long()].reshape(n, -1, 4, 8)
    return (dl * (grid + delta)).reshape(n, QK_K)


def decode_iq1_m(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    dev = blocks.device
    qs = blocks[:, :32].to(torch.int32)
    qh = blocks[:, 32:48].to(torch.int32)
    scales = _u16(blocks, 48, 4)
    # the fp16 d is the top nibbles of the four scale words
    dbits = (scales & 0xF000) >> _shifts(12, 8, 4, 0, device=dev)
    dbits = dbits[:, 0] | dbits[:, 1] | dbits[:, 2] | dbits[:, 3]
    d = dbits.to(torch.int16).view(torch.float16).float().reshape(n, 1)
    sc = ((scales.reshape(n, -1, 1) >> _shifts(0, 3, 6, 9, device=dev)) & 0x07).reshape(n, -1)
    dl = (d * (2 * sc + 1).float()).reshape(n, -1, 2, 1, 1)
    qh = (qh.reshape(n, -1, 1) >> _shifts(0, 4, device=dev)).reshape(n, -1)
    idx = qs | ((qh & 0x07) << 8)
    delta = torch.where((qh & 0x08) == 0, IQ1_DELTA, -IQ1_DELTA).float().reshape(n, -1, 2, 2, 1)
    grid = _grid(Q.IQ1_M, dev)[idx.long()].reshape(n, -1, 2, 2, 8)
    return (dl * (grid + delta)).reshape(n, QK_K)


def _nibbles_pairs(b: torch.Tensor) -> torch.Tensor:
    """Bytes (n, m) -> low nibble then high nibble of each byte in turn: int32 (n, 2m)."""
    n = b.shape[0]
    return ((b.to(torch.int32).reshape(n, -1, 1) >> _shifts(0, 4, device=b.device)) & 0x0F).reshape(n, -1)


# ---- ternary and fp4 types ---------------------------------------------------------------------


def decode_tq1_0(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    dev = blocks.device
    qs = blocks[:, :48].to(torch.int32)
    qh = blocks[:, 48:52].to(torch.int32)
    d = _f16(blocks, 52)
    pow3 = torch.tensor([1, 3, 9, 27, 81], dtype=torch.int32, device=dev)
    # byte * 3^t wraps at 256 (numpy's uint8 product); the top base-3 digit is then (x * 3) >> 8
    qs0 = ((qs[:, :32].reshape(n, 1, 32) * pow3.reshape(1, 5, 1)) & 0xFF).reshape(n, -1)
    qs1 = ((qs[:, 32:].reshape(n, 1, 16) * pow3.reshape(1, 5, 1)) & 0xFF).reshape(n, -1)
    qh = ((qh.reshape(n, 1, 4) * pow3[:4].reshape(1, 4, 1)) & 0xFF).reshape(n, -1)
    q = ((torch.cat([qs0, qs1, qh], dim=-1) * 3) >> 8) - 1
    return d * q.float()


def decode_tq2_0(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    qs = blocks[:, :64].to(torch.int32).reshape(n, -1, 1, 32)
    d = _f16(blocks, 64)
    q = ((qs >> _shifts(0, 2, 4, 6, device=blocks.device).reshape(1, 1, 4, 1)) & 3).reshape(n, -1) - 1
    return d * q.float()


def _kvalues_mxfp4(device) -> torch.Tensor:
    return torch.from_numpy(tables.kvalues_mxfp4()).to(device).float()


def decode_mxfp4(blocks: torch.Tensor) -> torch.Tensor:
    e = blocks[:, :1].to(torch.int32)
    # e8m0 scale, halved (gguf's e8m0_to_fp32_half): 2^(e - 128), subnormal for e < 2
    bits = torch.where(e < 2, 0x00200000 << e, (e - 1) << 23)
    d = bits.view(torch.float32)
    q = _nibbles(blocks[:, 1:], 16)
    return d * _kvalues_mxfp4(blocks.device)[q]


def ue4m3_half(x: torch.Tensor) -> torch.Tensor:
    """NVFP4 scale bytes (unsigned e4m3, bias 7) -> fp32, halved; 0 and 0x7F decode to 0 (gguf's)."""
    exp = (x >> 3) & 0xF
    man = (x & 7).float()
    powers = torch.tensor([2.0 ** (k - 7) for k in range(16)], device=x.device)
    raw = torch.where(exp == 0, man * 2.0**-9, (1.0 + man / 8.0) * powers[exp])
    return torch.where((x == 0) | (x == 0x7F), 0.0, raw * 0.5)


def decode_nvfp4(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    d = ue4m3_half(blocks[:, :4].to(torch.int32)).reshape(n, 4, 1)
    qs = blocks[:, 4:].to(torch.int32).reshape(n, 4, 8)
    q = torch.cat([qs & 0x0F, qs >> 4], dim=-1)  # per 16 values: 8 low nibbles, then the 8 high ones
    return (d * _kvalues_mxfp4(blocks.device)[q]).reshape(n, 64)


# ---- plain floats (one value per "block") ------------------------------------------------------


def decode_bf16(blocks: torch.Tensor) -> torch.Tensor:
    return (blocks.contiguous().view(torch.int16).to(torch.int32) << 16).view(torch.float32)


def decode_f16(blocks: torch.Tensor) -> torch.Tensor:
    return blocks.contiguous().view(torch.float16).float()


def decode_f32(blocks: torch.Tensor) -> torch.Tensor:
    return blocks.contiguous().view(torch.float32).clone()
