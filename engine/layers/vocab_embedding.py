"""Vocab-parallel token table: each rank keeps ceil(vocab / tp) rows. As the embedding, a lookup masks the ids
other ranks own and sums over the ranks; as the LM head (the same table when embeddings are tied), the
logits of every rank's rows are gathered on rank 0, which samples. At tp_size 1 both are the plain ops."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.distributed.parallel import ParallelContext
from engine.layers.linear import SINGLE, copy_checked


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int, parallel: ParallelContext = SINGLE):
        super().__init__()
        self.vocab_size, self.parallel = vocab_size, parallel
        self.rows = -(-vocab_size // parallel.tp_size)
        self.start = parallel.tp_rank * self.rows
        self.end = min(self.start + self.rows, vocab_size)
        self.weight = nn.Parameter(torch.empty(self.rows, hidden_size), requires_grad=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.parallel.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        mine = (input_ids >= self.start) & (input_ids < self.end)
        out = F.embedding((input_ids - self.start) * mine, self.weight)
        return self.parallel.all_reduce(out.masked_fill_(~mine[:, None], 0))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """hidden @ table^T: [rows, vocab] on rank 0, None on the other ranks."""
        logits = hidden @ self.weight.t()
        if self.parallel.tp_size == 1:
            return logits
        full = self.parallel.gather_to_first(logits)
        return None if full is None else full[:, :self.vocab_size]

    def shard_ids(self, name: str) -> tuple:
        return (None,)

    def load_weight(self, name: str, tensor, shard_id=None) -> None:
        n = self.end - self.start
        copy_checked(self.weight.data[:n], tensor.narrow(0, self.start, n), name)
        self.weight.data[n:].zero_()  # padding rows of the last rank: never looked up, zero logits
