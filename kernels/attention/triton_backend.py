"""Triton attention backend: the Triton KV store plus the portable Triton paged attention kernel.
Needs no per-step plan and reads only device tensors, so decode steps can be CUDA-graph captured."""
from __future__ import annotations

import torch

from kernels.attention.metadata import AttentionMetadata


class TritonAttentionBackend:
    name = "triton"
    supports_cuda_graph = True
    needs_block_tables = True

    def __init__(self, device: torch.device, k_scale: float = 1.0, v_scale: float = 1.0):
        self.device = device
        self.k_scale, self.v_scale = k_scale, v_scale

    def configure(self, **_) -> None:
        pass

    def plan(self, meta: AttentionMetadata) -> None:
        return None

    def attend(self, q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        from kernels.triton.paged_attention import paged_attention
        return paged_attention(q, kv_cache, meta.cu_seqlens_q, meta.seq_lens, meta.block_tables,
                               meta.max_seqlen_q, scale, self.k_scale, self.v_scale)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata, scale: float) -> torch.Tensor:
        from kernels.triton.kv_store import store_kv
        store_kv(k, v, kv_cache, meta.slot_mapping, self.k_scale, self.v_scale)
        return self.attend(q, kv_cache, meta, scale)
