"""The MoE router in one launch: router logits -> (top-k weights, top-k expert ids), one program per token.

Every router the engine serves is one case of the same kernel (kernels/moe/torch_ref.py has the references):
- Qwen3-MoE / Qwen2-MoE: softmax scores, top k, optionally renormalised;
- DeepSeek-V3 / Kimi-K2 / Moonlight: sigmoid scores, experts chosen on score + correction bias within the
  `topk_groups` groups whose two best biased scores sum highest, weights the unbiased scores, renormalised,
  times the routed scaling factor;
- DeepSeek-V2: softmax scores, groups ranked by their best score.

`num_shared` always-on experts (DeepSeek's shared experts, stacked after the E routed ones) come out as k more
slots per token: ids E, E + 1, ..., weight 1, so that the fused MoE runs them in the same GEMMs.

The experts are laid out as a [groups, experts per group] tile, so the group ranking and the expert choice
are reductions over one axis or both. Top-k is k rounds of "take the max, drop it" (ties to the lower id, as
torch.topk). The torch version of this was about ten launches per layer (cast, sigmoid, add, mask, topk,
gather, sum, divide, scale, cast), which dominated the router's share of a batch-1 decode step."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton.pdl import launch_options, pdl_wait


@triton.jit
def _route_kernel(logits_ptr, bias_ptr, weights_ptr, ids_ptr, stride_t, scaling,
                  PER_GROUP: tl.constexpr, GROUPS: tl.constexpr, TOPK_GROUPS: tl.constexpr, TOP_K: tl.constexpr,
                  SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr, RENORMALIZE: tl.constexpr, N_SHARED: tl.constexpr,
                  BLOCK_G: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    pdl_wait(PDL)
    t = tl.program_id(0).to(tl.int64)
    g = tl.arange(0, BLOCK_G)[:, None]
    p = tl.arange(0, BLOCK_P)[None, :]
    valid = (g < GROUPS) & (p < PER_GROUP)
    expert = g * PER_GROUP + p
    x = tl.load(logits_ptr + t * stride_t + expert, mask=valid, other=float("-inf")).to(tl.float32)
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


def route(router_logits: torch.Tensor, correction_bias: torch.Tensor | None, top_k: int, num_groups: int,
          topk_groups: int, renormalize: bool, routed_scaling: float, scoring: str,
          num_shared: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """See the module docstring; weights float32 [T, top_k + num_shared], ids int32 [T, top_k + num_shared]."""
    T, E = router_logits.shape
    weights = torch.empty(T, top_k + num_shared, dtype=torch.float32, device=router_logits.device)
    ids = torch.empty(T, top_k + num_shared, dtype=torch.int32, device=router_logits.device)
    if T:
        per = E // num_groups
        bias = correction_bias if correction_bias is not None else weights  # unread without HAS_BIAS
        block_g, block_p = triton.next_power_of_2(num_groups), triton.next_power_of_2(per)
        _route_kernel[(T,)](router_logits, bias, weights, ids, router_logits.stride(0), float(routed_scaling),
                            PER_GROUP=per, GROUPS=num_groups, TOPK_GROUPS=topk_groups, TOP_K=top_k,
                            SIGMOID=scoring == "sigmoid", HAS_BIAS=correction_bias is not None,
                            RENORMALIZE=renormalize, N_SHARED=num_shared, BLOCK_G=block_g, BLOCK_P=block_p,
                            BLOCK_K=triton.next_power_of_2(top_k + num_shared),
                            # one warp up to 512 experts: k rounds of reductions, each within the warp (more
                            # warps meet in shared memory at every round)
                            num_warps=1 if block_g * block_p <= 512 else 4, **launch_options(router_logits.device))
    return weights, ids
