"""Sampling through the whole engine: seeded reproducibility independent of the batch, n, stop rules,
penalties, filters and logprobs."""
from __future__ import annotations

import random

import pytest
import torch

from engine.sampling.sampler import SamplingMetadata, apply_penalties, sample
from engine.sampling_params import SamplingParams
from tests.hf_oracle import hf_model


@pytest.fixture
def llm(tiny_models, llm_cache):
    return llm_cache.get(tiny_models["qwen3"])


def prompts(n, seed=0, length=9):
    rng = random.Random(seed)
    return [[rng.randrange(3, 300) for _ in range(length + i)] for i in range(n)]


def tokens(outs):
    return [o.outputs[0].token_ids for o in outs]


def test_seeded_sampling_reproducible_and_batch_independent(llm):
    p = prompts(1)[0]
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=16, ignore_eos=True)
    alone = tokens(llm.generate([p], params))[0]
    assert tokens(llm.generate([p], params))[0] == alone
    others = prompts(5, seed=9)
    mixed = llm.generate(others[:2] + [p] + others[2:], [SamplingParams(temperature=0.8, max_tokens=20)] * 2
                         + [params] + [SamplingParams(temperature=0.0, max_tokens=5)] * 3)
    assert tokens(mixed)[2] == alone
    other_seed = tokens(llm.generate([p], SamplingParams(temperature=1.0, top_p=0.9, seed=99, max_tokens=16,
                                                          ignore_eos=True)))[0]
    assert other_seed != alone


def test_n_samples_are_distinct_and_seeded(llm):
    p = prompts(1, seed=3)[0]
    params = SamplingParams(n=4, temperature=1.0, seed=7, max_tokens=12, ignore_eos=True)
    out = llm.generate([p], params)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2, 3]
    samples = [tuple(c.token_ids) for c in out.outputs]
    assert len(set(samples)) == 4
    assert [tuple(c.token_ids) for c in llm.generate([p], params)[0].outputs] == samples
    greedy = llm.generate([p], SamplingParams(n=3, temperature=0.0, max_tokens=6, ignore_eos=True))[0]
    assert len({tuple(c.token_ids) for c in greedy.outputs}) == 1


def test_filters_that_reduce_to_greedy(llm):
    ps = prompts(3, seed=4)
    greedy = tokens(llm.generate(ps, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)))
    for kw in (dict(top_k=1), dict(top_p=1e-6), dict(min_p=1.0)):
        out = tokens(llm.generate(ps, SamplingParams(temperature=1.5, seed=5, max_tokens=8, ignore_eos=True, **kw)))
        assert out == greedy, kw


def test_stop_token_ids_min_tokens_and_max_tokens(llm):
    p = prompts(1, seed=5)[0]
    ref = tokens(llm.generate([p], SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)))[0]
    stop_at = ref[3]
    first = ref.index(stop_at)
    out = llm.generate([p], SamplingParams(temperature=0.0, max_tokens=10, stop_token_ids=[stop_at]))[0].outputs[0]
    assert out.token_ids == ref[:first + 1] and out.finish_reason == "stop" and out.stop_reason == stop_at
    out = llm.generate([p], SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True))[0].outputs[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 10
    # min_tokens masks the stop token until it is reached: the output is longer than `first + 1`
    out = llm.generate([p], SamplingParams(temperature=0.0, max_tokens=10, min_tokens=first + 2,
                                           stop_token_ids=[stop_at]))[0].outputs[0]
    assert len(out.token_ids) >= first + 2 and stop_at not in out.token_ids[:first + 2]


def test_eos_stops_unless_ignored(llm):
    eos = next(iter(llm.engine.eos_token_ids))
    p = prompts(1, seed=6)[0]
    # forbid nothing, but make EOS a stop: find a prompt position where greedy emits EOS by min_tokens=0
    out = llm.generate([p], SamplingParams(temperature=0.0, max_tokens=30))[0].outputs[0]
    if out.finish_reason == "stop":
        assert out.token_ids[-1] == eos
    out2 = llm.generate([p], SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True))[0].outputs[0]
    assert out2.finish_reason == "length" and len(out2.token_ids) == 30
    assert out2.token_ids[:len(out.token_ids)] == out.token_ids


def test_stop_strings(llm):
    p = prompts(1, seed=7)[0]
    full = llm.generate([p], SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True))[0].outputs[0]
    text = full.text
    stop = text[5:8]
    assert len(stop) == 3 and text.find(stop) == 5
    out = llm.generate([p], SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, stop=[stop]))[0].outputs[0]
    assert out.text == text[:5] and out.finish_reason == "stop" and out.stop_reason == stop
    out = llm.generate([p], SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, stop=stop,
                                           include_stop_str_in_output=True))[0].outputs[0]
    assert out.text == text[:8]


def test_repetition_penalty_matches_hf(tiny_models, llm):
    path = tiny_models["qwen3"]
    p = prompts(1, seed=8)[0]
    ours = tokens(llm.generate([p], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True,
                                                   repetition_penalty=1.7)))[0]
    model = hf_model(str(path))
    ids = torch.tensor([p])
    ref = model.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False, repetition_penalty=1.7)
    assert ours == ref[0, len(p):].tolist()


def test_presence_and_frequency_penalties_unit():
    logits = torch.zeros(2, 6)
    counts = torch.tensor([[0, 1, 3, 0, 0, 0], [0, 0, 0, 0, 0, 2]])
    m = SamplingMetadata(temperature=torch.zeros(2), top_k=torch.full((2,), 6), top_p=torch.ones(2),
                         min_p=torch.zeros(2), seeds=torch.zeros(2, dtype=torch.long),
                         steps=torch.zeros(2, dtype=torch.long), all_greedy=True, need_top_k=False,
                         need_top_p=False, need_min_p=False, presence_penalty=torch.tensor([0.5, 0.0]),
                         frequency_penalty=torch.tensor([0.25, 1.0]), repetition_penalty=torch.ones(2),
                         prompt_mask=torch.zeros(2, 6, dtype=torch.bool), output_counts=counts)
    out = apply_penalties(logits, m)
    assert out[0].tolist() == [0, -0.75, -1.25, 0, 0, 0]
    assert out[1].tolist() == [0, 0, 0, 0, 0, -2.0]


def test_sampling_distribution_matches_probabilities():
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4])
    B = 20000
    m = SamplingMetadata(temperature=torch.ones(B), top_k=torch.full((B,), 4), top_p=torch.ones(B),
                         min_p=torch.zeros(B), seeds=torch.arange(B), steps=torch.zeros(B, dtype=torch.long),
                         all_greedy=False, need_top_k=False, need_top_p=False, need_min_p=False)
    freq = torch.bincount(sample(probs.log().repeat(B, 1), m).token_ids, minlength=4) / B
    assert torch.allclose(freq, probs, atol=0.015)
    m.top_k, m.need_top_k = torch.full((B,), 2), True  # keeps 0.4 and 0.3 -> 4/7, 3/7
    freq = torch.bincount(sample(probs.log().repeat(B, 1), m).token_ids, minlength=4) / B
    assert torch.allclose(freq, torch.tensor([0, 0, 3 / 7, 4 / 7]), atol=0.015)


def test_logprobs_top_n(llm):
    p = prompts(1, seed=10)[0]
    out = llm.generate([p], SamplingParams(temperature=0.7, seed=3, max_tokens=5, logprobs=3))[0].outputs[0]
    assert len(out.logprobs) == len(out.token_ids)
    for token, entry in zip(out.token_ids, out.logprobs):
        assert token in entry and 3 <= len(entry) <= 4
        ranked = sorted((lp.rank, lp.logprob) for t, lp in entry.items() if t != token or lp.rank <= 3)
        assert all(a[1] >= b[1] for a, b in zip(ranked, ranked[1:]))
    assert abs(out.cumulative_logprob - sum(e[t].logprob for t, e in zip(out.token_ids, out.logprobs))) < 1e-5


def test_streaming_yields_growing_outputs(llm):
    p = prompts(1, seed=11)[0]
    seen = [o.outputs[0].token_ids[:] for o in llm.generate_stream([p], SamplingParams(temperature=0.0, max_tokens=6,
                                                                                       ignore_eos=True))]
    assert [len(s) for s in seen] == [1, 2, 3, 4, 5, 6]


def test_abandoned_stream_frees_blocks(llm):
    p = prompts(1, seed=12)[0]
    stream = llm.generate_stream([p], SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True))
    next(stream)
    stream.close()  # the autouse fixture checks that the pool is full again
