"""The absorbed decode with W_UV inside its merge kernel (mla_decode(..., w_uv=...)) against the reference
and against the unprojected decode followed by the einsum it replaces.

Batches come from test_mla_kernels.make_batch (random pages in random order, NaN in unused slots,
out-of-range unused table entries). Without a GPU the kernels run in the interpreter, where the split
count comes from a pretend 4-multiprocessor device, so sequences over 256 keys are merged from several
splits; on a GPU the bf16 tests run at the real DeepSeek widths.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # must precede the first triton import
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("MLAPIPE_AUTOTUNE", "0")

import textwrap  # noqa: E402

import pytest  # noqa: E402

from mlapipe.kernels import reference  # noqa: E402
from mlapipe.kernels.mla_decode import decode_splits, mla_decode  # noqa: E402
from tests.hopper_compile import compile_script_output  # noqa: E402
from tests.test_mla_kernels import DEVICE, TOLERANCES, make_batch  # noqa: E402

# A tile's padding rows (tokens past T) take log(0) and -inf - -inf before they are masked off; numpy
# says so in the interpreter. The outputs are checked for NaN below.
pytestmark = pytest.mark.filterwarnings(
    "ignore:divide by zero:RuntimeWarning", "ignore:invalid value:RuntimeWarning"
)

KV_LORA_RANK, ROPE = 32, 16
# fp32: exact fp32 dots in the interpreter, TF32 on a GPU
FP32_TIGHT = 2e-5 if DEVICE == "cpu" else 1e-2

# (q_lens, seq_lens): T = 1, 3 and 9 tokens; each has a sequence long enough for several splits
PROJECTED_BATCHES = [
    ([1], [700]),  # one token over three splits
    ([1, 1, 1], [37, 300, 5]),  # plain decode of different lengths
    ([1, 0, 4, 4], [70, 9, 23, 520]),  # a sequence with no new tokens; causal chunks of 4
]


def decode_inputs(heads, v_dim, q_lens, seq_lens, dtype, page=16):
    batch = make_batch(q_lens, seq_lens, page=page, width=KV_LORA_RANK + ROPE, dtype=dtype)
    q = torch.randn(batch.num_tokens, heads, KV_LORA_RANK + ROPE, dtype=dtype, device=DEVICE)
    w_uv = (torch.randn(heads, v_dim, KV_LORA_RANK) / KV_LORA_RANK**0.5).to(dtype).to(DEVICE)
    args = (q, batch.kv_cache, batch.block_table, batch.seq_lens, batch.query_start_loc, 0.3, KV_LORA_RANK)
    return args, w_uv


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("v_dim", [16, 48])  # 48: not a power of two, the last V block is masked
@pytest.mark.parametrize("heads", [1, 3])
@pytest.mark.parametrize("q_lens,seq_lens", PROJECTED_BATCHES)
def test_projected_matches_reference(heads, v_dim, q_lens, seq_lens, dtype):
    args, w_uv = decode_inputs(heads, v_dim, q_lens, seq_lens, dtype)
    if DEVICE == "cpu":  # the merge has several splits to combine
        assert decode_splits(len(seq_lens), heads, max(q_lens), max(seq_lens), DEVICE) > 1
    out, lse = mla_decode(*args, w_uv=w_uv)
    ref_out, ref_lse = reference.mla_decode(*args, w_uv=w_uv)
    atol, rtol = (FP32_TIGHT, FP32_TIGHT) if dtype == torch.float32 else TOLERANCES[dtype][:2]
    assert out.shape == (args[0].shape[0], heads, v_dim) and out.dtype == dtype
    assert not out.isnan().any() and not lse.isnan().any()
    assert out.abs().max() > 0.1  # random data: a kernel that wrote nothing would not pass as zeros
    torch.testing.assert_close(out.float(), ref_out.float(), atol=atol, rtol=rtol)
    torch.testing.assert_close(lse, ref_lse, atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("num_kv_splits", [None, 1, 5])
def test_projected_equals_unprojected_then_einsum(num_kv_splits, dtype):
    """The fused projection is the einsum it replaces: the same rounded latent, times w_uv in fp32."""
    args, w_uv = decode_inputs(3, 48, [1, 2, 1], [300, 45, 600], dtype)
    out, lse = mla_decode(*args, num_kv_splits=num_kv_splits, w_uv=w_uv)
    latent, latent_lse = mla_decode(*args, num_kv_splits=num_kv_splits)
    want = torch.einsum("thc,hvc->thv", latent.float(), w_uv.float())
    # fp32: only the summation order differs; fp16: that, then at most one rounding step of the output
    tol = 1e-6 if dtype == torch.float32 and DEVICE == "cpu" else 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(out.float(), want.to(dtype).float(), atol=tol, rtol=tol)
    if DEVICE == "cpu":
        assert torch.equal(lse, latent_lse)  # one merge function, run by both kernels
    else:
        torch.testing.assert_close(lse, latent_lse, atol=1e-6, rtol=1e-6)


BAD_W_UV = {
    "wrong heads": lambda w: w[:2],
    "wrong latent width": lambda w: w[..., :16],
    "two dims": lambda w: w[0],
    "wrong dtype": lambda w: w.half(),
    "strided latent": lambda w: torch.cat((w, w), dim=-1)[..., ::2],
}


@pytest.mark.parametrize("bad", BAD_W_UV.values(), ids=BAD_W_UV.keys())
def test_projected_rejects_bad_w_uv(bad):
    args, w_uv = decode_inputs(3, 16, [1], [5], torch.float32)
    with pytest.raises(ValueError, match="w_uv"):
        mla_decode(*args, w_uv=bad(w_uv))


def test_projected_kernel_compiles_for_hopper():
    """The projecting merge compiles for sm_90 at the real widths (Triton's bundled ptxas; no GPU needed),
    with the PDL wait in its PTX, so a GPU run does not find a compile error first."""
    script = textwrap.dedent(
        """
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from mlapipe.kernels import mla_decode as md
        ints = ["num_tokens", "num_splits", "v_dim", "stride_pt", "stride_ph", "stride_ps", "stride_lpt",
                "stride_lph", "stride_wh", "stride_wv", "stride_ot", "stride_oh", "stride_lt"]
        blocks = {"KV_LORA_RANK": 512, "BLOCK_T": md.PROJECT_BLOCK_T, "BLOCK_V": md.PROJECT_BLOCK_V, "PDL": True}
        for dtype, splits in (("bf16", 16), ("bf16", 64), ("fp32", 1)):
            sig = {"partial_out_ptr": "*fp32", "partial_lse_ptr": "*fp32", "w_uv_ptr": f"*{dtype}",
                   "out_ptr": f"*{dtype}", "lse_ptr": "*fp32", **{name: "i32" for name in ints},
                   **{name: "constexpr" for name in blocks}, "BLOCK_SPLITS": "constexpr"}
            src = ASTSource(fn=md._merge_splits_project_kernel, signature=sig,
                            constexprs={**blocks, "BLOCK_SPLITS": splits})
            options = {"num_warps": md.PROJECT_NUM_WARPS}
            compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
            assert "griddepcontrol.wait" in compiled.asm["ptx"]
            print(dtype, flush=True)
        """
    )
    assert compile_script_output(script) == ["bf16", "bf16", "fp32"]


# ----------------------------------------------------------------------------------------------------
# GPU, bf16, real DeepSeek widths (576 = 512 + 64 latent, V = 128; 16 heads for V2-Lite, 128 for V3)


def real_inputs(heads, q_lens, seq_lens, dtype=torch.bfloat16):
    batch = make_batch(q_lens, seq_lens, page=64, width=576, dtype=dtype)
    q = torch.randn(batch.num_tokens, heads, 576, dtype=dtype, device=DEVICE)
    w_uv = (torch.randn(heads, 128, 512) / 512**0.5).to(dtype).to(DEVICE)
    args = (q, batch.kv_cache, batch.block_table, batch.seq_lens, batch.query_start_loc, 192**-0.5, 512)
    return args, w_uv


@pytest.mark.gpu
@pytest.mark.parametrize("heads", [16, 128])
def test_projected_bf16_real_widths(heads):
    args, w_uv = real_inputs(heads, [1, 1, 0, 7], [1000, 63, 10, 2500])
    out, lse = mla_decode(*args, w_uv=w_uv)
    ref_out, ref_lse = reference.mla_decode(*args, w_uv=w_uv)
    assert out.shape == ref_out.shape and out.dtype == torch.bfloat16 and not out.isnan().any()
    relative = float((out.float() - ref_out.float()).norm() / ref_out.float().norm())
    assert relative < 1e-2, relative
    torch.testing.assert_close(lse, ref_lse, atol=1e-2, rtol=1e-2)
    latent, _ = mla_decode(*args)
    # cuBLAS's bf16 bmm (what the model ran before) against the fused product: a bf16 rounding apart
    unfused = torch.einsum("thc,hvc->thv", latent, w_uv)
    torch.testing.assert_close(out.float(), unfused.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("heads", [16, 128])
def test_projected_batch_invariant(heads):
    """One sequence's token alone gives the bits it gets among 31 others. The split count is pinned:
    decode_splits follows the number of sequences (to fill the machine), which the projection does not."""
    lengths = [int(n) for n in torch.randint(1, 3000, (32,))]
    lengths[5] = 1777
    args, w_uv = real_inputs(heads, [1] * 32, lengths)
    q, kv_cache, block_table, seq_lens, query_start_loc, scale, rank = args
    together, together_lse = mla_decode(*args, num_kv_splits=8, w_uv=w_uv)
    alone, alone_lse = mla_decode(
        q[5:6].clone(),
        kv_cache,
        block_table[5:6].clone(),
        seq_lens[5:6].clone(),
        torch.tensor([0, 1], dtype=torch.int32, device=DEVICE),
        scale,
        rank,
        num_kv_splits=8,
        w_uv=w_uv,
    )
    assert torch.equal(alone, together[5:6]) and torch.equal(alone_lse, together_lse[5:6])
    again, _ = mla_decode(*args, num_kv_splits=8, w_uv=w_uv)
    assert torch.equal(again, together)  # and run to run
