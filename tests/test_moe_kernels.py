"""MoE kernels: routing vs the reference and HF's DeepseekV3 gate, ordering invariants, fused experts vs a
loop reference; on a GPU, determinism, batch invariance and config invariance.

Without a GPU the Triton kernels run in the interpreter (fp16/fp32 only: its bf16 dot is broken)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from mlapipe.kernels import reference  # noqa: E402
from mlapipe.kernels.fused_moe import CONFIG_ENV, fused_moe  # noqa: E402
from mlapipe.kernels.moe_align import moe_align  # noqa: E402
from mlapipe.kernels.moe_routing import moe_routing  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def random_ids(T: int, K: int, E: int, experts: int | None = None) -> torch.Tensor:
    """(T, K) distinct experts per token, drawn from the first `experts` (default all E)."""
    pool = experts or E
    return torch.stack([torch.randperm(pool)[:K] for _ in range(T)]).to(DEVICE)


# ----------------------------------------------------------------------------------------------------
# routing


def sorted_by_id(weights: torch.Tensor, ids: torch.Tensor):
    """Slot order is free (topk(sorted=False)); compare (id, weight) pairs sorted by id."""
    ids_sorted, order = ids.sort(dim=1)
    return weights.gather(1, order), ids_sorted


ROUTING_CASES = [
    # (T, E, K, gating, groups, kept groups, bias, renormalize, scale)
    pytest.param(9, 64, 6, "softmax", 1, 1, False, False, 1.0, id="v2-lite"),
    pytest.param(7, 16, 3, "softmax", 4, 2, False, True, 16.0, id="v2-grouped"),  # max-scored groups
    pytest.param(5, 13, 3, "softmax", 1, 1, False, True, 1.0, id="prime-E"),
    pytest.param(4, 5, 5, "softmax", 1, 1, False, True, 1.0, id="K-equals-E"),
    pytest.param(6, 11, 1, "sigmoid", 1, 1, True, False, 1.0, id="K1-sigmoid-bias"),
    pytest.param(1, 256, 8, "sigmoid", 8, 4, True, True, 2.5, id="v3-T1"),
    pytest.param(33, 256, 8, "sigmoid", 8, 4, True, True, 2.5, id="v3"),  # T over BLOCK_T
]


@pytest.mark.parametrize("T, E, K, gating, groups, kept, has_bias, renorm, scale", ROUTING_CASES)
def test_routing_matches_reference(T, E, K, gating, groups, kept, has_bias, renorm, scale):
    logits = torch.randn(T, E, device=DEVICE) * 2
    bias = torch.randn(E, device=DEVICE) * 0.5 if has_bias else None
    args = (bias, K, gating, groups, kept, renorm, scale)
    weights, ids = moe_routing(logits, *args)
    ref_weights, ref_ids = reference.moe_routing(logits, *args)
    assert weights.dtype == torch.float32 and ids.shape == (T, K)
    weights, ids = sorted_by_id(weights, ids)
    ref_weights, ref_ids = sorted_by_id(ref_weights, ref_ids)
    assert torch.equal(ids.cpu(), ref_ids.cpu())
    torch.testing.assert_close(weights, ref_weights, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    "T, E, K, gating, groups, kept, has_bias, renorm, scale, shared",
    [(9, 64, 6, "softmax", 1, 1, False, False, 1.0, 2), (5, 256, 8, "sigmoid", 8, 4, True, True, 2.5, 1)],
    ids=["v2-lite", "v3"],
)
def test_routing_appends_shared_experts(T, E, K, gating, groups, kept, has_bias, renorm, scale, shared):
    """Shared experts come last, numbered E.., weight 1 (unscaled); the routed slots are unchanged."""
    logits = torch.randn(T, E, device=DEVICE) * 2
    bias = torch.randn(E, device=DEVICE) * 0.5 if has_bias else None
    args = (bias, K, gating, groups, kept, renorm, scale)
    routed_weights, routed_ids = moe_routing(logits, *args)
    for impl in (moe_routing, reference.moe_routing):
        weights, ids = impl(logits, *args, shared)
        assert weights.shape == ids.shape == (T, K + shared)
        expected_ids = torch.arange(E, E + shared, device=ids.device).expand(T, -1)
        assert torch.equal(ids[:, K:], expected_ids)
        assert torch.equal(weights[:, K:], torch.ones_like(weights[:, K:]))
        got = sorted_by_id(weights[:, :K], ids[:, :K])
        want = sorted_by_id(routed_weights, routed_ids)
        assert torch.equal(got[1].cpu(), want[1].cpu())
        torch.testing.assert_close(got[0], want[0], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("E, groups, kept, K", [(256, 8, 4, 8), (32, 4, 2, 4)])
def test_v3_routing_matches_hf_gate(E, groups, kept, K):
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    hidden_size, T = 48, 37
    config = DeepseekV3Config(
        hidden_size=hidden_size,
        n_routed_experts=E,
        num_experts_per_tok=K,
        n_group=groups,
        topk_group=kept,
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
    )
    gate = DeepseekV3TopkRouter(config)
    with torch.no_grad():
        gate.weight.normal_()
        gate.e_score_correction_bias.copy_(torch.randn(E) * 0.3)  # large enough to change the choice
    hidden = torch.randn(T, hidden_size)
    logits, hf_weights, hf_ids = gate(hidden)
    weights, ids = moe_routing(
        logits.to(DEVICE), gate.e_score_correction_bias.to(DEVICE), K, "sigmoid", groups, kept, True, 2.5
    )
    weights, ids = sorted_by_id(weights.cpu(), ids.cpu())
    hf_weights, hf_ids = sorted_by_id(hf_weights.detach(), hf_ids)
    assert torch.equal(ids, hf_ids)
    torch.testing.assert_close(weights, hf_weights, atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------
# ordering invariants


def check_layout(ids: torch.Tensor, num_experts: int, block_m: int):
    layout = moe_align(ids, num_experts, block_m)
    flat = ids.flatten().cpu().long()
    R = flat.numel()
    sorted_rows = layout.sorted_row_ids.cpu().long()
    tile_expert = layout.tile_expert.cpu().long()
    counts = layout.expert_counts.cpu().long()

    assert torch.equal(counts, torch.bincount(flat, minlength=num_experts))
    assert int(counts.sum()) == R
    # Tiles: each expert owns ceil(count / block_m) consecutive tiles in expert order, then -1s.
    expected_tiles = torch.repeat_interleave(torch.arange(num_experts), (counts + block_m - 1) // block_m)
    used = expected_tiles.numel()
    assert torch.equal(tile_expert[:used], expected_tiles)
    assert bool((tile_expert[used:] == -1).all())
    sorted_rows = sorted_rows[: used * block_m]  # positions of unused tiles are never read
    real = sorted_rows[sorted_rows < R]
    assert torch.equal(real.sort().values, torch.arange(R)), "each row exactly once"
    assert bool((sorted_rows >= 0).all() & (sorted_rows <= R).all()), "padding holds R, nothing else"
    # Within a tile: rows of that expert, increasing row id (stable), padding only at the run's end.
    for tile in range(used):
        rows = sorted_rows[tile * block_m : (tile + 1) * block_m]
        real = rows[rows < R]
        assert bool((flat[real] == tile_expert[tile]).all())
        assert torch.equal(real, real.sort().values)
        assert bool((rows[: real.numel()] < R).all())
    # Whole expert runs are stable too: concatenated rows of each expert == nonzero order.
    for e in range(num_experts):
        runs = sorted_rows[(tile_expert[:used] == e).repeat_interleave(block_m)]
        assert torch.equal(runs[runs < R], (flat == e).nonzero().squeeze(1))
    return layout


@pytest.mark.parametrize(
    "T, K, E, block_m",
    [
        (1, 1, 1, 16),  # the smallest thing there is
        (1, 8, 256, 64),  # decode on V3: 8 one-row tiles, 248 idle experts
        (5, 3, 7, 16),  # T*K below one tile, prime E
        (12, 4, 4, 16),  # K = E: every token in every expert
        (700, 3, 13, 16),  # R = 2100: 64-row chunks, offsets carry across chunks
        (129, 6, 64, 64),
        (64, 8, 66, 64),  # a decode batch of 64 with 2 shared experts: 8 chunks of 64 rows
        (17, 8, 66, 64),  # 136 rows: just past one program, the last chunk partial
    ],
)
def test_align_invariants(T, K, E, block_m):
    check_layout(random_ids(T, K, E), E, block_m)


def test_align_all_tokens_to_one_expert_and_unused_experts():
    ids = torch.full((300, 1), 5, dtype=torch.int64, device=DEVICE)  # 300 rows, one expert, 4 idle
    layout = check_layout(ids, 9, 16)
    assert layout.expert_counts.cpu().tolist() == [0] * 5 + [300] + [0] * 3
    check_layout(random_ids(40, 2, 16, experts=3), 16, 16)  # experts 3..15 never chosen


def test_align_is_a_function_of_the_ids():
    ids = random_ids(300, 4, 11)
    first = moe_align(ids, 11, 16)
    second = moe_align(ids.clone(), 11, 16)
    assert torch.equal(first.tile_expert, second.tile_expert)
    used = int((first.tile_expert >= 0).sum()) * 16
    assert torch.equal(first.sorted_row_ids[:used], second.sorted_row_ids[:used])


# ----------------------------------------------------------------------------------------------------
# fused experts


def loop_fused_moe(hidden, w_gate_up, w_down, weights, ids):
    """The obvious loop, in float64: for each token, for each slot in order, add w * down(silu(g) * u)."""
    inter = w_down.shape[-1]
    out = torch.zeros(hidden.shape, dtype=torch.float64)
    for t in range(hidden.shape[0]):
        x = hidden[t].double().cpu()
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            gate_up = w_gate_up[e].double().cpu() @ x
            act = F.silu(gate_up[:inter]) * gate_up[inter:]
            out[t] += float(weights[t, k]) * (w_down[e].double().cpu() @ act)
    return out


def random_experts(T, H, I, E, dtype):
    hidden = torch.randn(T, H, device=DEVICE).to(dtype)
    w_gate_up = (torch.randn(E, 2 * I, H, device=DEVICE) / H**0.5).to(dtype)
    w_down = (torch.randn(E, H, I, device=DEVICE) / I**0.5).to(dtype)
    return hidden, w_gate_up, w_down


def relative_error(out, ref):
    return ((out.double().cpu() - ref).norm() / ref.norm()).item()


TOLERANCE = {torch.float32: 1e-5, torch.float16: 3e-3}
FUSED_CASES = [
    # (T, H, I, E, K); the interpreter's pinned tiles are 16 rows x 32 x 32
    pytest.param(1, 64, 32, 8, 2, id="T1"),
    pytest.param(5, 64, 32, 8, 2, id="T-below-tile"),  # 10 rows, one partial tile per expert
    pytest.param(9, 33, 17, 6, 3, id="odd-H-and-I"),  # masks on both reduction dims and columns
    pytest.param(20, 48, 40, 13, 4, id="prime-E"),
    pytest.param(11, 40, 24, 7, 1, id="K1"),
    pytest.param(6, 32, 32, 5, 5, id="K-equals-E"),  # every token in every expert
    pytest.param(45, 32, 48, 3, 2, id="several-tiles-per-expert"),  # ~30 rows an expert, 16-row tiles
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("T, H, I, E, K", FUSED_CASES)
def test_fused_moe_matches_loop(T, H, I, E, K, dtype):
    hidden, w_gate_up, w_down = random_experts(T, H, I, E, dtype)
    ids = random_ids(T, K, E)
    weights = torch.rand(T, K, device=DEVICE) + 0.1
    out = fused_moe(hidden, w_gate_up, w_down, weights, ids)
    assert out.dtype == dtype and out.shape == (T, H)
    assert relative_error(out, loop_fused_moe(hidden, w_gate_up, w_down, weights, ids)) < TOLERANCE[dtype]
    reference_out = reference.fused_moe(hidden.float(), w_gate_up.float(), w_down.float(), weights, ids)
    torch.testing.assert_close(
        out.float(), reference_out, atol=TOLERANCE[dtype] * 20, rtol=TOLERANCE[dtype] * 20
    )


def test_fused_moe_all_tokens_to_one_expert_and_unused_experts():
    T, H, I, E = 37, 32, 24, 10
    hidden, w_gate_up, w_down = random_experts(T, H, I, E, torch.float32)
    other = torch.randint(0, 3, (T,), device=DEVICE)
    ids = torch.stack([torch.full_like(other, 7), other], dim=1)  # slot 0 always expert 7; 3..6, 8, 9 idle
    weights = torch.rand(T, 2, device=DEVICE)
    out = fused_moe(hidden, w_gate_up, w_down, weights, ids)
    assert relative_error(out, loop_fused_moe(hidden, w_gate_up, w_down, weights, ids)) < 1e-5


def test_fused_moe_pinned_config(monkeypatch):
    """The CI pin: a config given by environment variable is the one used (odd tiles show up in padding)."""
    monkeypatch.setenv(CONFIG_ENV, "32,16,16,4,1")
    T, H, I, E, K = 14, 40, 20, 5, 2
    hidden, w_gate_up, w_down = random_experts(T, H, I, E, torch.float32)
    ids = random_ids(T, K, E)
    weights = torch.rand(T, K, device=DEVICE)
    out = fused_moe(hidden, w_gate_up, w_down, weights, ids)
    assert relative_error(out, loop_fused_moe(hidden, w_gate_up, w_down, weights, ids)) < 1e-5


def test_routing_then_experts_end_to_end():
    """The model's call sequence: V3-style routing feeding the fused experts."""
    T, H, I, E, K = 10, 32, 16, 16, 4
    hidden, w_gate_up, w_down = random_experts(T, H, I, E, torch.float32)
    weights, ids = moe_routing(
        torch.randn(T, E, device=DEVICE), torch.randn(E, device=DEVICE), K, "sigmoid", 4, 2, True, 2.5
    )
    out = fused_moe(hidden, w_gate_up, w_down, weights, ids)
    assert relative_error(out, loop_fused_moe(hidden, w_gate_up, w_down, weights, ids)) < 1e-5


# ----------------------------------------------------------------------------------------------------
# GPU: bf16 accuracy, determinism, batch invariance, config invariance

V2_LITE = dict(H=2048, I=1408, E=64, K=6)


def bf16_problem(T, H, I, E, K):
    hidden, w_gate_up, w_down = random_experts(T, H, I, E, torch.bfloat16)
    weights, ids = moe_routing(torch.randn(T, E, device=DEVICE), None, K, "softmax", 1, 1, False, 1.0)
    return hidden, w_gate_up, w_down, weights, ids


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 37, 512, 3000])
def test_bf16_matches_reference(T):
    hidden, w_gate_up, w_down, weights, ids = bf16_problem(T, **V2_LITE)
    out = fused_moe(hidden, w_gate_up, w_down, weights, ids)
    ref = reference.fused_moe(hidden.float(), w_gate_up.float(), w_down.float(), weights, ids).double().cpu()
    assert relative_error(out, ref) < 1e-2


@pytest.mark.gpu
def test_twenty_runs_bit_identical():
    hidden, w_gate_up, w_down, _, _ = bf16_problem(512, **V2_LITE)
    logits = torch.randn(512, 64, device=DEVICE)
    first = None
    for _ in range(20):
        weights, ids = moe_routing(logits, None, 6, "softmax", 1, 1, False, 1.0)
        out = fused_moe(hidden, w_gate_up, w_down, weights, ids)
        if first is None:
            first = out.clone()
        assert torch.equal(out, first)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [V2_LITE, dict(H=1024, I=512, E=256, K=8)], ids=["v2-lite", "v3-like"])
def test_token_alone_equals_token_in_batch(shape):
    """Token j alone (T=1, decode tiles) vs among 511 others vs among 4095 (prefill tiles)."""
    hidden, w_gate_up, w_down, _, _ = bf16_problem(4096, **shape)
    logits = torch.randn(4096, shape["E"], device=DEVICE)

    def run(rows):
        weights, ids = moe_routing(logits[rows], None, shape["K"], "softmax", 1, 1, False, 1.0)
        return fused_moe(hidden[rows], w_gate_up, w_down, weights, ids)

    big, batch = run(slice(0, 4096)), run(slice(0, 512))
    for j in (0, 7, 300, 511):
        alone = run(slice(j, j + 1))
        assert torch.equal(alone[0], batch[j]), f"token {j}: alone vs 512"
        assert torch.equal(alone[0], big[j]), f"token {j}: alone vs 4096"


# Pins spanning the autotune spaces and both row tiles: BLOCK_M 64/128, BLOCK_N 32..256, BLOCK_K 64/128,
# 4 or 8 warps (the last one is too large for GEMM 1's shared memory and is skipped where it fails).
CONFIG_PINS = [
    "64,32,64,4,4",
    "64,64,64,4,4",
    "64,128,64,8,3",
    "128,128,64,8,3",
    "128,64,128,4,3",
    "128,256,64,8,3",
]


@pytest.mark.gpu
def test_every_config_gives_the_same_bits(monkeypatch):
    """Autotune's pick (timing-dependent) must not change results: all wgmma configs agree bit for bit."""
    hidden, w_gate_up, w_down, weights, ids = bf16_problem(700, **V2_LITE)
    results = {"autotuned": fused_moe(hidden, w_gate_up, w_down, weights, ids)}
    for pin in CONFIG_PINS:
        monkeypatch.setenv(CONFIG_ENV, pin)
        try:
            results[pin] = fused_moe(hidden, w_gate_up, w_down, weights, ids)
        except Exception as error:  # a config too large for shared memory
            if "OutOfResources" not in type(error).__name__:
                raise
    assert len(results) >= len(CONFIG_PINS)
    first = results["autotuned"]
    differing = [name for name, out in results.items() if not torch.equal(out, first)]
    assert not differing, f"configs with other bits: {differing}"
