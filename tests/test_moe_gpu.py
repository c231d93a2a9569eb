"""GPU MoE kernels against the torch reference (kernels/moe/torch_ref.py), at decode and prefill token counts:
the Triton routers, the Triton fused experts (all experts, and one rank's experts under expert
parallelism), the same inside a CUDA graph, and DeepGEMM's grouped GEMM path when `deep_gemm` imports."""
from __future__ import annotations

import importlib.util

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("triton") is None,
                                reason="the Triton MoE kernels need a CUDA GPU and triton")

# (experts, hidden, expert intermediate, top-k): Qwen3-30B-A3B's layer, and a small odd one
SHAPES = [(128, 2048, 768, 8), (8, 64, 48, 2)]
TOKENS = [1, 7, 64, 257, 2048]


def make(E, H, I, k, T, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    r = lambda *s, scale=1.0: (torch.randn(*s, generator=g, device="cuda") * scale).to(torch.bfloat16)
    x, logits = r(T, H), r(T, E)
    return x, r(E, 2 * I, H, scale=H ** -0.5), r(E, H, I, scale=I ** -0.5), logits


def reference(x, w13, w2, weights, ids, expert_map=None):
    from kernels.moe.torch_ref import fused_experts_ref
    return fused_experts_ref(x.float(), w13.float(), w2.float(), weights, ids, expert_map)


@pytest.mark.parametrize("T", TOKENS)
def test_router_topk_matches_torch(T):
    from kernels.moe.torch_ref import select_experts_ref
    from kernels.moe import select_experts
    logits = make(128, 16, 16, 8, T)[3]
    for renorm in (True, False):
        w, ids = select_experts(logits, 8, renorm)
        rw, rids = select_experts_ref(logits, 8, renorm)
        # bf16 logits tie often: the same weights, and each chosen id really has its weight
        torch.testing.assert_close(w, rw, atol=1e-6, rtol=1e-5)
        probs = torch.softmax(logits.float(), -1).gather(1, ids.long())
        if renorm:
            probs = probs / probs.sum(-1, keepdim=True)
        torch.testing.assert_close(w, probs, atol=1e-6, rtol=1e-5)
        assert (ids == rids).float().mean() > 0.95


def test_every_router_and_interleaved_rope_match_torch():
    """DeepSeek V3 / V2 / Kimi-K2 / Moonlight and Qwen routers (grouped, biased, scaled) and the rope on
    interleaved pairs, on the GPU at a prefill-sized token count (tests/support/decode_kernels.py)."""
    from tests.support.decode_kernels import check_interleaved_rope, check_routers
    assert check_routers("cuda", tokens=300) < 1e-5
    assert check_interleaved_rope("cuda") < 1e-5


@pytest.mark.parametrize("shape", SHAPES, ids=["qwen3-30b-a3b", "small"])
@pytest.mark.parametrize("T", TOKENS)
def test_triton_fused_experts(shape, T):
    from kernels.moe.torch_ref import select_experts_ref
    from kernels.triton.fused_moe import fused_experts
    E, H, I, k = shape
    x, w13, w2, logits = make(E, H, I, k, T)
    weights, ids = select_experts_ref(logits, k, True)
    got = fused_experts(x, w13, w2, weights, ids).float()
    ref = reference(x, w13, w2, weights, ids)
    torch.testing.assert_close(got, ref, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("T", [2, 3, 300])  # 2 tokens: the direct path (no sort)
def test_triton_fused_experts_one_ranks_share(T):
    from engine.layers.fused_moe import ExpertPlacement
    from kernels.moe.torch_ref import select_experts_ref
    from kernels.triton.fused_moe import fused_experts
    E, H, I, k = SHAPES[0]
    x, w13, w2, logits = make(E, H, I, k, T, seed=1)
    weights, ids = select_experts_ref(logits, k, True)
    placement = ExpertPlacement.even(E, 4)
    total = torch.zeros(T, H, device="cuda")
    for rank in range(4):
        local, m = placement.local_experts(rank), placement.expert_map(rank, torch.device("cuda"))
        part = fused_experts(x, w13[local].contiguous(), w2[local].contiguous(), weights, ids, m).float()
        torch.testing.assert_close(part, reference(x, w13[local], w2[local], weights, ids, m), atol=2e-2, rtol=2e-2)
        total += part
    torch.testing.assert_close(total, reference(x, w13, w2, weights, ids), atol=4e-2, rtol=2e-2)


def test_fused_experts_in_a_cuda_graph():
    from kernels.moe import fused_experts, select_experts
    E, H, I, k = SHAPES[0]
    x, w13, w2, logits = make(E, H, I, k, 16, seed=2)
    run = lambda: fused_experts(x, w13, w2, *select_experts(logits, k, True))
    eager = run()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    x.copy_(make(E, H, I, k, 16, seed=3)[0])  # new inputs, same buffers: the replay must follow them
    graph.replay()
    torch.testing.assert_close(out, run(), atol=0, rtol=0)
    assert not torch.equal(out, eager)


@pytest.mark.skipif(importlib.util.find_spec("deep_gemm") is None,
                    reason="deep_gemm is not installed (build it with ../shared/device/kernels.sh)")
@pytest.mark.parametrize("T", [1, 64, 2048])  # below and above MIN_PAIRS: called directly either way
def test_deep_gemm_fused_experts(T):
    from kernels.moe import deep_gemm_moe
    from kernels.moe.torch_ref import select_experts_ref
    E, H, I, k = SHAPES[0]
    x, w13, w2, logits = make(E, H, I, k, T, seed=4)
    weights, ids = select_experts_ref(logits, k, True)
    assert deep_gemm_moe.available()
    got = deep_gemm_moe.fused_experts(x, w13, w2, weights, ids).float()
    torch.testing.assert_close(got, reference(x, w13, w2, weights, ids), atol=2e-2, rtol=2e-2)
