"""Triton fused MoE: every (token, expert) pair of the batch is sorted by expert and padded per expert to the
row tile, so that one launch runs a grouped GEMM over all experts: each program multiplies BLOCK_M pairs of
one expert by a BLOCK_N slice of that expert's weights. Two launches per layer: gate+up (rows gathered from
the tokens), then, after SiLU-and-mul, down with the top-k weight applied before the store; the combine is
the sum over each token's k rows.

Everything is sized by the batch (no host sync), so decode steps run inside CUDA graphs. Block configs come
from the table tuned on an H200 (kernels/triton/fused_moe_configs.py)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.activation import silu_and_mul
from kernels.moe.torch_ref import local_ids
from kernels.triton.fused_moe_configs import moe_configs


@triton.jit
def _moe_gemm(a_ptr, b_ptr, c_ptr, weights_ptr, sorted_ids_ptr, expert_ids_ptr, num_padded_ptr,
              N, K, num_rows_max, num_valid,
              stride_am, stride_be, stride_bn, stride_bk, stride_cm,
              ROWS_PER_A: tl.constexpr, MUL_WEIGHT: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(num_rows_max, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_pid_n
    first_m = (pid // group) * GROUP_M
    size_m = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % size_m
    pid_n = (pid % group) // size_m
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_ids_ptr + offs_m).to(tl.int64)  # padding rows hold num_valid
    row_ok = pair < num_valid
    expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + (pair // ROWS_PER_A)[:, None] * stride_am + offs_k[None, :]
    b_ptrs = b_ptr + expert * stride_be + (offs_n % N)[None, :] * stride_bn + offs_k[:, None] * stride_bk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_ok = offs_k < K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None], other=0.0)
        acc += tl.dot(a, b)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K * stride_bk
    if MUL_WEIGHT:
        w = tl.load(weights_ptr + pair, mask=row_ok, other=0.0)
        acc = acc * w[:, None]
    c_ptrs = c_ptr + pair[:, None] * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=row_ok[:, None] & (offs_n[None, :] < N))


def align_by_expert(ids: torch.Tensor, block_m: int, num_experts: int):
    """Pair indices sorted by expert, each expert's run padded to a multiple of block_m (padding holds the
    pair count, an invalid index); the expert of every row tile; the padded length (a 1-element tensor).
    Pairs with id -1 (another rank's expert) are left out. Shapes depend only on the batch size."""
    P = ids.numel()
    key = torch.where(ids >= 0, ids, num_experts)  # other ranks' pairs sort last and are dropped
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=ids.device)
    counts.scatter_add_(0, key, torch.ones_like(key))
    padded = (counts[:num_experts] + block_m - 1) // block_m * block_m
    padded_end = torch.cumsum(padded, 0)
    padded_start = torch.cat([padded_end.new_zeros(1), padded_end])  # [E+1]; entry E: the drop slot below
    order = torch.argsort(key, stable=True)
    sorted_key = key[order]
    rank_in_expert = torch.arange(P, device=ids.device) - (torch.cumsum(counts, 0) - counts)[sorted_key]
    max_rows = (P + num_experts * (block_m - 1) + block_m - 1) // block_m * block_m
    dest = torch.where(sorted_key < num_experts, padded_start[sorted_key] + rank_in_expert, max_rows)
    sorted_ids = torch.full((max_rows + 1,), P, dtype=torch.int32, device=ids.device)
    sorted_ids.scatter_(0, dest, order.to(torch.int32))
    tile_starts = torch.arange(0, max_rows, block_m, device=ids.device)
    expert_ids = torch.searchsorted(padded_end, tile_starts, right=True).clamp_(max=num_experts - 1).to(torch.int32)
    return sorted_ids[:max_rows], expert_ids, padded_end[-1:], max_rows


def _gemm(a, b, c, weights, sorted_ids, expert_ids, num_padded, max_rows, rows_per_a, cfg):
    N, K = b.shape[1], b.shape[2]
    grid = (triton.cdiv(max_rows, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
    _moe_gemm[grid](a, b, c, weights, sorted_ids, expert_ids, num_padded, N, K, max_rows, c.shape[0], a.stride(0), b.stride(0), b.stride(1), b.stride(2), c.stride(0),
                    ROWS_PER_A=rows_per_a, MUL_WEIGHT=weights is not None, BLOCK_M=cfg["BLOCK_M"],
                    BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], GROUP_M=cfg["GROUP_M"],
                    num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


def fused_experts(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor, expert_map: torch.Tensor | None = None,
                  configs: tuple[dict, dict] | None = None) -> torch.Tensor:
    """See kernels/moe/__init__.py; `configs` (gate-up, down) overrides the tuned table (the tuner)."""
    T, H = x.shape
    k = topk_ids.shape[1]
    E, two_i, _ = w13.shape
    P = T * k
    ids = local_ids(topk_ids, expert_map).flatten()
    # one row tile for both GEMMs: they share the expert-sorted order
    cfg_up, cfg_down = configs or moe_configs(E, H, two_i // 2, P)
    sorted_ids, expert_ids, num_padded, max_rows = align_by_expert(ids, cfg_up["BLOCK_M"], E)
    up = torch.empty(P, two_i, dtype=x.dtype, device=x.device)
    _gemm(x, w13, up, None, sorted_ids, expert_ids, num_padded, max_rows, k, cfg_up)
    act = silu_and_mul(up)
    # rows of pairs another rank computes are never written: zeros make them add nothing
    down = (torch.zeros if expert_map is not None else torch.empty)(P, H, dtype=x.dtype, device=x.device)
    weights = topk_weights.to(torch.float32).flatten()
    _gemm(act, w2, down, weights, sorted_ids, expert_ids, num_padded, max_rows, 1, cfg_down)
    return down.view(T, k, H).sum(dim=1)
