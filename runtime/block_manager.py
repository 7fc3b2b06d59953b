"""Paged latent-KV blocks: which cache blocks each sequence owns. Pure Python.

Every stage's cache has the same number of blocks and uses the same block ids (a stage simply holds
its own layers of each block), so one block table per sequence serves the whole pipeline.
"""

from __future__ import annotations


class OutOfBlocks(RuntimeError):
    """Raised when an allocation needs more free blocks than there are."""


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(
                f"need at least one block of at least one token, got {num_blocks} x {block_size}"
            )
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first
        self._tables: dict[str, list[int]] = {}

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use (0..1)."""
        return 1.0 - len(self._free) / self.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def extra_blocks_needed(self, seq_id: str, num_tokens: int) -> int:
        """Blocks to add so that the sequence can hold num_tokens tokens in total."""
        return max(0, self.blocks_for(num_tokens) - len(self._tables.get(seq_id, ())))

    def can_allocate(self, seq_id: str, num_tokens: int) -> bool:
        return self.extra_blocks_needed(seq_id, num_tokens) <= len(self._free)

    def allocate(self, seq_id: str, num_tokens: int) -> list[int]:
        """Grows the sequence's table to hold num_tokens tokens; returns the whole table."""
        needed = self.extra_blocks_needed(seq_id, num_tokens)
        if needed > len(self._free):
            raise OutOfBlocks(f"sequence {seq_id} needs {needed} more KV blocks, {len(self._free)} free")
        table = self._tables.setdefault(seq_id, [])
        table.extend(self._free.pop() for _ in range(needed))
        return list(table)

    def table(self, seq_id: str) -> list[int]:
        return list(self._tables.get(seq_id, ()))

    def free(self, seq_id: str) -> None:
        for block in reversed(self._tables.pop(seq_id, [])):
            self._free.append(block)
