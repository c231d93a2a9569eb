"""A portable Triton paged attention (prefill with cached context, and decode), the fallback where
FlashInfer is absent or cannot serve the shape (float32, odd head sizes). Flash-attention style:
one program per (sequence, query head, query tile), online softmax over the sequence's pages.
It reads only device tensors of AttentionMetadata, so it can be captured in a CUDA graph."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton.pdl import launch_options, pdl_wait


@triton.jit(do_not_specialize=["stride_bt"])  # the block table's width changes per step
def _paged_attn_kernel(q_ptr, cache_ptr, out_ptr, cu_q_ptr, seq_lens_ptr, bt_ptr, scale, k_scale, v_scale,
                       stride_qt, stride_qh, stride_ot, stride_cb, stride_ckv, stride_co, stride_ch, stride_bt,
                       block_size, GROUP: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, IEEE: tl.constexpr, PDL: tl.constexpr):
    pdl_wait(PDL)
    b, h, mt = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    q_start = tl.load(cu_q_ptr + b)
    q_len = tl.load(cu_q_ptr + b + 1) - q_start
    if mt * BLOCK_M >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + b)
    kvh = h // GROUP
    rows = mt * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < q_len
    q_pos = seq_len - q_len + rows  # absolute position of each query row
    d = tl.arange(0, D)
    q = tl.load(q_ptr + (q_start + rows)[:, None] * stride_qt + h * stride_qh + d[None, :],
                mask=row_ok[:, None], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    kv_end = tl.minimum(seq_len, seq_len - q_len + (mt + 1) * BLOCK_M)  # causal: last row's horizon
    for n0 in range(0, kv_end, BLOCK_N):
        kpos = n0 + tl.arange(0, BLOCK_N)
        k_ok = kpos < kv_end
        page = tl.load(bt_ptr + b * stride_bt + kpos // block_size, mask=k_ok, other=0).to(tl.int64)
        base = cache_ptr + page[:, None] * stride_cb + (kpos % block_size)[:, None] * stride_co \
            + kvh * stride_ch + d[None, :]
        k = tl.load(base, mask=k_ok[:, None], other=0.0).to(tl.float32) * k_scale
        v = tl.load(base + stride_ckv, mask=k_ok[:, None], other=0.0).to(tl.float32) * v_scale
        if IEEE:
            s = tl.dot(q.to(tl.float32), tl.trans(k), input_precision="ieee") * scale
        else:
            s = tl.dot(q, tl.trans(k).to(q.dtype)) * scale
        ok = (kpos[None, :] <= q_pos[:, None]) & k_ok[None, :]
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype))
        m_i = m_new
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(out_ptr + (q_start + rows)[:, None] * stride_ot + h * D + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


def paged_attention(q: torch.Tensor, kv_cache: torch.Tensor, cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor,
                    block_tables: torch.Tensor, max_seqlen_q: int, scale: float,
                    k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
    """q [T, heads, D] -> out [T, heads, D]; kv_cache [num_blocks, 2, block_size, kv_heads, D]."""
    T, H, D = q.shape
    out = torch.empty((T, H, D), dtype=q.dtype, device=q.device)
    B = seq_lens.shape[0]
    if T == 0 or B == 0:
        return out
    BLOCK_M = 16
    ieee = q.dtype == torch.float32
    grid = (B, H, triton.cdiv(max_seqlen_q, BLOCK_M))
    _paged_attn_kernel[grid](q, kv_cache, out, cu_seqlens_q, seq_lens, block_tables, scale, k_scale, v_scale,
                             q.stride(0), q.stride(1), out.stride(0), kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2),
                             kv_cache.stride(3), block_tables.stride(0), kv_cache.shape[2],
                             GROUP=H // kv_cache.shape[3], D=D, BLOCK_M=BLOCK_M, BLOCK_N=32 if ieee else 64,
                             IEEE=ieee, num_warps=4, **launch_options(q.device))
    return out
