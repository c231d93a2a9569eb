"""Triton fused MoE: every (token, expert) pair of the batch is sorted by expert and padded per expert to the
row tile, so that one launch runs a grouped GEMM over all experts: each program multiplies BLOCK_M pairs of
one expert by a BLOCK_N slice of that expert's weights. Two launches per layer: gate+up (rows gathered from
the tokens) with SiLU-and-mul in its epilogue, then down with the top-k weight applied before the store; the
combine is the sum over each token's k rows.

A decode step of one or two tokens skips the sort: each pair is a row tile of its own (DIRECT_MAX_PAIRS).
Everything is sized by the batch (no host sync), so decode steps run inside CUDA graphs. Block configs come
from the table tuned on an H200 (kernels/triton/fused_moe_configs.py)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.moe.torch_ref import local_ids
from kernels.triton.elementwise import widen_fp16
from kernels.triton.fp8_gemm import quantize_per_token_group
from kernels.triton.fused_moe_configs import moe_configs
from kernels.triton.pdl import launch_options, pdl_wait

# up to this many (token, expert) pairs (two decode tokens of a top-8 router) each pair is its own row tile:
# at batch 1 the sort by expert cost as much as a tenth of the layer's MoE time, and a pair's expert is
# read once either way unless two of the few tokens share it
DIRECT_MAX_PAIRS = 16
# block-FP8 experts: up to this many tokens (decode batches) the activations are not quantised (fused_experts)
W8A16_MAX_TOKENS = 256


@triton.jit
def _moe_gemm(a_ptr, b_ptr, c_ptr, weights_ptr, sorted_ids_ptr, expert_ids_ptr, num_padded_ptr, as_ptr, bs_ptr,
              N, K, num_rows_max, num_valid,
              stride_am, stride_be, stride_bn, stride_bk, stride_cm, stride_asm, stride_bse, stride_bsn,
              ROWS_PER_A: tl.constexpr, MUL_WEIGHT: tl.constexpr, FP8: tl.constexpr, A_FP8: tl.constexpr,
              DIRECT: tl.constexpr, GATED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, PDL: tl.constexpr):
    # FP8: b is E4M3 with one scale per BLOCK_K (= the checkpoint's 128) columns and output row (row-expanded);
    # each K step's product is rescaled before it is accumulated. A_FP8: a is E4M3 too, one scale per row
    # (token) and BLOCK_K columns (FP8 tensor cores); else a is not quantised (no launch before the GEMM): both
    # tiles are multiplied in fp16 (widen_fp16; E4M3 values are fp16 values).
    # DIRECT (a few pairs): row tile m is pair m alone, its expert read from the ids as they are (no sort)
    # GATED (gate-up): b holds 2N rows, the gate's then the up's; the program multiplies both halves' BLOCK_N
    # columns and stores silu(gate) * up, each rounded to c's dtype first as the separate SiLU-and-mul did
    pdl_wait(PDL)
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(num_rows_max, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_pid_n
    first_m = (pid // group) * GROUP_M
    size_m = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % size_m
    pid_n = (pid % group) // size_m
    if DIRECT:
        expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
        if expert < 0:  # another rank's expert
            return
        pair = tl.where(tl.arange(0, BLOCK_M) == 0, pid_m, num_valid).to(tl.int64)
    else:
        if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
            return
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        pair = tl.load(sorted_ids_ptr + offs_m).to(tl.int64)  # padding rows hold num_valid
        expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    row_ok = pair < num_valid
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + (pair // ROWS_PER_A)[:, None] * stride_am + offs_k[None, :]
    b_ptrs = b_ptr + expert * stride_be + (offs_n % N)[None, :] * stride_bn + offs_k[:, None] * stride_bk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    up_rows = N * stride_bn
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_ok = offs_k < K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None], other=0.0)
        if FP8:
            bs_ptrs = bs_ptr + expert * stride_bse + (offs_n % N) * stride_bsn + k
            if A_FP8:
                a_s = tl.load(as_ptr + (pair // ROWS_PER_A) * stride_asm + k, mask=row_ok, other=0.0)[:, None]
            else:
                a_s = 1.0
                a = widen_fp16(a)
                b = b.to(tl.float16)
            acc += tl.dot(a, b) * a_s * tl.load(bs_ptrs)[None, :]
            if GATED:
                b_up = tl.load(b_ptrs + up_rows, mask=k_ok[:, None], other=0.0)
                if not A_FP8:
                    b_up = b_up.to(tl.float16)
                acc_up += tl.dot(a, b_up) * a_s * tl.load(bs_ptrs + N * stride_bsn)[None, :]
        else:
            acc += tl.dot(a, b)
            if GATED:
                acc_up += tl.dot(a, tl.load(b_ptrs + up_rows, mask=k_ok[:, None], other=0.0))
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K * stride_bk
    if GATED:
        gate = acc.to(c_ptr.dtype.element_ty).to(tl.float32)
        silu = (gate / (1.0 + tl.exp(-gate))).to(c_ptr.dtype.element_ty)
        acc = silu.to(tl.float32) * acc_up.to(c_ptr.dtype.element_ty).to(tl.float32)
    if MUL_WEIGHT:
        w = tl.load(weights_ptr + pair, mask=row_ok, other=0.0)
        acc = acc * w[:, None]
    c_ptrs = c_ptr + pair[:, None] * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=row_ok[:, None] & (offs_n[None, :] < N))


@triton.jit
def _align_kernel(ids_ptr, counts_ptr, sorted_ids_ptr, expert_ids_ptr, num_padded_ptr, P, E, max_rows,
                  BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_T: tl.constexpr,
                  PDL: tl.constexpr):
    """One program: count the pairs per expert, lay the experts' padded runs end to end, then place every
    pair in its expert's run (slots taken with atomics: order inside a run does not change any result)."""
    pdl_wait(PDL)
    offs_e = tl.arange(0, BLOCK_E)
    tl.store(counts_ptr + offs_e, tl.zeros((BLOCK_E,), tl.int32), mask=offs_e < E)
    for r in range(0, max_rows, BLOCK_P):
        offs = r + tl.arange(0, BLOCK_P)
        tl.store(sorted_ids_ptr + offs, tl.full((BLOCK_P,), 0, tl.int32) + P, mask=offs < max_rows)
    tl.debug_barrier()
    for p0 in range(0, P, BLOCK_P):
        offs = p0 + tl.arange(0, BLOCK_P)
        key = tl.load(ids_ptr + offs, mask=offs < P, other=-1).to(tl.int32)
        tl.atomic_add(counts_ptr + key, tl.full((BLOCK_P,), 1, tl.int32), mask=key >= 0)
    tl.debug_barrier()
    # volatile: the counts were summed by atomics in L2; this program's L1 may hold the zeros stored above
    counts = tl.load(counts_ptr + offs_e, mask=offs_e < E, other=0, volatile=True)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    end = tl.cumsum(padded, 0)
    tl.store(num_padded_ptr, tl.sum(padded, 0))
    tl.debug_barrier()
    tl.store(counts_ptr + offs_e, end - padded, mask=offs_e < E)  # the counts become each run's cursor
    for t0 in range(0, max_rows // BLOCK_M, BLOCK_T):
        tiles = t0 + tl.arange(0, BLOCK_T)
        ended = (end[None, :] <= (tiles * BLOCK_M)[:, None]) & (offs_e[None, :] < E)
        expert = tl.minimum(tl.sum(ended.to(tl.int32), 1), E - 1)
        tl.store(expert_ids_ptr + tiles, expert, mask=tiles < max_rows // BLOCK_M)
    tl.debug_barrier()
    for p0 in range(0, P, BLOCK_P):
        offs = p0 + tl.arange(0, BLOCK_P)
        key = tl.load(ids_ptr + offs, mask=offs < P, other=-1).to(tl.int32)
        slot = tl.atomic_add(counts_ptr + key, tl.full((BLOCK_P,), 1, tl.int32), mask=key >= 0)
        tl.store(sorted_ids_ptr + slot, offs, mask=key >= 0)


def align_by_expert(ids: torch.Tensor, block_m: int, num_experts: int):
    """Pair indices grouped by expert, each expert's run padded to a multiple of block_m (padding holds the
    pair count, an invalid index); the expert of every row tile; the padded length (a 1-element tensor).
    Pairs with id -1 (another rank's expert) are left out. Shapes depend only on the batch size, and it is
    one launch: decode steps replay it inside CUDA graphs."""
    P = ids.numel()
    # sum over experts of ceil(count / block_m) <= P // block_m + (experts with a pair) + 1: a small decode
    # batch launches a few tiles, not one per expert
    max_rows = (P // block_m + min(num_experts, P) + 1) * block_m
    dev = ids.device
    counts = torch.empty(num_experts, dtype=torch.int32, device=dev)
    sorted_ids = torch.empty(max_rows, dtype=torch.int32, device=dev)
    expert_ids = torch.empty(max_rows // block_m, dtype=torch.int32, device=dev)
    num_padded = torch.empty(1, dtype=torch.int32, device=dev)
    _align_kernel[(1,)](ids, counts, sorted_ids, expert_ids, num_padded, P, num_experts, max_rows, BLOCK_M=block_m,
                        BLOCK_P=1024, BLOCK_E=triton.next_power_of_2(num_experts), BLOCK_T=64, num_warps=8,
                        **launch_options(dev))
    return sorted_ids, expert_ids, num_padded, max_rows


@triton.jit
def _combine_kernel(rows_ptr, out_ptr, H, TOP_K: tl.constexpr, BLOCK_H: tl.constexpr, PDL: tl.constexpr):
    """out[t] = the sum of token t's k weighted expert rows, in float32, rounded once (as torch's sum)."""
    pdl_wait(PDL)
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        acc += tl.load(rows_ptr + (t * TOP_K + j) * H + offs, mask=offs < H, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * H + offs, acc.to(out_ptr.dtype.element_ty), mask=offs < H)


def combine(rows: torch.Tensor, top_k: int) -> torch.Tensor:
    """[T * k, H] -> [T, H]: one launch (torch's sum over the k axis was a slow generic reduction at decode)."""
    P, H = rows.shape
    out = torch.empty(P // top_k, H, dtype=rows.dtype, device=rows.device)
    if P:
        block = min(1024, triton.next_power_of_2(H))
        _combine_kernel[(P // top_k, triton.cdiv(H, block))](rows, out, H, TOP_K=top_k, BLOCK_H=block,
                                                             **launch_options(rows.device))
    return out


def _gemm(a, b, c, weights, sorted_ids, expert_ids, num_padded, max_rows, rows_per_a, cfg, a_scale=None,
          b_scale=None, direct=False, gated=False):
    """c = a @ b[expert]^T over the row tiles (gated: c = silu(gate) * up of b's two halves; the config's
    BLOCK_N then covers both halves, so that a program reads as many weight bytes per K step as the table's)."""
    N, K = b.shape[1] // (2 if gated else 1), b.shape[2]
    block_n = max(16, cfg["BLOCK_N"] // 2) if gated else cfg["BLOCK_N"]
    grid = (triton.cdiv(max_rows, cfg["BLOCK_M"]) * triton.cdiv(N, block_n),)
    fp8, a_fp8 = b_scale is not None, a_scale is not None
    a_s = a_scale if a_fp8 else a  # unused without FP8 activations
    b_s = b_scale if fp8 else b
    _moe_gemm[grid](a, b, c, weights, sorted_ids, expert_ids, num_padded, a_s, b_s, N, K, max_rows, c.shape[0],
                    a.stride(0), b.stride(0), b.stride(1), b.stride(2), c.stride(0),
                    a_s.stride(0), b_s.stride(0) if fp8 else 0, b_s.stride(1) if fp8 else 0,
                    ROWS_PER_A=rows_per_a, MUL_WEIGHT=weights is not None, FP8=fp8, A_FP8=a_fp8, DIRECT=direct,
                    GATED=gated,
                    BLOCK_M=cfg["BLOCK_M"], BLOCK_N=block_n, BLOCK_K=cfg["BLOCK_K"], GROUP_M=cfg["GROUP_M"],
                    num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **launch_options(a.device))


def fused_experts(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor, expert_map: torch.Tensor | None = None,
                  configs: tuple[dict, dict] | None = None, fp8_scales: tuple | None = None,
                  quantize_activations: bool | None = None) -> torch.Tensor:
    """See kernels/moe/__init__.py; `configs` (gate-up, down) overrides the tuned table (the tuner).
    `fp8_scales` (w13_scale, w2_scale, block_k): block-FP8 experts, the K step is the block. Up to
    W8A16_MAX_TOKENS tokens (decode) the activations are not quantised: they and the weight tiles are
    multiplied in fp16 (memory-bound: the launches that would quantise them cost more than FP8 math saves);
    larger batches quantise them per token and block_k columns before each GEMM and multiply on FP8 tensor cores
    (`quantize_activations` decides it instead of the token count: the tests)."""
    T, H = x.shape
    k = topk_ids.shape[1]
    E, two_i, _ = w13.shape
    P = T * k
    ids = (topk_ids if expert_map is None else local_ids(topk_ids, expert_map)).flatten()
    # one row tile for both GEMMs: they share the expert-sorted order
    cfg_up, cfg_down = configs or moe_configs(E, H, two_i // 2, P, fp8=fp8_scales is not None)
    w13_scale = w2_scale = None
    quant = lambda t: (t, None)
    if fp8_scales is not None:
        w13_scale, w2_scale, block_k = fp8_scales
        cfg_up, cfg_down = {**cfg_up, "BLOCK_K": block_k}, {**cfg_down, "BLOCK_K": block_k}
        if quantize_activations is None:
            quantize_activations = T > W8A16_MAX_TOKENS
        if quantize_activations:
            quant = lambda t: quantize_per_token_group(t, block_k)
    direct = P <= DIRECT_MAX_PAIRS
    if direct:  # pair m is row tile m: the sort (a launch of its own) is skipped
        sorted_ids = expert_ids = num_padded = ids
        max_rows = P * cfg_up["BLOCK_M"]
    else:
        sorted_ids, expert_ids, num_padded, max_rows = align_by_expert(ids, cfg_up["BLOCK_M"], E)
    act = torch.empty(P, two_i // 2, dtype=x.dtype, device=x.device)
    a, a_scale = quant(x)
    _gemm(a, w13, act, None, sorted_ids, expert_ids, num_padded, max_rows, k, cfg_up, a_scale, w13_scale, direct,
          gated=True)
    a, a_scale = quant(act)
    # rows of pairs another rank computes are never written: zeros make them add nothing
    down = (torch.zeros if expert_map is not None else torch.empty)(P, H, dtype=x.dtype, device=x.device)
    weights = topk_weights.to(torch.float32).flatten()
    _gemm(a, w2, down, weights, sorted_ids, expert_ids, num_padded, max_rows, 1, cfg_down, a_scale, w2_scale,
          direct)
    return combine(down, k)
