"""Triton attention backend: the Triton KV store plus the portable Triton paged attention kernel.
Needs no per-step plan and reads only device tensors, so decode steps can be CUDA-graph captured."""
from __future__ import annotations

import torch

from kernels.attention.base import AttentionBackend
from kernels.attention.metadata import AttentionMetadata


class TritonAttentionBackend(AttentionBackend):
    name = "triton"
    supports_cuda_graph = True
    supports_verify_graph = True  # plans nothing

    def __init__(self, device: torch.device):
        super().__init__()
        self.device = device

    def plan(self, meta: AttentionMetadata) -> None:
        return None

    def attend(self, q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
               k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
        from kernels.triton.paged_attention import paged_attention
        return paged_attention(q, kv_cache, meta.cu_seqlens_q, meta.seq_lens, meta.block_tables,
                               meta.max_seqlen_q, scale, k_scale, v_scale)
