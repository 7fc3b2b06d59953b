"""Errors the driver raises where more than one module needs them."""

from __future__ import annotations


class StageFailed(RuntimeError):
    """A pipeline stage died, raised, or missed a micro-batch's deadline."""

    def __init__(self, stage: int, device: str, reason: str, batch_ids: list[int]):
        super().__init__(f"pipeline stage {stage} ({device}) failed: {reason}")
        self.stage = stage
        self.batch_ids = batch_ids


class ClusterUnreachable(ConnectionError):
    """The Ray cluster named by --address / RAY_ADDRESS does not answer."""
