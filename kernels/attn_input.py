"""A layer's attention input: split the fused qkv projection, per-head RMSNorm of q and k (Qwen3),
rotary embedding, and the K/V write into the paged cache; returns q. On CUDA one Triton launch does all
of it (kernels/triton/attn_input.py); elsewhere, or for shapes it does not cover, the same ops run one
by one (the torch references on CPU)."""
from __future__ import annotations

import torch

from kernels.norm import rms_norm
from kernels.rope import apply_rope
from kernels.triton import use_triton


def store_kv(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
             k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    if use_triton(k):
        from kernels.triton.kv_store import store_kv as fused
        return fused(k, v, kv_cache, slot_mapping, k_scale, v_scale)
    from kernels.attention.torch_ref import store_kv as ref
    return ref(k, v, kv_cache, slot_mapping, k_scale, v_scale)


def _fusable(qkv, cos_sin_cache, kv_cache, head_dim, q_norm) -> bool:
    half = head_dim // 2
    return (use_triton(qkv) and qkv.dim() == 2 and qkv.stride(-1) == 1 and cos_sin_cache.shape[-1] == head_dim
            and half & (half - 1) == 0 and cos_sin_cache.is_contiguous() and kv_cache.stride(-1) == 1
            and kv_cache.stride(-2) == head_dim and (q_norm is None or q_norm.dtype == qkv.dtype))


def attention_input(qkv: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor, kv_cache: torch.Tensor,
                    slot_mapping: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int,
                    q_norm: torch.Tensor | None = None, k_norm: torch.Tensor | None = None, eps: float = 1e-6,
                    k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
    """qkv [T, (H + 2 KVH) * D] -> q [T, H, D]; k and v land in kv_cache at slot_mapping (-1: nowhere)."""
    if _fusable(qkv, cos_sin_cache, kv_cache, head_dim, q_norm):
        from kernels.triton.attn_input import attention_input as fused
        return fused(qkv, positions, cos_sin_cache, kv_cache, slot_mapping, num_heads, num_kv_heads, head_dim,
                     q_norm, k_norm, eps, k_scale, v_scale)
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
    q = q.view(-1, num_heads, head_dim)
    k = k.view(-1, num_kv_heads, head_dim)
    v = v.view(-1, num_kv_heads, head_dim)
    if q_norm is not None:
        q, k = rms_norm(q, q_norm, eps), rms_norm(k, k_norm, eps)
    q, k = apply_rope(q, k, positions, cos_sin_cache)
    store_kv(k, v, kv_cache, slot_mapping, k_scale, v_scale)
    return q
