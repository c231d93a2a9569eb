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


def local_ids(topk_ids: torch.Tensor, expert_map: torch.Tensor | None) -> torch.Tensor:
    """Global expert ids -> this rank's expert indices (-1: another rank's expert)."""
    ids = topk_ids.long()
    return ids if expert_map is None else expert_map[ids]


def fused_experts_ref(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                      topk_ids: torch.Tensor, expert_map: torch.Tensor | None = None) -> torch.Tensor:
    T, k = topk_ids.shape
    ids = local_ids(topk_ids, expert_map).flatten()
    weights = topk_weights.flatten()
    out = torch.zeros_like(x)
    for e in torch.unique(ids[ids >= 0]).tolist():
        pairs = torch.nonzero(ids == e).flatten()
        tokens = pairs // k
        gate, up = F.linear(x[tokens], w13[e]).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, w2[e]) * weights[pairs, None].to(x.dtype)
        out.index_add_(0, tokens, y)
    return out
