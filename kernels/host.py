"""Host lists to device tensors without waiting for the GPU."""

from __future__ import annotations

import torch


def upload(values: list, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """A (nested) host list as a tensor on `device`. On a GPU it goes through pinned memory with a
    non-blocking copy, so the host never waits for queued GPU work (a copy from pageable memory would);
    torch keeps the pinned buffer until the copy has run."""
    host = torch.tensor(values, dtype=dtype)
    if torch.device(device).type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)
