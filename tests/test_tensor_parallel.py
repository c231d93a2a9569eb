"""Tensor parallelism with real processes (gloo on CPU): an engine with tensor_parallel_size 2 (rank 0 here,
rank 1 a worker process) gives exactly the tokens of one rank and of Hugging Face transformers, greedy and
seeded, with prefix caching, small prefill chunks and forced preemption; KV heads replicated when fewer than
the ranks, and a vocabulary that does not split evenly. After every test every rank's tables are empty and
rank 0's pool is full (tests/support/models.py)."""
from __future__ import annotations

import random

import pytest

from engine.sampling_params import SamplingParams
from tests.support.models import build_checkpoint
from tests.test_engine_parity import (LOGIT_ATOL, assert_matches_hf, check_prefix_reuse, greedy,
                                      mixed_prompts)

ARCHS = ["llama", "qwen2", "qwen3"]
TP2 = dict(tensor_parallel_size=2)


def seeded(i: int) -> SamplingParams:
    return SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=100 + i, max_tokens=10, ignore_eos=True,
                          repetition_penalty=1.1, logprobs=2)


def tokens(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


@pytest.mark.parametrize("arch", ARCHS)
def test_tp2_matches_one_rank_and_transformers(arch, tiny_models, llm_cache):
    path = tiny_models[arch]
    one, two = llm_cache.get(path), llm_cache.get(path, **TP2)
    assert two.engine.executor.world_size == 2
    prompts = mixed_prompts(one.engine.model_config.vocab_size)
    outputs = two.generate(prompts, greedy(logprobs=5))
    assert_matches_hf(path, prompts, outputs, check_logprobs=True)
    params = [seeded(i) for i in range(len(prompts))]
    ref, got = one.generate(prompts, params), two.generate(prompts, params)
    assert tokens(got) == tokens(ref)
    for a, b in zip(ref, got):  # rank 0 samples from the gathered logits: the same distribution
        for ea, eb in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            assert all(abs(ea[t].logprob - eb[t].logprob) < LOGIT_ATOL for t in ea)


def test_tp2_prefix_caching(tiny_models, llm_cache):
    path = tiny_models["qwen3"]
    llm = llm_cache.get(path, block_size=4, **TP2)
    check_prefix_reuse(path, llm)


def test_tp2_small_prefill_chunks(tiny_models, llm_cache):
    path = tiny_models["qwen2"]
    llm = llm_cache.get(path, max_num_batched_tokens=8, block_size=4, enable_prefix_caching=False, **TP2)
    prompts = mixed_prompts(llm.engine.model_config.vocab_size, seed=3, lengths=(5, 19, 33, 2))
    assert_matches_hf(path, prompts, llm.generate(prompts, greedy()))


def test_tp2_forced_preemption_with_prefix_cache_and_chunks(tiny_models, llm_cache):
    """Preempted sequences come back under new block tables: the ranks must follow."""
    path = tiny_models["llama"]
    llm = llm_cache.get(path, num_kv_blocks=14, block_size=4, max_model_len=48, max_num_batched_tokens=10, **TP2)
    rng = random.Random(5)
    shared = [rng.randrange(3, 300) for _ in range(12)]
    prompts = [shared + [rng.randrange(3, 300) for _ in range(n)] for n in (8, 2, 13, 5, 1, 20)]
    before = llm.engine.scheduler.num_preemptions
    outputs = llm.generate(prompts, greedy())
    assert llm.engine.scheduler.num_preemptions > before
    assert_matches_hf(path, prompts, outputs)


def test_tp2_without_async_scheduling(tiny_models, llm_cache):
    path = tiny_models["qwen3"]
    llm = llm_cache.get(path, async_scheduling=False, **TP2)
    prompts = mixed_prompts(llm.engine.model_config.vocab_size, seed=7, lengths=(3, 30, 11))
    params = [seeded(i) for i in range(len(prompts))]
    assert tokens(llm.generate(prompts, params)) == tokens(llm_cache.get(path).generate(prompts, params))


@pytest.fixture(scope="module")
def replicated_kv_odd_vocab(tmp_path_factory):
    """One KV head (each of 2 ranks keeps a copy) and 401 vocabulary rows (rank 1's last row is padding)."""
    return build_checkpoint(tmp_path_factory.mktemp("tp") / "llama", "llama", num_key_value_heads=1,
                            vocab_size=401, tie_word_embeddings=False)


def test_tp2_replicated_kv_heads_and_padded_vocab(replicated_kv_odd_vocab, llm_cache):
    path = replicated_kv_odd_vocab
    llm = llm_cache.get(path, **TP2)
    qkv = llm.engine.runner.model.model.layers[0].self_attn.qkv_proj
    assert (qkv.num_heads, qkv.num_kv_heads) == (2, 1) and llm.engine.runner.model.lm_head.rows == 201
    prompts = mixed_prompts(401, seed=9, lengths=(4, 23))
    assert_matches_hf(path, prompts, llm.generate(prompts, greedy(logprobs=3)), check_logprobs=True)


def test_a_dead_worker_fails_the_engine_with_a_clear_error(tiny_models):
    """Offline: the next call after a rank dies raises, naming the rank and how it died."""
    import os
    import signal
    import time

    from engine.executor.channel import WorkerLost
    from engine.llm import LLM
    llm = LLM(str(tiny_models["qwen3"]), device="cpu", dtype="float32", kv_cache_memory_bytes=8 << 20, **TP2)
    executor = llm.engine.executor
    try:
        os.kill(executor.channel.pids[1], signal.SIGKILL)
        deadline = time.monotonic() + 10
        while executor.dead_reason is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert "rank 1" in executor.dead_reason and "signal 9" in executor.dead_reason
        with pytest.raises(WorkerLost, match="rank 1"):
            llm.generate([[5, 6, 7]], greedy())
    finally:
        llm.shutdown()
