"""Triton kernels of the decode path against their torch references: the router (kernels/triton/routing.py) for
every router shape the engine serves, the router's float32 logits (the skinny GEMM), the rope kernel on DeepSeek's
interleaved rotary pairs, the fused experts with and without the sort by expert, all experts or one rank's, and
the GQA decode attention whole and split. Run on the CPU under TRITON_INTERPRET=1
by tests/test_deepseek.py, and on the GPU by tests/test_moe_gpu.py."""
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
        plain = scoring == "softmax" and groups == 1 and scaling == 1.0  # Qwen's
        # DeepSeek's: also with two shared experts in the slots after the top k (ids E, E + 1, weight 1)
        for shared in (0,) if plain else (0, 2):
            if plain:
                want = select_experts_ref(logits, k, renorm)
            else:
                want = select_experts_grouped_ref(logits, bias, k, groups, kept, renorm, scaling, scoring, shared)
            got = route(logits, bias, k, groups, kept, renorm, scaling, scoring, shared)
            assert got[1].shape == (tokens, k + shared)
            assert torch.equal(got[1][:, k:].long(), torch.arange(E, E + shared, device=device).expand(tokens, -1))
            assert torch.equal(got[0][:, k:], torch.ones(tokens, shared, device=device))
            (gw, gi), (ww, wi) = by_id(*got), by_id(*want)
            assert torch.equal(gi, wi), f"{name}: the kernel chose experts {gi.tolist()}, the reference {wi.tolist()}"
            worst = max(worst, float(((gw - ww).abs() / ww.abs().clamp_min(1e-6)).max()))
    return worst


def check_interleaved_rope(device: str = "cpu") -> float:
    """The rope kernel reading DeepSeek's interleaved pairs from strided views (q's rotary part inside the
    projection's heads, k's inside the latent projection) against deinterleaving + the torch reference; then
    writing q into the rotary part of a wider buffer (MLA's latent query), as the layer does."""
    from kernels.rope import apply_rope_ref, deinterleave, rope_cos_sin_cache
    from kernels.triton.elementwise import apply_rope
    g = torch.Generator(device=device).manual_seed(1)
    T, heads, nope, rope = 5, 3, 8, 16
    q = torch.randn(T, heads, nope + rope, generator=g, device=device)[..., nope:]
    k = torch.randn(T, 40 + rope, generator=g, device=device)[:, 40:][:, None, :]
    cache = rope_cos_sin_cache(1.0 / 10000 ** (torch.arange(0, rope, 2, device=device).float() / rope), 64)
    pos = torch.tensor([0, 3, 9, 33, 63], device=device)
    want = apply_rope_ref(deinterleave(q), deinterleave(k), pos, cache)
    got = apply_rope(q, k, pos, cache, interleaved=True)
    buffer = torch.full((T, heads, 24 + rope), 7.0, device=device)
    into = apply_rope(q, k, pos, cache, interleaved=True, q_out=buffer[..., 24:])
    assert bool((buffer[..., :24] == 7.0).all()), "the rope kernel wrote outside the rotary part"
    return max(float((a - b).abs().max()) for a, b in zip((*got, *into, buffer[..., 24:]), (*want, *want[:1])))


def check_skinny_gemm(device: str = "cpu") -> float:
    """The skinny split-K GEMM (one K slice, and 2 and 8 slices meeting in the serial fix-up; with and without
    bias; 1 to 40 rows) in its float32 mode, and the MoE router's logits (bf16 activations, float32 weights, an
    exact float32 product: the kernel, and `router_linear`, which takes it on a GPU), relative to float64."""
    from kernels.linear import router_linear
    from kernels.triton.skinny_gemm import SkinnyGemmWorkspace, skinny_gemm
    g = torch.Generator(device=device).manual_seed(3)
    ws = SkinnyGemmWorkspace(torch.device(device))
    rel = lambda a, b: float((a.double() - b).abs().max() / b.abs().max())
    N, K = 64, 512
    w = torch.randn(N, K, generator=g, device=device)
    bias = torch.randn(N, generator=g, device=device)
    worst = 0.0
    for M, S, b in ((1, 1, None), (3, 2, bias), (16, 8, None), (40, 2, bias)):
        x = torch.randn(M, K, generator=g, device=device)
        want = x.double() @ w.double().t() + (0 if b is None else b.double())
        worst = max(worst, rel(skinny_gemm(x, w, b, S, BN=32, BK=32, BM=16, ws=ws, num_stages=1), want))
        assert int(ws.counters.count_nonzero()) == 0, "the split-K counters were not re-armed"
    router = torch.randn(64, 256, generator=g, device=device)
    for M in (1, 5, 40):
        x = torch.randn(M, 256, generator=g, device=device).to(torch.bfloat16)
        want = x.double() @ router.double().t()
        for logits in (router_linear(x, router), skinny_gemm(x, router, None, 4, BN=16, BK=64, BM=16, ws=ws,
                                                             num_stages=1)):
            assert logits.dtype == torch.float32
            worst = max(worst, rel(logits, want))
    return worst


def check_fused_experts(device: str = "cpu") -> float:
    """float32 experts (8 experts, hidden 64, intermediate 48, top 2): one or two tokens take the direct path (a
    row tile per pair), more take the sorted one; then a rank's half of the experts under expert parallelism."""
    from engine.layers.fused_moe import ExpertPlacement
    from kernels.moe.torch_ref import fused_experts_ref
    from kernels.triton.fused_moe import DIRECT_MAX_PAIRS, fused_experts
    g = torch.Generator(device=device).manual_seed(2)
    E, H, I, k = 8, 64, 48, 2
    w13 = torch.randn(E, 2 * I, H, generator=g, device=device) * 0.2
    w2 = torch.randn(E, H, I, generator=g, device=device) * 0.2
    cfg = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=1, num_warps=4, num_stages=1)
    rel = lambda a, b: float((a - b).norm() / b.norm())
    worst = 0.0
    for T in (1, DIRECT_MAX_PAIRS // k, DIRECT_MAX_PAIRS // k + 1, 21):
        x = torch.randn(T, H, generator=g, device=device)
        weights = torch.rand(T, k, generator=g, device=device)
        ids = torch.stack([torch.randperm(E, generator=g, device=device)[:k] for _ in range(T)]).to(torch.int32)
        worst = max(worst, rel(fused_experts(x, w13, w2, weights, ids, configs=(cfg, cfg)),
                               fused_experts_ref(x, w13, w2, weights, ids)))
        placement = ExpertPlacement.even(E, 2)
        local, m = placement.local_experts(1), placement.expert_map(1, torch.device(device))
        part = fused_experts(x, w13[local].contiguous(), w2[local].contiguous(), weights, ids, m, configs=(cfg, cfg))
        worst = max(worst, rel(part, fused_experts_ref(x, w13[local], w2[local], weights, ids, m)))
    return worst


def check_decode_attention(device: str = "cpu") -> float:
    """The GQA decode kernel whole and split (flash-decoding: partials merged by the second kernel), on ragged
    paged sequences of 1 to 300 tokens, against a plain softmax over each sequence's gathered keys, relative to
    the largest output."""
    from kernels.triton.decode_attention import decode_attention
    g = torch.Generator(device=device).manual_seed(3)
    bs, kvh, heads, d, lens = 16, 2, 6, 32, [1, 17, 300, 64]
    pages = [-(-n // bs) for n in lens]
    perm = torch.randperm(sum(pages), generator=torch.Generator().manual_seed(3)).tolist()
    tables = torch.zeros(len(lens), max(pages), dtype=torch.int32)
    for b, n in enumerate(pages):
        tables[b, :n] = torch.tensor([perm.pop() for _ in range(n)])
    pool = torch.randn(sum(pages), 2, bs, kvh, d, generator=g, device=device)
    q = torch.randn(len(lens), heads, d, generator=g, device=device)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=device)
    want = []
    for b, n in enumerate(lens):
        k, v = (pool[tables[b, :pages[b]].long(), i].flatten(0, 1)[:n].repeat_interleave(heads // kvh, 1)
                for i in (0, 1))
        p = torch.softmax(torch.einsum("hd,nhd->hn", q[b], k) * d ** -0.5, -1)
        want.append(torch.einsum("hn,nhd->hd", p, v))
    want = torch.stack(want)
    worst = 0.0
    for splits in (1, 4, 16):
        got = decode_attention(q, pool, seq_lens, tables.to(device), d ** -0.5, num_splits=splits, block_n=16)
        worst = max(worst, float((got - want).abs().max() / want.abs().max()))
    return worst


def check_triton_kernels(device: str = "cpu") -> float:
    return max(check_routers(device), check_interleaved_rope(device), check_fused_experts(device),
               check_skinny_gemm(device), check_decode_attention(device))
