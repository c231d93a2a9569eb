"""Mixture-of-experts models against transformers (float32, CPU): Qwen3-MoE and Qwen2-MoE, greedy tokens
identical and logits within 1e-4, with prefix caching and small prefill chunks; the same tokens with the
experts split over two real processes, by intermediate dimension (tensor parallel) and by expert (expert
parallel). The torch MoE reference against a dense per-token loop, and the expert placement."""
from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

from engine.layers.fused_moe import ExpertPlacement
from engine.wire import EngineCoreRequest
from kernels.moe import fused_experts, select_experts
from tests.hf_oracle import hf_logits
from tests.support.models import MOE_ARCHS, build_checkpoint
from tests.test_engine_parity import (LOGIT_ATOL, assert_matches_hf, check_prefix_reuse, greedy,
                                      mixed_prompts)
from tests.test_tensor_parallel import seeded, tokens


@pytest.fixture(scope="module")
def moe_models(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("moe")
    return {arch: build_checkpoint(root / arch, arch) for arch in MOE_ARCHS}


def dense_moe(x, w13, w2, weights, ids):
    """Token by token, pair by pair: the definition the kernels implement."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            gate, up = (w13[ids[t, j]] @ x[t]).chunk(2)
            out[t] += weights[t, j] * (w2[ids[t, j]] @ (F.silu(gate) * up))
    return out


def test_reference_moe_and_expert_parallel_split():
    g = torch.Generator().manual_seed(0)
    T, H, I, E, k = 9, 16, 12, 6, 2
    x = torch.randn(T, H, generator=g)
    w13, w2 = torch.randn(E, 2 * I, H, generator=g), torch.randn(E, H, I, generator=g)
    weights, ids = select_experts(torch.randn(T, E, generator=g), k, renormalize=True)
    assert ids.dtype == torch.int32 and torch.allclose(weights.sum(-1), torch.ones(T))
    ref = dense_moe(x, w13, w2, weights, ids)
    torch.testing.assert_close(fused_experts(x, w13, w2, weights, ids), ref, atol=1e-4, rtol=1e-4)
    # two ranks, each with half the experts: their partial outputs sum to the whole
    placement = ExpertPlacement.even(E, 2)
    parts = []
    for rank in range(2):
        local = placement.local_experts(rank)
        parts.append(fused_experts(x, w13[local], w2[local], weights, ids, placement.expert_map(rank, x.device)))
    torch.testing.assert_close(parts[0] + parts[1], ref, atol=1e-4, rtol=1e-4)
    assert fused_experts(x[:0], w13, w2, weights[:0], ids[:0]).shape == (0, H)


def test_placement_is_even_and_checked():
    p = ExpertPlacement.even(8, 4)
    assert [p.local_experts(r) for r in range(4)] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert p.expert_map(1, torch.device("cpu")).tolist() == [-1, -1, 0, 1, -1, -1, -1, -1]
    with pytest.raises(ValueError, match="not divisible"):
        ExpertPlacement.even(6, 4)


@pytest.mark.parametrize("arch", list(MOE_ARCHS))
def test_moe_matches_hf(arch, moe_models, llm_cache):
    path = moe_models[arch]
    llm = llm_cache.get(path)
    prompts = mixed_prompts(llm.engine.model_config.vocab_size)
    assert_matches_hf(path, prompts, llm.generate(prompts, greedy(logprobs=5)), check_logprobs=True)
    engine = llm.engine  # prefill logits of every position
    for i, p in enumerate(prompts[:4]):
        engine.add_request(EngineCoreRequest(request_id=f"moe{i}", prompt_token_ids=p, params=greedy()))
    sched = engine.scheduler.schedule()
    try:
        logits = engine.runner.prefill_logits(sched.scheduled).cpu()
    finally:
        engine.abort([f"moe{i}" for i in range(4)])
        engine.step()
    start = 0
    for p in prompts[:4]:
        torch.testing.assert_close(logits[start:start + len(p)], hf_logits(path, p), atol=LOGIT_ATOL, rtol=0)
        start += len(p)


def test_moe_prefix_caching_and_small_chunks(moe_models, llm_cache):
    path = moe_models["qwen3_moe"]
    llm = llm_cache.get(path, block_size=4, max_num_batched_tokens=8)
    check_prefix_reuse(path, llm)


@pytest.mark.parametrize("expert_parallel", [False, True], ids=["tp2", "ep2"])
def test_moe_two_ranks_match_one(expert_parallel, moe_models, llm_cache):
    path = moe_models["qwen3_moe"]
    one = llm_cache.get(path)
    two = llm_cache.get(path, tensor_parallel_size=2, enable_expert_parallel=expert_parallel)
    experts = two.engine.runner.model.model.layers[0].mlp.experts
    assert experts.w13_weight.shape[0] == (4 if expert_parallel else 8)
    prompts = mixed_prompts(one.engine.model_config.vocab_size, seed=5)
    assert_matches_hf(path, prompts, two.generate(prompts, greedy()))
    params = [seeded(i) for i in range(len(prompts))]
    assert tokens(two.generate(prompts, params)) == tokens(one.generate(prompts, params))


def test_moe_split_checks_name_the_shape(moe_models):
    from engine.errors import UnsupportedModelError
    from engine.models.config import check_tensor_parallel, load_model_config
    cfg = load_model_config(moe_models["qwen3_moe"])  # 8 experts of intermediate 48
    check_tensor_parallel(cfg, 2, expert_parallel=True)
    with pytest.raises(UnsupportedModelError, match="num_experts 8"):
        check_tensor_parallel(cfg, 16, expert_parallel=True)
    with pytest.raises(UnsupportedModelError, match="moe_intermediate_size 48"):
        check_tensor_parallel(cfg, 32)


def test_bench_counts_the_experts_a_step_reads():
    from engine.bench.throughput import step_weight_bytes
    assert step_weight_bytes(100, 1000, None, 7) == 100
    assert step_weight_bytes(100, 1280, (128, 8), 1) == 100 + 80  # one token: its 8 of 128 experts
    assert step_weight_bytes(100, 1280, (128, 8), 512) == 100 + 1280  # a large batch hits them all


@pytest.mark.parametrize("arch", ["qwen3_moe", "qwen3"])
def test_dp2_matches_one_rank(arch, moe_models, tiny_models, llm_cache):
    """Attention data parallelism over two real processes (each its own batch and KV pool), with the MoE
    experts spread over both (expert parallelism, tokens sent to their experts by all-to-all); a dense
    model runs as two replicas. Greedy and seeded tokens equal one rank's, and both DP groups got work."""
    path = moe_models[arch] if arch in MOE_ARCHS else tiny_models[arch]
    one = llm_cache.get(path)
    two = llm_cache.get(path, data_parallel_size=2, enable_expert_parallel=arch in MOE_ARCHS)
    assert two.engine.executor.world_size == 2 and len(two.engine.slices) == 2
    prompts = mixed_prompts(one.engine.model_config.vocab_size, seed=7)
    assert_matches_hf(path, prompts, two.generate(prompts, greedy()))
    params = [seeded(i) for i in range(len(prompts))]
    assert tokens(two.generate(prompts, params)) == tokens(one.generate(prompts, params))
    assert all(s.block_manager.prefix_queries for s in two.engine.slices), "a DP group never got a request"


def test_dp2_one_request_leaves_the_other_group_idle(moe_models, llm_cache):
    """One sequence: DP group 1 has nothing to do and runs the idle step (empty all-to-alls) every step."""
    path = moe_models["qwen3_moe"]
    two = llm_cache.get(path, data_parallel_size=2, enable_expert_parallel=True)
    prompt = mixed_prompts(two.engine.model_config.vocab_size, seed=8, lengths=(29,))
    assert_matches_hf(path, prompt, two.generate(prompt, greedy()))


def test_dp_needs_expert_parallel_for_moe(moe_models):
    from engine import LLM
    from engine.errors import UnsupportedModelError
    with pytest.raises(UnsupportedModelError, match="enable-expert-parallel"):
        LLM(str(moe_models["qwen3_moe"]), data_parallel_size=2, device="cpu")


def test_random_block_fp8_shape(moe_models, llm_cache, tmp_path):
    """`bench throughput --weights fp8`: a random-weights folder whose config declares block-FP8 weights loads
    every projection and expert as E4M3 with 0.02 block scales (the bf16 draws' magnitude once dequantised), the
    router and the embeddings in the model's dtype, and decodes (on the CPU: the dequantising reference)."""
    import json
    from engine.bench.throughput import BLOCK_FP8, weight_split, write_random_checkpoint
    config = json.loads((moe_models["qwen3_moe"] / "config.json").read_text())
    plain = write_random_checkpoint(tmp_path / "bf16", config)
    fp8 = write_random_checkpoint(tmp_path / "fp8", {**config, "quantization_config": BLOCK_FP8})
    for path in (plain, fp8):  # the tokenizer of the tiny model
        for f in moe_models["qwen3_moe"].glob("tokenizer*"):
            (path / f.name).write_bytes(f.read_bytes())
    llm = llm_cache.get(fp8)
    model = llm.engine.runner.model
    layer = model.model.layers[0]
    moe = layer.mlp
    assert layer.self_attn.qkv_proj.weight.dtype == moe.experts.w2_weight.dtype == torch.float8_e4m3fn
    assert torch.all(layer.self_attn.o_proj.weight_scale_inv == torch.tensor(0.02))
    assert moe.gate.weight_scale_inv is None and moe.gate.weight.dtype == model.model.embed_tokens.weight.dtype
    w = moe.experts.w13_weight.float()
    assert 0.9 < w.std().item() < 1.1  # standard normal E4M3 values
    fp8_bytes = weight_split(model)[1]
    assert fp8_bytes < 0.3 * weight_split(llm_cache.get(plain).engine.runner.model)[1]  # float32 experts
    out = llm.generate([[1, 2, 3, 4, 5]], greedy(max_tokens=4))
    assert len(out[0].outputs[0].token_ids) == 4
    from engine.bench.throughput import main
    with pytest.raises(SystemExit):  # a real checkpoint keeps its own weights' format
        main(["--model", str(plain), "--weights", "fp8"])
