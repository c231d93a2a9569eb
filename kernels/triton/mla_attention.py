"""Multi-head latent attention in the latent space (DeepSeek-V2/V3's absorbed form), in Triton, over the paged
latent cache [blocks, block_size, kv_lora_rank + rope_dim]: every query head attends to the one shared latent
"head", keys being the whole 576-value latent and values its first kv_lora_rank (512) values. One program per
(query token, block of 16 heads, split): a token of a prefill chunk sees the keys up to its own position (causal),
a decode token all of its sequence's. Long sequences at small token counts (decode, speculative verify steps) are
split across programs and merged by the GQA decode's merge kernel (flash-decoding); the split count depends on
the token count only, so a CUDA graph captured for a batch size stays valid for every length. Reads device
tensors only: no per-step plan for decode.

Also the latent store: [latent | rotated k_pe] of every token into its slot (slot -1: padding, written nowhere),
one launch, no host sync (the torch store checks its slots on the host, which a CUDA graph cannot); and the same
store fused with the latent's RMSNorm and the rope of q and k (`norm_rope_store`): one launch where a decode step
of a layer took three."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton.decode_attention import LOG2E, _merge_kernel, _num_sms, num_splits_for
from kernels.triton.elementwise import _rms_normed, _rotate, _saturated, _token_cos_sin
from kernels.triton.pdl import launch_options, pdl_wait

BLOCK_H = 16  # query heads per program: the MMA's M (64 would not fit the [M, 512] accumulator in registers)
INTERPRETER_SMS = 4  # CPU tensors (TRITON_INTERPRET=1, the CPU tests) have no device to ask: a small one


@triton.jit(do_not_specialize=["stride_bt"])
def _mla_kernel(q_ptr, cache_ptr, bt_ptr, seq_lens_ptr, cu_q_ptr, tok_seq_ptr, out_ptr, part_acc_ptr, part_ml_ptr,
                qk_scale, H, stride_qt, stride_qh, stride_ot, stride_oh, stride_cb, stride_co, stride_bt,
                BS: tl.constexpr, DC: tl.constexpr, DR: tl.constexpr, BLOCK_H: tl.constexpr,
                BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr, DECODE: tl.constexpr, PDL: tl.constexpr):
    pdl_wait(PDL)
    t, hb, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    if DECODE:
        b = t
        kv_len = tl.load(seq_lens_ptr + b)
    else:
        # token t sits at position seq_len - (q_end - t) of its sequence and sees the keys up to it
        b = tl.load(tok_seq_ptr + t)
        kv_len = tl.load(seq_lens_ptr + b) - tl.load(cu_q_ptr + b + 1) + t + 1
    tiles = tl.cdiv(kv_len, BLOCK_N)
    per_split = tl.cdiv(tiles, NUM_SPLITS)
    start = split * per_split * BLOCK_N
    end = tl.minimum(start + per_split * BLOCK_N, kv_len)

    hs = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = hs < H
    dc = tl.arange(0, DC)
    dr = tl.arange(0, DR)
    q_row = q_ptr + t.to(tl.int64) * stride_qt + hs[:, None] * stride_qh
    q_c = tl.load(q_row + dc[None, :], mask=h_ok[:, None], other=0.0)
    q_r = tl.load(q_row + DC + dr[None, :], mask=h_ok[:, None], other=0.0)
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, DC], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        kpos = n0 + tl.arange(0, BLOCK_N)
        k_ok = kpos < end
        page = tl.load(bt_ptr + b * stride_bt + kpos // BS, mask=k_ok, other=0).to(tl.int64)
        row = cache_ptr + page * stride_cb + (kpos % BS) * stride_co
        # FP8 pages are widened to q's dtype (unit scale)
        k_c = tl.load(row[:, None] + dc[None, :], mask=k_ok[:, None], other=0.0).to(q_c.dtype)
        k_r = tl.load(row[:, None] + DC + dr[None, :], mask=k_ok[:, None], other=0.0).to(q_c.dtype)
        s = (tl.dot(q_c, tl.trans(k_c)) + tl.dot(q_r, tl.trans(k_r))) * qk_scale  # log2 units: exp2 below
        s = tl.where(k_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(k_c.dtype), k_c)
        m_i = m_new
    if NUM_SPLITS == 1:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(out_ptr + t.to(tl.int64) * stride_ot + hs[:, None] * stride_oh + dc[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=h_ok[:, None])
    else:
        # partials [T, H, NUM_SPLITS, DC] and [T, H, NUM_SPLITS, 2] (m, l), as the GQA merge reads them
        prow = (t * H + hs) * NUM_SPLITS + split
        tl.store(part_acc_ptr + prow[:, None] * DC + dc[None, :], acc, mask=h_ok[:, None])
        tl.store(part_ml_ptr + prow * 2, m_i, mask=h_ok)
        tl.store(part_ml_ptr + prow * 2 + 1, l_i, mask=h_ok)


def mla_attention(q: torch.Tensor, cache: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor,
                  cu_seqlens_q: torch.Tensor, token_seq: torch.Tensor | None, kv_lora_rank: int, scale: float,
                  num_splits: int | None = None, block_n: int = 32, num_warps: int = 4,
                  num_stages: int = 2) -> torch.Tensor:
    """q [T, heads, kv_lora_rank + rope_dim] (the absorbed nope part, then the rotated rope part); cache
    [blocks, block_size, kv_lora_rank + rope_dim], strided over blocks; seq_lens [B] (this step's tokens
    included), block_tables [B, pages], cu_seqlens_q [B + 1] int32. `token_seq` [T] int32 names each token's
    sequence; None for a decode step (token b is sequence b). Returns [T, heads, kv_lora_rank]."""
    T, H, D = q.shape
    DR = D - kv_lora_rank
    assert q.stride(2) == 1 and cache.stride(2) == 1 and cache.shape[2] == D
    assert kv_lora_rank & (kv_lora_rank - 1) == 0 and DR & (DR - 1) == 0, "latent and rope widths must be powers of 2"
    out = torch.empty((T, H, kv_lora_rank), dtype=q.dtype, device=q.device)
    if T == 0:
        return out
    head_blocks = triton.cdiv(H, BLOCK_H)
    decode = token_seq is None
    if num_splits is None:
        sms = _num_sms(q.device.index or 0) if q.is_cuda else INTERPRETER_SMS
        # a few tokens (decode, verify) split their keys. Fewer splits win where every sequence has the same length
        # (H200, 128 x 600-1,200 keys: 2 splits 44-74 us, 8 splits 56-88), but over the throughput workload's
        # ragged lengths two waves of programs instead of eight took the decode step from 11.70 to 12.08 ms
        num_splits = num_splits_for(T, head_blocks, sms)
    if num_splits > 1:
        part_acc = torch.empty((T, H, num_splits, kv_lora_rank), dtype=torch.float32, device=q.device)
        part_ml = torch.empty((T, H, num_splits, 2), dtype=torch.float32, device=q.device)
    else:
        part_acc = part_ml = out  # unused
    _mla_kernel[(T, head_blocks, num_splits)](
        q, cache, block_tables, seq_lens, cu_seqlens_q, token_seq if token_seq is not None else seq_lens, out,
        part_acc, part_ml, scale * LOG2E, H, q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        cache.stride(0), cache.stride(1), block_tables.stride(0),
        BS=cache.shape[1], DC=kv_lora_rank, DR=DR, BLOCK_H=BLOCK_H, BLOCK_N=block_n, NUM_SPLITS=num_splits,
        DECODE=decode, num_warps=num_warps, num_stages=num_stages, **launch_options(q.device))
    if num_splits > 1:
        _merge_kernel[(T, H)](part_acc, part_ml, out, 1.0, H, out.stride(0), out.stride(1), D=kv_lora_rank,
                              NUM_SPLITS=num_splits, num_warps=4, **launch_options(q.device))
    return out


@triton.jit
def _to_cache(x, cache_ptr, FP8: tl.constexpr):
    """x as the cache holds it: FP8 pages saturate to E4M3's range, unscaled (as the torch store)."""
    if FP8:
        x = _saturated(x)
    return x.to(cache_ptr.dtype.element_ty)


@triton.jit
def _store_latent_kernel(latent_ptr, pe_ptr, cache_ptr, slot_ptr, stride_lt, stride_pt, stride_cb, stride_co,
                         block_size, DC: tl.constexpr, DR: tl.constexpr, FP8: tl.constexpr, PDL: tl.constexpr):
    pdl_wait(PDL)
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t)
    if slot < 0:
        return
    dst = cache_ptr + (slot // block_size).to(tl.int64) * stride_cb + (slot % block_size) * stride_co
    dc = tl.arange(0, DC)
    dr = tl.arange(0, DR)
    tl.store(dst + dc, _to_cache(tl.load(latent_ptr + t * stride_lt + dc), cache_ptr, FP8))
    tl.store(dst + DC + dr, _to_cache(tl.load(pe_ptr + t * stride_pt + dr), cache_ptr, FP8))


def store_latent(latent: torch.Tensor, k_pe: torch.Tensor, cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """latent [T, kv_lora_rank] and k_pe [T, rope_dim] (rows may be strided) into cache [blocks, block_size,
    kv_lora_rank + rope_dim] at slot_mapping (-1: nowhere)."""
    T, DC = latent.shape
    DR = k_pe.shape[1]
    assert latent.stride(1) == 1 and k_pe.stride(1) == 1 and cache.stride(2) == 1
    if T:
        _store_latent_kernel[(T,)](latent, k_pe, cache, slot_mapping, latent.stride(0), k_pe.stride(0),
                                   cache.stride(0), cache.stride(1), cache.shape[1], DC=DC, DR=DR,
                                   FP8=cache.dtype == torch.float8_e4m3fn, num_warps=4, **launch_options(cache.device))


@triton.jit
def _norm_rope_store_kernel(latent_ptr, norm_w_ptr, q_ptr, k_ptr, q_out_ptr, pos_ptr, cos_sin_ptr, cache_ptr,
                            slot_ptr, HQ, eps, block_size, stride_lt, stride_qt, stride_qh, stride_kt, stride_oqt,
                            stride_oqh, stride_cb, stride_co, DC: tl.constexpr, HALF: tl.constexpr,
                            BLOCK_HQ: tl.constexpr, INTERLEAVED: tl.constexpr, FP8: tl.constexpr,
                            PDL: tl.constexpr):
    # one program per token: q's rotary part into q_out (every token), and where the token has a slot the
    # normalised latent and the rotated k_pe into the cache, as rms_norm + the rope kernel + the store compute
    pdl_wait(PDL)
    t = tl.program_id(0).to(tl.int64)
    cos, sin, d = _token_cos_sin(cos_sin_ptr, pos_ptr, t, HALF)
    _rotate(q_ptr + t * stride_qt, q_out_ptr + t * stride_oqt, HQ, stride_qh, stride_oqh, cos, sin, d,
            HALF, BLOCK_HQ, INTERLEAVED)
    slot = tl.load(slot_ptr + t)
    if slot >= 0:
        dst = cache_ptr + (slot // block_size).to(tl.int64) * stride_cb + (slot % block_size) * stride_co
        dc = tl.arange(0, DC)
        x = tl.load(latent_ptr + t * stride_lt + dc)
        tl.store(dst + dc, _to_cache(_rms_normed(x, norm_w_ptr, dc, dc < DC, eps, DC), cache_ptr, FP8))
        _rotate(k_ptr + t * stride_kt, dst + DC, 1, 0, 0, cos, sin, d, HALF, 1, INTERLEAVED, SATURATE=FP8)


def norm_rope_store(latent: torch.Tensor, norm_weight: torch.Tensor, eps: float, q_pe: torch.Tensor,
                    k_pe: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor, interleaved: bool,
                    q_out: torch.Tensor, cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """See kernels/attention/mla.py's MLABackend.norm_rope_store (the reference): one launch. The latent
    [T, kv_lora_rank] and k_pe [T, rope] may be strided views of the projection's output."""
    T, DC = latent.shape
    HQ, DR = q_pe.shape[1], q_pe.shape[2]
    assert cache.dtype in (latent.dtype, torch.float8_e4m3fn), cache.dtype
    assert cos_sin_cache.shape[-1] == DR and cos_sin_cache.is_contiguous()
    assert all(x.stride(-1) == 1 for x in (latent, q_pe, k_pe, q_out, cache))
    if T:
        _norm_rope_store_kernel[(T,)](latent, norm_weight, q_pe, k_pe, q_out, positions, cos_sin_cache, cache,
                                      slot_mapping, HQ, eps, cache.shape[1], latent.stride(0), q_pe.stride(0),
                                      q_pe.stride(1), k_pe.stride(0), q_out.stride(0), q_out.stride(1),
                                      cache.stride(0), cache.stride(1), DC=DC, HALF=DR // 2,
                                      BLOCK_HQ=triton.next_power_of_2(HQ), INTERLEAVED=interleaved,
                                      FP8=cache.dtype == torch.float8_e4m3fn, num_warps=4,
                                      **launch_options(cache.device))
