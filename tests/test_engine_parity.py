"""Engine vs Hugging Face transformers on tiny random checkpoints of every architecture (float32):
greedy tokens identical, logits and logprobs within 1e-4, under prefix caching, chunked prefill and
forced preemption."""
from __future__ import annotations

import random

import pytest
import torch

from engine.sampling_params import SamplingParams
from engine.wire import EngineCoreRequest
from tests.hf_oracle import hf_greedy, hf_logits

ARCHS = ["llama", "qwen2", "qwen3"]
LOGIT_ATOL = 1e-4  # float32 end to end; differences come from summation order only
MAX_NEW = 12


def mixed_prompts(vocab: int, seed: int = 0, lengths=(1, 3, 7, 16, 17, 31, 45, 64)) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in lengths]


def shared_prefix_prompts(seed: int = 2, prefix: int = 37, tails=(1, 5, 9)) -> list[list[int]]:
    """Prompts that share their first `prefix` tokens (nine full blocks of 4: the prefix cache's to reuse)."""
    rng = random.Random(seed)
    shared = [rng.randrange(3, 300) for _ in range(prefix)]
    return [shared + [rng.randrange(3, 300) for _ in range(n)] for n in tails]


def check_prefix_reuse(path, llm) -> None:
    """The first prompt fills the cache; the others reuse its full blocks and still match transformers."""
    prompts = shared_prefix_prompts()
    first = llm.generate(prompts[:1], greedy())
    rest = llm.generate(prompts[1:], greedy())
    assert all(o.num_cached_tokens >= 36 for o in rest)
    assert_matches_hf(path, prompts, first + rest)


def greedy(max_tokens=MAX_NEW, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kw)


def assert_matches_hf(path, prompts, outputs, check_logprobs=False):
    for prompt, out in zip(prompts, outputs):
        ref_tokens, ref_logprobs = hf_greedy(path, prompt, MAX_NEW)
        got = out.outputs[0]
        assert got.token_ids == ref_tokens, f"prompt of {len(prompt)} tokens"
        if check_logprobs:
            for entry, ref in zip(got.logprobs, ref_logprobs):
                for token_id, lp in entry.items():
                    assert abs(lp.logprob - float(ref[token_id])) < LOGIT_ATOL


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_batch_matches_hf(arch, tiny_models, llm_cache):
    path = tiny_models[arch]
    llm = llm_cache.get(path)
    prompts = mixed_prompts(llm.engine.runner.vocab_size)
    outputs = llm.generate(prompts, greedy(logprobs=5))
    assert_matches_hf(path, prompts, outputs, check_logprobs=True)


@pytest.mark.parametrize("arch", ARCHS)
def test_prefill_logits_match_hf(arch, tiny_models, llm_cache):
    path = tiny_models[arch]
    llm = llm_cache.get(path)
    engine = llm.engine
    prompts = mixed_prompts(engine.runner.vocab_size, seed=1)
    for i, p in enumerate(prompts):
        engine.add_request(EngineCoreRequest(request_id=f"logits{i}", prompt_token_ids=p, params=greedy()))
    sched = engine.scheduler.schedule()
    try:
        assert [s.num_new_tokens for s in sched.scheduled] == [len(p) for p in prompts]
        logits = engine.runner.prefill_logits(sched.scheduled).cpu()
    finally:
        engine.abort([f"logits{i}" for i in range(len(prompts))])
        engine.step()
    start = 0
    for p in prompts:
        ref = hf_logits(path, p)
        torch.testing.assert_close(logits[start:start + len(p)], ref, atol=LOGIT_ATOL, rtol=0)
        start += len(p)


def test_prefix_caching_hits_and_matches(tiny_models, llm_cache):
    path = tiny_models["qwen3"]
    llm = llm_cache.get(path, block_size=4)
    prompts = shared_prefix_prompts()
    first = llm.generate(prompts[:1], greedy())
    hits_before = llm.engine.block_manager.prefix_hits
    rest = llm.generate(prompts[1:], greedy())
    assert llm.engine.block_manager.prefix_hits - hits_before >= 2 * 36, "the shared prefix was not reused"
    assert all(o.num_cached_tokens >= 36 for o in rest)
    assert_matches_hf(path, prompts, first + rest)


def test_chunked_prefill_small_chunks(tiny_models, llm_cache):
    path = tiny_models["qwen2"]
    llm = llm_cache.get(path, max_num_batched_tokens=8, block_size=4, enable_prefix_caching=False)
    prompts = mixed_prompts(llm.engine.runner.vocab_size, seed=3, lengths=(5, 19, 33, 2))
    assert_matches_hf(path, prompts, llm.generate(prompts, greedy()))


def test_forced_preemption(tiny_models, llm_cache):
    path = tiny_models["llama"]
    # 12 blocks of 4 tokens cannot hold 6 sequences of ~30 tokens: the scheduler must preempt
    llm = llm_cache.get(path, num_kv_blocks=12, block_size=4, max_model_len=48, enable_prefix_caching=False)
    prompts = mixed_prompts(llm.engine.runner.vocab_size, seed=4, lengths=(20, 14, 9, 25, 3, 17))
    before = llm.engine.scheduler.num_preemptions
    outputs = llm.generate(prompts, greedy())
    assert llm.engine.scheduler.num_preemptions > before
    assert_matches_hf(path, prompts, outputs)


def test_preemption_with_prefix_cache_and_chunks(tiny_models, llm_cache):
    path = tiny_models["qwen3"]
    llm = llm_cache.get(path, num_kv_blocks=14, block_size=4, max_model_len=48, max_num_batched_tokens=10)
    rng = random.Random(5)
    shared = [rng.randrange(3, 300) for _ in range(12)]
    prompts = [shared + [rng.randrange(3, 300) for _ in range(n)] for n in (8, 2, 13, 5, 1)]
    outputs = llm.generate(prompts, greedy())
    assert llm.engine.scheduler.num_preemptions > 0
    assert_matches_hf(path, prompts, outputs)


def test_kernels_name_does_not_break_transformers(tiny_models):
    """Our top-level `kernels` package shadows the HF `kernels` hub package name: models still build."""
    import subprocess
    import sys
    code = ("import kernels, transformers\n"
            "from transformers import AutoModelForCausalLM\n"
            f"m = AutoModelForCausalLM.from_pretrained({str(tiny_models['llama'])!r})\n"
            "print(type(m).__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "LlamaForCausalLM" in out.stdout
