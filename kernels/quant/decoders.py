"""Triton tile decoders, one per GGUF block type, all with one signature:

    decode_<type>(w_ptr, rows, row_bytes, k0, BLOCK_K: tl.constexpr, table_ptr) -> fp32 [R, BLOCK_K]

- w_ptr: uint8 pointer to the tensor's blocks: row r starts at byte r * row_bytes (an expert stack
  (E, N, row_bytes) is rows e*N + n of one pointer).
- rows: int tensor [R] (R a power of two) of row indices, all valid (callers clamp the rows past the
  end and mask their stores), so one decoder serves dense rows, expert rows and embedding gathers.
- k0: the tile's first value along the row, a multiple of BLOCK_K; BLOCK_K a power of two >= 32.
  The tile must lie inside the row (k0 + BLOCK_K <= cols) for block types; the plain float types
  (F32, F16, BF16) mask past the row's end and give 0 there.
- table_ptr: int16 pointer to the type's lookup table (kernels/quant/tables.py); the types without one
  ignore it, so a shared kernel passes `tables.device_table(qtype, device)` whatever the type.
The values are bit-identical to gguf's numpy dequantization in fp32: each decoder does gguf's fp32
operations in gguf's order. Where a multiply feeds an add (the "- dmin*m" types) the product is exact
in fp32 (fp16 scale x small integers), so a fused multiply-add gives the same bits.

Each decoder works on groups of G values that share their scales: it loads the per-group fields once
as [R, NG] (NG = BLOCK_K / G), the quant bytes as [R, NG, G], and reshapes to [R, BLOCK_K]. Byte
loads throughout: blocks sit at any byte offset (34-byte Q8_0, 210-byte Q6_K). Offsets are int64.
"""

from __future__ import annotations

import triton
import triton.language as tl

# ---- field readers -----------------------------------------------------------------------------


@triton.jit
def _byte(w_ptr, offset):
    """uint8 at `offset` -> int32."""
    return tl.load(w_ptr + offset).to(tl.int32)


@triton.jit
def _fp16(w_ptr, offset):
    """Little-endian fp16 at `offset` -> fp32 (exact, subnormals included)."""
    lo = tl.load(w_ptr + offset).to(tl.uint16)
    hi = tl.load(w_ptr + offset + 1).to(tl.uint16)
    return (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _u16(w_ptr, offset):
    """Little-endian uint16 at `offset` -> int32."""
    return _byte(w_ptr, offset) | (_byte(w_ptr, offset + 1) << 8)


@triton.jit
def _u32(w_ptr, offset):
    """Little-endian uint32 at `offset` -> uint32 (so >> is a logical shift)."""
    b0 = tl.load(w_ptr + offset).to(tl.uint32)
    b1 = tl.load(w_ptr + offset + 1).to(tl.uint32)
    b2 = tl.load(w_ptr + offset + 2).to(tl.uint32)
    b3 = tl.load(w_ptr + offset + 3).to(tl.uint32)
    return b0 | (b1 << 8) | (b2 << 16) | (b3 << 24)


@triton.jit
def _groups(rows, row_bytes, k0, BLOCK_K: tl.constexpr, G: tl.constexpr, QK: tl.constexpr, BB: tl.constexpr):
    """The tile's groups of G values: byte offset of each group's block [R, NG], the group's index
    inside its block [NG], and the value index inside the group [G]."""
    NG: tl.constexpr = BLOCK_K // G
    g = k0 // G + tl.arange(0, NG)
    block = g // (QK // G)
    base = rows.to(tl.int64)[:, None] * row_bytes + (block * BB).to(tl.int64)[None, :]
    return base, g % (QK // G), tl.arange(0, G)


@triton.jit
def _flat(values, R: tl.constexpr, BLOCK_K: tl.constexpr):
    return tl.reshape(values, (R, BLOCK_K))


# ---- 32-value blocks ---------------------------------------------------------------------------


@triton.jit
def decode_q8_0(w_ptr, rows, row_bytes, k0, BLOCK_K: tl.constexpr, table_ptr):
    # block_q8_0, 34 bytes: fp16 d | int8 qs[32];  x = qs * d
    R: tl.constexpr = rows.shape[0]
    base, _, j = _groups(rows, row_bytes, k0, BLOCK_K, 32, 32, 34)
    d = _fp16(w_ptr, base)
    q = tl.load(w_ptr + base[:, :, None] + 2 + j[None, None, :]).to(tl.int8, bitcast=True)
    return _flat(q.to(tl.float32) * d[:, :, None], R, BLOCK_K)


@triton.jit
def _nibble32(w_ptr, base, qs_offset, j):
    """Value j of a 32-value run of nibbles: bytes 0..15 low nibbles, then the same bytes' high ones."""
    byte = _byte(w_ptr, base[:, :, None] + qs_offset + (j % 16)[None, None, :])
    return (byte >> (4 * (j // 16))[None, None, :]) & 0xF


@triton.jit
def decode_q4_0(w_ptr, rows, row_bytes, k0, BLOCK_K: tl.constexpr, table_ptr):
    # block_q4_0, 18 bytes: fp16 d | qs[16] (value i < 16: low nibble of qs[i], i >= 16: high of qs[i-16])
    # x = (q - 8) * d
    R: tl.constexpr = rows.shape[0]
    base, _, j = _groups(rows, row_bytes, k0, BLOCK_K, 32, 32, 18)
    d = _fp16(w_ptr, base)
    q = _nibble32(w_ptr, base, 2, j) - 8
    return _flat(d[:, :, None] * q.to(tl.float32), R, BLOCK_K)


@triton.jit
def decode_q4_1(w_ptr, rows, row_bytes, k0, BLOCK_K: tl.constexpr, table_ptr):
    # block_q4_1, 20 bytes: fp16 d | fp16 m | qs[16] (nibbles as Q4_0);  x = q * d + m
    R: tl.constexpr = rows.shape[0]
    base, _, j = _groups(rows, row_bytes, k0, BLOCK_K, 32, 32, 20)
    d = _fp16(w_ptr, base)
    m = _fp16(w_ptr, base + 2)
    q = _nibble32(w_ptr, base, 4, j)
    return _flat(d[:, :, None] * q.to(tl.float32) + m[:, :, None], R, BLOCK_K)


@triton.jit
def _q5_quant(w_ptr, base, qh_offset, j):
    """5-bit value j: nibble as Q4_0 from qs (after qh), fifth bit = bit j of the little-endian qh."""
    ql = _nibble32(w_ptr, base, qh_offset + 4, j)
    qh = _byte(w_ptr, base[:, :, None] + qh_offset + (j // 8)[None, None, :])
    return ql | (((qh >> (j % 8)[None, None, :]) & 1) << 4)


@triton.jit
def decode_q5_0(w_ptr, rows, row_bytes, k0, BLOCK_K: tl.constexpr, table_ptr):
    # block_q5_0, 22 bytes: fp16 d | qh[4] (bit i = fifth bit of value i) | qs[16];  x = (q - 16) * d
    R: tl.constexpr = rows.shape[0]
    base, _, j = _groups(rows, row_bytes, k0, BLOCK_K, 32, 32, 22)
    d = _fp16(w_ptr, base)
    q = _q5_quant(w_ptr, base, 2, j) - 16
    return _flat(d[:, :, None] * q.to(tl.float32), R, BLOCK_K)


@triton.jit
def decode_q5_1(w_ptr, rows, row_bytes, k0, BLOCK_K: tl.constexpr, table_ptr):
    # block_q5_1, 24 bytes: fp16 d | fp16 m | qh[4] | qs[16];  x = q * d + m
    R: tl.constexpr = rows.shape[0]
    base, _, j = _groups(rows, row_bytes, k0, BLOCK_K, 32, 32, 24)
    d = _fp16(w_ptr, base)
    m = _fp16(w_ptr, base + 2)
    q = _q5_quant(w_ptr, base, 4, j)
    return _flat(d[:, :, None] * q.to(tl.float32) + m[:, :, None], R, BLOCK_K)


@triton.jit
def decode_iq4_nl(w_ptr, rows, row_bytes, k0, BLOCK_K: tl.constexpr, table_ptr):
    # block_iq4_nl, 18 bytes: fp16 d | qs[16] (nibbles as Q4_0);  x = d * kvalues_iq4nl[q]
    # table: the 16 kvalues
    R: tl.constexpr = rows.shape[0]
    base, _, j = _groups(rows, row_bytes, k0, BLOCK_K, 32, 32, 18)
    d = _fp16(w_ptr, base)
    kv = tl.load(table_ptr + _nibble32(w_ptr, base, 2, j)).to(tl.float32)
    return _flat(d[:, :, None] * kv, R, BLOCK_K)


# ---- K-quants (256-value super-blocks) ---------------------------------------------------------


@triton.jit
def decode_q2_k(w_ptr, rows, row_bytes, k0, BLOCK_K: tl.constexpr, table_ptr):
    # block_q2_K, 84 bytes: scales[16] (low nibble: scale, high: min, per 16 values) | qs[64] | fp16 d |
    # fp16 dmin. Value e: half h = e/128, 2-bit field s = (e/32)%4 of byte qs[h*32 + e%32].
    # x = (d * scale) * q - dmin * min
    R: tl.constexpr = rows.shape[0]
    base, gi, j = _groups(rows, row_bytes, k0, BLOCK_K, 16, 256, 84)
    sc = _byte(w_ptr, base + gi[None, :])
    dl = _fp16(w_ptr, base + 80) * (sc & 0xF).to(tl.float32)
    ml = _fp16(w_ptr, base + 82) * (sc >> 4).to(tl.float32)
    e = gi[:, None] * 16 + j[None, :]  # [NG, 16] value index in the block
    byte = _byte(w_ptr, base[:, :, None] + (16 + (e // 128) * 32 + e % 32)[None, :, :])
    q = (byte >> (2 * ((e // 32) % 4))[None, :, :]) & 3
    return _flat(dl[:, :, None] * q.to(tl.float32) - ml[:, :, None], R, BLOCK_K)


@triton.jit
def decode_q3_k(w_ptr, rows, row_bytes, k0, BLOCK_K: tl.constexpr, table_ptr):
    # block_q3_K, 110 bytes: hmask[32] | qs[64] | scales[12] | fp16 d. 16 6-bit scales (bias 32): low
    # 4 bits = nibble (is/8) of scales[is%8], high 2 bits = 2-bit field (is/4) of scales[8 + is%4].
    # Value e: low 2 bits as Q2_K from qs; high bit = bit e/32 of hmask[e%32], set meaning "no -4".
    # x = (d * scale) * (q_low - 4 * (1 - hbit))
    R: tl.constexpr = rows.shape[0]
    base, gi, j = _groups(rows, row_bytes, k0, BLOCK_K, 16, 256, 110)
    lsc = (_byte(w_ptr, base + (96 + gi % 8)[None, :]) >> (4 * (gi // 8))[None, :]) & 0xF
    hsc = (_byte(w_ptr, base + (104 + gi % 4)[None, :]) >> (2 * (gi // 4))[None, :]) & 3
    dl = _fp16(w_ptr, base + 108) * ((lsc | (hsc << 4)) - 32).to(tl.float32)
    e = gi[:, None] * 16 + j[None, :]
    ql = _byte(w_ptr, base[:, :, None] + (32 + (e // 128) * 32 + e % 32)[None, :, :])
    ql = (ql >> (2 * ((e // 32) % 4))[None, :, :]) & 3
    hb = (_byte(w_ptr, base[:, :, None] + (e % 32)[None, :, :]) >> (e // 32)[None, :, :]) & 1
    q = ql - ((hb ^ 1) << 2)
    return _flat(dl[:, :, None] * q.to(tl.float32), R, BLOCK_K)


@triton.jit
def _k_scale_min(w_ptr, base, gi):
    """Q4_K / Q5_K: the 6-bit scale and min of sub-block gi (0..7) from the 12 bytes at base + 4.
    Sub-blocks 0-3: low 6 bits of bytes gi and gi+4; 4-7: nibbles of byte gi+4 (of 8..11) with the top
    2 bits of bytes gi-4 and gi."""
    low = gi < 4
    i = gi % 4
    a = _byte(w_ptr, base + (4 + i)[None, :])
    b = _byte(w_ptr, base + (8 + i)[None, :])
    c = _byte(w_ptr, base + (12 + i)[None, :])
    sc = tl.where(low[None, :], a & 0x3F, (c & 0xF) | ((a >> 2) & 0x30))
    mn = tl.where(low[None, :], b & 0x3F, (c >> 4) | ((b >> 2) & 0x30))
    return sc, mn


@triton.jit
def decode_q4_k(w_ptr, rows, row_bytes, k0, BLOCK_K: tl.constexpr, table_ptr):
    # block_q4_K, 144 bytes: fp16 d | fp16 dmin | scales[12] (8 6-bit scales + 8 6-bit mins) | qs[128].
    # Sub-block gi of 32 values: nibble (gi%2) of qs[(gi/2)*32 + j].  x = (d * sc) * q - dmin * min
    R: tl.constexpr = rows.shape[0]
    base, gi, j = _groups(rows, row_bytes, k0, BLOCK_K, 32, 256, 144)
    sc, mn = _k_scale_min(w_ptr, base, gi)
    dl = _fp16(w_ptr, base) * sc.to(tl.float32)
    ml = _fp16(w_ptr, base + 2) * mn.to(tl.float32)
    byte = _byte(w_ptr, base[:, :, None] + (16 + (gi // 2) * 32)[None, :, None] + j[None, None, :])
    q = (byte >> (4 * (gi % 2))[None, :, None]) & 0xF
    return _flat(dl[:, :, None] * q.to(tl.float32) - ml[:, :, None], R, BLOCK_K)


@triton.jit
def decode_q5_k(w_ptr, rows, row_bytes, k0, BLOCK_K: tl.constexpr, table_ptr):
    # block_q5_K, 176 bytes: fp16 d | fp16 dmin | scales[12] (as Q4_K) | qh[32] | qs[128].
    # Sub-block gi: low 4 bits as Q4_K from qs, fifth bit = bit gi of qh[j].  x = (d * sc) * q - dmin * min
    R: tl.constexpr = rows.shape[0]
    base, gi, j = _groups(rows, row_bytes, k0, BLOCK_K, 32, 256, 176)
    sc, mn = _k_scale_min(w_ptr, base, gi)
    dl = _fp16(w_ptr, base) * sc.to(tl.float32)
    ml = _fp16(w_ptr, base + 2) * mn.to(tl.float32)
    ql = _byte(w_ptr, base[:, :, None] + (48 + (gi // 2) * 32)[None, :, None] + j[None, None, :])
    ql = (ql >> (4 * (gi % 2))[None, :, None]) & 0xF
    qh = (_byte(w_ptr, base[:, :, None] + 16 + j[None, None, :]) >> gi[None, :, None]) & 1
    q = ql | (qh << 4)
    return _flat(dl[:, :, None] * q.to(tl.float32) - ml[:, :, None], R, BLOCK_K)


@triton.jit
def decode_q6_k(w_ptr, rows, row_bytes, k0, BLOCK_K: tl.constexpr, table_ptr):
    # block_q6_K, 210 bytes: ql[128] | qh[64] | int8 scales[16] (per 16 values) | fp16 d.
    # Value e (h = e/128): low 4 bits = nibble ((e/64)%2) of ql[h*64 + e%64]; high 2 bits = field
    # ((e/32)%4) of qh[h*32 + e%32].  x = (d * scale) * (q - 32)
    R: tl.constexpr = rows.shape[0]
    base, gi, j = _groups(rows, row_bytes, k0, BLOCK_K, 16, 256, 210)
    scale = tl.load(w_ptr + base + (192 + gi)[None, :]).to(tl.int8, bitcast=True)
    dl = _fp16(w_ptr, base + 208) * scale.to(tl.float32)
    e = gi[:, None] * 16 + j[None, :]
    h = e // 128
    ql = _byte(w_ptr, base[:, :, None] + (h * 64 + e % 64)[None, :, :])
    ql = (ql >> (4 * ((e // 64) % 2))[None, :, :]) & 0xF
    qh = _byte(w_ptr, base[:, :, None] + (128 + h * 32 + e % 32)[None, :, :])
    qh = (qh >> (2 * ((e // 32) % 4))[None, :, :]) & 3
    q = (ql | (qh << 4)) - 32
    return _flat(dl[:, :, None] * q.to(tl.float32), R, BLOCK_K)


@triton.jit
def decode_iq4_xs(w_ptr, rows, row_bytes, k0, BLOCK_K: tl.constexpr, table_ptr):
    # block_iq4_xs, 136 bytes: fp16 d | uint16 scales_h (2 bits per sub-block) | scales_l[4] (a nibble
    # per sub-block) | qs[128]. Sub-block gi of 32: 6-bit scale (bias 32); nibbles as Q4_0 from
    # qs[gi*16 ..]. x = (d * scale) * kvalues_iq4nl[q];  table: the 16 kvalues
    R: tl.constexpr = rows.shape[0]
    base, gi, j = _groups(rows, row_bytes, k0, BLOCK_K, 32, 256, 136)
    sl = (_byte(w_ptr, base + (4 + gi // 2)[None, :]) >> (4 * (gi % 2))[None, :]) & 0xF
    sh = (_u16(w_ptr, base + 2) >> (2 * gi)[None, :]) & 3
    dl = _fp16(w_ptr, base) * ((sl | (sh << 4)) - 32).to(tl.float32)
    byte = _byte(w_ptr, base[:, :, None] + (8 + gi * 16)[None, :, None] + (j % 16)[None, None, :])
    q = (byte >> (4 * (j // 16))[None, None, :]) & 0xF
    kv = tl.load(table_ptr + q).to(tl.float32)
    return _flat(dl[:, :, None] * kv, R, BLOCK_K)


# ---- IQ2 / IQ3 / IQ1: grid indices + signs --------------------------------------------------------


@triton.jit
def _ksign(table_ptr, KSIGNS: tl.constexpr, sign_index, bit):
    """+1 / -1 from bit `bit` of ksigns[sign_index] (the 128 ksigns follow the grid in the table)."""
    signs = tl.load(table_ptr + KSIGNS + sign_index).to(tl.int32)
    return tl.where(((signs >> bit) & 1) == 0, 1.0, -1.0)


@triton.jit
def decode_iq2_xxs(w_ptr, rows, row_bytes, k0, BLOCK_K: tl.constexpr, table_ptr):
    # block_iq2_xxs, 66 bytes: fp16 d | qs as 8 groups of (4 grid-index bytes, uint32 aux) per 32 values.
    # aux: 4 x 7-bit ksigns indices (one per 8 values), top 4 bits the scale s.
    # x = (d * (0.5 + s) * 0.25) * grid[idx][j % 8] * sign;  table: grid 256x8, then ksigns
    R: tl.constexpr = rows.shape[0]
    base, gi, j = _groups(rows, row_bytes, k0, BLOCK_K, 32, 256, 66)
    group = base + (2 + gi * 8)[None, :]
    aux = _u32(w_ptr, group + 4)
    db = _fp16(w_ptr, base) * (0.5 + (aux >> 28).to(tl.float32)) * 0.25
    sub = (j // 8)[None, None, :]
    idx = _byte(w_ptr, group[:, :, None] + sub)
    grid = tl.load(table_ptr + idx * 8 + (j % 8)[None, None, :]).to(tl.float32)
    sign_index = ((aux[:, :, None] >> (7 * sub).to(tl.uint32)) & 0x7F).to(tl.int32)
    sign = _ksign(table_ptr, 2048, sign_index, (j % 8)[None, None, :])
    return _flat(db[:, :, None] * grid * sign, R, BLOCK_K)


@triton.jit
def decode_iq2_xs(w_ptr, rows, row_bytes, k0, BLOCK_K: tl.constexpr, table_ptr):
    # block_iq2_xs, 74 bytes: fp16 d | uint16 qs[32] (9-bit grid index | 7-bit ksigns index, per 8
    # values) | scales[8] (a nibble s per 16 values).
    # x = (d * (0.5 + s) * 0.25) * grid[idx][j % 8] * sign;  table: grid 512x8, then ksigns
    R: tl.constexpr = rows.shape[0]
    base, gi, j = _groups(rows, row_bytes, k0, BLOCK_K, 16, 256, 74)
    s = (_byte(w_ptr, base + (66 + gi // 2)[None, :]) >> (4 * (gi % 2))[None, :]) & 0xF
    db = _fp16(w_ptr, base) * (0.5 + s.to(tl.float32)) * 0.25
    word = _u16(w_ptr, base[:, :, None] + (2 + 2 * (gi[:, None] * 2 + j[None, :] // 8))[None, :, :])
    grid = tl.load(table_ptr + (word & 511) * 8 + (j % 8)[None, None, :]).to(tl.float32)
    sign = _ksign(table_ptr, 4096, word >> 9, (j % 8)[None, None, :])
    return _flat(db[:, :, None] * grid * sign, R, BLOCK_K)


@triton.jit
def decode_iq2_s(w_ptr, rows, row_bytes, k0, BLOCK_K: tl.constexpr, table_ptr):
    # block_iq2_s, 82 bytes: fp16 d | qs[32] (low 8 bits of the grid index per 8 values) | signs[32]
    # (bit e%8 of signs[e/8]) | qh[8] (2 high index bits per 8 values) | scales[8] (nibble per 16).
    # x = (d * (0.5 + s) * 0.25) * grid[idx][j % 8] * sign;  table: grid 1024x8
    R: tl.constexpr = rows.shape[0]
    base, gi, j = _groups(rows, row_bytes, k0, BLOCK_K, 16, 256, 82)
    s = (_byte(w_ptr, base + (74 + gi // 2)[None, :]) >> (4 * (gi % 2))[None, :]) & 0xF
    db = _fp16(w_ptr, base) * (0.5 + s.to(tl.float32)) * 0.25
    q8 = (gi[:, None] * 2 + j[None, :] // 8)[None, :, :]  # which group of 8 values
    hi = (_byte(w_ptr, base[:, :, None] + 66 + q8 // 4) >> (2 * (q8 % 4))) & 3
    idx = _byte(w_ptr, base[:, :, None] + 2 + q8) | (hi << 8)
    grid = tl.load(table_ptr + idx * 8 + (j % 8)[None, None, :]).to(tl.float32)
    bit = (_byte(w_ptr, base[:, :, None] + 34 + q8) >> (j % 8)[None, None, :]) & 1
    sign = tl.where(bit == 0, 1.0, -1.0)
    return _flat(db[:, :, None] * grid * sign, R, BLOCK_K)


@triton.jit
def decode_iq3_xxs(w_ptr, rows, row_bytes, k0, BLOCK_K: tl.constexpr, table_ptr):
    # block_iq3_xxs, 98 bytes: fp16 d | qs[64] (grid index per 4 values) | uint32 aux[8] (per 32 values:
    # 4 x 7-bit ksigns indices, top 4 bits the scale s).
    # x = (d * (0.5 + s) * 0.5) * grid[idx][j % 4] * sign;  table: grid 256x4, then ksigns
    R: tl.constexpr = rows.shape[0]
    base, gi, j = _groups(rows, row_bytes, k0, BLOCK_K, 32, 256, 98)
    aux = _u32(w_ptr, base + (66 + 4 * gi)[None, :])
    db = _fp16(w_ptr, base) * (0.5 + (aux >> 28).to(tl.float32)) * 0.5
    idx = _byte(w_ptr, base[:, :, None] + (2 + gi * 8)[None, :, None] + (j // 4)[None, None, :])
    grid = tl.load(table_ptr + idx * 4 + (j % 4)[None, None, :]).to(tl.float32)
    sign_index = ((aux[:, :, None] >> (7 * (j // 8)).to(tl.uint32)[None, None, :]) & 0x7F).to(tl.int32)
    sign = _ksign(table_ptr, 1024, sign_index, (j % 8)[None, None, :])
    return _flat(db[:, :, None] * grid * sign, R, BLOCK_K)


@triton.jit
def decode_iq3_s(w_ptr, rows, row_bytes, k0, BLOCK_K: tl.constexpr, table_ptr):
    # block_iq3_s, 110 bytes: fp16 d | qs[64] (low 8 index bits per 4 values) | qh[8] (ninth bit:
    # bit q%8 of qh[q/8] for index q) | signs[32] (bit e%8 of signs[e/8]) | scales[4] (nibble per 32).
    # x = (d * (1 + 2 s)) * grid[idx][j % 4] * sign;  table: grid 512x4
    R: tl.constexpr = rows.shape[0]
    base, gi, j = _groups(rows, row_bytes, k0, BLOCK_K, 32, 256, 110)
    s = (_byte(w_ptr, base + (106 + gi // 2)[None, :]) >> (4 * (gi % 2))[None, :]) & 0xF
    db = _fp16(w_ptr, base) * (1 + 2 * s).to(tl.float32)
    q4 = (gi[:, None] * 8 + j[None, :] // 4)[None, :, :]  # which group of 4 values
    hi = (_byte(w_ptr, base[:, :, None] + 66 + q4 // 8) >> (q4 % 8)) & 1
    idx = _byte(w_ptr, base[:, :, None] + 2 + q4) | (hi << 8)
    grid = tl.load(table_ptr + idx * 4 + (j % 4)[None, None, :]).to(tl.float32)
    sign_byte = _byte(w_ptr, base[:, :, None] + (74 + gi * 4)[None, :, None] + (j // 8)[None, None, :])
    sign = tl.where(((sign_byte >> (j % 8)[None, None, :]) & 1) == 0, 1.0, -1.0)
    return _flat(db[:, :, None] * grid * sign, R, BLOCK_K)


@triton.jit
def decode_iq1_s(w_ptr, rows, row_bytes, k0, BLOCK_K: tl.constexpr, table_ptr):
    # block_iq1_s, 50 bytes: fp16 d | qs[32] (low 8 index bits per 8 values) | uint16 qh[8] (per 32
    # values: 4 x 3 high index bits, 3-bit scale s at bit 12, the delta's sign at bit 15).
    # x = (d * (2 s + 1)) * (grid[idx][j % 8] + delta), delta = +-1/8;  table: grid 2048x8 of -1/0/1
    R: tl.constexpr = rows.shape[0]
    base, gi, j = _groups(rows, row_bytes, k0, BLOCK_K, 32, 256, 50)
    qh = _u16(w_ptr, base + (34 + 2 * gi)[None, :])
    dl = _fp16(w_ptr, base) * (2 * ((qh >> 12) & 7) + 1).to(tl.float32)
    delta = tl.where((qh & 0x8000) == 0, 0.125, -0.125)
    sub = (j // 8)[None, None, :]
    hi = (qh[:, :, None] >> (3 * sub)) & 7
    idx = _byte(w_ptr, base[:, :, None] + (2 + gi * 4)[None, :, None] + sub) | (hi << 8)
    grid = tl.load(table_ptr + idx * 8 + (j % 8)[None, None, :]).to(tl.float32)
    return _flat(dl[:, :, None] * (grid + delta[:, :, None]), R, BLOCK_K)


@triton.jit
def decode_iq1_m(w_ptr, rows, row_bytes, k0, BLOCK_K: tl.constexpr, table_ptr):
    # block_iq1_m, 56 bytes: qs[32] (low 8 index bits per 8 values) | qh[16] (a nibble per 8 values: 3
    # high index bits, the delta's sign at bit 3) | uint16 scales[4] (3-bit scale s per 16 values; the
    # top nibbles of the 4 words form the fp16 d).
    # x = (d * (2 s + 1)) * (grid[idx][j % 8] + delta), delta = +-1/8;  table: grid 2048x8 of -1/0/1
    R: tl.constexpr = rows.shape[0]
    base, gi, j = _groups(rows, row_bytes, k0, BLOCK_K, 16, 256, 56)
    w0 = _u16(w_ptr, base + 48)
    w1 = _u16(w_ptr, base + 50)
    w2 = _u16(w_ptr, base + 52)
    w3 = _u16(w_ptr, base + 54)
    dbits = (w0 >> 12) | ((w1 >> 8) & 0xF0) | ((w2 >> 4) & 0xF00) | (w3 & 0xF000)
    d = dbits.to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
    s = (_u16(w_ptr, base + (48 + 2 * (gi // 4))[None, :]) >> (3 * (gi % 4))[None, :]) & 7
    dl = d * (2 * s + 1).to(tl.float32)
    q8 = (gi[:, None] * 2 + j[None, :] // 8)[None, :, :]  # which group of 8 values
    qh = _byte(w_ptr, base[:, :, None] + 32 + q8 // 2) >> (4 * (q8 % 2))
    idx = _byte(w_ptr, base[:, :, None] + q8) | ((qh & 7) << 8)
    delta = tl.where((qh & 8) == 0, 0.125, -0.125)
    grid = tl.load(table_ptr + idx * 8 + (j % 8)[None, None, :]).to(tl.float32)
    return _flat(dl[:, :, None] * (grid + delta), R, BLOCK_K)


# ---- ternary and fp4 types ---------------------------------------------------------------------


@triton.jit
def decode_tq1_0(w_ptr, rows, row_bytes, k0, BLOCK_K: tl.constexpr, table_ptr):
    # block_tq1_0, 54 bytes: qs[48] | qh[4] | fp16 d; 5 (qs) or 4 (qh) base-3 digits per byte, digit t of
    # byte b read as ((b * 3^t mod 256) * 3) >> 8. Values 0-159: digit e/32 of qs[e%32]; 160-239: digit
    # (e-160)/16 of qs[32 + e%16]; 240-255: digit (e-240)/4 of qh[e%4].  x = d * (digit - 1)
    R: tl.constexpr = rows.shape[0]
    base, gi, j = _groups(rows, row_bytes, k0, BLOCK_K, 16, 256, 54)
    d = _fp16(w_ptr, base + 52)
    g = gi[:, None]  # [NG, 1] groups of 16 values
    jj = j[None, :]
    offset = tl.where(g < 10, (g % 2) * 16 + jj, tl.where(g < 15, 32 + jj, 48 + jj % 4))
    t = tl.where(g < 10, g // 2, tl.where(g < 15, g - 10, jj // 4))
    pow3 = tl.where(t == 0, 1, tl.where(t == 1, 3, tl.where(t == 2, 9, tl.where(t == 3, 27, 81))))
    byte = _byte(w_ptr, base[:, :, None] + offset[None, :, :])
    q = ((((byte * pow3[None, :, :]) & 0xFF) * 3) >> 8) - 1
    return _flat(d[:, :, None] * q.to(tl.float32), R, BLOCK_K)


@triton.jit
def decode_tq2_0(w_ptr, rows, row_bytes, k0, BLOCK_K: tl.constexpr, table_ptr):
    # block_tq2_0, 66 bytes: qs[64] (2-bit fields as Q2_K: value e in field (e/32)%4 of qs[(e/128)*32 +
    # e%32]) | fp16 d.  x = d * (q - 1)
    R: tl.constexpr = rows.shape[0]
    base, gi, j = _groups(rows, row_bytes, k0, BLOCK_K, 32, 256, 66)
    d = _fp16(w_ptr, base + 64)
    byte = _byte(w_ptr, base[:, :, None] + ((gi // 4) * 32)[None, :, None] + j[None, None, :])
    q = ((byte >> (2 * (gi % 4))[None, :, None]) & 3) - 1
    return _flat(d[:, :, None] * q.to(tl.float32), R, BLOCK_K)


@triton.jit
def decode_mxfp4(w_ptr, rows, row_bytes, k0, BLOCK_K: tl.constexpr, table_ptr):
    # block_mxfp4, 17 bytes: e8m0 scale e | qs[16] (nibbles as Q4_0). d = 2^(e - 128) (ggml's
    # e8m0_to_fp32_half; subnormal for e < 2).  x = d * kvalues_mxfp4[q];  table: the 16 kvalues
    R: tl.constexpr = rows.shape[0]
    base, _, j = _groups(rows, row_bytes, k0, BLOCK_K, 32, 32, 17)
    e = tl.load(w_ptr + base).to(tl.uint32)
    bits = tl.where(e < 2, 0x00200000 << e, (e - 1) << 23)
    d = bits.to(tl.float32, bitcast=True)
    kv = tl.load(table_ptr + _nibble32(w_ptr, base, 1, j)).to(tl.float32)
    return _flat(d[:, :, None] * kv, R, BLOCK_K)


@triton.jit
def decode_nvfp4(w_ptr, rows, row_bytes, k0, BLOCK_K: tl.constexpr, table_ptr):
    # block_nvfp4, 36 bytes: 4 ue4m3 scales (one per 16 values; e4m3 without sign, bias 7, 0 and 0x7F
    # read as 0, halved) | qs[32]: per 16 values, the low nibbles of 8 bytes then their high nibbles.
    # x = d * kvalues_mxfp4[q];  table: the 16 kvalues
    R: tl.constexpr = rows.shape[0]
    base, gi, j = _groups(rows, row_bytes, k0, BLOCK_K, 16, 64, 36)
    x = _byte(w_ptr, base + gi[None, :])
    exp = (x >> 3) & 0xF
    man = (x & 7).to(tl.float32)
    power = ((exp + 120) << 23).to(tl.float32, bitcast=True)  # 2^(exp - 7), exact
    raw = tl.where(exp == 0, man * 0.001953125, (1.0 + man / 8.0) * power)  # 2^-9 for subnormals
    d = tl.where((x == 0) | (x == 0x7F), 0.0, raw * 0.5)
    byte = _byte(w_ptr, base[:, :, None] + (4 + gi * 8)[None, :, None] + (j % 8)[None, None, :])
    q = (byte >> (4 * (j // 8))[None, None, :]) & 0xF
    kv = tl.load(table_ptr + q).to(tl.float32)
    return _flat(d[:, :, None] * kv, R, BLOCK_K)


# ---- plain floats: one value per "block"; these mask past the row's end ------------------------


@triton.jit
def _plain_offsets(rows, row_bytes, k0, BLOCK_K: tl.constexpr, SIZE: tl.constexpr):
    k = k0 + tl.arange(0, BLOCK_K)
    offsets = rows.to(tl.int64)[:, None] * row_bytes + (k * SIZE)[None, :]
    return offsets, (k * SIZE < row_bytes)[None, :]


@triton.jit
def decode_f32(w_ptr, rows, row_bytes, k0, BLOCK_K: tl.constexpr, table_ptr):
    # 4 bytes per value: the fp32 bits, little-endian
    offsets, mask = _plain_offsets(rows, row_bytes, k0, BLOCK_K, 4)
    bits = tl.load(w_ptr + offsets, mask=mask, other=0).to(tl.uint32)
    for i in tl.static_range(1, 4):
        bits = bits | (tl.load(w_ptr + offsets + i, mask=mask, other=0).to(tl.uint32) << (8 * i))
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def decode_f16(w_ptr, rows, row_bytes, k0, BLOCK_K: tl.constexpr, table_ptr):
    # 2 bytes per value: the fp16 bits
    offsets, mask = _plain_offsets(rows, row_bytes, k0, BLOCK_K, 2)
    lo = tl.load(w_ptr + offsets, mask=mask, other=0).to(tl.uint16)
    hi = tl.load(w_ptr + offsets + 1, mask=mask, other=0).to(tl.uint16)
    return (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def decode_bf16(w_ptr, rows, row_bytes, k0, BLOCK_K: tl.constexpr, table_ptr):
    # 2 bytes per value: the top half of the fp32 bits
    offsets, mask = _plain_offsets(rows, row_bytes, k0, BLOCK_K, 2)
    lo = tl.load(w_ptr + offsets, mask=mask, other=0).to(tl.uint32)
    hi = tl.load(w_ptr + offsets + 1, mask=mask, other=0).to(tl.uint32)
    return ((lo << 16) | (hi << 24)).to(tl.float32, bitcast=True)
