"""The plain-torch MoE reference (CPU path and the oracle of the GPU kernels): expert by expert, the way
transformers computes it, so that float32 results match the reference model to rounding."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def select_experts_ref(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids.to(torch.int32)


def select_experts_grouped_ref(router_logits: torch.Tensor, correction_bias: torch.Tensor | None, top_k: int,
                               num_groups: int, topk_groups: int, renormalize: bool,
                               routed_scaling: float, scoring: str = "sigmoid",
                               num_shared: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek's routing. V3 (`sigmoid`): sigmoid scores; the experts are chosen on score + correction bias,
    only within the `topk_groups` groups whose two best biased scores sum highest. V2 (`softmax`): softmax
    scores, groups ranked by their best score ("group_limited_greedy"; one group: plain greedy). The weights
    are the unbiased scores of the chosen, optionally renormalised, times `routed_scaling`. `num_shared`
    shared experts (ids E, E + 1, ...) follow in every row with weight 1."""
    T, E = router_logits.shape
    scores = router_logits.float().sigmoid() if scoring == "sigmoid" else router_logits.float().softmax(dim=-1)
    choice = scores if correction_bias is None else scores + correction_bias.float()
    if topk_groups < num_groups:  # else every group is kept (Moonlight, V2-Lite: one group): no mask to build
        grouped = choice.view(T, num_groups, E // num_groups)
        group_scores = grouped.topk(2, dim=-1)[0].sum(dim=-1) if scoring == "sigmoid" else grouped.max(dim=-1).values
        groups = torch.topk(group_scores, k=topk_groups, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores).scatter_(1, groups, 1)
        expert_mask = group_mask.unsqueeze(-1).expand(-1, num_groups, E // num_groups).reshape(T, E)
        choice = choice.masked_fill(~expert_mask.bool(), float("-inf"))
    ids = torch.topk(choice, k=top_k, dim=-1, sorted=False)[1]
    weights = scores.gather(1, ids)
    if renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    weights, ids = weights * routed_scaling, ids.to(torch.int32)
    if num_shared:
        shared = torch.arange(E, E + num_shared, dtype=torch.int32, device=ids.device).expand(T, -1)
        weights = torch.cat([weights, torch.ones_like(shared, dtype=weights.dtype)], 1)
        ids = torch.cat([ids, shared], 1)
    return weights, ids


def local_ids(topk_ids: torch.Tensor, expert_map: torch.Tensor | None) -> torch.Tensor:
    """Global expert ids -> this rank's expert indices (-1: another rank's expert)."""
    ids = topk_ids.long()
    return ids if expert_map is None else expert_map[ids]


def fused_experts_ref(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                      topk_ids: torch.Tensor, expert_map: torch.Tensor | None = None,
                      fp8_scales: tuple | None = None) -> torch.Tensor:
    """`fp8_scales` (w13_scale, w2_scale, block_k): block-FP8 experts, dequantised as each is used."""
    T, k = topk_ids.shape
    ids = local_ids(topk_ids, expert_map).flatten()
    weights = topk_weights.flatten()
    out = torch.zeros_like(x)
    for e in torch.unique(ids[ids >= 0]).tolist():
        pairs = torch.nonzero(ids == e).flatten()
        tokens = pairs // k
        w_up, w_down = w13[e], w2[e]
        if fp8_scales is not None:
            from kernels.linear import dequantize_block_fp8_rows
            s13, s2, block_k = fp8_scales
            w_up = dequantize_block_fp8_rows(w_up, s13[e], block_k).to(x.dtype)
            w_down = dequantize_block_fp8_rows(w_down, s2[e], block_k).to(x.dtype)
        gate, up = F.linear(x[tokens], w_up).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, w_down) * weights[pairs, None].to(x.dtype)
        out.index_add_(0, tokens, y)
    return out
