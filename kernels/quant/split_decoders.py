"""Split decoders: a type's tile decoder cut into FETCH (its loads) and CONVERT (its register math), so
the GEMM loops can load step k+1 before converting step k (linear.prefetched_dot, fused_moe's gate|up
loop) and keep a step of loads in flight per warp. kernels/NOTES-quant.md (v4, v5) has the measurements.

    fetch_<type>(w_ptr, rows, row_bytes, k0, BLOCK_K) -> (quants, scales)   # k0 absolute, as decoders.py
    convert_<type>(quants, scales, k0) -> fp32 [len(rows), BLOCK_K]         # bit-identical with gguf

Quants stay packed in int32 words while they wait in registers (carried as uint8 they would take a
register a byte), and int -> float goes by the magic number in PTX (no I2F, a quarter-rate instruction):
a byte b as the low mantissa bits of 2^23 is the float 2^23 + b. The interpreter runs no PTX: it takes
the same arithmetic in Triton ops. QuantType.fetch / .convert find these by name. Each K-quant fetch
takes 64-value tiles (QuantType.fetch_block_k) and loads the widest words its block alignment allows:
16 bytes (Q4_K, Q5_K), 4 (Q2_K), 2 (Q6_K, Q3_K); a tile of a 32-value type is two blocks: 2-byte quants
and 4-byte heads (Q4_0, IQ4_NL, Q5_0), 4-byte words (Q4_1, Q5_1). k0 >= 0 in every caller, so tile positions
are shifts and masks of k0 (signed // and % cost about 40 uniform instructions a step).
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

from mlapipe.kernels.quant.tables import kvalues

COMPILED = tl.constexpr(os.environ.get("TRITON_INTERPRET") != "1")


def _magic_ptx(src: str, outs: tuple[int, ...], bias: int) -> str:
    """PTX: bytes 0-3 of register `src` -> operands $outs as fp32 byte - bias, exactly: the byte as the low
    mantissa bits of 2^23 (prmt), minus 2^23 + bias."""
    prmt = "".join(f"prmt.b32 ${o}, {src}, 0x4B000000, 0x765{j};\n" for j, o in enumerate(outs))
    return prmt + "".join(f"sub.f32 ${o}, ${o}, 0f{0x4B000000 + bias:08X};\n" for o in outs)


def _nibbles_ptx(bias: int) -> str:
    """$8: a word of 8 nibbles -> $0-$3 its low nibbles (bytes 0-3) - bias, $4-$7 its high nibbles - bias."""
    return (
        "{\n.reg .b32 lo, hi;\nand.b32 lo, $8, 0x0F0F0F0F;\nshr.b32 hi, $8, 4;\nand.b32 hi, hi, 0x0F0F0F0F;\n"
        + _magic_ptx("lo", (0, 1, 2, 3), bias)
        + _magic_ptx("hi", (4, 5, 6, 7), bias)
        + "}"
    )


_NIBBLES_PTX_0 = tl.constexpr(_nibbles_ptx(0))
_NIBBLES_PTX_8 = tl.constexpr(_nibbles_ptx(8))
# int8 quants (Q8_0): the sign bits flipped (q + 128), then the magic number
_Q8_WORD_PTX = tl.constexpr("{\n.reg .b32 t;\nxor.b32 t, $4, 0x80808080;\n" + _magic_ptx("t", (0, 1, 2, 3), 128) + "}")
# bytes the caller has masked (0..255)
_U8_WORD_PTX = tl.constexpr("{\n" + _magic_ptx("$4", (0, 1, 2, 3), 0) + "}")
# Q6_K: [ql_a | ql_b] low nibbles and the [qh | qh >> 2] pair shifted onto bits 4-5 of each byte, q - 32
_Q6_HALVES_PTX = tl.constexpr(
    "{\n.reg .b16 h2;\n.reg .b32 w, hh, s;\nmov.b32 w, {$4, $5};\nshr.u16 h2, $6, 2;\nmov.b32 hh, {$6, h2};\n"
    "shr.u32 w, w, $7;\nsub.u32 s, 4, $7;\nshl.b32 hh, hh, s;\nand.b32 w, w, 0x0F0F0F0F;\n"
    "and.b32 hh, hh, 0x30303030;\nor.b32 w, w, hh;\n" + _magic_ptx("w", (0, 1, 2, 3), 32) + "}"
)
# Q3_K: the 2-bit fields and their high bits (<< 2) in each byte, q = byte - 4
_Q3_HALVES_PTX = tl.constexpr(
    "{\n.reg .b16 q2, h1;\n.reg .b32 w, h;\nshr.u16 q2, $4, 2;\nmov.b32 w, {$4, q2};\nshr.u16 h1, $5, 1;\n"
    "mov.b32 h, {$5, h1};\nshr.u32 w, w, $6;\nshr.u32 h, h, $7;\nand.b32 w, w, 0x03030303;\n"
    "and.b32 h, h, 0x01010101;\nshl.b32 h, h, 2;\nor.b32 w, w, h;\n" + _magic_ptx("w", (0, 1, 2, 3), 4) + "}"
)


@triton.jit
def _q8_word_to_fp32(words):
    """int32 words, each four int8 quants (little-endian) -> their four fp32 values, exactly, without an
    I2F: a byte with its sign bit flipped (q + 128), as the low mantissa bits of 2^23, is 2^23 + q + 128;
    minus 2^23 + 128 leaves q. Returns the values of bytes 0, 1, 2, 3, each shaped like `words`."""
    if COMPILED:
        return tl.inline_asm_elementwise(
            _Q8_WORD_PTX,
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
    packed while they wait in registers), and the fp16 scale of each run of 4 words (16 values), [R,
    BLOCK_K / 16]: a block's scale twice. Q8_0 repacked by the loader (kernels/quant/planes.py): groups of
    16 rows, each [16 rows x K int8 qs][K/32 blocks x 16 rows x fp16 d]; both planes advance 1 byte per
    value, and a row's quants are 16-byte aligned runs. At the decode tiles a thread loads 4 words of a
    row (one 16-byte load) and, here, the scale of those same 4 words, so the scales arrive where the
    words are: loaded one per block ([R, BLOCK_K / 32]) they went through shared memory to reach them (a
    store, two loads and two barriers a tile; sm_90 dense loop 189 -> 179 a step). k0 >= 0 in every
    caller: shifts, not signed division."""
    cols = (row_bytes // 17) * 16
    r = rows.to(tl.int64)
    group = (r // 16) * (16 * row_bytes)
    lane = r % 16
    # cast the row starts, then add word indices: the pointer analysis sees runs of contiguous words
    q_rows = (w_ptr + (group + lane * cols)).to(tl.pointer_type(tl.int32))
    q_ptrs = q_rows[:, None] + ((k0 >> 2) + tl.arange(0, BLOCK_K // 4))[None, :]
    b = (k0 >> 5) + (tl.arange(0, BLOCK_K // 16) >> 1)  # the block of each run of 16 values
    d_ptrs = (w_ptr + (group + 16 * cols + 2 * lane)[:, None] + 32 * b[None, :]).to(
        tl.pointer_type(tl.float16)
    )
    return tl.load(q_ptrs), tl.load(d_ptrs)


@triton.jit
def convert_q8_0_planes(q, d, k0):
    """fetch_q8_0_planes's words and scales -> fp32 [R, BLOCK_K]: x = qs * d, in registers (k0 unused:
    the scales fetched are the tile's own)."""
    R: tl.constexpr = q.shape[0]
    W: tl.constexpr = q.shape[1]
    v0, v1, v2, v3 = _q8_word_to_fp32(q)
    dw = tl.reshape(tl.broadcast_to(d.to(tl.float32)[:, :, None], (R, W // 4, 4)), (R, W))  # word w's scale
    return _interleave4(v0 * dw, v1 * dw, v2 * dw, v3 * dw)


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
            _NIBBLES_PTX_0,
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
def _u8_word_to_fp32(words):
    """int32 words of 4 unsigned bytes -> their 4 fp32 values (0..255), exactly, by the magic number alone
    (the caller has masked the bits it wants into each byte): bytes 0, 1, 2, 3, each shaped like `words`."""
    if COMPILED:
        return tl.inline_asm_elementwise(
            _U8_WORD_PTX,
            "=r,=r,=r,=r,r",
            [words],
            dtype=(tl.float32, tl.float32, tl.float32, tl.float32),
            is_pure=True,
            pack=1,
        )
    else:
        bits = words.to(tl.uint32, bitcast=True)
        b0 = (bits & 0xFF).to(tl.float32)
        b1 = ((bits >> 8) & 0xFF).to(tl.float32)
        b2 = ((bits >> 16) & 0xFF).to(tl.float32)
        b3 = (bits >> 24).to(tl.float32)
        return b0, b1, b2, b3


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
    start = rows.to(tl.int64) * row_bytes + (k0 >> 8) * 144
    words = (w_ptr + start).to(tl.pointer_type(tl.int32))
    q = tl.load(words[:, None] + (4 + ((k0 >> 6) & 3) * 8 + tl.arange(0, 8))[None, :])
    return q, tl.load(words[:, None] + tl.arange(0, 4)[None, :])


@triton.jit
def _k_scales(head, chunk):
    """Q4_K / Q5_K: a block's 4 head words (d | dmin | 12 scale bytes) -> d, dmin (fp32 [R]) and the 6-bit
    scale and min of sub-blocks 2 * chunk and 2 * chunk + 1 (int32 [R]; decoders._k_scale_min's packing).
    The shifts are by the tile's position in the block, the same for every row: uniform registers."""
    R: tl.constexpr = head.shape[0]
    even, odd = tl.split(tl.reshape(head, (R, 2, 2)))  # words (0, 2), (1, 3)
    w0, w2 = tl.split(even)
    w1, w3 = tl.split(odd)
    d = (w0 & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
    dmin = ((w0 >> 16) & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
    shift = 16 * (chunk % 2)
    a, b, c = w1 >> shift, w2 >> shift, w3 >> shift  # scale bytes 4+i, 8+i, 12+i in bits 0-7 and 8-15
    if chunk < 2:  # sub-blocks 0-3: the low 6 bits of bytes 4+i (scale) and 8+i (min)
        sc0, sc1, mn0, mn1 = a & 63, (a >> 8) & 63, b & 63, (b >> 8) & 63
    else:  # 4-7: nibbles of byte 12+i, the top 2 bits from bytes 4+i and 8+i
        sc0 = (c & 0xF) | ((a >> 2) & 0x30)
        sc1 = ((c >> 8) & 0xF) | ((a >> 10) & 0x30)
        mn0 = ((c >> 4) & 0xF) | ((b >> 2) & 0x30)
        mn1 = ((c >> 12) & 0xF) | ((b >> 10) & 0x30)
    return d, dmin, sc0, sc1, mn0, mn1


@triton.jit
def _k_tile(first, second, d, dmin, sc0, sc1, mn0, mn1):
    """Two sub-blocks' quants (fp32 [R, 32] each) -> the tile [R, 64]: gguf's (d * sc) * q - dmin * m. The
    product is exact in fp32 (fp16 x 6 bits x 5 bits), so the fused multiply-add gives gguf's bits."""
    R: tl.constexpr = first.shape[0]
    first = first * (d * sc0.to(tl.float32))[:, None] - (dmin * mn0.to(tl.float32))[:, None]
    second = second * (d * sc1.to(tl.float32))[:, None] - (dmin * mn1.to(tl.float32))[:, None]
    return tl.reshape(tl.permute(tl.join(first, second), (0, 2, 1)), (R, 64))


@triton.jit
def convert_q4_k(q, head, k0):
    """fetch_q4_k's words -> fp32 [R, 64]: x = (d * sc) * q - dmin * min per sub-block, gguf's operations."""
    d, dmin, sc0, sc1, mn0, mn1 = _k_scales(head, (k0 >> 6) & 3)  # sub-blocks 2 * chunk, 2 * chunk + 1
    lo0, lo1, lo2, lo3, hi0, hi1, hi2, hi3 = _q4_word_to_fp32(q)
    first = _interleave4(lo0, lo1, lo2, lo3)
    second = _interleave4(hi0, hi1, hi2, hi3)
    return _k_tile(first, second, d, dmin, sc0, sc1, mn0, mn1)


@triton.jit
def fetch_q5_k(w_ptr, rows, row_bytes, k0, BLOCK_K: tl.constexpr):
    """The loads of a Q5_K tile of 64 values at k0 (sub-blocks 2c, 2c+1 of its block): the 8 qs words of the
    tile's 32-byte run and the block's 8 qh words (all 32 bytes: value j of every sub-block takes its fifth
    bit from qh[j]), joined as [R, 8, 2], and the 16-byte head (d | dmin | 12 scale bytes) as 4 words [R, 4].
    176-byte blocks keep rows 16-byte aligned, as Q4_K's: 16-byte loads without a repack."""
    tl.static_assert(BLOCK_K == 64)
    start = rows.to(tl.int64) * row_bytes + (k0 >> 8) * 176
    words = (w_ptr + start).to(tl.pointer_type(tl.int32))
    qs = tl.load(words[:, None] + (12 + ((k0 >> 6) & 3) * 8 + tl.arange(0, 8))[None, :])
    qh = tl.load(words[:, None] + (4 + tl.arange(0, 8))[None, :])
    return tl.join(qs, qh), tl.load(words[:, None] + tl.arange(0, 4)[None, :])


@triton.jit
def convert_q5_k(q, head, k0):
    """fetch_q5_k's words -> fp32 [R, 64]: q = nibble | fifth bit << 4, then Q4_K's (d * sc) * q - dmin * min.
    The fifth bits of sub-blocks 2c and 2c+1 are bits 2c and 2c+1 of each qh byte: one uniform shift of the
    word brings them to bits 0 and 1 of every byte, then each goes to bit 4 of its byte beside the nibble."""
    chunk = (k0 >> 6) & 3
    d, dmin, sc0, sc1, mn0, mn1 = _k_scales(head, chunk)
    qs, qh = tl.split(q)
    qs = qs.to(tl.uint32, bitcast=True)
    high = qh.to(tl.uint32, bitcast=True) >> tl.cast(2 * chunk, tl.uint32)  # k0 may be an int here
    lo0, lo1, lo2, lo3 = _u8_word_to_fp32((qs & 0x0F0F0F0F) | ((high << 4) & 0x10101010))
    hi0, hi1, hi2, hi3 = _u8_word_to_fp32(((qs >> 4) & 0x0F0F0F0F) | ((high << 3) & 0x10101010))
    first = _interleave4(lo0, lo1, lo2, lo3)
    second = _interleave4(hi0, hi1, hi2, hi3)
    return _k_tile(first, second, d, dmin, sc0, sc1, mn0, mn1)


@triton.jit
def fetch_q2_k(w_ptr, rows, row_bytes, k0, BLOCK_K: tl.constexpr):
    """The loads of a Q2_K tile of 64 values at k0 (groups 4c..4c+3 of 16 values, c = the tile's place in
    its block): the 8 qs words of the block half it reads (all 32 bytes: each byte holds a 2-bit field of
    4 tiles) as [2, R, 4] (word 4j + t at [j, r, t]), and the head as 2 words [R, 2]: the tile's 4 scale
    bytes, d | dmin. 84-byte blocks keep every field 4-byte aligned (rows are whole blocks): int32 word
    loads, no repack; not 16-byte aligned, so one LDG.E a word. As [j, R, t] 4 lanes share a row and each
    thread takes 2 rows x 2 words, both fields of each used; as [R, 8] a thread loaded 2 rows x 4 words and
    used one field of each (287 SASS instructions a step, 13 LDG, against 265 and 9)."""
    tl.static_assert(BLOCK_K == 64)
    chunk = (k0 >> 6) & 3
    start = rows.to(tl.int64) * row_bytes + (k0 >> 8) * 84
    words = (w_ptr + start).to(tl.pointer_type(tl.int32))
    w = (4 * tl.arange(0, 2)[:, None] + tl.arange(0, 4)[None, :])[:, None, :]  # [j, 1, t]: word 4j + t
    q = tl.load(words[None, :, None] + (4 + (chunk // 2) * 8) + w)
    return q, tl.join(tl.load(words + chunk), tl.load(words + 20))


@triton.jit
def convert_q2_k(q, head, k0):
    """fetch_q2_k's words -> fp32 [R, 64]: x = (d * scale) * q - dmin * min per 16 values, gguf's operations
    (the product is exact in fp32: fp16 x 4 bits x 2 bits, so the fused multiply-add gives gguf's bits).
    The tile's first 32 values are 2-bit field 2 * (c % 2) of the 32 bytes, the next 32 field
    2 * (c % 2) + 1: one uniform shift, then a mask a field. The scales come from the scale word broadcast
    to [R, a, j] (joined from per-row scalars they cost a shared-memory round trip and 12 barriers a step)."""
    R: tl.constexpr = q.shape[1]
    scales, dd = tl.split(head)
    d = (dd & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
    dmin = ((dd >> 16) & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
    # [R, a, j]: byte 2a + j of the scale word, group 4c + 2a + j: the scale in its low nibble, the min high
    at = (8 * (2 * tl.arange(0, 2)[:, None] + tl.arange(0, 2)[None, :])).to(tl.uint32)
    sc = scales.to(tl.uint32, bitcast=True)[:, None, None] >> at[None, :, :]
    dl = d[:, None, None] * (sc & 0xF).to(tl.float32)
    ml = dmin[:, None, None] * ((sc >> 4) & 0xF).to(tl.float32)
    bits = q.to(tl.uint32, bitcast=True) >> tl.cast(4 * ((k0 >> 6) & 1), tl.uint32)  # k0 may be an int
    lo0, lo1, lo2, lo3 = _u8_word_to_fp32(bits & 0x03030303)
    hi0, hi1, hi2, hi3 = _u8_word_to_fp32((bits >> 2) & 0x03030303)
    first = tl.join(tl.join(lo0, lo2), tl.join(lo1, lo3))  # [j, R, t, b1, b0]: byte b = 2 b1 + b0
    second = tl.join(tl.join(hi0, hi2), tl.join(hi1, hi3))
    v = tl.permute(tl.join(first, second), (1, 5, 0, 2, 3, 4))  # [R, a, j, t, b1, b0]: 32a + 16j + 4t + b
    return tl.reshape(v * dl[:, :, :, None, None, None] - ml[:, :, :, None, None, None], (R, 64))


@triton.jit
def _q6_halves_to_fp32(ql_a, ql_b, qh, shift):
    """Q6_K: uint16 ql halfwords of values (2v, 2v+1) and (32+2v, 33+2v) of a tile, the qh halfword of both,
    the nibble shift 4n (n: the tile's nibble of ql) -> q - 32 of the 4 values, fp32, exactly: one word
    [ql_a | ql_b] of low nibbles, the qh pair as [qh | qh >> 2] shifted so its 2-bit fields of this tile
    land on bits 4-5 of each byte, then the magic number (2^23 + q - (2^23 + 32) = q - 32)."""
    if COMPILED:
        return tl.inline_asm_elementwise(
            _Q6_HALVES_PTX,
            "=r,=r,=r,=r,h,h,h,r",
            [ql_a, ql_b, qh, shift],
            dtype=(tl.float32, tl.float32, tl.float32, tl.float32),
            is_pure=True,
            pack=1,
        )
    else:
        s = tl.cast(shift, tl.uint32)
        a = ((ql_a.to(tl.uint32) >> s) & 0xF0F) | (((qh.to(tl.uint32) >> s) << 4) & 0x3030)
        b = ((ql_b.to(tl.uint32) >> s) & 0xF0F) | (((qh.to(tl.uint32) >> s) << 2) & 0x3030)
        return (
            (a & 0xFF).to(tl.float32) - 32.0,
            (a >> 8).to(tl.float32) - 32.0,
            (b & 0xFF).to(tl.float32) - 32.0,
            (b >> 8).to(tl.float32) - 32.0,
        )


@triton.jit
def fetch_q6_k(w_ptr, rows, row_bytes, k0, BLOCK_K: tl.constexpr):
    """The loads of a Q6_K tile of 64 values at k0 (c = its place in the block, h = c // 2 its half, n = c % 2
    its nibble): ql halfwords of values (2v, 2v+1) and (32+2v, 33+2v), the qh halfwords of both (each qh
    byte holds a 2-bit field of 4 tiles), uint16 [4, R, 4] each (v = 4j + t at [j, r, t]: 4 lanes share a
    row, a thread takes 2 rows x 4 halfwords of each), joined as [4, R, 4, 2, 2]; the head: the tile's 4
    int8 scales (two halfwords) and the fp16 d, uint16 [R], joined as [R, 2, 2]. 210-byte blocks keep a
    row only 2-byte aligned, so 16-bit loads: one LDG.U16 per 2 quant bytes, 31 a thread a step (the whole
    decoder's byte loads came to 36 per 64 values: the saving is in the conversion); wider loads would
    need a repack at load."""
    tl.static_assert(BLOCK_K == 64)
    chunk = (k0 >> 6) & 3
    start = rows.to(tl.int64) * row_bytes + (k0 >> 8) * 210
    half = (w_ptr + start).to(tl.pointer_type(tl.uint16))
    v = (4 * tl.arange(0, 4)[:, None] + tl.arange(0, 4)[None, :])[:, None, :]  # [j, 1, t]: halfword 4j + t
    ql = half[None, :, None] + (chunk // 2) * 32 + v
    qh = half[None, :, None] + (64 + (chunk // 2) * 16) + v
    qh = tl.load(qh)
    d = tl.load(half + 104)
    # joined, not tuples (jit tuples need a newer Triton than the project's >= 3.1); qh and d twice to
    # match shapes: 2 PRMT a step
    quants = tl.join(tl.join(tl.load(ql), tl.load(ql + 16)), tl.join(qh, qh))
    scales = tl.join(tl.load(half + 96 + 2 * chunk), tl.load(half + 97 + 2 * chunk))
    return quants, tl.join(scales, tl.join(d, d))


@triton.jit
def convert_q6_k(q, head, k0):
    """fetch_q6_k's halfwords -> fp32 [R, 64]: x = (d * scale) * (q - 32) per 16 values, gguf's operations
    (q - 32 comes exactly from the magic number; the int8 scale goes by the magic number too: converted
    as a signed byte it cost 8 I2F a step). A product, no sum: no fused multiply-add question."""
    ql, qh = tl.split(q)
    ql_a, ql_b = tl.split(ql)
    qh, _ = tl.split(qh)
    scales, d16 = tl.split(head)
    s01, s23 = tl.split(scales)
    d16, _ = tl.split(d16)
    R: tl.constexpr = qh.shape[1]
    d = d16.to(tl.float16, bitcast=True).to(tl.float32)
    sw = s01.to(tl.uint32) | (s23.to(tl.uint32) << 16)
    # [R, a, g]: scale byte 2a + g; (b ^ 0x80) as the low bits of 2^23 is 2^23 + 128 + the int8 value
    at = (8 * (2 * tl.arange(0, 2)[:, None] + tl.arange(0, 2)[None, :])).to(tl.uint32)
    sc = ((sw[:, None, None] >> at[None, :, :]) & 0xFF) ^ 0x4B000080
    dl = d[:, None, None] * (sc.to(tl.float32, bitcast=True) - 8388736.0)
    v0, v1, v2, v3 = _q6_halves_to_fp32(ql_a, ql_b, qh, tl.cast(4 * ((k0 >> 6) & 1), tl.int32))
    t = tl.join(tl.join(v0, v2), tl.join(v1, v3))  # [j, R, t, a, b]
    t = tl.permute(t, (1, 3, 0, 2, 4))  # [R, a, j, t, b]: value 32a + 8j + 2t + b
    t = tl.reshape(t, (R, 2, 2, 2, 4, 2))  # [R, a, g, j % 2, t, b]: group 2a + g
    return tl.reshape(dl[:, :, :, None, None, None] * t, (R, 64))


@triton.jit
def _q3_halves_to_fp32(qs, hmask, qshift, hshift):
    """Q3_K: the uint16 qs halfword of values (2v, 2v+1) and (32+2v, 33+2v) of a tile (their 2-bit fields
    at bits qshift and qshift + 2 of each byte), the hmask halfword of both (their high bits at bits hshift
    and hshift + 1) -> q of the 4 values, fp32, exactly: q = low 2 bits - 4 where the high bit is clear,
    i.e. (low | high << 2) - 4, as the magic number (2^23 + byte - (2^23 + 4))."""
    if COMPILED:
        return tl.inline_asm_elementwise(
            _Q3_HALVES_PTX,
            "=r,=r,=r,=r,h,h,r,r",
            [qs, hmask, qshift, hshift],
            dtype=(tl.float32, tl.float32, tl.float32, tl.float32),
            is_pure=True,
            pack=1,
        )
    else:
        q = qs.to(tl.uint32) >> tl.cast(qshift, tl.uint32)
        h = hmask.to(tl.uint32) >> tl.cast(hshift, tl.uint32)
        a = (q & 0x303) | ((h & 0x101) << 2)  # bytes: values 2v, 2v+1
        b = ((q >> 2) & 0x303) | (((h >> 1) & 0x101) << 2)  # values 32+2v, 33+2v
        return (
            (a & 0xFF).to(tl.float32) - 4.0,
            (a >> 8).to(tl.float32) - 4.0,
            (b & 0xFF).to(tl.float32) - 4.0,
            (b >> 8).to(tl.float32) - 4.0,
        )


@triton.jit
def fetch_q3_k(w_ptr, rows, row_bytes, k0, BLOCK_K: tl.constexpr):
    """The loads of a Q3_K tile of 64 values at k0 (groups 4c..4c+3 of 16 values): the qs halfwords of values
    (2v, 2v+1) and (32+2v, 33+2v) (the 32 bytes of the block half c // 2: each holds a 2-bit field of 4 tiles)
    and the hmask halfwords of both (all 32 bytes: each holds the high bit of every tile's values), uint16
    [4, R, 4] each as Q6_K's (v = 4j + t at [j, r, t]), joined as [4, R, 4, 2]; the head: the 4 scale bytes
    whose nibble c // 2 holds the low 4 bits of the tile's 4 scales (bytes 4 (c % 2) ..), the 4 bytes whose
    field c holds their top 2 bits (bytes 8-11), the fp16 d; uint16 [R], joined as [R, 2, 2, 2]. 110-byte
    blocks keep a row only 2-byte aligned, as Q6_K's: 16-bit loads, 37 a row a step."""
    tl.static_assert(BLOCK_K == 64)
    chunk = (k0 >> 6) & 3
    start = rows.to(tl.int64) * row_bytes + (k0 >> 8) * 110
    half = (w_ptr + start).to(tl.pointer_type(tl.uint16))
    v = (4 * tl.arange(0, 4)[:, None] + tl.arange(0, 4)[None, :])[:, None, :]  # [j, 1, t]: halfword 4j + t
    qs = tl.load(half[None, :, None] + (16 + (chunk // 2) * 16) + v)
    hmask = tl.load(half[None, :, None] + v)
    low = tl.join(tl.load(half + 48 + 2 * (chunk % 2)), tl.load(half + 49 + 2 * (chunk % 2)))
    high = tl.join(tl.load(half + 52), tl.load(half + 53))
    d = tl.load(half + 54)
    # joined, not tuples (see fetch_q6_k); d four times to match shapes
    return tl.join(qs, hmask), tl.join(tl.join(low, high), tl.join(tl.join(d, d), tl.join(d, d)))


@triton.jit
def convert_q3_k(q, head, k0):
    """fetch_q3_k's halfwords -> fp32 [R, 64]: x = (d * (scale - 32)) * q per 16 values, gguf's operations
    (scale - 32 and q exact from the magic number; a product, no sum)."""
    qs, hmask = tl.split(q)
    scales, d16 = tl.split(head)
    low, high = tl.split(scales)
    lo01, lo23 = tl.split(low)
    hi01, hi23 = tl.split(high)
    d16, _ = tl.split(d16)
    d16, _ = tl.split(d16)
    R: tl.constexpr = qs.shape[1]
    chunk = (k0 >> 6) & 3
    d = d16.to(tl.float16, bitcast=True).to(tl.float32)
    lw = lo01.to(tl.uint32) | (lo23.to(tl.uint32) << 16)
    hw = hi01.to(tl.uint32) | (hi23.to(tl.uint32) << 16)
    # byte g' of sw: scale 4c + g' (6 bits): nibble c // 2 of byte g' of lw, field c of byte g' of hw
    low = (lw >> tl.cast(4 * (chunk // 2), tl.uint32)) & 0x0F0F0F0F
    sw = low | (((hw >> tl.cast(2 * chunk, tl.uint32)) & 0x03030303) << 4)
    # [R, a, g]: byte 2a + g as the low bits of 2^23, minus 2^23 + 32 (the 6-bit word a row first: 332
    # SASS instructions a step, against 365 with two shifts and masks a scale)
    at = (8 * (2 * tl.arange(0, 2)[:, None] + tl.arange(0, 2)[None, :])).to(tl.uint32)
    sc = ((sw[:, None, None] >> at[None, :, :]) & 0xFF) | 0x4B000000
    dl = d[:, None, None] * (sc.to(tl.float32, bitcast=True) - 8388640.0)
    qshift = tl.cast(4 * (chunk % 2), tl.int32)
    v0, v1, v2, v3 = _q3_halves_to_fp32(qs, hmask, qshift, tl.cast(2 * chunk, tl.int32))
    t = tl.join(tl.join(v0, v2), tl.join(v1, v3))  # [j, R, t, a, b]
    t = tl.permute(t, (1, 3, 0, 2, 4))  # [R, a, j, t, b]: value 32a + 8j + 2t + b
    t = tl.reshape(t, (R, 2, 2, 2, 4, 2))  # [R, a, g, j % 2, t, b]: group 2a + g
    return tl.reshape(dl[:, :, :, None, None, None] * t, (R, 64))


# ---- 32-value blocks: Q4_0, IQ4_NL (18 bytes), Q5_0 (22), Q4_1 (20), Q5_1 (24) --------------------------
# A 64-value tile is two blocks. At K % 64 == 0 (the only K a 64-value tile serves) every tile starts 4-byte
# aligned (36, 44, 40, 48 bytes a tile), so head fields at 4-byte offsets come as int32 words. The quants:
# the 4 lanes that share a row take, lane t, qs halfwords t and t + 4 of each block, whose nibbles are the
# lane's own values in the tensor-core A fragment (k = 2t, 2t+1, 2t+8, 2t+9 of each 16): no lane needs
# another lane's bytes. uint16 loads where the qs sit 2 bytes off a word (Q4_0, IQ4_NL, Q5_0); where they are
# 4-byte aligned (Q4_1, Q5_1) the two int32 words holding the lane's halfwords, then one prmt (uint16 loads
# there were vectorized across the row's lanes: shuffles or shared memory, 226 / 271 SASS instructions a
# step against 191 / 221).


def _q5_ptx(bias: int) -> str:
    """_nibbles_ptx with fifth bits: $9 the block's qh word, $10 = 2t. Bits 2t + (0, 1, 8, 9) of qh (16 more
    for the high nibbles) go to bit 4 of bytes 0-3: s = qh >> 2t shifted left by 4 (bits 0, 8, 16, 24 to bit
    4 of a byte) and by 3 (bits 1, 9, 17, 25), the bytes interleaved by prmt, masked and or-ed in."""
    return (
        "{\n.reg .b32 s, a, b, lo, hi, n;\nshr.b32 s, $9, $10;\nshl.b32 a, s, 4;\nshl.b32 b, s, 3;\n"
        "prmt.b32 lo, a, b, 0x5140;\nprmt.b32 hi, a, b, 0x7362;\nand.b32 lo, lo, 0x10101010;\n"
        "and.b32 n, $8, 0x0F0F0F0F;\nor.b32 lo, lo, n;\nand.b32 hi, hi, 0x10101010;\nshr.b32 n, $8, 4;\n"
        "and.b32 n, n, 0x0F0F0F0F;\nor.b32 hi, hi, n;\n"
        + _magic_ptx("lo", (0, 1, 2, 3), bias)
        + _magic_ptx("hi", (4, 5, 6, 7), bias)
        + "}"
    )


def _kvalue_words() -> list[int]:
    """gguf's kvalues_iq4nl (tables.kvalues), each + 128 (the int8 with its sign bit flipped), as 4
    little-endian words: table bytes 0-3, 4-7, 8-11, 12-15."""
    biased = [int(v) + 128 for v in kvalues()]
    return [sum(biased[4 * i + j] << (8 * j) for j in range(4)) for i in range(4)]


def _iq4_nl_ptx() -> str:
    """$8 as _nibbles_ptx's -> $0-$3 the kvalues of its low nibbles, $4-$7 of its high ones. A selector's
    nibbles 0-3 (w, then w >> 16: byte 0's low and high nibble, byte 1's ...) pick byte n & 7 of table words
    0-1 (la) and of words 2-3 (ha), a third prmt la's or ha's byte by bit 3 (selector 0x3210 | 4 * bit 3);
    then the magic number minus 2^23 + 128."""
    t0, t1, t2, t3 = (f"0x{w:08X}" for w in _kvalue_words())
    pick = f"prmt.b32 la, {t0}, {t1}, x;\nprmt.b32 ha, {t2}, {t3}, x;\nprmt.b32 %s, la, ha, y;\n"
    return (
        "{\n.reg .b32 x, y, la, ha, r0, r1;\nand.b32 x, $8, 0x77777777;\nshr.b32 y, $8, 1;\n"
        "and.b32 y, y, 0x44444444;\nor.b32 y, y, 0x32103210;\n"
        + pick % "r0"
        + "shr.b32 x, x, 16;\nshr.b32 y, y, 16;\n"
        + pick % "r1"
        + _magic_ptx("r0", (0, 4, 1, 5), 128)
        + _magic_ptx("r1", (2, 6, 3, 7), 128)
        + "}"
    )


_Q5_PTX_0 = tl.constexpr(_q5_ptx(0))
_Q5_PTX_16 = tl.constexpr(_q5_ptx(16))
_IQ4_NL_PTX = tl.constexpr(_iq4_nl_ptx())
_KV0, _KV1, _KV2, _KV3 = (tl.constexpr(w) for w in _kvalue_words())


@triton.jit
def _nibbles_to_fp32(w, BIAS: tl.constexpr):
    """uint32 words of a block's qs bytes 2t, 2t+1, 2t+8, 2t+9 (their low nibbles are values 2t + (0, 1, 8, 9),
    the high nibbles 16 more) -> nibble - BIAS (0 or 8) of the 8 values, fp32, exactly: low nibbles first."""
    if COMPILED:
        return tl.inline_asm_elementwise(
            _NIBBLES_PTX_8 if BIAS == 8 else _NIBBLES_PTX_0,
            "=r,=r,=r,=r,=r,=r,=r,=r,r",
            [w],
            dtype=(tl.float32,) * 8,
            is_pure=True,
            pack=1,
        )
    else:
        w = w.to(tl.uint32, bitcast=True)
        return (
            (w & 0xF).to(tl.float32) - BIAS,
            ((w >> 8) & 0xF).to(tl.float32) - BIAS,
            ((w >> 16) & 0xF).to(tl.float32) - BIAS,
            ((w >> 24) & 0xF).to(tl.float32) - BIAS,
            ((w >> 4) & 0xF).to(tl.float32) - BIAS,
            ((w >> 12) & 0xF).to(tl.float32) - BIAS,
            ((w >> 20) & 0xF).to(tl.float32) - BIAS,
            (w >> 28).to(tl.float32) - BIAS,
        )


@triton.jit
def _q5_to_fp32(w, qh, shift, BIAS: tl.constexpr):
    """_nibbles_to_fp32 with fifth bits (Q5_0, Q5_1): qh the block's qh word (bit i: value i's fifth bit),
    shift = 2t -> q - BIAS (16 or 0) of the 8 values, q = nibble | fifth bit << 4, as gguf builds it."""
    if COMPILED:
        return tl.inline_asm_elementwise(
            _Q5_PTX_16 if BIAS == 16 else _Q5_PTX_0,
            "=r,=r,=r,=r,=r,=r,=r,=r,r,r,r",
            [w, qh, shift],
            dtype=(tl.float32,) * 8,
            is_pure=True,
            pack=1,
        )
    else:
        w = w.to(tl.uint32, bitcast=True)
        s = qh.to(tl.uint32, bitcast=True) >> tl.cast(shift, tl.uint32)
        return (
            ((w & 0xF) | ((s << 4) & 0x10)).to(tl.float32) - BIAS,
            (((w >> 8) & 0xF) | ((s << 3) & 0x10)).to(tl.float32) - BIAS,
            (((w >> 16) & 0xF) | ((s >> 4) & 0x10)).to(tl.float32) - BIAS,
            (((w >> 24) & 0xF) | ((s >> 5) & 0x10)).to(tl.float32) - BIAS,
            (((w >> 4) & 0xF) | ((s >> 12) & 0x10)).to(tl.float32) - BIAS,
            (((w >> 12) & 0xF) | ((s >> 13) & 0x10)).to(tl.float32) - BIAS,
            (((w >> 20) & 0xF) | ((s >> 20) & 0x10)).to(tl.float32) - BIAS,
            ((w >> 28) | ((s >> 21) & 0x10)).to(tl.float32) - BIAS,
        )


@triton.jit
def _kvalue(n):
    """kvalues_iq4nl[n] for nibbles n (uint32), fp32: byte n % 4 of _kvalue_words()[n // 4], minus 128."""
    word = tl.where(n < 8, tl.where(n < 4, _KV0, _KV1), tl.where(n < 12, _KV2, _KV3)).to(tl.uint32)
    return ((word >> ((n & 3) * 8)) & 0xFF).to(tl.float32) - 128.0


@triton.jit
def _iq4_nl_to_fp32(w):
    """_nibbles_to_fp32's words -> kvalues_iq4nl of the 8 nibbles (fp32, exact), low nibbles first. No table
    pointer reaches a split convert (the loops call CONVERT(quants, scales, k0)): the 16 values are gguf's
    constants, 4 words in the PTX."""
    if COMPILED:
        return tl.inline_asm_elementwise(
            _IQ4_NL_PTX, "=r,=r,=r,=r,=r,=r,=r,=r,r", [w], dtype=(tl.float32,) * 8, is_pure=True, pack=1
        )
    else:
        w = w.to(tl.uint32, bitcast=True)
        return (
            _kvalue(w & 0xF),
            _kvalue((w >> 8) & 0xF),
            _kvalue((w >> 16) & 0xF),
            _kvalue((w >> 24) & 0xF),
            _kvalue((w >> 4) & 0xF),
            _kvalue((w >> 12) & 0xF),
            _kvalue((w >> 20) & 0xF),
            _kvalue(w >> 28),
        )


@triton.jit
def _pair(q):
    """[2, R, 4, 2] uint16 qs halfwords (t, t + 4) -> [2, R, 4] uint32 words of them."""
    a, c = tl.split(q)
    return a.to(tl.uint32) | (c.to(tl.uint32) << 16)


@triton.jit
def _pick_halves(q):
    """[2, R, 4, 2] int32 qs words holding lane t's halfwords t and t + 4 (half t % 2 of each) -> _pair's
    words: one prmt (selector 0x5410 for an even lane, 0x7632 for an odd one)."""
    a, c = tl.split(q)
    odd = tl.broadcast_to((tl.arange(0, 4) & 1)[None, None, :], a.shape)
    if COMPILED:
        sel = tl.where(odd == 0, 0x5410, 0x7632)
        return tl.inline_asm_elementwise(
            "prmt.b32 $0, $1, $2, $3;", "=r,r,r,r", [a, c, sel], dtype=tl.uint32, is_pure=True, pack=1
        )
    else:
        s = (16 * odd).to(tl.uint32)
        return ((a.to(tl.uint32, bitcast=True) >> s) & 0xFFFF) | ((c.to(tl.uint32, bitcast=True) >> s) << 16)


@triton.jit
def _lane_shift(like):
    """2t for lane t of [2, R, 4] (Q5's qh shift), int32."""
    return tl.broadcast_to(2 * tl.arange(0, 4)[None, None, :], like.shape)


@triton.jit
def _tile_ptr(w_ptr, rows, row_bytes, k0, TILE_BYTES: tl.constexpr, dtype: tl.constexpr):
    """[R] pointers (of dtype) to the rows' tile at k0: two blocks, TILE_BYTES in all."""
    return (w_ptr + (rows.to(tl.int64) * row_bytes + (k0 >> 6) * TILE_BYTES)).to(tl.pointer_type(dtype))


@triton.jit
def _per_block(ptr, stride, lane_offset):
    """[2, R, 4] (block b, row, lane t): ptr[r][stride * b + lane_offset[t]]."""
    b = tl.arange(0, 2)[:, None, None]
    return tl.load(ptr[None, :, None] + (stride * b + lane_offset[None, None, :]))


@triton.jit
def _f16(bits):
    """The low 16 bits of uint/int words as fp16 -> fp32 (exact)."""
    return bits.to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _pairs_tile(lo0, lo1, lo2, lo3, hi0, hi1, hi2, hi3):
    """The 8 values of each [block b, row, lane t] (low nibbles of bytes 0-3, then the high nibbles) -> the
    tile [R, 64]: byte 2m + e of the lane's halfword pair is value 8m + 2t + e of its block (16 more for a
    high nibble): k = 32b + 16c + 8m + 2t + e."""
    R: tl.constexpr = lo0.shape[1]
    lo = tl.join(tl.join(lo0, lo2), tl.join(lo1, lo3))  # [b, R, t, m, e]
    hi = tl.join(tl.join(hi0, hi2), tl.join(hi1, hi3))
    return tl.reshape(tl.permute(tl.join(lo, hi), (1, 0, 5, 3, 2, 4)), (R, 64))  # [R, b, c, m, t, e]


@triton.jit
def _scaled_tile(v, d):
    """gguf's d * q of _nibbles_to_fp32's 8 values (Q4_0, IQ4_NL, Q5_0) -> [R, 64]."""
    return _pairs_tile(d * v[0], d * v[1], d * v[2], d * v[3], d * v[4], d * v[5], d * v[6], d * v[7])


@triton.jit
def _offset_tile(v, d, m):
    """gguf's (d * q) + m (Q4_1, Q5_1) -> [R, 64]. The product is exact in fp32 (fp16 x 5 bits), so the
    fused multiply-add gives gguf's bits."""
    v0, v1, v2, v3, v4, v5, v6, v7 = v
    return _pairs_tile(
        d * v0 + m, d * v1 + m, d * v2 + m, d * v3 + m, d * v4 + m, d * v5 + m, d * v6 + m, d * v7 + m
    )


@triton.jit
def fetch_q4_0(w_ptr, rows, row_bytes, k0, BLOCK_K: tl.constexpr):
    """The loads of a Q4_0 tile of 64 values at k0 (blocks of 18 bytes: fp16 d | qs[16]): lane t's qs
    halfwords t and t + 4 of each block, uint16 [2, R, 4, 2], and the blocks' d, uint16 [2, R, 4] (each lane
    of a row loads it: one LDG.U16 against a shared-memory round trip). The qs sit 2 bytes off a word: 16-bit
    loads, 12 a thread a step. IQ4_NL's blocks are laid out alike (fetch_iq4_nl)."""
    tl.static_assert(BLOCK_K == 64)
    half = _tile_ptr(w_ptr, rows, row_bytes, k0, 36, tl.uint16)
    t = tl.arange(0, 4)
    return tl.join(_per_block(half, 9, 1 + t), _per_block(half, 9, 5 + t)), _per_block(half, 9, 0 * t)


@triton.jit
def convert_q4_0(q, d, k0):
    """fetch_q4_0's halfwords -> fp32 [R, 64]: gguf's d * (q - 8) (q - 8 exact from the magic number)."""
    return _scaled_tile(_nibbles_to_fp32(_pair(q), 8), _f16(d))


fetch_iq4_nl = fetch_q4_0  # block_iq4_nl: fp16 d | qs[16], as Q4_0's


@triton.jit
def convert_iq4_nl(q, d, k0):
    """fetch_iq4_nl's halfwords -> fp32 [R, 64]: gguf's d * kvalues_iq4nl[q]."""
    return _scaled_tile(_iq4_nl_to_fp32(_pair(q)), _f16(d))


@triton.jit
def fetch_q5_0(w_ptr, rows, row_bytes, k0, BLOCK_K: tl.constexpr):
    """The loads of a Q5_0 tile of 64 values at k0 (blocks of 22 bytes: fp16 d | qh[4] | qs[16]): lane t's qs
    halfwords as fetch_q4_0's (uint16 [2, R, 4, 2]), and the head as two int32 words of each block, [2, R, 4,
    2]: words 0, 1 of the tile (d0 | qh0 low half, qh0 high half | qs), words 5, 6 (qs | d1, qh1)."""
    tl.static_assert(BLOCK_K == 64)
    half = _tile_ptr(w_ptr, rows, row_bytes, k0, 44, tl.uint16)
    words = _tile_ptr(w_ptr, rows, row_bytes, k0, 44, tl.int32)
    t = tl.arange(0, 4)
    qs = tl.join(_per_block(half, 11, 3 + t), _per_block(half, 11, 7 + t))
    return qs, tl.join(_per_block(words, 5, 0 * t), _per_block(words, 5, 1 + 0 * t))


@triton.jit
def convert_q5_0(q, head, k0):
    """fetch_q5_0's halfwords and words -> fp32 [R, 64]: gguf's d * (q - 16), q = nibble | fifth bit << 4."""
    a, c = tl.split(head)
    a = a.to(tl.uint32, bitcast=True)
    c = c.to(tl.uint32, bitcast=True)
    first = (tl.arange(0, 2) == 0)[:, None, None]  # block 0's fields sit 2 bytes earlier in their words
    d = _f16(tl.where(first, a, a >> 16))
    qh = tl.where(first, (a >> 16) | (c << 16), c)
    return _scaled_tile(_q5_to_fp32(_pair(q), qh, _lane_shift(qh), 16), d)


@triton.jit
def fetch_q4_1(w_ptr, rows, row_bytes, k0, BLOCK_K: tl.constexpr):
    """The loads of a Q4_1 tile of 64 values at k0 (blocks of 20 bytes: fp16 d | fp16 m | qs[16]): the int32
    qs words holding lane t's halfwords t and t + 4 of each block (words t // 2 and t // 2 + 2 of its qs),
    [2, R, 4, 2], and each block's d | m word, [2, R, 4]."""
    tl.static_assert(BLOCK_K == 64)
    words = _tile_ptr(w_ptr, rows, row_bytes, k0, 40, tl.int32)
    t = tl.arange(0, 4)
    qs = tl.join(_per_block(words, 5, 1 + (t >> 1)), _per_block(words, 5, 3 + (t >> 1)))
    return qs, _per_block(words, 5, 0 * t)


@triton.jit
def convert_q4_1(q, dm, k0):
    """fetch_q4_1's words -> fp32 [R, 64]: gguf's (d * q) + m."""
    dm = dm.to(tl.uint32, bitcast=True)
    return _offset_tile(_nibbles_to_fp32(_pick_halves(q), 0), _f16(dm), _f16(dm >> 16))


@triton.jit
def fetch_q5_1(w_ptr, rows, row_bytes, k0, BLOCK_K: tl.constexpr):
    """The loads of a Q5_1 tile of 64 values at k0 (blocks of 24 bytes: fp16 d | fp16 m | qh[4] | qs[16]): qs
    words as fetch_q4_1's, and each block's d | m and qh words, [2, R, 4, 2] (a tile is 48 bytes, so rows and
    tiles are 16-byte aligned and the two words one 8-byte load)."""
    tl.static_assert(BLOCK_K == 64)
    words = _tile_ptr(w_ptr, rows, row_bytes, k0, 48, tl.int32)
    t = tl.arange(0, 4)
    qs = tl.join(_per_block(words, 6, 2 + (t >> 1)), _per_block(words, 6, 4 + (t >> 1)))
    b = tl.arange(0, 2)[:, None, None, None]
    j = tl.arange(0, 2)[None, None, None, :]
    head = words[None, :, None, None] + (6 * b + j + 0 * t[None, None, :, None])
    return qs, tl.load(head)


@triton.jit
def convert_q5_1(q, head, k0):
    """fetch_q5_1's words -> fp32 [R, 64]: gguf's (d * q) + m, q = nibble | fifth bit << 4."""
    dm, qh = tl.split(head)
    dm = dm.to(tl.uint32, bitcast=True)
    return _offset_tile(_q5_to_fp32(_pick_halves(q), qh, _lane_shift(qh), 0), _f16(dm), _f16(dm >> 16))
