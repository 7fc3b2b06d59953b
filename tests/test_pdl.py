"""Programmatic dependent launch (kernels/pdl.py): where it is on, and that it changes no bits."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

from mlapipe.kernels import pdl  # noqa: E402


def test_off_on_cpus_in_the_interpreter_and_by_the_switch(monkeypatch):
    assert dict(pdl.launch_options(torch.device("cpu"))) == {"PDL": False}
    # decided before any CUDA query, so these hold on a machine without a GPU
    assert dict(pdl._options("cuda", 0, "0", "0")) == {"PDL": False}  # MLAPIPE_PDL=0
    assert dict(pdl._options("cuda", 0, "1", "1")) == {"PDL": False}  # TRITON_INTERPRET=1
    monkeypatch.setenv(pdl.PDL_ENV, "0")
    assert not pdl.launch_options(torch.device("cpu"))["PDL"]


def test_options_cannot_be_changed_by_a_caller():
    options = pdl.launch_options(torch.device("cpu"))
    with pytest.raises(TypeError):
        options["PDL"] = True  # a shared cached mapping: read-only


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_a_chain_of_kernels_gives_the_same_bits_with_and_without_pdl(monkeypatch):
    """A decode-shaped chain of dependent Triton kernels (quantized linear -> residual norm -> rope ->
    routing), each reading what the previous wrote, run with PDL on and off: the same bits."""
    from mlapipe.kernels.fused_norm_rope import add_rms_norm, apply_rope_pairs
    from mlapipe.kernels.moe_routing import moe_routing
    from mlapipe.kernels.quant.linear import quant_linear
    from mlapipe.kernels.quant.random_blocks import random_quant_tensor

    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("PDL needs sm_90 or later")
    device = torch.device("cuda")
    w = random_quant_tensor((2048, 2048), 8, 2048**-0.5, "w", seed=1, device=device)
    router = random_quant_tensor((64, 2048), 8, 2048**-0.5, "r", seed=2, device=device)
    x = torch.randn(3, 2048, device=device, dtype=torch.bfloat16)
    norm = torch.rand(2048, device=device) + 0.5
    angles = torch.rand(3, 32, device=device)

    def chain():
        stream, h = add_rms_norm(x, quant_linear(x, w), norm, 1e-6)
        roped = apply_rope_pairs(h.view(3, 32, 64), angles.cos(), angles.sin())
        logits = quant_linear(roped.view(3, 2048), router).float()
        return [stream, h, roped, *moe_routing(logits, None, 6, "softmax", 1, 1, False, 1.0)]

    monkeypatch.setenv(pdl.PDL_ENV, "1")
    assert pdl.launch_options(device)["PDL"]
    on = [chain() for _ in range(3)]
    monkeypatch.setenv(pdl.PDL_ENV, "0")
    assert not pdl.launch_options(device)["PDL"]
    off = chain()
    for run in on:
        for got, want in zip(run, off):
            assert torch.equal(got, want)
