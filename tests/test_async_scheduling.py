"""Async scheduling: step N+1 is scheduled and launched before step N's samples are read back.
Outputs must be exactly those of the synchronous engine, whatever stops a sequence and however the
pool is squeezed, and the in-flight bookkeeping must leave nothing behind."""
from __future__ import annotations

import random

import pytest

from engine.config import EngineConfig
from engine.core import EngineCore
from engine.sampling_params import SamplingParams
from engine.wire import EngineCoreRequest

MIXED = [
    SamplingParams(temperature=0.0, max_tokens=17),
    SamplingParams(temperature=0.9, seed=7, max_tokens=23, ignore_eos=True),
    SamplingParams(temperature=0.8, top_k=20, top_p=0.9, min_p=0.02, seed=3, max_tokens=12),
    SamplingParams(temperature=1.0, seed=11, repetition_penalty=1.3, presence_penalty=0.5,
                   frequency_penalty=0.4, max_tokens=30, ignore_eos=True),
    SamplingParams(temperature=0.0, min_tokens=4, max_tokens=25, logprobs=3),
    SamplingParams(temperature=0.7, seed=5, max_tokens=1),
    SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, stop=["e"]),
]


def _prompts(n, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(3, 300) for _ in range(rng.randrange(5, 40))] for _ in range(n)]


def _with_stop_tokens(llm, prompts):
    """MIXED, plus a greedy request that stops on a token it is known to produce at its 6th step."""
    probe = llm.generate([prompts[0]], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    stop_at = probe[0].outputs[0].token_ids[5]
    return MIXED + [SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True, stop_token_ids=[stop_at])]


def _summary(outs):
    return [(c.token_ids, c.finish_reason, c.stop_reason, c.text, [sorted(e) for e in c.logprobs or []])
            for o in outs for c in o.outputs]


def _logprobs(outs):
    return [lp.logprob for o in outs for c in o.outputs for e in c.logprobs or [] for _, lp in sorted(e.items())]


@pytest.mark.parametrize("options", [{}, dict(num_kv_blocks=24, block_size=4, max_model_len=80, max_num_batched_tokens=16)],
                         ids=["roomy", "preempting"])
def test_async_outputs_equal_sync(tiny_models, llm_cache, options):
    path = tiny_models["qwen3"]
    sync = llm_cache.get(path, async_scheduling=False, **options)
    asyn = llm_cache.get(path, async_scheduling=True, **options)
    prompts = _prompts(16)
    params = _with_stop_tokens(sync, prompts)
    params = [params[i % len(params)] for i in range(len(prompts))]
    want, got = sync.generate(prompts, params), asyn.generate(prompts, params)
    expected = _summary(want)
    assert _summary(got) == expected  # tokens, finish reasons, text and top-logprob ids
    # the batches differ (async computes one dropped token for sequences that just stopped)
    assert _logprobs(got) == pytest.approx(_logprobs(want), abs=1e-4)
    stopped = [s for s in expected if s[1] == "stop"]
    assert stopped and any(s[1] == "length" for s in expected)
    if "num_kv_blocks" in options:
        assert asyn.engine.scheduler.num_preemptions > 0 and sync.engine.scheduler.num_preemptions > 0


@pytest.fixture
def core(tiny_models):
    return EngineCore(EngineConfig(model=str(tiny_models["llama"]), dtype="float32", device="cpu",
                                   kv_cache_memory_bytes=8 << 20))


def _request(rid, max_tokens, prompt=(5, 6, 7, 8), **kw):
    return EngineCoreRequest(request_id=rid, prompt_token_ids=list(prompt),
                             params=SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kw))


def test_last_token_in_flight_is_not_scheduled(core):
    """A sequence whose in-flight token is its last (max_tokens reached) takes no further step."""
    core.add_request(_request("a", 1))
    assert core.step() == []  # launched; its sample is still on the device
    seq = core.seqs["a"]
    assert seq.num_pending_tokens == 1 and seq.last_token_pending
    assert core.scheduler.schedule().is_empty
    outs = core.step()
    assert [(o.request_id, len(o.new_token_ids), o.finish_reason) for o in outs] == [("a", 1, "length")]
    assert not core.has_unfinished() and core._in_flight is None
    assert core.block_manager.num_free_blocks == core.block_manager.num_blocks


def test_abort_while_in_flight_drops_the_sample(core):
    core.add_request(_request("a", 10))
    core.add_request(_request("b", 10, prompt=(9, 10, 11)))
    core.step()
    core.step()  # b's second token is now in flight
    core.abort(["b"])
    outs = []
    while core.has_unfinished():
        outs.extend(core.step())
    assert {o.request_id for o in outs} == {"a"}
    assert sum(len(o.new_token_ids) for o in outs) == 9  # a's first token came out before the abort
    assert core.block_manager.num_free_blocks == core.block_manager.num_blocks


def _run(engine, lengths) -> dict[str, list[int]]:
    for rid, n in lengths.items():
        engine.add_request(_request(rid, n, prompt=(3 + len(rid), 40, 41)))
    tokens = {rid: [] for rid in lengths}
    while engine.has_unfinished():
        for o in engine.step():
            tokens[o.request_id].extend(o.new_token_ids)
    return tokens


def test_every_token_read_back_once(core):
    """Tokens reach the outputs in order, one per step per sequence, none lost or doubled."""
    lengths = {"a": 3, "b": 8, "c": 5}
    got = _run(core, lengths)
    assert {rid: len(t) for rid, t in got.items()} == lengths
    sync = EngineCore(EngineConfig(model=core.config.model, dtype="float32", device="cpu",
                                   kv_cache_memory_bytes=8 << 20, async_scheduling=False))
    assert got == _run(sync, lengths)
