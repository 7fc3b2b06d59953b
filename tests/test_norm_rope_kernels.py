"""Triton RMSNorm and pairwise rope against their torch references, on random data of odd shapes and
strided inputs (the column slices the model passes). Without a GPU they run in the interpreter."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import textwrap  # noqa: E402

import pytest  # noqa: E402

from mlapipe.kernels import fused_norm_rope, norm_rope, reference  # noqa: E402
from tests.hopper_compile import compile_script_output  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def close(ours, ref, dtype):
    assert ours.shape == ref.shape and ours.dtype == ref.dtype and ours.is_contiguous()
    scale = ref.float().abs().max().clamp_min(1e-6)
    assert float((ours.float() - ref.float()).abs().max() / scale) < TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 7), (5, 512), (3, 4, 100), (9, 2048)])
def test_rms_norm_matches_reference(shape, dtype):
    x = (torch.randn(shape, device=DEVICE) * 3 + 0.5).to(dtype)
    weight = torch.rand(shape[-1], device=DEVICE) + 0.5  # fp32, as the model keeps 1-D weights
    close(fused_norm_rope.rms_norm(x, weight, 1e-6), reference.rms_norm(x, weight, 1e-6), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_of_a_column_slice(dtype):
    """The kv norm reads latent[:, :C] out of a (T, C + R) projection: rows strided by C + R."""
    latent = torch.randn(6, 40 + 8, device=DEVICE).to(dtype)
    weight = torch.rand(40, device=DEVICE) + 0.5
    x = latent[:, :40]
    assert not x.is_contiguous()
    close(fused_norm_rope.rms_norm(x, weight, 1e-5), reference.rms_norm(x, weight, 1e-5), dtype)


def tables(T: int, half: int):
    positions = torch.randint(0, 5000, (T,), device=DEVICE)
    inv_freq = norm_rope.yarn_inv_freq(2 * half, 10000.0, 40.0, 4096).to(DEVICE)
    return norm_rope.rope_cos_sin(positions, inv_freq)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T, heads, R", [(1, 1, 64), (5, 16, 64), (3, 20, 8), (4, 3, 6)])
def test_rope_matches_reference(T, heads, R, dtype):
    x = torch.randn(T, heads, R, device=DEVICE).to(dtype)
    cos, sin = tables(T, R // 2)
    close(fused_norm_rope.apply_rope_pairs(x, cos, sin), reference.apply_rope_pairs(x, cos, sin), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_of_the_models_slices(dtype):
    """q[..., N:] of a (T, H, N + R) query, and latent[:, None, C:] of a (T, C + R) projection."""
    T, H, N, R, C = 7, 5, 24, 16, 40
    cos, sin = tables(T, R // 2)
    q = torch.randn(T, H, N + R, device=DEVICE).to(dtype)
    close(
        fused_norm_rope.apply_rope_pairs(q[..., N:], cos, sin),
        reference.apply_rope_pairs(q[..., N:], cos, sin),
        dtype,
    )
    latent = torch.randn(T, C + R, device=DEVICE).to(dtype)
    k = latent[:, None, C:]
    close(fused_norm_rope.apply_rope_pairs(k, cos, sin), reference.apply_rope_pairs(k, cos, sin), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_in_place_into_the_query_slice(dtype):
    """The attention rotates q[..., N:] in place inside a (T, q_rows + 576) projection's column slice: the
    rope part equals the out-of-place rotation bit for bit, and nothing else of the row changes."""
    T, H, N, R, extra = 6, 5, 24, 16, 19
    cos, sin = tables(T, R // 2)
    for rope in (fused_norm_rope.apply_rope_pairs, reference.apply_rope_pairs):
        projected = torch.randn(T, H * (N + R) + extra, device=DEVICE).to(dtype)
        before = projected.clone()
        q = projected[:, : H * (N + R)].view(T, H, N + R)
        expected = rope(q[..., N:], cos, sin)
        returned = rope(q[..., N:], cos, sin, out=q[..., N:])
        assert returned.data_ptr() == q[..., N:].data_ptr()
        assert torch.equal(q[..., N:], expected)
        assert torch.equal(q[..., :N], before[:, : H * (N + R)].view(T, H, N + R)[..., :N])
        assert torch.equal(projected[:, H * (N + R) :], before[:, H * (N + R) :])
    with pytest.raises(ValueError, match="must have x's shape"):
        fused_norm_rope.apply_rope_pairs(q[..., N:], cos, sin, out=torch.empty(T, H, R + 2, device=DEVICE, dtype=dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 7), (5, 512), (9, 2048), (3, 100)])
def test_add_rms_norm_is_the_add_then_the_norm(shape, dtype):
    x = (torch.randn(shape, device=DEVICE) * 3 + 0.5).to(dtype)
    delta = torch.randn(shape, device=DEVICE).to(dtype)
    weight = torch.rand(shape[-1], device=DEVICE) + 0.5
    total, normed = fused_norm_rope.add_rms_norm(x, delta, weight, 1e-6)
    assert torch.equal(total, x + delta)  # bit for bit what the separate add and Triton norm give
    assert torch.equal(normed, fused_norm_rope.rms_norm(x + delta, weight, 1e-6))
    ref_total, ref_normed = reference.add_rms_norm(x, delta, weight, 1e-6)
    assert torch.equal(total, ref_total)
    close(normed, ref_normed, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, num_partials", [((1, 7), 1), ((3, 512), 4), ((9, 100), 7)])
def test_add_rms_norm_sums_a_split_linears_partials_first(shape, num_partials, dtype):
    """delta as (n, T, W) fp32 partials: the bits of quant/linear.py's chunk sum (0 + p0 + p1 ..., rounded
    to the stream's dtype) followed by the plain add_rms_norm."""
    x = (torch.randn(shape, device=DEVICE) * 3 + 0.5).to(dtype)
    partials = torch.randn((num_partials, *shape), device=DEVICE) * 2
    weight = torch.rand(shape[-1], device=DEVICE) + 0.5
    summed = torch.zeros(shape, device=DEVICE)
    for partial in partials:
        summed = summed + partial
    delta = summed.to(dtype)
    total, normed = fused_norm_rope.add_rms_norm(x, partials, weight, 1e-6)
    plain_total, plain_normed = fused_norm_rope.add_rms_norm(x, delta, weight, 1e-6)
    assert torch.equal(total, plain_total) and torch.equal(normed, plain_normed)
    ref_total, ref_normed = reference.add_rms_norm(x, partials, weight, 1e-6)
    assert torch.equal(ref_total, x + delta)
    close(normed, ref_normed, dtype)
    for bad in (partials[:, :, :-1], partials.half()):  # wrong shape, not fp32
        with pytest.raises(ValueError, match="partials"):
            fused_norm_rope.add_rms_norm(x, bad, weight, 1e-6)


def split_partials(shape, num_partials, column_slice=(0, 0)):
    """(n, *shape) fp32 partials as a split linear leaves them, optionally a column slice of wider rows
    (the q | latent projection's partials, sliced), with the plain sum its sum kernel would store."""
    before, after = column_slice
    wide = torch.randn((num_partials, *shape[:-1], before + shape[-1] + after), device=DEVICE) * 2 + 0.25
    return wide[..., before : before + shape[-1]]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, num_partials, column_slice", [((1, 7), 1, (0, 0)), ((3, 512), 8, (5, 40))])
def test_rms_norm_sums_a_split_linears_partials_first(shape, num_partials, column_slice, dtype):
    """x as (n, T, W) fp32 partials (V3's q_a before its norm): the bits of the chunk sum, then the norm."""
    partials = split_partials(shape, num_partials, column_slice)
    weight = torch.rand(shape[-1], device=DEVICE) + 0.5
    summed = reference.sum_partials(partials, dtype)
    ours = fused_norm_rope.rms_norm(partials, weight, 1e-6, partials_dtype=dtype)
    assert ours.dtype == dtype and ours.shape == shape
    assert torch.equal(ours, fused_norm_rope.rms_norm(summed, weight, 1e-6))
    close(ours, reference.rms_norm(partials, weight, 1e-6, partials_dtype=dtype), dtype)
    assert torch.equal(reference.rms_norm(partials, weight, 1e-6, dtype), reference.rms_norm(summed, weight, 1e-6))
    with pytest.raises(ValueError, match="partials"):
        fused_norm_rope.rms_norm(partials.half(), weight, 1e-6, partials_dtype=dtype)


# ----------------------------------------------------------------------------------------------------
# write_latent_cache: kv norm of latent[:, :C] and rope of latent[:, C:], scattered into the paged cache


def latent_case(T, C, R, dtype, cache_dtype=None, num_blocks=7, page=4, fill=float("nan")):
    """A (T, C + R) column slice of a wider projection (rows strided, as the model passes it), slots
    scattered over the blocks in no order, and a cache whose every row starts at `fill`."""
    wide = (torch.randn(T, 5 + C + R + 3, device=DEVICE) * 3 + 0.5).to(dtype)
    latent = wide[:, 5 : 5 + C + R]
    kv_norm = torch.rand(C, device=DEVICE) + 0.5  # fp32, as the model keeps 1-D weights
    cos, sin = tables(T, R // 2)
    slot_mapping = torch.randperm(num_blocks * page, device=DEVICE)[:T]
    cache_dtype = cache_dtype or dtype
    if fill == "random":
        kv_cache = torch.randn(num_blocks, page, C + R, device=DEVICE).to(cache_dtype)
    else:
        kv_cache = torch.full((num_blocks, page, C + R), fill, device=DEVICE, dtype=cache_dtype)
    return latent, kv_norm, cos, sin, kv_cache, slot_mapping


def run_both(latent, kv_norm, cos, sin, kv_cache, slot_mapping, eps=1e-6):
    """(Triton cache, reference cache, the current path's cache), each from a copy of kv_cache. The
    current path is what workers/attention.py ran before: the two Triton kernels, cat, cast, scatter."""
    ours, ref, current = kv_cache.clone(), kv_cache.clone(), kv_cache.clone()
    fused_norm_rope.write_latent_cache(latent, kv_norm, cos, sin, eps, ours, slot_mapping)
    reference.write_latent_cache(latent, kv_norm, cos, sin, eps, ref, slot_mapping)
    C = kv_norm.shape[0]
    c_kv = fused_norm_rope.rms_norm(latent[:, :C], kv_norm, eps)
    k_pe = fused_norm_rope.apply_rope_pairs(latent[:, None, C:], cos, sin)[:, 0]
    flat = current.view(-1, current.shape[-1])
    flat[slot_mapping] = torch.cat((c_kv, k_pe), dim=-1).to(current.dtype)
    return ours, ref, current


def assert_cache_written(ours, ref, current, before, slot_mapping, tolerance_dtype):
    width = before.shape[-1]
    flat, flat_before = ours.view(-1, width), before.view(-1, width)
    untouched = torch.ones(flat.shape[0], dtype=torch.bool, device=flat.device)
    untouched[slot_mapping] = False
    # rows outside slot_mapping keep their exact bits (NaN included)
    assert torch.equal(flat[untouched].view(torch.uint8), flat_before[untouched].view(torch.uint8))
    written, expected = flat[slot_mapping], ref.view(-1, width)[slot_mapping]
    assert torch.isfinite(written).all()
    # Same math and order as the two Triton kernels it replaces: bit-identical to the current path.
    assert torch.equal(ours.view(torch.uint8), current.view(torch.uint8))
    # Against the torch reference only close: the fp32 sum of squares is reduced in a different order
    # (and rsqrt vs 1 / sqrt), so the norm may differ in the last bit before rounding to the dtype.
    close(written, expected, tolerance_dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T, C, R", [(1, 24, 8), (13, 24, 8), (3, 512, 64), (1, 512, 64), (13, 40, 6)])
def test_write_latent_cache_matches_reference(T, C, R, dtype):
    latent, kv_norm, cos, sin, kv_cache, slot_mapping = latent_case(T, C, R, dtype)
    assert latent.stride(0) > latent.shape[1] and latent.stride(-1) == 1  # rows strided
    ours, ref, current = run_both(latent, kv_norm, cos, sin, kv_cache, slot_mapping)
    assert_cache_written(ours, ref, current, kv_cache, slot_mapping, dtype)


@pytest.mark.parametrize("fill", ["random", float("nan")])
def test_write_latent_cache_leaves_other_rows(fill):
    """Random bits or NaN in every other row stay as they were; all pages but one hold a new token."""
    latent, kv_norm, cos, sin, kv_cache, slot_mapping = latent_case(
        9, 24, 8, torch.float16, num_blocks=5, page=3, fill=fill
    )
    ours, ref, current = run_both(latent, kv_norm, cos, sin, kv_cache, slot_mapping)
    assert_cache_written(ours, ref, current, kv_cache, slot_mapping, torch.float16)


def test_write_latent_cache_rounds_to_latent_dtype_first():
    """fp32 latent into an fp16 cache: rounded once, to fp16 (the fp32 round is exact)."""
    latent, kv_norm, cos, sin, kv_cache, slot_mapping = latent_case(
        6, 40, 8, torch.float32, cache_dtype=torch.float16
    )
    ours, ref, current = run_both(latent, kv_norm, cos, sin, kv_cache, slot_mapping)
    assert ours.dtype == torch.float16
    assert_cache_written(ours, ref, current, kv_cache, slot_mapping, torch.float16)


def test_write_latent_cache_no_tokens():
    latent, kv_norm, cos, sin, kv_cache, slot_mapping = latent_case(0, 24, 8, torch.float32, fill="random")
    ours, ref, _ = run_both(latent, kv_norm, cos, sin, kv_cache, slot_mapping)
    assert torch.equal(ours, kv_cache) and torch.equal(ref, kv_cache)


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 37, 700])
def test_write_latent_cache_bf16_real_widths(T):
    """bf16 at the real DeepSeek widths (576 = 512 + 64), 64-token pages, compiled."""
    latent, kv_norm, cos, sin, kv_cache, slot_mapping = latent_case(
        T, 512, 64, torch.bfloat16, num_blocks=40, page=64
    )
    ours, ref, current = run_both(latent, kv_norm, cos, sin, kv_cache, slot_mapping)
    assert_cache_written(ours, ref, current, kv_cache, slot_mapping, torch.bfloat16)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T, C, R, num_partials", [(1, 24, 8, 3), (5, 512, 64, 8)])
def test_write_latent_cache_sums_a_split_linears_partials_first(T, C, R, num_partials, dtype):
    """latent as the fp32 partials of the q | latent projection (a column slice of them): the cache gets
    the bits it gets from the summed latent."""
    latent, kv_norm, cos, sin, kv_cache, slot_mapping = latent_case(T, C, R, dtype)
    partials = split_partials((T, C + R), num_partials, column_slice=(7, 0))
    summed = reference.sum_partials(partials, dtype)
    ours, plain, ref = kv_cache.clone(), kv_cache.clone(), kv_cache.clone()
    fused_norm_rope.write_latent_cache(partials, kv_norm, cos, sin, 1e-6, ours, slot_mapping, dtype)
    fused_norm_rope.write_latent_cache(summed, kv_norm, cos, sin, 1e-6, plain, slot_mapping)
    reference.write_latent_cache(partials, kv_norm, cos, sin, 1e-6, ref, slot_mapping, dtype)
    assert torch.equal(ours.view(torch.uint8), plain.view(torch.uint8))  # NaN-filled other rows included
    width = kv_cache.shape[-1]
    close(ours.view(-1, width)[slot_mapping], ref.view(-1, width)[slot_mapping], dtype)
    with pytest.raises(ValueError, match="partials"):
        fused_norm_rope.write_latent_cache(partials[0], kv_norm, cos, sin, 1e-6, ours, slot_mapping, dtype)


def test_partials_forms_compile_for_hopper():
    """The norms and the cache write compile for sm_90 reading 8 fp32 partials (Triton's bundled ptxas; no
    GPU needed): a GPU run does not meet a compile error first."""
    script = textwrap.dedent(
        """
        import triton
        import triton.language as tl
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from mlapipe.kernels import fused_norm_rope as k
        def compile(fn, pointers, ints, constexprs):
            sig = dict(pointers, **{name: "i32" for name in ints}, **{name: "constexpr" for name in constexprs})
            sig["eps"] = "fp32"
            src = ASTSource(fn=fn, signature=sig, constexprs=constexprs)
            return triton.compile(src, target=GPUTarget("cuda", 90, 32)).asm["ptx"].count("ld.global")
        print(compile(k._rms_norm_kernel, {"x_ptr": "*fp32", "w_ptr": "*fp32", "out_ptr": "*bf16"},
                      ("x_row_stride", "partial_stride", "width"), {"BLOCK": 2048, "NUM_PARTIALS": 8, "PDL": True}) > 0)
        print(compile(k._add_rms_norm_kernel,
                      {"x_ptr": "*bf16", "delta_ptr": "*fp32", "w_ptr": "*fp32", "sum_ptr": "*bf16", "out_ptr": "*bf16"},
                      ("x_row_stride", "delta_row_stride", "partial_stride", "width"),
                      {"BLOCK": 2048, "NUM_PARTIALS": 8, "PDL": True}) > 0)
        print(compile(k._write_latent_cache_kernel,
                      {"latent_ptr": "*fp32", "w_ptr": "*fp32", "cos_ptr": "*fp32", "sin_ptr": "*fp32",
                       "slot_ptr": "*i64", "cache_ptr": "*bf16"},
                      ("latent_stride", "partial_stride", "cos_stride", "cache_stride", "width", "half"),
                      {"KIND": tl.bfloat16, "BLOCK": 512, "BLOCK_HALF": 32, "NUM_PARTIALS": 8, "PDL": True}) > 0)
        """
    )
    assert compile_script_output(script) == ["True"] * 3
