"""Attention layer: this layer's view of the paged KV pool and the backend that attends over it (the
model writes the step's K/V first, kernels/attn_input.py)."""
from __future__ import annotations

import torch
from torch import nn

from kernels.attention import AttentionMetadata


class PagedAttention(nn.Module):
    def __init__(self, backend, num_heads: int, num_kv_heads: int, head_dim: int, scale: float):
        super().__init__()
        self.backend = backend
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = scale
        # this layer's view `pool[:, layer]` of the block-major KV pool, bound by the model runner
        self.kv_cache: torch.Tensor | None = None

    def forward(self, q: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        return self.backend.attend(q, self.kv_cache, meta, self.scale)
