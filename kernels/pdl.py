"""Programmatic dependent launch (Hopper and later): a kernel's programs become resident while the kernel
before it in the stream finishes, instead of after.

A decode step is ~600 short kernels replayed from a CUDA graph; each boundary costs the next kernel's
launch and ramp (~1 us) on top of its work. Every Triton kernel here starts with `wait_for_previous(PDL)`
and is launched with `**launch_options(device)`: with PDL on, `gdc_wait` holds the kernel's programs
until the previous kernel has finished and its writes are visible (before any load or store, so neither
a read-after-write nor a write-after-read can race), then `gdc_launch_dependents` lets the next kernel's
programs launch. At most two kernels overlap, and a kernel only ever runs its body after its predecessor
has completed, so results are the same bits with PDL on or off. Kernels launched without the attribute
(cuBLAS, torch) wait for their predecessors as usual.

Off on CPUs, in the interpreter, before sm_90, where this Triton lacks the launch option, and with
MLAPIPE_PDL=0 (to measure its effect or rule it out).
"""

from __future__ import annotations

import functools
import os
import types

import torch
import triton
import triton.language as tl

PDL_ENV = "MLAPIPE_PDL"


@triton.jit
def wait_for_previous(PDL: tl.constexpr):
    """First statement of every kernel: under PDL, wait for the previous kernel, then let the next launch."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


def launch_options(device: torch.device) -> types.MappingProxyType:
    """Keyword arguments for a Triton launch on `device`: the kernel's PDL constexpr, and launch_pdl
    where it is on."""
    index = device.index if device.type != "cuda" or device.index is not None else torch.cuda.current_device()
    return _options(device.type, index, os.environ.get(PDL_ENV, "1"), os.environ.get("TRITON_INTERPRET", "0"))


@functools.cache
def _options(kind: str, index: int | None, switch: str, interpret: str) -> types.MappingProxyType:
    on = kind == "cuda" and interpret != "1" and switch != "0" and _supported(index)
    return types.MappingProxyType({"PDL": True, "launch_pdl": True} if on else {"PDL": False})


def _supported(index: int) -> bool:
    if torch.cuda.get_device_capability(index)[0] < 9:
        return False
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
        from triton.language.extra import cuda as extra_cuda
    except ImportError:
        return False
    has_option = "launch_pdl" in getattr(CUDAOptions, "__dataclass_fields__", {})
    return has_option and hasattr(extra_cuda, "gdc_wait") and hasattr(extra_cuda, "gdc_launch_dependents")
