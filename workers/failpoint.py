"""A fault-injection point in the stage's forward, for the tests that a failing micro-batch fails alone.

MLAPIPE_FAILPOINT_FORWARD="STAGE:TOKEN" makes stage STAGE raise in its forward of any micro-batch whose
new tokens include token id TOKEN, the way an out-of-memory error or a bug would. Unset (always, outside
those tests) it costs one None check a forward. The driver passes MLAPIPE_* variables to the stage
actors (runtime/pipeline.py), so it reaches stages on other nodes too.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

FAILPOINT_ENV = "MLAPIPE_FAILPOINT_FORWARD"


@dataclass(frozen=True)
class Failpoint:
    stage: int
    token_id: int

    @classmethod
    def from_env(cls) -> Failpoint | None:
        text = os.environ.get(FAILPOINT_ENV)
        if not text:
            return None
        stage, _, token = text.partition(":")
        try:
            return cls(int(stage), int(token))
        except ValueError:
            raise ValueError(f"{FAILPOINT_ENV} must be STAGE:TOKEN (two integers), got {text!r}") from None

    def hits(self, stage: int, batch) -> bool:
        return stage == self.stage and any(self.token_id in chunk.token_ids for chunk in batch.chunks)
