"""Mixture-of-experts kernels behind one import point.

`select_experts` / `select_experts_grouped` turn router logits into (top-k weights, top-k expert ids): one
Triton launch on a GPU (kernels/triton/routing.py), the torch reference elsewhere. `fused_experts` runs every
token through its experts' gated MLPs and sums the weighted outputs:

    out[t] = sum_j w[t, j] * down[e_j](silu(gate[e_j](x[t])) * up[e_j](x[t])),  e_j = ids[t, j]

with the experts' weights stacked as `w13` [E, 2I, H] (gate rows, then up rows) and `w2` [E, H, I].
`expert_map` (global id -> local index, -1: held by another rank) lets a rank run only the experts it
holds (expert parallelism); pairs routed elsewhere add nothing here.

Which implementation runs: DeepGEMM's grouped GEMM when `deep_gemm` imports and the call fits it (see
kernels/moe/deep_gemm_moe.py), else the Triton fused kernel on a GPU (kernels/triton/fused_moe.py), else
the plain-torch reference (kernels/moe/torch_ref.py), which every other path is tested against."""
from __future__ import annotations

import torch

from kernels.moe.torch_ref import fused_experts_ref, select_experts_grouped_ref, select_experts_ref
from kernels.triton import use_triton


def _fused_router_fits(router_logits: torch.Tensor, num_groups: int) -> bool:
    """The Triton router holds a token's experts in one [groups, experts per group] tile of <= 1024 values."""
    E = router_logits.shape[-1]
    p2 = lambda n: 1 << (n - 1).bit_length()
    return use_triton(router_logits) and E % num_groups == 0 and p2(num_groups) * p2(E // num_groups) <= 1024


def select_experts(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over the experts, the top k, optionally renormalised to sum to 1 (Qwen3-MoE's
    `norm_topk_prob`). Weights in float32, ids int32."""
    if _fused_router_fits(router_logits, 1):
        from kernels.triton.routing import route
        return route(router_logits, None, top_k, 1, 1, renormalize, 1.0, "softmax")
    return select_experts_ref(router_logits, top_k, renormalize)


def select_experts_grouped(router_logits: torch.Tensor, correction_bias: torch.Tensor | None, top_k: int,
                           num_groups: int, topk_groups: int, renormalize: bool,
                           routed_scaling: float, scoring: str = "sigmoid",
                           num_shared: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek routing: V3 / Kimi-K2 (sigmoid scores, correction bias, group-limited top-k, routed scaling) or
    V2 (softmax scores, groups ranked by their best expert); see kernels/moe/torch_ref.py. Weights in float32,
    ids int32; `num_shared` always-on experts (ids E, E + 1, ..., weight 1) follow the top k in every row."""
    if _fused_router_fits(router_logits, num_groups):
        from kernels.triton.routing import route
        return route(router_logits, correction_bias, top_k, num_groups, topk_groups, renormalize, routed_scaling,
                     scoring, num_shared)
    return select_experts_grouped_ref(router_logits, correction_bias, top_k, num_groups, topk_groups, renormalize,
                                      routed_scaling, scoring, num_shared)


def fused_experts(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor, expert_map: torch.Tensor | None = None, w13_scale: torch.Tensor | None = None,
                  w2_scale: torch.Tensor | None = None, block_k: int = 0) -> torch.Tensor:
    """x [T, H] -> [T, H] in x's dtype (see the module docstring). Block-FP8 experts: w13 / w2 in E4M3 with
    row-expanded block scales [E, 2I, H / block_k] / [E, H, I / block_k] (DeepSeek-V3 checkpoints)."""
    if x.shape[0] == 0:
        return torch.zeros_like(x)
    scales = (w13_scale, w2_scale, block_k) if w13_scale is not None else None
    if use_triton(x):
        from kernels.moe import deep_gemm_moe
        if scales is None and deep_gemm_moe.supports(x, w13, w2, topk_ids):
            return deep_gemm_moe.fused_experts(x, w13, w2, topk_weights, topk_ids, expert_map)
        from kernels.triton.fused_moe import fused_experts as triton_fused_experts
        return triton_fused_experts(x, w13, w2, topk_weights, topk_ids, expert_map, fp8_scales=scales)
    return fused_experts_ref(x, w13, w2, topk_weights, topk_ids, expert_map, scales)
