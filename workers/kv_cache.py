"""The paged latent KV cache of one stage: 576 numbers (kv_lora_rank + rope dim) per token per layer.

Blocks are handed out by the driver's block manager; a token at position p of a sequence lives in
row p % block_size of block block_table[p // block_size]. Every layer of the stage uses the same
block ids, so one block table serves all of them.
"""

from __future__ import annotations

import torch


def allocate_latent_cache(
    num_layers: int, num_blocks: int, block_size: int, latent_dim: int, dtype: torch.dtype, device
) -> torch.Tensor:
    """(num_layers, num_blocks, block_size, latent_dim). Filled with NaN on allocation so that a read of
    a slot nothing wrote shows up in the output instead of passing silently."""
    return torch.full(
        (num_layers, num_blocks, block_size, latent_dim), float("nan"), dtype=dtype, device=device
    )


def slot_mapping(block_table: list[int], first_position: int, count: int, block_size: int) -> list[int]:
    """Flat cache rows (block * block_size + offset) of positions first_position .. first_position+count-1."""
    return [
        block_table[p // block_size] * block_size + p % block_size
        for p in range(first_position, first_position + count)
    ]


def cache_bytes(num_layers: int, num_blocks: int, block_size: int, latent_dim: int, element_size: int) -> int:
    return num_layers * num_blocks * block_size * latent_dim * element_size
