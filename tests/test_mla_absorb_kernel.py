"""The Triton absorbed query (q_nope @ W_UK, rope of q_pe, cat, cast in one kernel) against its torch
reference, on random data of odd shapes and the strided column slice the model passes. Without a GPU it
runs in the interpreter (fp32/fp16: bf16 dots are broken there); on a GPU also bf16 and batch invariance."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import textwrap  # noqa: E402

import pytest  # noqa: E402

from mlapipe.kernels import mla_absorb, norm_rope, reference  # noqa: E402
from tests.hopper_compile import compile_script_output  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def close(ours, ref, dtype):
    """Max error relative to the largest reference value, at the tolerance of `dtype`."""
    assert ours.shape == ref.shape and ours.dtype == ref.dtype
    assert torch.isfinite(ours.float()).all()
    scale = ref.float().abs().max().clamp_min(1e-6)
    assert float((ours.float() - ref.float()).abs().max() / scale) < TOLERANCE[dtype]


def case(T, H, N, R, C, dtype, extra=(3, 5)):
    """q as a column slice of a wider projection (token rows strided past H * (N + R)), w_uk (H, N, C),
    and rope tables of random positions."""
    before, after = extra
    wide = (torch.randn(T, before + H * (N + R) + after, device=DEVICE) * 2 + 0.25).to(dtype)
    q = wide[:, before : before + H * (N + R)].view(T, H, N + R)
    w_uk = (torch.randn(H, N, C, device=DEVICE) / N**0.5).to(dtype)
    positions = torch.randint(0, 5000, (T,), device=DEVICE)
    inv_freq = norm_rope.yarn_inv_freq(R, 10000.0, 40.0, 4096).to(DEVICE)
    cos, sin = norm_rope.rope_cos_sin(positions, inv_freq)
    return wide, q, w_uk, cos, sin


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "T, H, N, R, C",
    [(1, 1, 16, 16, 48), (3, 3, 32, 16, 64), (17, 5, 16, 32, 80), (33, 3, 32, 32, 48), (1, 5, 32, 16, 80)],
)
def test_absorb_query_matches_reference(T, H, N, R, C, dtype):
    wide, q, w_uk, cos, sin = case(T, H, N, R, C, dtype)
    # the projection's column slice: offset into its rows, rows strided (a size-1 dim has no stride)
    assert q.data_ptr() != wide.data_ptr() and q.stride(-1) == 1 and (T == 1 or not q.is_contiguous())
    before = wide.clone()
    ours = mla_absorb.absorb_query(q, w_uk, cos, sin, dtype)
    assert ours.is_contiguous()
    ref = reference.absorb_query(q, w_uk, cos, sin, dtype)
    assert torch.equal(wide, before)  # q (and the rest of the projection) untouched
    close(ours[..., :C], ref[..., :C], dtype)
    # the rope part: same fp32 arithmetic, then the same roundings
    if DEVICE == "cpu":
        assert torch.equal(ours[..., C:], ref[..., C:])
    else:  # compiled, the multiply-adds may fuse into FMAs: bits of the Triton rope, close to torch's
        close(ours[..., C:], ref[..., C:], dtype)


def test_absorb_query_rope_bits_of_the_rope_kernel():
    """The rope part equals what the in-place rope kernel it replaces wrote into q, bit for bit."""
    from mlapipe.kernels import fused_norm_rope

    _, q, w_uk, cos, sin = case(7, 3, 16, 32, 48, torch.float16)
    ours = mla_absorb.absorb_query(q, w_uk, cos, sin, torch.float16)
    assert torch.equal(ours[..., 48:], fused_norm_rope.apply_rope_pairs(q[..., 16:], cos, sin))


def test_absorb_query_casts_to_the_cache_dtype():
    """fp32 q into an fp16 output: rounded to fp32 (exact), then once to fp16, as the torch path's cast."""
    T, H, N, R, C = 5, 3, 32, 16, 64
    _, q, w_uk, cos, sin = case(T, H, N, R, C, torch.float32)
    ours = mla_absorb.absorb_query(q, w_uk, cos, sin, torch.float16)
    ref = reference.absorb_query(q, w_uk, cos, sin, torch.float16)
    assert ours.dtype == torch.float16
    close(ours, ref, torch.float16)
    assert torch.equal(ours[..., C:], ref[..., C:])
    # what workers/attention.py computes today, rope in place on a copy
    q_now = q.clone()
    q_now[..., N:] = reference.apply_rope_pairs(q_now[..., N:], cos, sin)
    current = torch.cat((torch.einsum("thn,hnc->thc", q_now[..., :N], w_uk), q_now[..., N:]), -1)
    close(ours, current.to(torch.float16), torch.float16)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T, H, num_partials", [(1, 3, 8), (17, 2, 3)])
def test_absorb_query_sums_a_split_linears_partials_first(T, H, num_partials, dtype):
    """q as the fp32 partials (n, T, H, N + R) of the projection that made it (a column slice of the
    q | latent partials): the bits of the chunk sum followed by the absorbed query."""
    N, R, C = 16, 16, 48
    wide = torch.randn(num_partials, T, 3 + H * (N + R) + 9, device=DEVICE) * 2 + 0.25
    partials = wide[..., 3 : 3 + H * (N + R)].unflatten(-1, (H, N + R))
    _, _, w_uk, cos, sin = case(T, H, N, R, C, dtype)
    summed = reference.sum_partials(partials, dtype)
    ours = mla_absorb.absorb_query(partials, w_uk, cos, sin, dtype, partials_dtype=dtype)
    assert torch.equal(ours, mla_absorb.absorb_query(summed, w_uk, cos, sin, dtype))
    ref = reference.absorb_query(partials, w_uk, cos, sin, dtype, partials_dtype=dtype)
    assert torch.equal(ref, reference.absorb_query(summed, w_uk, cos, sin, dtype))
    close(ours, ref, dtype)
    with pytest.raises(ValueError, match="partials"):
        mla_absorb.absorb_query(summed, w_uk, cos, sin, dtype, partials_dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T, H, num_partials", [(1, 3, 0), (1, 2, 8), (17, 2, 3), (33, 1, 0)])
def test_absorb_and_write_latent_is_the_two_kernels_in_one_launch(T, H, num_partials, dtype):
    """The absorbed query and the latent cache rows, from q and latent or from their projection's partials,
    equal absorb_query then write_latent_cache bit for bit; other cache rows keep their bits (NaN)."""
    from mlapipe.kernels import fused_norm_rope

    N, R, C, page = 16, 16, 48, 4
    _, q, w_uk, cos, sin = case(T, H, N, R, C, dtype)
    generator = torch.Generator(device=DEVICE).manual_seed(T)
    latent = torch.randn(T, 5 + C + R, generator=generator, device=DEVICE)[:, 5:].to(dtype)
    partials_dtype = dtype if num_partials else None
    if num_partials:  # the q | latent projection's partials, each a column slice
        wide = torch.randn(num_partials, T, H * (N + R) + C + R, generator=generator, device=DEVICE) + 0.25
        q, latent = wide[..., : H * (N + R)].unflatten(-1, (H, N + R)), wide[..., H * (N + R) :]
    kv_norm = torch.rand(C, generator=generator, device=DEVICE) + 0.5
    cache = torch.full((T // page + 3, page, C + R), float("nan"), device=DEVICE).to(dtype)
    slots = torch.randperm(cache.shape[0] * page, generator=generator, device=DEVICE)[:T]
    fused_cache, split_cache, ref_cache = cache.clone(), cache.clone(), cache.clone()
    args = (w_uk, kv_norm, cos, sin, 1e-6)
    ours = mla_absorb.absorb_and_write_latent(
        q, latent, *args, fused_cache, slots, dtype, partials_dtype, partials_dtype
    )
    fused_norm_rope.write_latent_cache(latent, kv_norm, cos, sin, 1e-6, split_cache, slots, partials_dtype)
    assert torch.equal(ours, mla_absorb.absorb_query(q, w_uk, cos, sin, dtype, partials_dtype))
    assert torch.equal(fused_cache.view(torch.uint8), split_cache.view(torch.uint8))
    ref = reference.absorb_and_write_latent(q, latent, *args, ref_cache, slots, dtype, partials_dtype, partials_dtype)
    close(ours, ref, dtype)
    width = C + R
    close(fused_cache.view(-1, width)[slots], ref_cache.view(-1, width)[slots], dtype)


def test_absorb_and_write_latent_of_a_latent_wider_than_the_fused_norm_takes():
    """C > 1024 (no DeepSeek model): the norm would want more warps than the query's 4, so two launches."""
    from mlapipe.kernels import fused_norm_rope

    _, q, w_uk, cos, sin = case(3, 1, 16, 16, 2048, torch.float32)
    latent, kv_norm = torch.randn(3, 2064), torch.rand(2048) + 0.5
    fused, split, slots = torch.zeros(2, 4, 2064), torch.zeros(2, 4, 2064), torch.tensor([6, 1, 3])
    ours = mla_absorb.absorb_and_write_latent(q, latent, w_uk, kv_norm, cos, sin, 1e-6, fused, slots, torch.float32)
    fused_norm_rope.write_latent_cache(latent, kv_norm, cos, sin, 1e-6, split, slots)
    assert torch.equal(fused, split) and torch.equal(ours, mla_absorb.absorb_query(q, w_uk, cos, sin, torch.float32))


def test_absorb_and_write_latent_rejects_mismatched_latent_arguments():
    _, q, w_uk, cos, sin = case(2, 3, 16, 16, 48, torch.float32)
    latent, cache, slots = torch.randn(2, 64), torch.zeros(4, 4, 64), torch.tensor([0, 5])
    with pytest.raises(ValueError, match="kv_norm"):
        mla_absorb.absorb_and_write_latent(q, latent, w_uk, torch.ones(40), cos, sin, 1e-6, cache, slots, torch.float32)
    with pytest.raises(ValueError, match="latent rows"):
        mla_absorb.absorb_and_write_latent(
            q, latent[:, :40], w_uk, torch.ones(48), cos, sin, 1e-6, cache, slots, torch.float32
        )
    with pytest.raises(ValueError, match="slot_mapping"):
        mla_absorb.absorb_and_write_latent(
            q, latent, w_uk, torch.ones(48), cos, sin, 1e-6, cache, slots[:1], torch.float32
        )


def test_absorb_query_no_tokens():
    _, q, w_uk, cos, sin = case(0, 3, 16, 16, 48, torch.float32)
    for absorb in (mla_absorb.absorb_query, reference.absorb_query):
        out = absorb(q, w_uk, cos, sin, torch.float32)
        assert out.shape == (0, 3, 64) and out.dtype == torch.float32


@pytest.mark.parametrize(
    "N, R, C, message",
    [(24, 16, 48, "w_uk's N = 24"), (8, 16, 48, "w_uk's N = 8"), (16, 24, 48, "rope width R = 24"),
     (16, 8, 48, "rope width R = 8")],
)  # fmt: skip
def test_absorb_query_rejects_widths_a_dot_cannot_take(N, R, C, message):
    q = torch.randn(2, 3, N + R, device=DEVICE)
    w_uk = torch.randn(3, N, C, device=DEVICE)
    cos, sin = torch.randn(2, R // 2, device=DEVICE), torch.randn(2, R // 2, device=DEVICE)
    with pytest.raises(ValueError, match=message):
        mla_absorb.absorb_query(q, w_uk, cos, sin, torch.float32)


def test_absorb_query_rejects_mismatched_arguments():
    q = torch.randn(2, 3, 32, device=DEVICE)
    cos, sin = torch.randn(2, 8, device=DEVICE), torch.randn(2, 8, device=DEVICE)
    with pytest.raises(ValueError, match="must be \\(H, N, C\\)"):
        mla_absorb.absorb_query(q, torch.randn(4, 16, 48, device=DEVICE), cos, sin, torch.float32)
    w_uk = torch.randn(3, 16, 48, device=DEVICE)
    with pytest.raises(ValueError, match="cos"):
        mla_absorb.absorb_query(q, w_uk, cos[:, :4], sin[:, :4], torch.float32)
    with pytest.raises(ValueError, match="unit stride"):
        mla_absorb.absorb_query(q, w_uk.transpose(1, 2).contiguous().transpose(1, 2), cos, sin, torch.float32)


def test_absorb_query_compiles_for_hopper():
    """The kernel compiles for sm_90 with the PDL wait and bf16 pointers (Triton's bundled ptxas; no GPU
    needed), so a GPU run does not find a compile error first: the absorbed query alone from q, and with
    the latent cache write, both from a split linear's partials."""
    script = textwrap.dedent(
        """
        import triton
        import triton.language as tl
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from mlapipe.kernels import mla_absorb
        for q_type, partials, write in (("*bf16", 0, False), ("*fp32", 8, True)):
            sig = {"q_ptr": q_type, "w_ptr": "*bf16", "cos_ptr": "*fp32", "sin_ptr": "*fp32", "out_ptr": "*bf16",
                   "latent_ptr": "*fp32" if write else "*bf16", "kv_norm_ptr": "*fp32", "slot_ptr": "*i64",
                   "cache_ptr": "*bf16", "eps": "fp32"}
            for name in ("T", "C", "q_token_stride", "q_head_stride", "partial_stride", "w_head_stride",
                         "w_row_stride", "cos_stride", "out_token_stride", "out_head_stride", "H", "latent_stride",
                         "latent_partial_stride", "cache_stride"):
                sig[name] = "i32"
            constexprs = {"N": 128, "R": 64, "KIND": tl.bfloat16, "COMPUTE": tl.bfloat16, "IEEE": False,
                          "BLOCK_T": mla_absorb.BLOCK_T, "BLOCK_C": mla_absorb.BLOCK_C, "NUM_PARTIALS": partials,
                          "WRITE_LATENT": write, "LATENT_KIND": tl.bfloat16, "BLOCK_LATENT": 512,
                          "NUM_LATENT_PARTIALS": partials, "PDL": True}
            sig.update({name: "constexpr" for name in constexprs})
            src = ASTSource(fn=mla_absorb._absorb_query_kernel, signature=sig, constexprs=constexprs)
            ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32)).asm["ptx"]
            print("griddepcontrol.wait" in ptx, ("rsqrt" in ptx or "sqrt" in ptx) == write, flush=True)
        """
    )
    # the PDL wait is in the kernel; the norm's square root only where it writes the cache
    assert compile_script_output(script) == ["True"] * 4


# ----------------------------------------------------------------------------------------------------
# compiled, on a GPU: bf16 at the real DeepSeek widths, and one token's bits in any batch


@pytest.mark.gpu
@pytest.mark.parametrize("T, H", [(1, 16), (5, 128), (37, 16), (200, 16)])
def test_gpu_absorb_query_bf16_real_widths(T, H):
    _, q, w_uk, cos, sin = case(T, H, 128, 64, 512, torch.bfloat16)
    close(
        mla_absorb.absorb_query(q, w_uk, cos, sin, torch.bfloat16),
        reference.absorb_query(q, w_uk, cos, sin, torch.bfloat16),
        torch.bfloat16,
    )


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_absorb_query_is_batch_invariant(dtype):
    """Token t alone gives the same bits as at any row of a batch of 37 tokens."""
    T, H = 37, 16
    _, q, w_uk, cos, sin = case(T, H, 128, 64, 512, dtype)
    batch = mla_absorb.absorb_query(q, w_uk, cos, sin, dtype)
    for t in (0, 5, 15, 16, 36):
        alone = mla_absorb.absorb_query(q[t : t + 1], w_uk, cos[t : t + 1], sin[t : t + 1], dtype)
        assert torch.equal(alone.view(torch.uint8), batch[t : t + 1].view(torch.uint8)), t
    # and in a batch of 3 starting elsewhere, so the token sits at another row of its tile
    three = mla_absorb.absorb_query(q[14:17], w_uk, cos[14:17], sin[14:17], dtype)
    assert torch.equal(three.view(torch.uint8), batch[14:17].view(torch.uint8))


@pytest.mark.gpu
@pytest.mark.parametrize("T, H, num_partials", [(1, 16, 8), (37, 128, 0)])
def test_gpu_absorb_and_write_latent_bits_of_the_two_kernels(T, H, num_partials):
    """Compiled at the real widths (512 + 64, bf16): the fused launch writes the cache rows the separate
    kernel writes (the same 4-warp layout of the norm's reduction) and returns absorb_query's bits."""
    from mlapipe.kernels import fused_norm_rope

    _, q, w_uk, cos, sin = case(T, H, 128, 64, 512, torch.bfloat16)
    latent = torch.randn(T, 576, device=DEVICE).to(torch.bfloat16)
    partials_dtype = torch.bfloat16 if num_partials else None
    if num_partials:
        wide = torch.randn(num_partials, T, H * 192 + 576, device=DEVICE)
        q, latent = wide[..., : H * 192].unflatten(-1, (H, 192)), wide[..., H * 192 :]
    kv_norm = torch.rand(512, device=DEVICE) + 0.5
    cache = torch.zeros(T // 64 + 2, 64, 576, dtype=torch.bfloat16, device=DEVICE)
    slots = torch.randperm(cache.shape[0] * 64, device=DEVICE)[:T]
    fused, split = cache.clone(), cache.clone()
    ours = mla_absorb.absorb_and_write_latent(
        q, latent, w_uk, kv_norm, cos, sin, 1e-6, fused, slots, torch.bfloat16, partials_dtype, partials_dtype
    )
    fused_norm_rope.write_latent_cache(latent, kv_norm, cos, sin, 1e-6, split, slots, partials_dtype)
    assert torch.equal(fused.view(torch.uint8), split.view(torch.uint8))
    absorbed = mla_absorb.absorb_query(q, w_uk, cos, sin, torch.bfloat16, partials_dtype)
    assert torch.equal(ours.view(torch.uint8), absorbed.view(torch.uint8))
