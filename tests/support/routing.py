"""The router's Triton kernel (kernels/triton/routing.py) against the torch references, every router shape the
engine serves, and the rope kernel on DeepSeek's interleaved rotary pairs; run on the CPU under
TRITON_INTERPRET=1 by tests/test_deepseek.py."""
from __future__ import annotations

import torch

# (experts, groups, groups kept, top k, scoring, correction bias, renormalise, routed scaling)
ROUTERS = {
    "moonlight": (64, 1, 1, 6, "sigmoid", True, True, 2.446),
    "deepseek-v3": (256, 8, 4, 8, "sigmoid", True, True, 2.5),
    "deepseek-v2": (160, 8, 3, 6, "softmax", False, False, 16.0),  # 20 experts a group: a padded tile
    "kimi-k2": (384, 1, 1, 8, "sigmoid", True, True, 2.827),
    "qwen3-moe": (128, 1, 1, 8, "softmax", False, True, 1.0),
    "qwen2-moe": (60, 1, 1, 4, "softmax", False, False, 1.0),
}


def by_id(weights: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k sets in id order: the references pick with torch.topk(sorted=False), whose order is unspecified."""
    order = ids.long().argsort(dim=-1)
    return weights.gather(1, order), ids.long().gather(1, order)


def check_routers(device: str = "cpu", tokens: int = 9) -> float:
    from kernels.moe.torch_ref import select_experts_grouped_ref, select_experts_ref
    from kernels.triton.routing import route
    g = torch.Generator(device=device).manual_seed(0)
    worst = 0.0
    for name, (E, groups, kept, k, scoring, with_bias, renorm, scaling) in ROUTERS.items():
        logits = torch.randn(tokens, E, generator=g, device=device) * 2
        bias = torch.randn(E, generator=g, device=device) * 0.1 if with_bias else None
        if scoring == "softmax" and groups == 1 and scaling == 1.0:
            want = select_experts_ref(logits, k, renorm)
        else:
            want = select_experts_grouped_ref(logits, bias, k, groups, kept, renorm, scaling, scoring)
        got = route(logits, bias, k, groups, kept, renorm, scaling, scoring)
        (gw, gi), (ww, wi) = by_id(*got), by_id(*want)
        assert torch.equal(gi, wi), f"{name}: the kernel chose experts {gi.tolist()}, the reference {wi.tolist()}"
        worst = max(worst, float(((gw - ww).abs() / ww.abs().clamp_min(1e-6)).max()))
    return worst


def check_interleaved_rope(device: str = "cpu") -> float:
    """The rope kernel reading DeepSeek's interleaved pairs from strided views (q's rotary part inside the
    projection's heads, k's inside the latent projection) against deinterleaving + the torch reference."""
    from kernels.rope import apply_rope_ref, deinterleave, rope_cos_sin_cache
    from kernels.triton.elementwise import apply_rope
    g = torch.Generator(device=device).manual_seed(1)
    T, heads, nope, rope = 5, 3, 8, 16
    q = torch.randn(T, heads, nope + rope, generator=g, device=device)[..., nope:]
    k = torch.randn(T, 40 + rope, generator=g, device=device)[:, 40:][:, None, :]
    cache = rope_cos_sin_cache(1.0 / 10000 ** (torch.arange(0, rope, 2, device=device).float() / rope), 64)
    pos = torch.tensor([0, 3, 9, 33, 63], device=device)
    got = apply_rope(q, k, pos, cache, interleaved=True)
    want = apply_rope_ref(deinterleave(q), deinterleave(k), pos, cache)
    return max(float((a - b).abs().max()) for a, b in zip(got, want))


def check_triton_kernels(device: str = "cpu") -> float:
    return max(check_routers(device), check_interleaved_rope(device))
