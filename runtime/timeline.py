"""A text figure of where each pipeline stage computes and where it waits, from the stages' forward spans
(workers/stage_timeline.py). One row per stage over a shared time axis: a column shows the micro-batch a
stage was computing (its id, base 36), '.' that it was idle; then each stage's busy share, its idle time
before its first span, between spans (bubbles) and after its last.

    stage 0 |00001111222233........| busy 64%: 0.0 ms before, 0.0 between, 8.1 after
    stage 1 |....00001111222233....| busy 64%: 2.3 ms before, 0.0 between, 2.3 after
"""

from __future__ import annotations

import math

DIGITS = "0123456789abcdefghijklmnopqrstuvwxyz"


def render(timelines: list[list[tuple[int, int, float, float]]], width: int = 100) -> str:
    """timelines: per stage, (batch id, step, start, end) spans in seconds of one clock."""
    spans = [span for stage in timelines for span in stage]
    if not spans:
        return "timeline: no forward spans recorded"
    t0 = min(s[2] for s in spans)
    total = max(max(s[3] for s in spans) - t0, 1e-9)
    column = total / width
    lines = [
        f"timeline: {total * 1e3:.1f} ms, one column = {column * 1e3:.2f} ms; a column shows the micro-batch "
        "a stage computes (id, base 36), '.' idle"
    ]
    for stage, stage_spans in enumerate(timelines):
        row = ["."] * width
        ordered = sorted(stage_spans, key=lambda s: s[2])
        for batch_id, _, start, end in ordered:
            first = min(width - 1, int((start - t0) / column))
            last = max(first + 1, min(width, math.ceil((end - t0) / column)))
            row[first:last] = DIGITS[batch_id % len(DIGITS)] * (last - first)
        busy = sum(end - start for _, _, start, end in ordered)
        if ordered:
            before = ordered[0][2] - t0
            after = t0 + total - max(s[3] for s in ordered)
            between = max(0.0, total - busy - before - after)
        else:
            before, between, after = total, 0.0, 0.0
        lines.append(
            f"stage {stage} |{''.join(row)}| busy {busy / total:.0%}: {before * 1e3:.1f} ms before, "
            f"{between * 1e3:.1f} between, {after * 1e3:.1f} after"
        )
    return "\n".join(lines)
