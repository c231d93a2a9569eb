"""Multi-head latent attention (DeepSeek-V2/V3) over a paged latent cache, in plain torch. The cache holds one
vector per token, [normalised KV latent | rotated shared key part].
- `mla_latent_attention_ref`: the absorbed form every backend computes (kernels/attention/mla.py), the CPU
  path and the reference of the GPU kernels;
- `mla_attention_ref`: the reference model's own computation, each sequence's latents expanded into per-head
  keys and values with `kv_b_proj`'s weight, which the tests hold the absorbed form to."""
from __future__ import annotations

import torch

from kernels.attention.metadata import AttentionMetadata
from kernels.attention.torch_ref import gather_pages, quantize_kv, ragged_causal_attention


def store_latent(latent: torch.Tensor, cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """latent [T, latent_dim] into cache [blocks, block_size, latent_dim] at slot_mapping (-1: nowhere); an FP8
    cache holds the values saturated to E4M3's range, unscaled."""
    valid = slot_mapping >= 0
    if not bool(valid.all()):
        latent, slot_mapping = latent[valid], slot_mapping[valid]
    block_size = cache.shape[1]
    cache[slot_mapping // block_size, slot_mapping % block_size] = quantize_kv(latent, cache.dtype)


def mla_attention_ref(q_nope: torch.Tensor, q_pe: torch.Tensor, cache: torch.Tensor, meta: AttentionMetadata,
                      w_kv_b: torch.Tensor, kv_lora_rank: int, v_head_dim: int, scale: float) -> torch.Tensor:
    """q_nope [T, heads, nope], q_pe [T, heads, rope]; w_kv_b [heads * (nope + v), kv_lora_rank] (this rank's
    heads). Returns [T, heads, v_head_dim]."""
    heads, nope = q_nope.shape[1], q_nope.shape[2]
    latents = gather_pages(cache, meta).to(q_nope.dtype)  # [B, K, latent_dim]
    B, K = latents.shape[:2]
    kv = (latents[..., :kv_lora_rank] @ w_kv_b.t()).view(B, K, heads, nope + v_head_dim)
    k_pe = latents[..., kv_lora_rank:]
    k = torch.cat([kv[..., :nope], k_pe[:, :, None, :].expand(B, K, heads, k_pe.shape[-1])], dim=-1)
    q = torch.cat([q_nope, q_pe], dim=-1)
    return ragged_causal_attention(q, k, kv[..., nope:], meta, scale)


def mla_latent_attention_ref(q: torch.Tensor, cache: torch.Tensor, meta: AttentionMetadata, kv_lora_rank: int,
                             scale: float) -> torch.Tensor:
    """The absorbed form's attention: q [T, heads, latent_dim] against the cached [latent | k_pe] vectors, one
    key per token shared by every head, the latent part as the value. Returns [T, heads, kv_lora_rank]."""
    latents = gather_pages(cache, meta).to(q.dtype)[:, :, None, :]  # [B, K, 1, latent_dim]
    heads = q.shape[1]
    k = latents.expand(-1, -1, heads, -1)
    return ragged_causal_attention(q, k, k[..., :kv_lora_rank], meta, scale)
