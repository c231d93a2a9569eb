"""Paged decode attention in Triton, for GQA over a bf16/fp16 or FP8 KV pool: one program per (sequence,
KV head, split) reads each K/V page once for the whole query-head group (the group's columns padded to
8 in a swapped-operand MMA), FP8 pages are widened to fp16 in registers (with q in fp16), and long
sequences at small batch are split across programs and merged by a second kernel (flash-decoding).
The split count depends on the batch size only, so a CUDA graph captured for a batch size stays valid
for every sequence length. Reads device tensors only (seq_lens, block_tables): no per-step plan."""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from kernels.triton.pdl import launch_options, pdl_wait

LOG2E = 1.4426950408889634


# stride_bt is the block table's width: fixed in a CUDA graph, but per step in mixed steps and eager
# decode. Specialising on it (==1, %16) compiled new variants mid-run (~1.8 s of the throughput bench).
@triton.jit(do_not_specialize=["stride_bt"])
def _decode_kernel(q_ptr, cache_ptr, bt_ptr, seq_lens_ptr, out_ptr, part_acc_ptr, part_ml_ptr,
                   qk_scale, v_scale, stride_qt, stride_qh, stride_ot, stride_oh,
                   stride_cb, stride_ckv, stride_co, stride_ch, stride_bt,
                   BS: tl.constexpr, GROUP: tl.constexpr, BLOCK_H: tl.constexpr, D: tl.constexpr,
                   BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr, PDL: tl.constexpr):
    # Swapped operands: s^T = K q^T is [BLOCK_N, BLOCK_H], so the token axis is the MMA's M (a Hopper
    # warpgroup MMA) and the query-head group pads only to 8 columns, not 16 rows: 6 % faster on FP8
    # pages (bench attention), the same on bf16.
    pdl_wait(PDL)
    b, kvh, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + b)
    # whole BLOCK_N tiles per split, so that every split but the last starts on a tile boundary
    tiles = tl.cdiv(seq_len, BLOCK_N)
    per_split = tl.cdiv(tiles, NUM_SPLITS)
    start = split * per_split * BLOCK_N
    end = tl.minimum(start + per_split * BLOCK_N, seq_len)

    hs = tl.arange(0, BLOCK_H)
    h_ok = hs < GROUP
    heads = kvh * GROUP + hs
    d = tl.arange(0, D)
    q_t = tl.load(q_ptr + b * stride_qt + heads[None, :] * stride_qh + d[:, None], mask=h_ok[None, :], other=0.0)
    if cache_ptr.dtype.element_ty == tl.float8e4nv:
        # E4M3 widens to fp16 in one packed instruction (to bf16 it takes several): compute in fp16
        q_t = q_t.to(tl.float16)
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc_t = tl.zeros([D, BLOCK_H], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        kpos = n0 + tl.arange(0, BLOCK_N)
        k_ok = kpos < end
        page = tl.load(bt_ptr + b * stride_bt + kpos // BS, mask=k_ok, other=0).to(tl.int64)
        off = page[:, None] * stride_cb + (kpos % BS)[:, None] * stride_co + kvh * stride_ch + d[None, :]
        k = tl.load(cache_ptr + off, mask=k_ok[:, None], other=0.0).to(q_t.dtype)
        s_t = tl.dot(k, q_t) * qk_scale  # log2 units: exp2 below
        s_t = tl.where(k_ok[:, None], s_t, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s_t, 0))
        p_t = tl.exp2(s_t - m_new[None, :])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p_t, 0)
        v = tl.load(cache_ptr + off + stride_ckv, mask=k_ok[:, None], other=0.0).to(q_t.dtype)
        acc_t = acc_t * alpha[None, :] + tl.dot(tl.trans(v), p_t.to(q_t.dtype))
        m_i = m_new
    if NUM_SPLITS == 1:
        out_t = acc_t * (v_scale / tl.where(l_i == 0.0, 1.0, l_i))[None, :]
        tl.store(out_ptr + b * stride_ot + heads[None, :] * stride_oh + d[:, None],
                 out_t.to(out_ptr.dtype.element_ty), mask=h_ok[None, :])
    else:
        # partials [B, H, NUM_SPLITS, D] and [B, H, NUM_SPLITS, 2] (m, l); an empty split has l = 0
        row = (b * tl.num_programs(1) * GROUP + heads) * NUM_SPLITS + split
        tl.store(part_acc_ptr + row[None, :] * D + d[:, None], acc_t, mask=h_ok[None, :])
        tl.store(part_ml_ptr + row * 2, m_i, mask=h_ok)
        tl.store(part_ml_ptr + row * 2 + 1, l_i, mask=h_ok)


@triton.jit
def _merge_kernel(part_acc_ptr, part_ml_ptr, out_ptr, v_scale, H, stride_ot, stride_oh,
                  D: tl.constexpr, NUM_SPLITS: tl.constexpr, PDL: tl.constexpr):
    pdl_wait(PDL)
    b, h = tl.program_id(0), tl.program_id(1)
    row = (b * H + h) * NUM_SPLITS + tl.arange(0, NUM_SPLITS)
    m = tl.load(part_ml_ptr + row * 2)
    l = tl.load(part_ml_ptr + row * 2 + 1)
    m_max = tl.max(tl.where(l > 0.0, m, float("-inf")), 0)
    w = tl.where(l > 0.0, tl.exp2(m - m_max), 0.0)
    d = tl.arange(0, D)
    acc = tl.load(part_acc_ptr + row[:, None] * D + d[None, :])
    out = tl.sum(acc * w[:, None], 0) * (v_scale / tl.sum(l * w, 0))
    tl.store(out_ptr + b * stride_ot + h * stride_oh + d, out.to(out_ptr.dtype.element_ty))


def num_splits_for(batch_size: int, num_kv_heads: int, num_sms: int, max_splits: int = 16) -> int:
    """Programs enough to fill the GPU about eight times over: a power of two, 1 at large batch
    (H100, 8 KV heads: 1 split from batch 129 on, 2 at 64, 16 at batch 1..8)."""
    want = max(1, (8 * num_sms) // max(1, batch_size * num_kv_heads))
    return min(max_splits, 1 << (want.bit_length() - 1))


@functools.cache
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def decode_attention(q: torch.Tensor, kv_cache: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor,
                     scale: float, k_scale: float = 1.0, v_scale: float = 1.0, num_splits: int | None = None,
                     block_n: int = 128, num_warps: int = 4, num_stages: int = 3,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """q [B, heads, D] (one query token per sequence) -> out [B, heads, D] (written into `out` if given);
    kv_cache [num_blocks, 2, block_size, kv_heads, D], strided over blocks; seq_lens [B] int32 (the new
    token included); block_tables [B, pages] int32."""
    B, H, D = q.shape
    KVH, BS = kv_cache.shape[3], kv_cache.shape[2]
    assert kv_cache.stride(4) == 1 and q.stride(2) == 1 and D & (D - 1) == 0
    if out is None:
        out = torch.empty((B, H, D), dtype=q.dtype, device=q.device)
    if B == 0:
        return out
    group = H // KVH
    if num_splits is None:
        num_splits = num_splits_for(B, KVH, _num_sms(q.device.index or 0))
    if num_splits > 1:
        part_acc = torch.empty((B, H, num_splits, D), dtype=torch.float32, device=q.device)
        part_ml = torch.empty((B, H, num_splits, 2), dtype=torch.float32, device=q.device)
    else:
        part_acc = part_ml = out  # unused
    _decode_kernel[(B, KVH, num_splits)](
        q, kv_cache, block_tables, seq_lens, out, part_acc, part_ml, scale * k_scale * LOG2E, v_scale,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3), block_tables.stride(0),
        BS=BS, GROUP=group, BLOCK_H=max(8, triton.next_power_of_2(group)), D=D, BLOCK_N=block_n,
        NUM_SPLITS=num_splits, num_warps=num_warps, num_stages=num_stages, **launch_options(q.device))
    if num_splits > 1:
        _merge_kernel[(B, H)](part_acc, part_ml, out, v_scale, H, out.stride(0), out.stride(1), D=D,
                              NUM_SPLITS=num_splits, num_warps=4, **launch_options(q.device))
    return out
