"""Attention layer: this layer's view of the paged KV pool, its FP8 page scales, and the backend that attends
over it (the model writes the step's K/V first, kernels/attn_input.py)."""
from __future__ import annotations

import torch
from torch import nn

from kernels.attention import AttentionBackend, AttentionMetadata


class PagedAttention(nn.Module):
    def __init__(self, backend: AttentionBackend, num_heads: int, num_kv_heads: int, head_dim: int, scale: float):
        super().__init__()
        self.backend = backend
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = scale
        # FP8 pages hold x / scale; per-tensor and per layer (1.0 until a checkpoint brings calibrated ones)
        self.k_scale = self.v_scale = 1.0
        # this layer's view `pool[:, layer]` of the block-major KV pool, bound by the model runner
        self.kv_cache: torch.Tensor | None = None

    def forward(self, q: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        return self.backend.attend(q, self.kv_cache, meta, self.scale, self.k_scale, self.v_scale)
