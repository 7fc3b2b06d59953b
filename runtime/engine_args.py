"""The engine's keyword arguments checked before anything is loaded: ranges, transports, devices, TLS."""

from __future__ import annotations

import math
from numbers import Integral

TRANSPORTS = ("nccl", "gloo", "grpc")


def tls_files(text: str | None, transport: str | None):
    """transport_tls's certificate files (workers/transport/tls.py); they secure the grpc transport only."""
    if text is None:
        return None
    from mlapipe.workers.transport.tls import TlsFiles

    if transport != "grpc":
        raise ValueError(
            f"transport_tls secures the grpc transport; transport is {transport or 'its default'}"
        )
    return TlsFiles.parse(text)


def check_engine_args(
    *,
    pipeline,
    amb,
    ubatch,
    n_ctx,
    block_size,
    kv_blocks,
    max_seqs_per_batch,
    decode_steps,
    deadline_s,
    metrics_port,
    transport,
    devices,
) -> None:
    """Refuses engine settings out of range before anything is loaded (the CLI's argparse types check
    the same ranges, so a user sees the flag's name; this names the keyword)."""

    def integer(name, value, low, high=None, optional=False):
        if optional and value is None:
            return
        if (
            isinstance(value, bool)
            or not isinstance(value, Integral)
            or value < low
            or (high and value > high)
        ):
            span = f"in [{low}, {high}]" if high else f"at least {low}"
            raise ValueError(f"{name} must be an integer {span}, got {value!r}")

    integer("pipeline", pipeline, 1)
    integer("ubatch", ubatch, 1, optional=True)
    integer("n_ctx", n_ctx, 2, optional=True)
    integer("block_size", block_size, 1)
    integer("kv_blocks", kv_blocks, 1, optional=True)
    integer("max_seqs_per_batch", max_seqs_per_batch, 1)
    integer("decode_steps", decode_steps, 1)
    integer("metrics_port", metrics_port, 0, 65535, optional=True)
    ambs = [amb] if isinstance(amb, (int, float)) else list(amb)
    if not ambs or any(
        isinstance(a, bool) or not isinstance(a, (int, float)) or not math.isfinite(a) or a < 0 for a in ambs
    ):
        raise ValueError(
            f"amb must be a finite number of MiB >= 0 (0: unlimited), or one per stage, got {amb!r}"
        )
    if len(ambs) > 1 and len(ambs) != pipeline:
        raise ValueError(
            f"amb has {len(ambs)} values for {pipeline} pipeline stages; give one or one per stage"
        )
    if not (isinstance(deadline_s, (int, float)) and math.isfinite(deadline_s) and deadline_s > 0):
        raise ValueError(f"deadline_s must be a positive number of seconds, got {deadline_s!r}")
    if transport is not None and transport not in TRANSPORTS:
        raise ValueError(f"transport must be one of {', '.join(TRANSPORTS)}, got {transport!r}")
    if devices is not None and devices not in ("cuda", "cpu"):
        raise ValueError(f"devices must be 'cuda' or 'cpu', got {devices!r}")
    if transport == "nccl" and (devices == "cpu" or (devices is None and default_device() == "cpu")):
        raise ValueError("transport nccl needs CUDA GPUs; on CPU use gloo or grpc")


# Tokens per micro-batch when none is given. On a GPU a prefill chunk of 8192 tokens keeps the MoE GEMMs
# on full tiles (V2-Lite pp8192 on one H200: 63.9k t/s at 2048, 71.6k at 4096, 74.3k at 8192), the
# chunk vLLM and SGLang default to on GPUs of this class; its cost is the compute buffer (V3: 5.0 GiB a
# stage against 4.3 at 2048) and decode steps that wait behind a whole chunk (--ubatch 2048 for
# latency-bound serving). On CPU stages, where a chunk takes seconds, 512, as llama.cpp's ubatch.
DEFAULT_UBATCH = {"cuda": 8192, "cpu": 512}


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
