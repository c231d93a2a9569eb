"""Plain-torch paged attention: the reference every other backend is checked against (runs on CPU).
FP8 KV: values are stored as x / scale in E4M3 (saturated) and read back as stored * scale."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.attention.base import AttentionBackend
from kernels.attention.metadata import AttentionMetadata

FP8_MAX = 448.0


def quantize_kv(x: torch.Tensor, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    if dtype == torch.float8_e4m3fn:
        return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(dtype)
    return x.to(dtype)


def store_kv(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
             k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """Writes k, v [T, kv_heads, head_dim] into kv_cache [num_blocks, 2, block_size, kv_heads, head_dim]."""
    block_size = kv_cache.shape[2]
    valid = slot_mapping >= 0  # padded tokens carry slot -1
    if not bool(valid.all()):
        k, v, slot_mapping = k[valid], v[valid], slot_mapping[valid]
    blocks, offsets = slot_mapping // block_size, slot_mapping % block_size
    kv_cache[:, 0][blocks, offsets] = quantize_kv(k, kv_cache.dtype, k_scale)
    kv_cache[:, 1][blocks, offsets] = quantize_kv(v, kv_cache.dtype, v_scale)


def paged_attention(q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
                    k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
    """Causal attention of q [T, heads, head_dim] over each sequence's cached KV (its new tokens included)."""
    num_heads = q.shape[1]
    # every sequence's keys/values, padded: [B, max_k, kv_heads, head_dim]
    k = gather_pages(kv_cache[:, 0], meta).to(q.dtype)
    v = gather_pages(kv_cache[:, 1], meta).to(q.dtype)
    if k_scale != 1.0 or v_scale != 1.0:
        k, v = k * k_scale, v * v_scale
    group = num_heads // k.shape[2]
    if group > 1:
        k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
    return ragged_causal_attention(q, k, v, meta, scale)


def gather_pages(cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
    """Every sequence's cached entries, padded: cache [blocks, block_size, ...] -> [B, max_seqlen_k, ...]."""
    key_pos = torch.arange(meta.max_seqlen_k, device=cache.device)
    block_size = cache.shape[1]
    blocks = meta.block_tables.long()[:, key_pos // block_size]
    return cache[blocks, (key_pos % block_size).expand(meta.num_seqs, -1)]


def ragged_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata,
                            scale: float) -> torch.Tensor:
    """q [T, heads, d] (ragged, `meta.cu_seqlens_q`) over padded k [B, max_k, heads, d], v [B, max_k, heads, dv]:
    each query sees the keys up to its own position."""
    num_tokens, num_heads, head_dim = q.shape
    num_seqs, device = meta.num_seqs, q.device
    q_lens = (meta.cu_seqlens_q[1:] - meta.cu_seqlens_q[:-1]).long()
    seq_lens = meta.seq_lens.long()
    key_pos = torch.arange(k.shape[1], device=device)
    # scatter the ragged queries into [B, max_q, heads, head_dim]
    seq_of_token = torch.repeat_interleave(torch.arange(num_seqs, device=device), q_lens)
    row = torch.arange(num_tokens, device=device) - meta.cu_seqlens_q.long()[seq_of_token]
    qp = q.new_zeros(num_seqs, meta.max_seqlen_q, num_heads, head_dim)
    qp[seq_of_token, row] = q
    # query i of sequence b sits at position seq_len - q_len + i and sees keys 0..that position
    q_pos = (seq_lens - q_lens)[:, None] + torch.arange(meta.max_seqlen_q, device=device)[None]
    mask = key_pos[None, None, :] <= q_pos[:, :, None]
    out = F.scaled_dot_product_attention(qp.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=mask[:, None], scale=scale)
    return out.transpose(1, 2)[seq_of_token, row]


class TorchAttentionBackend(AttentionBackend):
    """The reference backend: no per-step plan, works on every device (not CUDA-graph safe)."""

    name = "torch"

    def plan(self, meta: AttentionMetadata) -> None:
        return None

    def attend(self, q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
               k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
        return paged_attention(q, kv_cache, meta, scale, k_scale, v_scale)

    def store_kv(self, k, v, kv_cache, slot_mapping, k_scale=1.0, v_scale=1.0) -> None:
        store_kv(k, v, kv_cache, slot_mapping, k_scale, v_scale)
