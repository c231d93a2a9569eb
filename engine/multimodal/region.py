"""A host memory region of image embeddings, in blocks of BLOCK_ROWS rows (a row: one image token's embedding
followed by its deepstack features), that a KV transfer agent serves or pulls into: the encoder keeps its
cache here, and a prefill front pulls an encoder's blocks into its own. The same agent, state machine,
validation and timeouts as KV migration (engine/pd/transfer.py); only the "pool" is this region."""
from __future__ import annotations

import torch

BLOCK_ROWS = 64


def blocks_for(rows: int) -> int:
    return -(-rows // BLOCK_ROWS)


class EmbeddingRegion:
    def __init__(self, num_blocks: int, width: int, dtype: torch.dtype):
        self.tensor = torch.zeros(num_blocks, BLOCK_ROWS, width, dtype=dtype)
        self.width, self.dtype = width, dtype
        self.free_blocks = list(range(num_blocks))

    @property
    def num_blocks(self) -> int:
        return self.tensor.shape[0]

    @property
    def num_free(self) -> int:
        return len(self.free_blocks)

    def alloc(self, num_blocks: int) -> list[int] | None:
        n = num_blocks
        if n > len(self.free_blocks):
            return None
        out, self.free_blocks = self.free_blocks[:n], self.free_blocks[n:]
        return out

    def free(self, blocks: list[int]) -> None:
        self.free_blocks.extend(blocks)

    def write(self, blocks: list[int], rows: torch.Tensor) -> None:
        """rows [n, width] (any device) into the blocks, in order."""
        for i, b in enumerate(blocks):
            part = rows[i * BLOCK_ROWS:(i + 1) * BLOCK_ROWS]
            self.tensor[b, :len(part)].copy_(part)

    def read(self, blocks: list[int], rows: int) -> torch.Tensor:
        return self.tensor[blocks].reshape(-1, self.width)[:rows].clone()
