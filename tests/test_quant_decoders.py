"""GGUF block decoders (kernels/quant/) against gguf's own numpy dequantization, bit for bit in fp32.

Blocks are adversarial: every byte uniformly random (all quant, index, sign and sub-scale patterns),
the fp16 scale fields drawn from zero / subnormal, ordinary, and huge magnitudes of both signs (never
inf or NaN: their propagation is not a format property). Bits are compared as int32, so -0.0 vs 0.0
counts. MXFP4 / NVFP4 keep random scale bytes (all finite; MXFP4's largest overflow to inf in gguf and
here alike). Without a GPU the Triton decoders run in the interpreter at small sizes; on a GPU the `gpu`
test repeats the comparison at a larger size with the compiled kernels.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # must precede the first triton import
    os.environ.setdefault("TRITON_INTERPRET", "1")

import textwrap  # noqa: E402

import gguf  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from mlapipe.kernels.quant import random_blocks, reference, split_decoders, tables  # noqa: E402
from mlapipe.kernels.quant.dequantize import (  # noqa: E402
    dequantize,
    dequantize_reference,
    quant_embedding,
    quant_embedding_reference,
)
from mlapipe.kernels.quant.tensor import QuantTensor  # noqa: E402
from mlapipe.kernels.quant.types import QUANT_TYPES, has_kernel, nbytes, quant_type, row_bytes  # noqa: E402
from tests.hopper_compile import compile_script_output  # noqa: E402
from tests.ptx_emulator import run_ptx  # noqa: E402

# MXFP4's huge e8m0 scales overflow fp32 (inf, in gguf too), huge fp16 scales overflow fp16 outputs
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TYPES = list(QUANT_TYPES.values())
TYPE_IDS = [t.name for t in TYPES]
PLAIN_COLS = 37  # plain float types: an odd row length, so the decoders' tail mask is exercised
PLAIN_BITS = {"F32": (np.uint32, 23, 0xFF), "F16": (np.uint16, 10, 0x1F), "BF16": (np.uint16, 7, 0xFF)}


def fp16_scales(rng: np.random.Generator, n: int) -> np.ndarray:
    """n fp16 values: a quarter zero/subnormal, a quarter huge (>= 2^14), the rest any finite exponent;
    random signs."""
    kind = rng.integers(0, 4, n)
    exponent = np.where(kind == 0, 0, np.where(kind == 1, rng.integers(29, 31, n), rng.integers(1, 31, n)))
    bits = (rng.integers(0, 2, n) << 15) | (exponent << 10) | rng.integers(0, 1024, n)
    return bits.astype(np.uint16).view(np.float16)


def adversarial_rows(qtype: int, rows: int, blocks_per_row: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 (rows, row_bytes) of `qtype` with random bits and random fp16 scales."""
    row = quant_type(qtype)
    if row.block_elems == 1:  # plain floats: random bits, inf/NaN exponents moved one down
        dtype, shift, ones = PLAIN_BITS[row.name]
        bits = rng.integers(
            0, np.iinfo(dtype).max, (rows, PLAIN_COLS * blocks_per_row), dtype=dtype, endpoint=True
        )
        bits[((bits >> shift) & ones) == ones] ^= dtype(1 << shift)
        return bits.view(np.uint8)
    n = rows * blocks_per_row
    blocks = torch.from_numpy(rng.integers(0, 256, (n, row.block_bytes), dtype=np.uint8))
    d = torch.from_numpy(fp16_scales(rng, n).copy())
    dmin = torch.from_numpy(fp16_scales(rng, n).copy()) if len(row.fp16_fields) == 2 else None
    if row.fp16_fields or row.name == "IQ1_M":  # MXFP4 / NVFP4 keep random scale bytes: all are finite
        random_blocks.write_scales(blocks, qtype, d, dmin)
    return blocks.numpy().reshape(rows, -1)


def gguf_values(raw: np.ndarray, qtype: int) -> torch.Tensor:
    return torch.from_numpy(
        np.ascontiguousarray(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType(qtype)))
    )


def quant_tensor(raw: np.ndarray, qtype: int, device="cpu") -> QuantTensor:
    cols = raw.shape[-1] // quant_type(qtype).block_bytes * quant_type(qtype).block_elems
    return QuantTensor(torch.from_numpy(raw.copy()).to(device), qtype, (*raw.shape[:-1], cols))


def assert_bits_equal(got: torch.Tensor, want: torch.Tensor):
    assert got.shape == want.shape, (got.shape, want.shape)
    got, want = got.float().cpu().contiguous(), want.float().cpu().contiguous()
    diff = got.view(torch.int32) != want.view(torch.int32)
    if diff.any():
        i = diff.nonzero()[0].tolist()
        raise AssertionError(
            f"{int(diff.sum())} of {diff.numel()} values differ, first at {i}: {got[tuple(i)]} vs {want[tuple(i)]}"
        )


# ---- the table -------------------------------------------------------------------------------------


def test_table_matches_gguf_sizes_and_covers_its_dequantizers():
    for row in TYPES:
        assert (row.block_elems, row.block_bytes) == gguf.GGML_QUANT_SIZES[
            gguf.GGMLQuantizationType(row.code)
        ]
        assert has_kernel(row.code) and row.decoder is not None and row.reference is not None
    Q = gguf.GGMLQuantizationType
    assert set(gguf.quants._type_traits) | {Q.F16, Q.F32} <= set(QUANT_TYPES)  # all that gguf dequantizes
    assert row_bytes(Q.Q4_K, 7168) == 28 * 144 and nbytes(Q.Q8_0, (4, 3, 64)) == 12 * 2 * 34
    with pytest.raises(ValueError, match="Q4_K rows hold multiples of 256 values, not 1408"):
        row_bytes(Q.Q4_K, 1408)
    with pytest.raises(ValueError, match="Q8_K has no block decoder"):
        quant_type(Q.Q8_K)
    assert not has_kernel(Q.Q8_K)


def test_tables_are_gguf_tables():
    Q = gguf.GGMLQuantizationType
    signs = tables.ksigns()
    # ggml's ksigns_iq2xs: 7 sign bits, the eighth makes the number of minus signs even
    assert all(int(s) & 0x7F == i and bin(int(s)).count("1") % 2 == 0 for i, s in enumerate(signs))
    assert tables.host_table(Q.IQ2_XXS).shape == (256 * 8 + 128,)
    assert tables.host_table(Q.IQ1_S).unique().tolist() == [-1, 0, 1]
    assert tables.host_table(Q.IQ4_NL).tolist() == list(gguf.quants.IQ4_NL.kvalues)
    assert tables.host_table(Q.Q8_0).shape == (1,)


# ---- decoders vs gguf ----------------------------------------------------------------------------


@pytest.mark.parametrize("row", TYPES, ids=TYPE_IDS)
def test_torch_reference_equals_gguf(row):
    raw = adversarial_rows(row.code, 7, 3, np.random.default_rng(row.code))
    assert_bits_equal(
        reference.dequantize_rows(torch.from_numpy(raw.copy()), row.code), gguf_values(raw, row.code)
    )


# (rows, blocks per row): rows not a multiple of the 4-row tile, two blocks a row; one row of one block
# (the tile-width test below walks rows of several blocks)
SHAPES = [(5, 2), (1, 1)]


@pytest.mark.parametrize("shape", SHAPES, ids=["5x2", "1x1"])
@pytest.mark.parametrize("row", TYPES, ids=TYPE_IDS)
def test_triton_decoder_equals_gguf(row, shape):
    raw = adversarial_rows(row.code, *shape, np.random.default_rng([row.code, *shape]))
    assert_bits_equal(dequantize(quant_tensor(raw, row.code)), gguf_values(raw, row.code))


@pytest.mark.parametrize(
    "row", [t for t in TYPES if t.block_elems > 1], ids=[t.name for t in TYPES if t.block_elems > 1]
)
def test_every_tile_width_decodes_the_same(row):
    """BLOCK_K 32 (an eighth of a K-quant block), 64 (the GEMMs' tile) and 512 (two K-quant blocks)."""
    raw = adversarial_rows(row.code, 2, 512 // row.block_elems, np.random.default_rng(row.code + 100))
    want = gguf_values(raw, row.code)
    for block_k in (32, 64, 512):
        assert_bits_equal(dequantize(quant_tensor(raw, row.code), block_k=block_k), want)


# the interpreter truncates fp32 -> bf16 (no numpy bf16); the compiled kernels round to nearest even
HALF = torch.bfloat16 if torch.cuda.is_available() else torch.float16


@pytest.mark.parametrize("dtype", [torch.float32, HALF])
def test_dequantize_expert_stack_and_output_dtype(dtype):
    """A (E, N, cols) expert stack dequantizes whole and per expert; half output is the rounded fp32."""
    qtype = gguf.GGMLQuantizationType.Q4_K
    raw = adversarial_rows(qtype, 3 * 5, 2, np.random.default_rng(7)).reshape(3, 5, -1)
    w = quant_tensor(raw, qtype)
    assert w.shape == (3, 5, 512)
    want = gguf_values(raw.reshape(15, -1), qtype).reshape(3, 5, 512)
    got = dequantize(w, dtype)
    assert (
        got.dtype == dtype
        and torch.equal(got, want.to(dtype))
        and torch.equal(got, dequantize_reference(w, dtype))
    )
    assert torch.equal(dequantize(w[1], dtype), want[1].to(dtype))


# ---- split decoders (fetch + convert, what the GEMMs call a step ahead) --------------------------


@triton.jit
def _split_decode_kernel(w_ptr, out_ptr, n_rows, cols, row_bytes, FETCH: tl.constexpr, CONVERT: tl.constexpr,
                         BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    k0 = tl.program_id(1) * BLOCK_K
    quants, scales = FETCH(w_ptr, tl.minimum(rows, n_rows - 1), row_bytes, k0, BLOCK_K)
    values = CONVERT(quants, scales, k0)
    k = k0 + tl.arange(0, BLOCK_K)
    offsets = rows.to(tl.int64)[:, None] * cols + k[None, :]
    tl.store(out_ptr + offsets, values, mask=(rows < n_rows)[:, None])


def split_decode(w: QuantTensor) -> torch.Tensor:
    """All of w's values through its type's fetch + convert, tile by tile, fp32."""
    kind = quant_type(w.qtype)
    n_rows, cols = w.data.numel() // w.data.shape[-1], w.shape[-1]
    block_k = kind.fetch_block_k or 64
    out = torch.empty(n_rows, cols, dtype=torch.float32, device=w.device)
    grid = (triton.cdiv(n_rows, 16), cols // block_k)
    _split_decode_kernel[grid](
        w.data, out, n_rows, cols, w.data.shape[-1], kind.fetch, kind.convert, BLOCK_R=16, BLOCK_K=block_k
    )
    return out.reshape(w.shape)


SPLIT_TYPES = [t for t in TYPES if t.fetch is not None]


@pytest.mark.parametrize("row", SPLIT_TYPES, ids=[t.name for t in SPLIT_TYPES])
def test_split_decoder_equals_gguf(row):
    """Every 64-value tile of every position in a block (4 per K-quant block), rows past one 16-row tile;
    3 blocks a row, so Q6_K rows (210-byte blocks) start 2 bytes off a 4-byte boundary every other row; 32-value
    types 6 blocks a row (3 tiles of two blocks), so Q5_0 rows (132 bytes) start 4 bytes off an 8-byte one."""
    blocks = 3 if row.block_elems == 256 else 6
    raw = adversarial_rows(row.code, 20, blocks, np.random.default_rng(row.code + 300))
    assert_bits_equal(split_decode(quant_tensor(raw, row.code, DEVICE)), gguf_values(raw, row.code))


def test_split_converts_ptx_equals_their_twins():
    """The 32-value types' converts run PTX on a GPU and Triton ops in the interpreter (the test above): the
    PTX, run by tests/ptx_emulator.py on every input pattern that matters (random words, all 4 lanes), gives
    the twins' values: nibbles (- 8), Q5 quants (- 16, fifth bits from qh >> 2t), kvalues_iq4nl, the halves
    prmt, Q8_0's signed bytes and the K-quants' masked unsigned ones."""
    rng = np.random.default_rng(5)
    w, qh = (rng.integers(0, 2**32, 4096, dtype=np.uint64).astype(np.uint32) for _ in range(2))
    t = np.arange(4096, dtype=np.uint32) % 4
    nib = np.stack([(w >> np.uint32(4 * i)) & 0xF for i in range(8)])  # low, high nibble of byte 0, ...
    lo_hi = np.concatenate([nib[0::2], nib[1::2]]).astype(np.int64)  # the converts' order: low nibbles first
    fifth = np.stack([(qh >> (2 * t + e)) & 1 for e in (0, 1, 8, 9, 16, 17, 24, 25)]).astype(np.int64)
    kv = tables.kvalues().astype(np.int64)
    cases = [
        (split_decoders._NIBBLES_PTX_0, {8: w}, lo_hi),
        (split_decoders._NIBBLES_PTX_8, {8: w}, lo_hi - 8),
        (split_decoders._Q5_PTX_0, {8: w, 9: qh, 10: 2 * t}, lo_hi | fifth << 4),
        (split_decoders._Q5_PTX_16, {8: w, 9: qh, 10: 2 * t}, (lo_hi | fifth << 4) - 16),
        (split_decoders._IQ4_NL_PTX, {8: w}, kv[lo_hi]),
    ]
    for asm, inputs, want in cases:
        got = np.stack(run_ptx(asm.value, inputs, 8)).view(np.float32)
        assert np.array_equal(got, want.astype(np.float32)), asm.value
    byte_values = np.stack([(w >> np.uint32(8 * i)) & 0xFF for i in range(4)]).astype(np.int64)
    signed = np.where(byte_values >= 128, byte_values - 256, byte_values)
    for asm, want in ((split_decoders._Q8_WORD_PTX, signed), (split_decoders._U8_WORD_PTX, byte_values)):
        got = np.stack(run_ptx(asm.value, {4: w}, 4)).view(np.float32)
        assert np.array_equal(got, want.astype(np.float32)), asm.value
    odd = t & 1
    (got,) = run_ptx("prmt.b32 $0, $1, $2, $3;", {1: w, 2: qh, 3: np.where(odd, 0x7632, 0x5410)}, 1)
    assert np.array_equal(got, ((w >> 16 * odd) & 0xFFFF) | (((qh >> 16 * odd) & 0xFFFF) << 16))


# ---- embedding gather ----------------------------------------------------------------------------


@pytest.mark.parametrize("row", TYPES, ids=TYPE_IDS)
def test_embedding_gather_equals_reference(row):
    raw = adversarial_rows(row.code, 9, 2, np.random.default_rng(row.code + 200))
    w = quant_tensor(raw, row.code)
    ids = torch.tensor([3, 0, 8, 3, 5, 1])  # repeats, first and last rows; 6 tokens: not a multiple of 4
    want = gguf_values(raw, row.code)[ids]
    assert_bits_equal(quant_embedding(ids, w, torch.float32), want)
    assert_bits_equal(quant_embedding_reference(ids, w, torch.float32), want)
    assert torch.equal(quant_embedding(ids, w, HALF), quant_embedding_reference(ids, w, HALF))


def test_empty_and_bad_inputs_fail_with_one_line():
    qtype = gguf.GGMLQuantizationType.Q8_0
    w = quant_tensor(adversarial_rows(qtype, 4, 2, np.random.default_rng(1)), qtype)
    assert quant_embedding(torch.zeros(0, dtype=torch.long), w, torch.float32).shape == (0, 64)
    bad = QuantTensor(w.data[:, :-1].contiguous(), qtype, w.shape)
    with pytest.raises(AssertionError, match=r"Q8_0 of shape \[4, 64\] needs bytes \[4, 68\], got \[4, 67\]"):
        dequantize(bad)
    with pytest.raises(AssertionError, match="ids are"):
        quant_embedding(torch.zeros(2), w, torch.float32)


# ---- random blocks -------------------------------------------------------------------------------


@pytest.mark.parametrize("row", TYPES, ids=TYPE_IDS)
def test_random_blocks_have_the_requested_scale(row):
    std = 7168**-0.5  # a V3 projection's 1/sqrt(fan_in)
    cols = 1024 if row.block_elems == 256 else 448  # K-quant sub-block offsets vary: sample 8192 of them
    w = random_blocks.random_quant_tensor((256, cols), row.code, std, "layers.0.attn.wq_a", seed=3)
    assert w.data.shape == (256, row_bytes(row.code, cols)) and w.shape == (256, cols)
    values = reference.dequantize_rows(w.data, row.code).double()
    assert abs(values.std().item() / std - 1) < 0.05
    assert abs(values.mean().item()) < 0.05 * std
    again = random_blocks.random_quant_tensor((256, cols), row.code, std, "layers.0.attn.wq_a", seed=3)
    other = random_blocks.random_quant_tensor((4, cols), row.code, std, "layers.1.attn.wq_a", seed=3)
    assert torch.equal(w.data, again.data) and not torch.equal(w.data[:4], other.data)
    assert_bits_equal(
        dequantize(QuantTensor(w.data[:4].contiguous(), row.code, (4, cols))), values[:4].float()
    )


# ---- GPU: compiles for sm_90 here; bit-exact on the device there ----------------------------------


def test_decoders_compile_for_hopper():
    """Every decoder inside the shared dequantize kernel compiles for sm_90 (Triton's bundled ptxas; no
    GPU needed), so a GPU run does not find a compile error first; with the PDL wait the GPU launches take.
    Every split decoder (fetch + convert) also compiles in the fused MoE's gate|up loop, two tiles loaded
    a step ahead, without spilling (tests/test_quant_sass.py compiles the dense split launch)."""
    script = textwrap.dedent(
        """
        import triton
        import triton.language as tl
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from mlapipe.kernels.bench.sass import disassemble
        from mlapipe.kernels.quant import dequantize as dq
        from mlapipe.kernels.quant.fused_moe import _gate_up_kernel
        from mlapipe.kernels.quant.types import QUANT_TYPES
        sig = {"w_ptr": "*u8", "table_ptr": "*i16", "out_ptr": "*bf16", "n_rows": "i32", "cols": "i32",
               "row_bytes": "i32", "DECODE": "constexpr", "BLOCK_R": "constexpr", "BLOCK_K": "constexpr",
               "PDL": "constexpr"}
        for row in QUANT_TYPES.values():
            src = ASTSource(fn=dq._dequantize_kernel, signature=sig,
                            constexprs={"DECODE": row.decoder, "BLOCK_R": 16, "BLOCK_K": 64, "PDL": True})
            triton.compile(src, target=GPUTarget("cuda", 90, 32))
            print(row.name, flush=True)
        moe = {"hidden_ptr": "*bf16", "w_ptr": "*u8", "table_ptr": "*i16", "act_ptr": "*bf16",
               "partial_ptr": "*fp32", "sorted_row_ids_ptr": "*i32", "tile_expert_ptr": "*i32"}
        moe |= {name: "i32" for name in ("num_rows", "top_k", "hidden_size", "inter_size", "num_tiles",
                                         "stride_hidden_t", "stride_w_e", "row_bytes", "stride_act_p", "chunk_k",
                                         "num_chunks")}
        for row in QUANT_TYPES.values():
            if row.fetch is None:
                continue
            constants = {"DECODE": row.decoder, "COMPUTE": tl.bfloat16, "IEEE": False, "SPLIT": True,
                         "BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": row.fetch_block_k or 64,
                         "BLOCK_ELEMS": row.block_elems, "BLOCK_BYTES": row.step_bytes, "GROUP_M": 8,
                         "FETCH": row.fetch, "CONVERT": row.convert, "PDL": True}
            src = ASTSource(_gate_up_kernel, moe | {name: "constexpr" for name in constants}, constants)
            compiled = triton.compile(src, target=GPUTarget("cuda", 90, 64), options={"num_warps": 4})
            spills = "STL" in disassemble(compiled.asm["cubin"])
            print(row.name + ("-spills" if spills else "-split"), flush=True)
        """
    )
    split = [f"{t.name}-split" for t in TYPES if t.fetch is not None]
    assert compile_script_output(script) == TYPE_IDS + split


@pytest.mark.gpu
@pytest.mark.parametrize("row", TYPES, ids=TYPE_IDS)
def test_gpu_decoders_equal_gguf(row):
    """On the device, compiled: 300 rows of 4096 values (plain types: 37*64), every tile width, the
    embedding gather, bf16 output."""
    rng = np.random.default_rng(row.code + 1000)
    raw = adversarial_rows(row.code, 300, 4096 // row.block_elems if row.block_elems > 1 else 64, rng)
    want = gguf_values(raw, row.code)
    w = quant_tensor(raw, row.code, "cuda")
    assert_bits_equal(dequantize(w), want)
    for block_k in (32, 128, 256):
        assert_bits_equal(dequantize(w, block_k=block_k), want)
    ids = torch.from_numpy(rng.integers(0, 300, 777)).cuda()
    assert_bits_equal(quant_embedding(ids, w, torch.float32), want[ids.cpu()])
    assert torch.equal(dequantize(w, torch.bfloat16).cpu(), want.to(torch.bfloat16))
    assert_bits_equal(reference.dequantize_rows(w.data, row.code), want)  # the torch reference on CUDA
