"""Fused KV write: k, v of every token go to their `slot_mapping` slot of one layer's paged cache in
one launch (quantised to FP8 E4M3 with a per-tensor scale when the pool is FP8). Slot -1 = padding."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton.pdl import launch_options, pdl_wait


@triton.jit
def _store_kv_kernel(k_ptr, v_ptr, cache_ptr, slot_ptr, k_scale_inv, v_scale_inv,
                     stride_kt, stride_vt, stride_cb, stride_ckv, stride_co,
                     block_size, N: tl.constexpr, BLOCK: tl.constexpr, QUANT: tl.constexpr, PDL: tl.constexpr):
    pdl_wait(PDL)
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t)
    if slot < 0:
        return
    blk, off = slot // block_size, slot % block_size
    cols = tl.arange(0, BLOCK)
    mask = cols < N  # kv_heads * head_dim of one token: contiguous in the cache row
    k = tl.load(k_ptr + t * stride_kt + cols, mask=mask)
    v = tl.load(v_ptr + t * stride_vt + cols, mask=mask)
    dst = cache_ptr + blk.to(tl.int64) * stride_cb + off * stride_co + cols
    if QUANT:
        k = tl.clamp(k.to(tl.float32) * k_scale_inv, -448.0, 448.0)
        v = tl.clamp(v.to(tl.float32) * v_scale_inv, -448.0, 448.0)
    tl.store(dst, k.to(cache_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + stride_ckv, v.to(cache_ptr.dtype.element_ty), mask=mask)


def store_kv(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
             k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """k, v [T, kv_heads, head_dim] (rows may be strided views of the fused qkv output);
    kv_cache [num_blocks, 2, block_size, kv_heads, head_dim], strided over blocks."""
    T, H, D = k.shape
    assert k.stride(2) == 1 and k.stride(1) == D and v.stride(2) == 1 and v.stride(1) == D
    assert kv_cache.stride(4) == 1 and kv_cache.stride(3) == D
    if T == 0:
        return
    quant = kv_cache.dtype == torch.float8_e4m3fn
    N = H * D
    _store_kv_kernel[(T,)](k, v, kv_cache, slot_mapping, 1.0 / k_scale, 1.0 / v_scale,
                           k.stride(0), v.stride(0), kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2),
                           kv_cache.shape[2], N=N, BLOCK=triton.next_power_of_2(N), QUANT=quant, num_warps=4,
                           **launch_options(k.device))
