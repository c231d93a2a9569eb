"""Rotary position embedding (neox / rotate-half style, as Llama and Qwen use it).
On CUDA one Triton launch rotates all heads of a token; `apply_rope_ref` is the torch reference."""
from __future__ import annotations

import torch

from kernels.triton import use_triton


def rope_cos_sin_cache(inv_freq: torch.Tensor, max_positions: int, scaling: float = 1.0) -> torch.Tensor:
    """[max_positions, head_dim] float32: cos in the first half of the last dim, sin in the second
    (each of rotary_dim/2), computed exactly as Hugging Face does (float32 outer product)."""
    positions = torch.arange(max_positions, dtype=torch.float32, device=inv_freq.device)
    freqs = positions[:, None] * inv_freq.float()[None, :]
    return torch.cat((freqs.cos() * scaling, freqs.sin() * scaling), dim=-1)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope_ref(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
                   cos_sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    cos, sin = cos_sin_cache[positions].chunk(2, dim=-1)
    cos = torch.cat((cos, cos), dim=-1).to(q.dtype)[:, None, :]
    sin = torch.cat((sin, sin), dim=-1).to(q.dtype)[:, None, :]
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def deinterleave(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1, x2, x3, ...) -> (x0, x2, ..., x1, x3, ...): interleaved rotary pairs as rotate-half halves."""
    return torch.cat([x[..., 0::2], x[..., 1::2]], dim=-1)


def rope_kernel_fits(rotary_dim: int, cos_sin_cache: torch.Tensor) -> bool:
    """The Triton rope kernels (the rope, and MLA's norm + rope + store) read a power-of-two half and the cache's
    contiguous rows of exactly [cos | sin] of that width."""
    half = rotary_dim // 2
    return cos_sin_cache.shape[-1] == rotary_dim and half & (half - 1) == 0 and cos_sin_cache.is_contiguous()


def apply_rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor,
               interleaved: bool = False, q_out: torch.Tensor | None = None,
               k_out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, heads, head_dim], k [T, kv_heads, head_dim] (strided views welcome); returns rotated copies in
    their dtype and in halves, written into q_out / k_out where given (e.g. the rotary part of a larger query
    buffer, which saves the concatenation after). `interleaved`: the inputs hold the rotary pairs side by side
    (DeepSeek's layout), taken apart into halves first, as the reference does."""
    if (use_triton(q) and rope_kernel_fits(q.shape[-1], cos_sin_cache)
            and all(t is None or t.stride(-1) == 1 for t in (q, k, q_out, k_out))):
        from kernels.triton.elementwise import apply_rope as fused
        return fused(q, k, positions, cos_sin_cache, interleaved, q_out, k_out)
    if interleaved:
        q, k = deinterleave(q), deinterleave(k)
    q, k = apply_rope_ref(q, k, positions, cos_sin_cache)
    if q_out is not None:
        q = q_out.copy_(q)
    if k_out is not None:
        k = k_out.copy_(k)
    return q, k
