"""The attention input of one layer in one launch per step: per-head RMSNorm of q and k (Qwen3), neox
rotary embedding of q and k, and the K/V write into the paged cache at `slot_mapping` (FP8 with a
per-tensor scale when the pool is FP8). k is never materialised: it goes straight to the cache.
Roundings follow the unfused kernels (norm -> dtype, weight * normed -> dtype, rope in float32 -> dtype)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton.pdl import launch_options, pdl_wait

SPLIT_MAX_TOKENS = 1024  # up to here each token gets two programs (decode steps, small chunks)


@triton.jit
def _norm_rope(x_ptr, w_ptr, heads, h_ok, d, cos, sin, eps, HALF: tl.constexpr, QK_NORM: tl.constexpr):
    """Rows `heads` of one token ([BLOCK, 2 * HALF] at x_ptr): normed (optional) and rotated halves."""
    x1 = tl.load(x_ptr + heads[:, None] * 2 * HALF + d[None, :], mask=h_ok[:, None], other=0.0)
    x2 = tl.load(x_ptr + heads[:, None] * 2 * HALF + HALF + d[None, :], mask=h_ok[:, None], other=0.0)
    dt = x1.dtype
    if QK_NORM:
        f1, f2 = x1.to(tl.float32), x2.to(tl.float32)
        var = (tl.sum(f1 * f1, 1) + tl.sum(f2 * f2, 1)) / (2 * HALF)
        r = tl.rsqrt(var + eps)[:, None]
        w1 = tl.load(w_ptr + d).to(tl.float32)[None, :]
        w2 = tl.load(w_ptr + HALF + d).to(tl.float32)[None, :]
        x1 = (w1 * (f1 * r).to(dt).to(tl.float32)).to(dt)
        x2 = (w2 * (f2 * r).to(dt).to(tl.float32)).to(dt)
    c, s = cos.to(dt).to(tl.float32)[None, :], sin.to(dt).to(tl.float32)[None, :]
    x1f, x2f = x1.to(tl.float32), x2.to(tl.float32)
    return (x1f * c - x2f * s).to(dt), (x2f * c + x1f * s).to(dt)


@triton.jit
def _attn_input_kernel(qkv_ptr, q_out_ptr, cache_ptr, slot_ptr, pos_ptr, cs_ptr, qw_ptr, kw_ptr, eps,
                       k_scale_inv, v_scale_inv, stride_t, stride_cb, stride_ckv, stride_co, block_size,
                       H: tl.constexpr, KVH: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr,
                       BLOCK_KVH: tl.constexpr, QK_NORM: tl.constexpr, QUANT: tl.constexpr, PARTS: tl.constexpr,
                       PDL: tl.constexpr):
    # PARTS programs per token: with 2, one does q and the other k/v (see attention_input)
    pdl_wait(PDL)
    t, part = tl.program_id(0), tl.program_id(1)
    pos = tl.load(pos_ptr + t)
    d = tl.arange(0, HALF)
    cos = tl.load(cs_ptr + pos * 2 * HALF + d)
    sin = tl.load(cs_ptr + pos * 2 * HALF + HALF + d)
    row = qkv_ptr + t.to(tl.int64) * stride_t
    if part == 0:
        hq = tl.arange(0, BLOCK_H)
        q_ok = hq < H
        q1, q2 = _norm_rope(row, qw_ptr, hq, q_ok, d, cos, sin, eps, HALF, QK_NORM)
        out = q_out_ptr + t.to(tl.int64) * H * 2 * HALF + hq[:, None] * 2 * HALF + d[None, :]
        tl.store(out, q1, mask=q_ok[:, None])
        tl.store(out + HALF, q2, mask=q_ok[:, None])
    if part == PARTS - 1:
        slot = tl.load(slot_ptr + t)
        if slot >= 0:  # -1: a padded row, writes no KV
            hk = tl.arange(0, BLOCK_KVH)
            k_ok = hk < KVH
            k1, k2 = _norm_rope(row + H * 2 * HALF, kw_ptr, hk, k_ok, d, cos, sin, eps, HALF, QK_NORM)
            vrow = row + (H + KVH) * 2 * HALF + hk[:, None] * 2 * HALF + d[None, :]
            v1 = tl.load(vrow, mask=k_ok[:, None], other=0.0)
            v2 = tl.load(vrow + HALF, mask=k_ok[:, None], other=0.0)
            blk, off = slot // block_size, slot % block_size
            dst = cache_ptr + blk.to(tl.int64) * stride_cb + off * stride_co + hk[:, None] * 2 * HALF + d[None, :]
            if QUANT:
                k1 = tl.clamp(k1.to(tl.float32) * k_scale_inv, -448.0, 448.0)
                k2 = tl.clamp(k2.to(tl.float32) * k_scale_inv, -448.0, 448.0)
                v1 = tl.clamp(v1.to(tl.float32) * v_scale_inv, -448.0, 448.0)
                v2 = tl.clamp(v2.to(tl.float32) * v_scale_inv, -448.0, 448.0)
            ty = cache_ptr.dtype.element_ty
            tl.store(dst, k1.to(ty), mask=k_ok[:, None])
            tl.store(dst + HALF, k2.to(ty), mask=k_ok[:, None])
            tl.store(dst + stride_ckv, v1.to(ty), mask=k_ok[:, None])
            tl.store(dst + stride_ckv + HALF, v2.to(ty), mask=k_ok[:, None])


def attention_input(qkv: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor, kv_cache: torch.Tensor,
                    slot_mapping: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int,
                    q_norm: torch.Tensor | None, k_norm: torch.Tensor | None, eps: float,
                    k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
    """qkv [T, (H + 2 KVH) * D] (rows contiguous); kv_cache [num_blocks, 2, block_size, KVH, D] strided over
    blocks. Returns q [T, H, D]."""
    T = qkv.shape[0]
    q = torch.empty((T, num_heads, head_dim), dtype=qkv.dtype, device=qkv.device)
    if T == 0:
        return q
    qk_norm = q_norm is not None
    # Decode-sized steps are latency-bound: two programs per token (q; k and v) halve each program's
    # serial chain (H200, Qwen3-0.6B shape: 2.84 -> 2.35 us at 128 tokens). Large prefills are
    # bandwidth-bound, and there one program per token, loading cos/sin once, is faster (72.8 against
    # 78.2 us at 16k tokens).
    parts = 2 if T <= SPLIT_MAX_TOKENS else 1
    _attn_input_kernel[(T, parts)](
        qkv, q, kv_cache, slot_mapping, positions, cos_sin_cache, q_norm if qk_norm else qkv,
        k_norm if qk_norm else qkv, eps, 1.0 / k_scale, 1.0 / v_scale, qkv.stride(0), kv_cache.stride(0),
        kv_cache.stride(1), kv_cache.stride(2), kv_cache.shape[2], H=num_heads, KVH=num_kv_heads, HALF=head_dim // 2,
        BLOCK_H=triton.next_power_of_2(num_heads), BLOCK_KVH=triton.next_power_of_2(num_kv_heads), QK_NORM=qk_norm,
        QUANT=kv_cache.dtype == torch.float8_e4m3fn, PARTS=parts, num_warps=4,
        **launch_options(qkv.device))
    return q
