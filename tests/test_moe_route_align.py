"""Routing and the experts' row order in one kernel (kernels/moe_route_align.py `moe_route_and_align`): the same
weights, ids and layout, bit for bit, as `moe_routing` then `moe_align`; the MoE block gives the same output
through it; it compiles for sm_90 with the route part laid out as the route kernel's. Without a GPU the
kernels run in the interpreter; on a GPU the same comparisons run compiled, plus a CUDA-graph replay."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import textwrap  # noqa: E402
from dataclasses import replace  # noqa: E402

import pytest  # noqa: E402

from mlapipe.kernels import moe_route_align, moe_routing  # noqa: E402
from mlapipe.kernels.moe_align import moe_align  # noqa: E402
from mlapipe.kernels.moe_route_align import moe_route_and_align, route_align_fits  # noqa: E402
from mlapipe.runtime.shapes import SHAPES  # noqa: E402
from mlapipe.workers import ops  # noqa: E402
from mlapipe.workers.layers import MoEBlock  # noqa: E402
from tests.hopper_compile import compile_script_output  # noqa: E402
from tests.test_moe_block import random_weights, small_config, unfused  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (E, K, gating, groups, kept groups, bias, renormalize, scale, shared)
ROUTINGS = {
    "v2": (64, 6, "softmax", 1, 1, False, False, 1.0, 2),
    "v3": (256, 8, "sigmoid", 8, 4, True, True, 2.5, 1),
    "odd-E": (13, 3, "softmax", 1, 1, False, True, 1.0, 1),  # 14 experts in the layout
    "small-grouped": (12, 3, "sigmoid", 3, 2, True, True, 2.5, 0),  # no shared experts
}


def routing_args(name: str, T: int):
    E, K, gating, groups, kept, has_bias, renorm, scale, shared = ROUTINGS[name]
    logits = torch.randn(T, E, device=DEVICE) * 2
    bias = torch.randn(E, device=DEVICE) * 0.5 if has_bias else None
    return logits, bias, K, gating, groups, kept, renorm, scale, shared


def assert_same_layout(got, want) -> None:
    """Every output bit that a reader reads: all counts, tile owners and row positions, and the sorted
    rows of the used tiles (unused tiles' positions are never read, and never written)."""
    assert (got.num_rows, got.block_m, got.max_tiles) == (want.num_rows, want.block_m, want.max_tiles)
    assert torch.equal(got.expert_counts, want.expert_counts)
    assert torch.equal(got.tile_expert, want.tile_expert)
    assert torch.equal(got.row_positions, want.row_positions)
    used = int((want.tile_expert >= 0).sum()) * want.block_m
    assert torch.equal(got.sorted_row_ids[:used], want.sorted_row_ids[:used])


# (routing, T): T = 1, 3, 16 each; v3 at T = 16 has 144 rows, past one program (today's two kernels), so
# also T = 14, its largest batch in one kernel
CASES = [(name, T) for name in ROUTINGS for T in (1, 3, 16)] + [("v3", 14)]


@pytest.mark.parametrize("block_m", [16, 64])
@pytest.mark.parametrize("name, T", CASES)
def test_one_kernel_equals_route_then_align(name, T, block_m):
    args = routing_args(name, T)
    E, K, shared = ROUTINGS[name][0], ROUTINGS[name][1], ROUTINGS[name][-1]
    assert route_align_fits(T, E, K, shared) == (name != "v3" or T < 16)
    weights, ids, layout = moe_route_and_align(*args, block_m=block_m)
    want_weights, want_ids = moe_routing.moe_routing(*args)
    assert torch.equal(weights, want_weights) and weights.dtype == torch.float32
    assert torch.equal(ids, want_ids) and ids.dtype == torch.int64
    assert_same_layout(layout, moe_align(want_ids, E + shared, block_m))


def test_fits_decode_sized_batches_only():
    assert route_align_fits(16, 64, 6, 2)  # V2-Lite: 16 tokens, 128 rows
    assert not route_align_fits(17, 64, 6, 2)  # past the route kernel's one program (and 128 rows)
    assert route_align_fits(14, 256, 8, 1) and not route_align_fits(15, 256, 8, 1)  # V3: 126 / 135 rows
    assert route_align_fits(4, 1024, 8, 0) and not route_align_fits(5, 1024, 8, 0)  # BLOCK_T 4 at E 1024
    assert not route_align_fits(0, 64, 6, 2)


def test_empty_batch():
    weights, ids, layout = moe_route_and_align(*routing_args("v2", 0), block_m=16)
    assert weights.shape == ids.shape == (0, 8) and layout.num_rows == 0
    assert int(layout.expert_counts.sum()) == 0 and bool((layout.tile_expert == -1).all())


def test_a_layout_for_other_rows_is_refused():
    from mlapipe.kernels.fused_moe import fused_moe

    T, H, inter, E = 3, 32, 16, 8
    hidden = torch.randn(T, H, device=DEVICE)
    w_gate_up, w_down = torch.randn(E, 2 * inter, H, device=DEVICE), torch.randn(E, H, inter, device=DEVICE)
    logits = torch.randn(T, E, device=DEVICE)
    weights, ids, layout = moe_route_and_align(logits, None, 2, "softmax", 1, 1, False, 1.0, 0, block_m=32)
    with pytest.raises(AssertionError, match="layout for"):  # the GEMMs take 16 (interpreter) or 64 rows
        fused_moe(hidden, w_gate_up, w_down, weights, ids, layout=layout)


# ----------------------------------------------------------------------------------------------------
# the MoE block


@pytest.fixture
def triton_ops(monkeypatch):
    """ops dispatches to the Triton kernels here too (the interpreter on a CPU)."""
    monkeypatch.setattr(ops, "uses_reference", lambda device: False)


@pytest.mark.parametrize("shape, shared", [("v2-lite", 2), ("v3", 1)])
def test_moe_block_output_unchanged(shape, shared, triton_ops, monkeypatch):
    """The block's decode-sized forward through the one kernel = through route then align (the
    fallback forced), bit for bit; and both = the plain composition (the torch references)."""
    cfg = small_config(shape, shared)
    weights = random_weights(cfg, seed=3)
    block = MoEBlock(cfg, {k: v.to(DEVICE) for k, v in weights.items()})
    x = torch.randn(5, cfg.hidden_size, device=DEVICE)
    assert route_align_fits(5, cfg.num_experts, cfg.num_experts_per_token, shared)
    one_kernel = [block.forward(x[:T]) for T in (1, 5)]
    monkeypatch.setattr(moe_route_align, "route_align_fits", lambda *args: False)
    two_kernels = [block.forward(x[:T]) for T in (1, 5)]
    for got, want in zip(one_kernel, two_kernels):
        assert torch.equal(got, want)
    expected = unfused(cfg, weights, x.cpu())
    tolerance = 1e-4 if DEVICE == "cpu" else 2e-2  # fp32 dots may take TF32 on a GPU
    torch.testing.assert_close(one_kernel[1].cpu(), expected, rtol=tolerance, atol=tolerance)


def test_quantized_moe_block_output_unchanged(triton_ops, monkeypatch):
    """The same with Q8_0 expert stacks (quant_fused_moe's row tile and layout)."""
    from gguf import GGMLQuantizationType as Q

    from mlapipe.kernels.quant.random_blocks import random_quant_tensor

    E, H, inter, n = 4, 256, 64, 2
    cfg = replace(
        SHAPES["v2-lite"], hidden_size=H, num_experts=E, num_experts_per_token=2, num_shared_experts=n,
        expert_intermediate_size=inter,
    )  # fmt: skip
    shapes = {
        "moe.w_gate": (E, inter, H),
        "moe.w_up": (E, inter, H),
        "moe.w_down": (E, H, inter),
        "shared.w_gate": (n * inter, H),
        "shared.w_up": (n * inter, H),
        "shared.w_down": (H, n * inter),
    }
    weights = {
        k: random_quant_tensor(s, int(Q.Q8_0), s[-1] ** -0.5, k, device=DEVICE) for k, s in shapes.items()
    }
    weights["moe.router"] = torch.randn(E, H, device=DEVICE) * H**-0.5
    block = MoEBlock(cfg, weights)
    assert block.shared_in_stack
    x = torch.randn(3, H, device=DEVICE).to(torch.bfloat16 if DEVICE == "cuda" else torch.float32)
    one_kernel = block.forward(x)
    monkeypatch.setattr(moe_route_align, "route_align_fits", lambda *args: False)
    assert torch.equal(one_kernel, block.forward(x))


# ----------------------------------------------------------------------------------------------------
# compiled


def test_compiles_for_hopper():
    """The one kernel compiles for sm_90 (Triton's bundled ptxas; no GPU needed) at the V2-Lite and V3
    decode shapes, with the PDL wait and the barrier, its ids read back through coherent loads (no
    ld.global.nc), and its route part is the route kernel's: the same float operations, reductions,
    loads and stores on the same layouts, in the same order (so the same bits on the GPU)."""
    script = textwrap.dedent(
        """
        import re
        import torch
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from mlapipe.kernels import moe_route_align as fused, moe_routing as mr

        ROUTE = {"logits_ptr": "*fp32", "bias_ptr": "*fp32", "weights_ptr": "*fp32", "ids_ptr": "*i64",
                 "num_tokens": "i32", "num_experts": "i32", "stride_logits": "i32", "scale": "fp32"}
        LAYOUT = {"expert_counts_ptr": "*i32", "tile_expert_ptr": "*i32", "sorted_row_ids_ptr": "*i32",
                  "row_positions_ptr": "*i32", "max_tiles": "i32"}

        def compiled(fn, sig, constexprs):
            sig = dict(sig, **{name: "constexpr" for name in constexprs})
            return triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs),
                                  target=GPUTarget("cuda", 90, 32))

        def route_ops(ttgir, stop=None):
            # float arithmetic, reductions, loads and stores, with layout aliases spelled out, names dropped
            aliases = dict(re.findall(r"^(#\\w+) = (#ttg\\.[^\\n]*)$", ttgir, re.M))
            body = ttgir[ttgir.index("tt.func"):]
            body = body[: re.search(stop, body).start()] if stop else body
            kept = []
            for line in body.splitlines():
                line = re.sub(r"%[\\w.#]+", "%", re.sub(r"\\s*loc\\(.*$", "", line)).strip()
                line = re.sub(r"#\\w+", lambda m: aliases.get(m.group(0), m.group(0)), line)
                if line.startswith(("}) : (", "tt.store")) or re.search(
                    r"= (arith\\.\\w+f\\b|arith\\.(cmpf|maxnumf|minnumf)|math\\.|tt\\.load|tt\\.extern)", line
                ):
                    kept.append(line)
            return kept

        for T, E, K, gating, groups, kept, bias, renorm, shared, block_m in [
            (16, 64, 6, "softmax", 1, 1, False, False, 2, 64), (1, 256, 8, "sigmoid", 8, 4, True, True, 1, 16)
        ]:
            # the launchers' constexprs, from CPU tensors of the shapes
            _, _, _, route = mr.prepare_routing(
                torch.empty(T, E), torch.empty(E) if bias else None, K, gating, groups, kept, renorm, 2.5, shared
            )
            both = fused._route_align_meta(route, T * (K + shared), E + shared, block_m)
            one = compiled(fused._route_align_kernel, dict(ROUTE, **LAYOUT), dict(both, PDL=True))
            alone = compiled(mr._route_kernel, ROUTE, dict(route, PDL=True))
            ptx = one.asm["ptx"]
            # the ids' 64-bit stores, a barrier, then the ordering's 64-bit loads of them
            last_store = max(m.end() for m in re.finditer(r"st\\.global[.\\w]*\\.b64", ptx))
            first_load = min(m.start() for m in re.finditer(r"ld\\.global[.\\w]*\\.b64", ptx))
            barrier = last_store < first_load and "bar.sync" in ptx[last_store:first_load]
            fused_route = route_ops(one.asm["ttgir"], stop=r"\\b(gpu|ttg)\\.barrier\\b")
            same = fused_route == route_ops(alone.asm["ttgir"]) and len(fused_route) > 20
            print("griddepcontrol.wait" in ptx, barrier, "ld.global.nc" not in ptx, same, flush=True)
        """
    )
    assert compile_script_output(script) == ["True"] * 8


@pytest.mark.gpu
def test_cuda_graph_replay_gives_the_eager_bits():
    """Captured once, replayed on new logits: the eager two-kernel outputs (buffer sizes depend on T, K,
    E and block_m alone)."""
    for name, T in (("v2", 1), ("v3", 14)):
        args = routing_args(name, T)
        logits = args[0].clone()
        moe_route_and_align(logits, *args[1:], block_m=64)  # compile outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            weights, ids, layout = moe_route_and_align(logits, *args[1:], block_m=64)
        for _ in range(3):
            logits.copy_(torch.randn_like(logits) * 2)
            graph.replay()
            want_weights, want_ids = moe_routing.moe_routing(logits, *args[1:])
            assert torch.equal(weights, want_weights) and torch.equal(ids, want_ids)
            assert_same_layout(layout, moe_align(want_ids, ROUTINGS[name][0] + ROUTINGS[name][-1], 64))
