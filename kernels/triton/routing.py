"""The MoE router in one launch: router logits -> (top-k weights, top-k expert ids), one program per token.

Every router the engine serves is one case of the same kernel (kernels/moe/torch_ref.py has the references):
- Qwen3-MoE / Qwen2-MoE: softmax scores, top k, optionally renormalised;
- DeepSeek-V3 / Kimi-K2 / Moonlight: sigmoid scores, experts chosen on score + correction bias within the
  `topk_groups` groups whose two best biased scores sum highest, weights the unbiased scores, renormalised,
  times the routed scaling factor;
- DeepSeek-V2: softmax scores, groups ranked by their best score.

`num_shared` always-on experts (DeepSeek's shared experts, stacked after the E routed ones) come out as k more
slots per token: ids E, E + 1, ..., weight 1, so that the fused MoE runs them in the same GEMMs.

`router` also computes the logits (the gate's GEMV, split over the programs as the skinny GEMM splits K) and
routes in the same launch, for decode steps of one or two tokens: one launch per layer instead of two.

The experts are laid out as a [groups, experts per group] tile, so the group ranking and the expert choice
are reductions over one axis or both. Top-k is k rounds of "take the max, drop it" (ties to the lower id, as
torch.topk). The torch version of this was about ten launches per layer (cast, sigmoid, add, mask, topk,
gather, sum, divide, scale, cast), which dominated the router's share of a batch-1 decode step."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _route_row(row_ptr, bias_ptr, weights_ptr, ids_ptr, t, scaling,
               PER_GROUP: tl.constexpr, GROUPS: tl.constexpr, TOPK_GROUPS: tl.constexpr, TOP_K: tl.constexpr,
               SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr, RENORMALIZE: tl.constexpr, N_SHARED: tl.constexpr,
               BLOCK_G: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr):
    """Token t's logits (row_ptr) -> its weights and ids (rows t of weights_ptr / ids_ptr)."""
    g = tl.arange(0, BLOCK_G)[:, None]
    p = tl.arange(0, BLOCK_P)[None, :]
    valid = (g < GROUPS) & (p < PER_GROUP)
    expert = g * PER_GROUP + p
    # .cg: in the fused router these were written by the same launch (another thread of this program)
    x = tl.load(row_ptr + expert, mask=valid, other=float("-inf"), cache_modifier=".cg").to(tl.float32)
    if SIGMOID:
        scores = 1.0 / (1.0 + tl.exp(-x))
    else:
        e = tl.exp(x - tl.max(tl.max(x, 1), 0))
        scores = e / tl.sum(tl.sum(e, 1), 0)
    choice = scores
    if HAS_BIAS:
        choice = choice + tl.load(bias_ptr + expert, mask=valid, other=0.0).to(tl.float32)
    choice = tl.where(valid, choice, float("-inf"))
    if TOPK_GROUPS < GROUPS:
        # a group's rank: its two best biased scores summed (sigmoid), or its best score (softmax)
        best = tl.max(choice, 1)
        group_score = best
        if SIGMOID:
            first = tl.min(tl.where(choice == best[:, None], p, BLOCK_P), 1)
            group_score = best + tl.max(tl.where(p == first[:, None], float("-inf"), choice), 1)
        groups = tl.arange(0, BLOCK_G)
        gs = tl.where(groups < GROUPS, group_score, float("-inf"))
        keep = tl.zeros((BLOCK_G,), dtype=tl.int32)
        for _ in tl.static_range(TOPK_GROUPS):
            gi = tl.min(tl.where(gs == tl.max(gs, 0), groups, BLOCK_G), 0)
            keep = tl.where(groups == gi, 1, keep)
            gs = tl.where(groups == gi, float("-inf"), gs)
        choice = tl.where(keep[:, None] != 0, choice, float("-inf"))
    slots = tl.arange(0, BLOCK_K)
    out_w = tl.zeros((BLOCK_K,), dtype=tl.float32)
    out_id = tl.zeros((BLOCK_K,), dtype=tl.int32)
    total = 0.0
    for j in tl.static_range(TOP_K):
        top = tl.max(tl.max(choice, 1), 0)
        pick = tl.min(tl.min(tl.where(choice == top, expert, GROUPS * PER_GROUP), 1), 0)
        hit = expert == pick
        w = tl.sum(tl.sum(tl.where(hit, scores, 0.0), 1), 0)
        out_w = tl.where(slots == j, w, out_w)
        out_id = tl.where(slots == j, pick, out_id)
        total += w
        choice = tl.where(hit, float("-inf"), choice)
    if RENORMALIZE:
        out_w = out_w / (total + 1e-20)
    out_w = out_w * scaling
    if N_SHARED > 0:  # the shared experts' slots after the routed ones
        shared = slots >= TOP_K
        out_w = tl.where(shared, 1.0, out_w)
        out_id = tl.where(shared, GROUPS * PER_GROUP + slots - TOP_K, out_id)
    width = TOP_K + N_SHARED
    tl.store(weights_ptr + t * width + slots, out_w, mask=slots < width)
    tl.store(ids_ptr + t * width + slots, out_id, mask=slots < width)


@triton.jit
def _route_kernel(logits_ptr, bias_ptr, weights_ptr, ids_ptr, stride_t, scaling,
                  PER_GROUP: tl.constexpr, GROUPS: tl.constexpr, TOPK_GROUPS: tl.constexpr, TOP_K: tl.constexpr,
                  SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr, RENORMALIZE: tl.constexpr, N_SHARED: tl.constexpr,
                  BLOCK_G: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    _route_row(logits_ptr + t * stride_t, bias_ptr, weights_ptr, ids_ptr, t, scaling, PER_GROUP, GROUPS, TOPK_GROUPS,
               TOP_K, SIGMOID, HAS_BIAS, RENORMALIZE, N_SHARED, BLOCK_G, BLOCK_P, BLOCK_K)


@triton.jit
def _router_kernel(x_ptr, w_ptr, ws_ptr, logits_ptr, cnt_ptr, bias_ptr, weights_ptr, ids_ptr, T, K_SPLIT,
                   stride_xm, stride_wn, scaling, E: tl.constexpr, BLOCK_E: tl.constexpr, BM: tl.constexpr,
                   BK: tl.constexpr, IEEE: tl.constexpr,
                   PER_GROUP: tl.constexpr, GROUPS: tl.constexpr, TOPK_GROUPS: tl.constexpr, TOP_K: tl.constexpr,
                   SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr, RENORMALIZE: tl.constexpr, N_SHARED: tl.constexpr,
                   BLOCK_G: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr):
    # program (e, s): the logits of BLOCK_E experts over the s-th K slice for the T (<= BM) tokens, as the skinny
    # GEMM computes them (weights as the MMA's M), left as a partial [S, E, BM]; the last program to arrive sums
    # the partials in slice order into the logits (rounded to the weights' dtype, as the gate's Linear rounds
    # them), routes every token and re-arms the counter
    pid_e, pid_s = tl.program_id(0), tl.program_id(1)
    re = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    rm = tl.arange(0, BM)
    rk = tl.arange(0, BK)
    k0 = pid_s * K_SPLIT
    w_ptrs = w_ptr + re[:, None].to(tl.int64) * stride_wn + (k0 + rk)[None, :]
    x_ptrs = x_ptr + rm[None, :].to(tl.int64) * stride_xm + (k0 + rk)[:, None]  # x^T: [BK, BM]
    m_ok = rm[None, :] < T
    acc = tl.zeros((BLOCK_E, BM), dtype=tl.float32)
    for _ in range(0, K_SPLIT, BK):
        w = tl.load(w_ptrs)
        xt = tl.load(x_ptrs, mask=m_ok, other=0.0).to(w.dtype)
        if IEEE:
            acc = tl.dot(w, xt, acc, input_precision="ieee")
        else:
            acc = tl.dot(w, xt, acc)
        w_ptrs += BK
        x_ptrs += BK
    tile = tl.arange(0, BLOCK_E)[:, None] * BM + rm[None, :]
    tl.store(ws_ptr + (pid_s * E + pid_e * BLOCK_E) * BM + tile, acc, mask=m_ok)
    tl.debug_barrier()  # every thread's partial is written before the one counting atomic (release, GPU scope)
    arrived = tl.atomic_add(cnt_ptr, 1, sem="acq_rel", scope="gpu")
    if arrived == tl.num_programs(0) * tl.num_programs(1) - 1:
        for e0 in range(0, E, BLOCK_E):
            logits = tl.zeros((BLOCK_E, BM), dtype=tl.float32)
            for s in range(0, tl.num_programs(1)):  # a fixed order: the sum does not depend on who came last
                logits += tl.load(ws_ptr + (s * E + e0) * BM + tile, mask=m_ok, other=0.0, cache_modifier=".cg")
            # [T, E] rows for the routing, in the dtype the gate's output has before the router widens it
            dst = logits_ptr + rm[None, :] * E + e0 + tl.arange(0, BLOCK_E)[:, None]
            tl.store(dst, logits.to(w_ptr.dtype.element_ty).to(tl.float32), mask=m_ok)
        tl.debug_barrier()  # the logits rows are written before any thread reads them
        for t in range(0, T):
            _route_row(logits_ptr + t * E, bias_ptr, weights_ptr, ids_ptr, t, scaling, PER_GROUP, GROUPS,
                       TOPK_GROUPS, TOP_K, SIGMOID, HAS_BIAS, RENORMALIZE, N_SHARED, BLOCK_G, BLOCK_P, BLOCK_K)
        tl.store(cnt_ptr, 0)


def _outputs(T: int, E: int, correction_bias: torch.Tensor | None, top_k: int, num_groups: int, topk_groups: int,
             renormalize: bool, scoring: str, num_shared: int, device: torch.device):
    """The (weights, ids) outputs and the routing's kernel arguments (bias, constexprs)."""
    weights = torch.empty(T, top_k + num_shared, dtype=torch.float32, device=device)
    ids = torch.empty(T, top_k + num_shared, dtype=torch.int32, device=device)
    bias = correction_bias if correction_bias is not None else weights  # unread without HAS_BIAS
    per = E // num_groups
    consts = dict(PER_GROUP=per, GROUPS=num_groups, TOPK_GROUPS=topk_groups, TOP_K=top_k,
                  SIGMOID=scoring == "sigmoid", HAS_BIAS=correction_bias is not None, RENORMALIZE=renormalize,
                  N_SHARED=num_shared, BLOCK_G=triton.next_power_of_2(num_groups),
                  BLOCK_P=triton.next_power_of_2(per), BLOCK_K=triton.next_power_of_2(top_k + num_shared))
    return weights, ids, bias, consts


def route(router_logits: torch.Tensor, correction_bias: torch.Tensor | None, top_k: int, num_groups: int,
          topk_groups: int, renormalize: bool, routed_scaling: float, scoring: str,
          num_shared: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """See the module docstring; weights float32 [T, top_k + num_shared], ids int32 [T, top_k + num_shared]."""
    T, E = router_logits.shape
    weights, ids, bias, consts = _outputs(T, E, correction_bias, top_k, num_groups, topk_groups, renormalize,
                                          scoring, num_shared, router_logits.device)
    if T:
        _route_kernel[(T,)](router_logits, bias, weights, ids, router_logits.stride(0), float(routed_scaling),
                            # one warp up to 512 experts: k rounds of reductions, each within the warp (more
                            # warps meet in shared memory at every round)
                            **consts, num_warps=1 if consts["BLOCK_G"] * consts["BLOCK_P"] <= 512 else 4)
    return weights, ids


# The router GEMV and the routing in one launch (`router`) for decode steps of up to this many tokens: the
# last program routes the tokens one after the other, which costs more than a second launch past a few
FUSED_ROUTER_MAX_TOKENS = 2
_BLOCK_E, _BK, _BM = 16, 64, 16  # experts per program, K step, the row tile (the MMA's N: 16 at least)


def fused_router_fits(x: torch.Tensor, weight: torch.Tensor) -> bool:
    E, K = weight.shape
    return (0 < x.shape[0] <= FUSED_ROUTER_MAX_TOKENS and E % _BLOCK_E == 0 and K % _BK == 0
            and x.stride(1) == 1 and weight.stride(1) == 1 and weight.dtype in (torch.float32, torch.bfloat16,
                                                                                 torch.float16))


def router(x: torch.Tensor, weight: torch.Tensor, correction_bias: torch.Tensor | None, top_k: int, num_groups: int,
           topk_groups: int, renormalize: bool, routed_scaling: float, scoring: str,
           num_shared: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """route(x @ weight^T, ...) in one launch for a few tokens (fused_router_fits): the logits as the gate computes
    them (float32 weights: an exact float32 product of the widened activations; else rounded to the weights'
    dtype), then the routing of the module docstring."""
    from kernels.triton.skinny_gemm import workspace
    T, K = x.shape
    E = weight.shape[0]
    weights, ids, bias, consts = _outputs(T, E, correction_bias, top_k, num_groups, topk_groups, renormalize,
                                          scoring, num_shared, x.device)
    # K slices: enough programs to stream the weights (~64), each at least one K step
    S = max(1, min(K // _BK, 64 // (E // _BLOCK_E)))
    while K % (S * _BK):
        S -= 1
    ws = workspace(x.device)  # the skinny GEMM's partials and counters: launches on one stream never overlap
    assert S * E * _BM <= ws.partials.numel() - T * E
    logits = ws.partials[S * E * _BM:]  # [T, E] after the partials
    _router_kernel[(E // _BLOCK_E, S)](x, weight, ws.partials, logits, ws.counters, bias, weights, ids, T, K // S,
                                       x.stride(0), weight.stride(0), float(routed_scaling), E=E, BLOCK_E=_BLOCK_E,
                                       BM=_BM, BK=_BK, IEEE=weight.dtype == torch.float32, **consts, num_warps=4)
    return weights, ids
