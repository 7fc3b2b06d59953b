"""The control message of one micro-batch: what every stage needs to run its layers on it.

Plain Python (lists, ints), so it is cheap to pickle through Ray and testable without torch.

A decode micro-batch may ask for several steps (num_steps > 1): the stages then run that many decode
steps on their own, the last stage feeding each step's sampled tokens back to the first, and the
driver hears back once per round instead of once per token.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mlapipe.runtime.sampling_params import SamplingParams


@dataclass
class SequenceChunk:
    request_id: str
    token_ids: list[int]  # the new tokens of this step (stage 0 embeds them)
    num_cached: int  # tokens already in the KV cache: the first new token sits at this position
    block_table: list[int]  # KV blocks of the sequence, covering num_cached + len(token_ids)
    sample: bool  # the chunk reaches the end of the known tokens: sample the next one
    sampling: SamplingParams = field(default_factory=SamplingParams)
    num_generated: int = 0  # tokens sampled so far (seeds the per-step generator)
    score_targets: list[int] | None = None  # score(): the token that follows each new token (-1: none)
    return_logits: bool = False  # full logits of every new token (tests, debugging)

    @property
    def num_new(self) -> int:
        return len(self.token_ids)

    @property
    def seq_len(self) -> int:
        return self.num_cached + len(self.token_ids)


@dataclass
class MicroBatch:
    batch_id: int
    chunks: list[SequenceChunk]
    num_steps: int = 1  # > 1: a decode round (every chunk one new token, sampled); see decode_step

    def __post_init__(self) -> None:
        if self.num_steps > 1 and not all(
            c.num_new == 1 and c.sample and c.score_targets is None and not c.return_logits
            for c in self.chunks
        ):
            raise ValueError(
                "only decode micro-batches (one sampled token per sequence) can run several steps"
            )

    def decode_step(self, step: int) -> MicroBatch:
        """Step `step` of a decode round as a one-step micro-batch: each sequence one position further.
        Its token ids are step 0's; the first stage embeds the tokens sampled at the previous step,
        which travel as a device tensor and never enter this message."""
        if step == 0:
            return MicroBatch(self.batch_id, self.chunks)
        return MicroBatch(
            self.batch_id,
            [
                SequenceChunk(
                    request_id=c.request_id,
                    token_ids=c.token_ids,
                    num_cached=c.num_cached + step,
                    block_table=c.block_table,
                    sample=True,
                    sampling=c.sampling,
                    num_generated=c.num_generated + step,
                )
                for c in self.chunks
            ],
        )

    @property
    def num_tokens(self) -> int:
        return sum(c.num_new for c in self.chunks)

    @property
    def chunk_ends(self) -> list[int]:
        """Row after each chunk's last token in the batch's token order."""
        ends, total = [], 0
        for c in self.chunks:
            total += c.num_new
            ends.append(total)
        return ends


@dataclass
class StepOutput:
    """What the last stage returns: token ids for sampling chunks (one per step, in order); log p(target)
    per new token for scoring chunks; logits only when asked for; for chunks whose sampling asks for
    logprobs, one (log p of the sampled token, [(token id, log p) of the top alternatives]) per token.
    A micro-batch that raised on a stage comes back with only its error."""

    batch_id: int
    sampled: dict[str, list[int]]
    scores: dict[str, list[float]] = field(default_factory=dict)
    logits: dict[str, object] = field(default_factory=dict)  # request id -> (num_new, vocab) array
    logprobs: dict[str, list[tuple[float, list[tuple[int, float]]]]] = field(default_factory=dict)
    error: str | None = None  # the micro-batch failed on a stage (which, and why): its requests fail alone
