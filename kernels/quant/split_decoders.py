"""Split decoders: a type's tile decoder cut into FETCH (its loads) and CONVERT (its register math), so
the GEMM loops can load step k+1 before converting step k (linear.prefetched_dot, fused_moe's gate|up
loop) and keep a step of loads in flight per warp. kernels/NOTES-quant.md (v4, v5) has the measurements.

    fetch_<type>(w_ptr, rows, row_bytes, k0, BLOCK_K) -> (quants, scales)   # k0 absolute, as decoders.py
    convert_<type>(quants, scales, k0) -> fp32 [len(rows), BLOCK_K]         # bit-identical with gguf

Quants stay packed in int32 words while they wait in registers (carried as uint8 they would take a
register a byte), and int -> float goes by the magic number in PTX (no I2F, a quarter-rate instruction):
a byte b as the low mantissa bits of 2^23 is the float 2^23 + b. The interpreter runs no PTX: it takes
the same arithmetic in Triton ops. QuantType.fetch / .convert find these by name.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

from mlapipe.kernels.quant.decoders import _flat

# int8 quants: one xor a word, one prmt and one sub a value.
COMPILED = tl.constexpr(os.environ.get("TRITON_INTERPRET") != "1")


@triton.jit
def _q8_word_to_fp32(words):
    """int32 words, each four int8 quants (little-endian) -> their four fp32 values, exactly, without an
    I2F: a byte with its sign bit flipped (q + 128), as the low mantissa bits of 2^23, is 2^23 + q + 128;
    minus 2^23 + 128 leaves q. Returns the values of bytes 0, 1, 2, 3, each shaped like `words`."""
    if COMPILED:
        return tl.inline_asm_elementwise(
            """{
            .reg .b32 t;
            xor.b32 t, $4, 0x80808080;
            prmt.b32 $0, t, 0x4B000000, 0x7650;
            prmt.b32 $1, t, 0x4B000000, 0x7651;
            prmt.b32 $2, t, 0x4B000000, 0x7652;
            prmt.b32 $3, t, 0x4B000000, 0x7653;
            sub.f32 $0, $0, 0f4B000080;
            sub.f32 $1, $1, 0f4B000080;
            sub.f32 $2, $2, 0f4B000080;
            sub.f32 $3, $3, 0f4B000080;
            }""",
            "=r,=r,=r,=r,r",
            [words],
            dtype=(tl.float32, tl.float32, tl.float32, tl.float32),
            is_pure=True,
            pack=1,
        )
    else:
        flipped = words.to(tl.uint32, bitcast=True) ^ 0x80808080
        b0 = ((flipped & 0xFF) | 0x4B000000).to(tl.float32, bitcast=True) - 8388736.0
        b1 = (((flipped >> 8) & 0xFF) | 0x4B000000).to(tl.float32, bitcast=True) - 8388736.0
        b2 = (((flipped >> 16) & 0xFF) | 0x4B000000).to(tl.float32, bitcast=True) - 8388736.0
        b3 = ((flipped >> 24) | 0x4B000000).to(tl.float32, bitcast=True) - 8388736.0
        return b0, b1, b2, b3


@triton.jit
def fetch_q8_0_planes(w_ptr, rows, row_bytes, k0, BLOCK_K: tl.constexpr):
    """The loads of decode_q8_0_planes: the quants as int32 words [R, BLOCK_K / 4] (four a word, kept
    packed while they wait in registers), the fp16 scales [R, BLOCK_K / 32].
    Q8_0 repacked by the loader (kernels/quant/planes.py): groups of 16 rows, each
    [16 rows x K int8 qs][K/32 blocks x 16 rows x fp16 d]; both planes advance 1 byte per value, and a
    row's quants are 16-byte aligned runs."""
    NB: tl.constexpr = BLOCK_K // 32
    cols = (row_bytes // 17) * 16
    r = rows.to(tl.int64)
    group = (r // 16) * (16 * row_bytes)
    lane = r % 16
    # cast the row starts, then add word indices: the pointer analysis sees runs of contiguous words
    q_rows = (w_ptr + (group + lane * cols)).to(tl.pointer_type(tl.int32))
    q_ptrs = q_rows[:, None] + (k0 // 4 + tl.arange(0, BLOCK_K // 4))[None, :]
    b = k0 // 32 + tl.arange(0, NB)
    d_ptrs = (w_ptr + (group + 16 * cols + 2 * lane)[:, None] + 32 * b[None, :]).to(
        tl.pointer_type(tl.float16)
    )
    return tl.load(q_ptrs), tl.load(d_ptrs)


@triton.jit
def convert_q8_0_planes(q, d, k0):
    """fetch_q8_0_planes's words and scales -> fp32 [R, BLOCK_K]: x = qs * d, in registers (k0 unused:
    the scales fetched are the tile's own)."""
    R: tl.constexpr = q.shape[0]
    BLOCK_K: tl.constexpr = q.shape[1] * 4
    v0, v1, v2, v3 = _q8_word_to_fp32(q)
    # value 4w + j is byte j of word w: [R, W, a, b] with j = 2a + b
    values = tl.reshape(tl.join(tl.join(v0, v2), tl.join(v1, v3)), (R, BLOCK_K // 32, 32))
    return _flat(values * d.to(tl.float32)[:, :, None], R, BLOCK_K)


@triton.jit
def decode_q8_0_planes(w_ptr, rows, row_bytes, k0, BLOCK_K: tl.constexpr, table_ptr):
    # split in two so the GEMMs can load a step ahead of converting (linear.prefetched_dot)
    q, d = fetch_q8_0_planes(w_ptr, rows, row_bytes, k0, BLOCK_K)
    return convert_q8_0_planes(q, d, k0)


@triton.jit
def _q4_word_to_fp32(words):
    """int32 words of 8 nibbles -> their 8 fp32 values (0..15), exactly, as _q8_word_to_fp32 does it: the low
    nibbles of bytes 0-3, then the high nibbles of bytes 0-3, each shaped like `words`."""
    if COMPILED:
        return tl.inline_asm_elementwise(
            """{
            .reg .b32 lo, hi;
            and.b32 lo, $8, 0x0F0F0F0F;
            shr.u32 hi, $8, 4;
            and.b32 hi, hi, 0x0F0F0F0F;
            prmt.b32 $0, lo, 0x4B000000, 0x7650;
            prmt.b32 $1, lo, 0x4B000000, 0x7651;
            prmt.b32 $2, lo, 0x4B000000, 0x7652;
            prmt.b32 $3, lo, 0x4B000000, 0x7653;
            prmt.b32 $4, hi, 0x4B000000, 0x7650;
            prmt.b32 $5, hi, 0x4B000000, 0x7651;
            prmt.b32 $6, hi, 0x4B000000, 0x7652;
            prmt.b32 $7, hi, 0x4B000000, 0x7653;
            sub.f32 $0, $0, 0f4B000000;
            sub.f32 $1, $1, 0f4B000000;
            sub.f32 $2, $2, 0f4B000000;
            sub.f32 $3, $3, 0f4B000000;
            sub.f32 $4, $4, 0f4B000000;
            sub.f32 $5, $5, 0f4B000000;
            sub.f32 $6, $6, 0f4B000000;
            sub.f32 $7, $7, 0f4B000000;
            }""",
            "=r,=r,=r,=r,=r,=r,=r,=r,r",
            [words],
            dtype=(tl.float32,) * 8,
            is_pure=True,
            pack=1,
        )
    else:
        bits = words.to(tl.uint32, bitcast=True)
        lo0 = (bits & 0xF).to(tl.float32)
        lo1 = ((bits >> 8) & 0xF).to(tl.float32)
        lo2 = ((bits >> 16) & 0xF).to(tl.float32)
        lo3 = ((bits >> 24) & 0xF).to(tl.float32)
        hi0 = ((bits >> 4) & 0xF).to(tl.float32)
        hi1 = ((bits >> 12) & 0xF).to(tl.float32)
        hi2 = ((bits >> 20) & 0xF).to(tl.float32)
        hi3 = (bits >> 28).to(tl.float32)
        return lo0, lo1, lo2, lo3, hi0, hi1, hi2, hi3


@triton.jit
def _interleave4(v0, v1, v2, v3):
    """Four [R, W] tensors -> [R, 4W] with value 4w + j from v_j[:, w]."""
    R: tl.constexpr = v0.shape[0]
    W: tl.constexpr = v0.shape[1]
    # [R, W, a, b] with j = 2a + b
    return tl.reshape(tl.join(tl.join(v0, v2), tl.join(v1, v3)), (R, 4 * W))


@triton.jit
def fetch_q4_k(w_ptr, rows, row_bytes, k0, BLOCK_K: tl.constexpr):
    """The loads of a Q4_K tile of 64 values at k0 (one 32-byte run of a block's qs: sub-blocks 2c, 2c+1):
    its 8 qs words [R, 8] and the block's 16-byte head (d | dmin | 12 scale bytes) as 4 words [R, 4].
    144-byte blocks keep rows 16-byte aligned, so both are 16-byte loads without a repack."""
    tl.static_assert(BLOCK_K == 64)
    start = rows.to(tl.int64) * row_bytes + (k0 // 256) * 144
    words = (w_ptr + start).to(tl.pointer_type(tl.int32))
    q = tl.load(words[:, None] + (4 + ((k0 % 256) // 64) * 8 + tl.arange(0, 8))[None, :])
    return q, tl.load(words[:, None] + tl.arange(0, 4)[None, :])


@triton.jit
def convert_q4_k(q, head, k0):
    """fetch_q4_k's words -> fp32 [R, 64]: x = (d * sc) * q - dmin * min per sub-block, gguf's operations."""
    R: tl.constexpr = q.shape[0]
    even, odd = tl.split(tl.reshape(head, (R, 2, 2)))  # words (0, 2), (1, 3)
    w0, w2 = tl.split(even)
    w1, w3 = tl.split(odd)
    d = (w0 & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
    dmin = ((w0 >> 16) & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
    chunk = (k0 % 256) // 64  # sub-blocks 2 * chunk and 2 * chunk + 1
    shift = 16 * (chunk % 2)
    a, b, c = w1 >> shift, w2 >> shift, w3 >> shift  # scale bytes 4+i, 8+i, 12+i in bits 0-7 and 8-15
    if chunk < 2:  # sub-blocks 0-3: the low 6 bits of bytes 4+i (scale) and 8+i (min)
        sc0, sc1, mn0, mn1 = a & 63, (a >> 8) & 63, b & 63, (b >> 8) & 63
    else:  # 4-7: nibbles of byte 12+i, the top 2 bits from bytes 4+i and 8+i
        sc0 = (c & 0xF) | ((a >> 2) & 0x30)
        sc1 = ((c >> 8) & 0xF) | ((a >> 10) & 0x30)
        mn0 = ((c >> 4) & 0xF) | ((b >> 2) & 0x30)
        mn1 = ((c >> 12) & 0xF) | ((b >> 10) & 0x30)
    lo0, lo1, lo2, lo3, hi0, hi1, hi2, hi3 = _q4_word_to_fp32(q)
    first = (
        _interleave4(lo0, lo1, lo2, lo3) * (d * sc0.to(tl.float32))[:, None]
        - (dmin * mn0.to(tl.float32))[:, None]
    )
    second = (
        _interleave4(hi0, hi1, hi2, hi3) * (d * sc1.to(tl.float32))[:, None]
        - (dmin * mn1.to(tl.float32))[:, None]
    )
    return tl.reshape(tl.permute(tl.join(first, second), (0, 2, 1)), (R, 64))
