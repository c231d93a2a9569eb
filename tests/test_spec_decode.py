"""Speculative decoding (engine/spec_decode/) with the ngram drafter on tiny checkpoints: the output equals plain
decoding token for token (greedy, and seeded sampling, whose draws depend only on the seed and the output index),
logprobs included; drafts are proposed and some accepted; stop tokens and length limits cut a verify step's
tokens; preemption under a small pool; two tensor-parallel ranks; every KV pool full afterwards."""
from __future__ import annotations

import pytest

from engine.errors import InvalidRequestError
from engine.sampling_params import SamplingParams
from engine.spec_decode.config import SpeculativeConfig
from engine.spec_decode.ngram import propose
from engine.spec_decode.verify import accepted_tokens
from tests.test_tensor_parallel import tokens

NGRAM = '{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3}'


def test_ngram_proposals():
    assert propose([1, 2, 3, 4, 1, 2], 3, 1, 4) == [3, 4, 1]  # after the latest earlier "1 2"
    assert propose([5, 6, 7, 5, 6, 7, 5, 6], 2, 1, 3) == [7, 5]
    assert propose([1, 2, 3], 2, 1, 4) == [] and propose([9], 2, 1, 4) == []
    assert propose([1, 2, 9, 2, 8, 1, 2], 2, 2, 2) == [9, 2]  # only 2-grams


def test_acceptance_rule():
    assert accepted_tokens([7], []) == [7]
    assert accepted_tokens([4, 5, 6, 9], [4, 5, 6]) == [4, 5, 6, 9]  # all kept, and the bonus token
    assert accepted_tokens([4, 8, 6, 9], [4, 5, 6]) == [4, 8]  # the first mismatch is the target's token
    assert accepted_tokens([3, 5, 6, 9], [4, 5, 6]) == [3]


@pytest.mark.parametrize("text,why", [("nope", "not JSON"), ("[1]", "JSON object"),
                                      ('{"num_speculative_tokens": 0}', ">= 1"),
                                      ('{"method": "eagle", "num_speculative_tokens": 1}', "not available"),
                                      ('{"num_speculative_tokens": 2, "draft": 1}', "unknown keys"),
                                      ('{"method": "ngram"}', "needs num_speculative_tokens")])
def test_speculative_config_errors(text, why):
    with pytest.raises(InvalidRequestError, match=why) as e:
        SpeculativeConfig.parse(text)
    assert e.value.param == "speculative_config"


def test_speculative_config_with_data_parallel_is_refused():
    from engine.config import EngineConfig
    with pytest.raises(InvalidRequestError, match="data_parallel_size"):
        EngineConfig(speculative_config=NGRAM, data_parallel_size=2)


def repetitive_prompts() -> list[list[int]]:
    """Prompts whose patterns a small random model tends to continue: drafts get accepted."""
    return [[5, 6, 7, 8] * 6, [11, 12, 13] * 5 + [11], [20 + i % 7 for i in range(40)], [3, 4], [9] * 12]


def sampled(i: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.8, top_p=0.95, seed=7 + i, max_tokens=24, ignore_eos=True, **kw)


def test_ngram_speculation_keeps_the_output(tiny_models, llm_cache):
    path = tiny_models["llama"]
    plain, spec = llm_cache.get(path), llm_cache.get(path, speculative_config=NGRAM)
    assert not spec.engine.async_scheduling
    prompts = repetitive_prompts()
    greedy = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=2)
    want, got = plain.generate(prompts, greedy), spec.generate(prompts, greedy)
    assert tokens(got) == tokens(want)
    for a, b in zip(got, want):  # the logprobs of every kept token are its plain-decoding ones
        for x, y in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            assert x.keys() == y.keys() and all(abs(x[t].logprob - y[t].logprob) < 1e-4 for t in x)
    stats = spec.engine.stats()
    assert stats["spec_draft_tokens"] > 0 and stats["spec_accepted_tokens"] > 0, stats
    assert stats["spec_accepted_tokens"] <= stats["spec_draft_tokens"]
    # seeded sampling draws the same tokens: the distribution is plain decoding's
    params = [sampled(i) for i in range(len(prompts))]
    assert tokens(spec.generate(prompts, params)) == tokens(plain.generate(prompts, params))


def test_stops_and_limits_inside_a_verify_step(tiny_models, llm_cache):
    path = tiny_models["llama"]
    plain, spec = llm_cache.get(path), llm_cache.get(path, speculative_config=NGRAM)
    prompts = repetitive_prompts()
    free = plain.generate(prompts, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True))
    # stop on a token the greedy output reaches after a few steps; and odd max_tokens
    cases = [SamplingParams(temperature=0.0, max_tokens=24, stop_token_ids=[o.outputs[0].token_ids[5]])
             for o in free] + [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in (1, 2, 5)]
    inputs = prompts + prompts[:3]
    want, got = plain.generate(inputs, cases), spec.generate(inputs, cases)
    assert tokens(got) == tokens(want)
    assert [o.outputs[0].finish_reason for o in got] == [o.outputs[0].finish_reason for o in want]
    assert [len(o.outputs[0].token_ids) for o in got[-3:]] == [1, 2, 5]


def test_speculation_under_preemption_and_chunked_prefill(tiny_models, llm_cache):
    path = tiny_models["llama"]
    opts = dict(num_kv_blocks=24, block_size=4, max_num_batched_tokens=16, max_model_len=80)
    plain, spec = llm_cache.get(path, **opts), llm_cache.get(path, speculative_config=NGRAM, **opts)
    prompts = repetitive_prompts()
    greedy = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    assert tokens(spec.generate(prompts, greedy)) == tokens(plain.generate(prompts, greedy))
    assert spec.engine.stats()["num_preemptions"] > 0


def test_speculation_over_two_ranks(tiny_models, llm_cache):
    path = tiny_models["qwen3"]
    one, two = llm_cache.get(path), llm_cache.get(path, tensor_parallel_size=2, speculative_config=NGRAM)
    prompts = repetitive_prompts()
    params = [sampled(i) for i in range(len(prompts))]
    assert tokens(two.generate(prompts, params)) == tokens(one.generate(prompts, params))


def test_served_with_speculative_config(tiny_llama, tiny_server, tmp_path):
    """`slipstream serve --speculative-config`: the answers of a plain server (whole and streamed, several
    tokens per delta), and the drafts counted in /metrics."""
    import openai
    from tests.support.server import start_server
    server = start_server(tiny_llama, tmp_path, "--speculative-config", NGRAM)
    try:
        prompt = "one two three one two three one two three one two"
        ask = dict(model=str(tiny_llama), prompt=prompt, max_tokens=40, temperature=0, extra_body={"ignore_eos": True})
        plain = openai.OpenAI(base_url=tiny_server.url + "/v1", api_key="x").completions.create(**ask)
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x")
        assert client.completions.create(**ask).choices[0].text == plain.choices[0].text
        streamed = "".join(c.choices[0].text for c in client.completions.create(stream=True, **ask))
        assert streamed == plain.choices[0].text
        stats = server.engine_info()["stats"]  # the core's own counters (/metrics shows the last heartbeat's)
        assert stats["spec_draft_tokens"] > 0 and stats["spec_verify_rows"] > 0, stats
        _, raw, _ = server.request("GET", "/metrics")
        names = {line.split("{")[0] for line in raw.decode().splitlines() if line.startswith("slipstream:spec_decode")}
        assert names == {f"slipstream:spec_decode_{n}" for n in ("num_draft_tokens_total", "num_accepted_tokens_total",
                                                                 "num_drafts_total", "acceptance_rate",
                                                                 "tokens_per_step")}
        server.wait_kv_free()
    finally:
        server.stop()


def test_decode_engine_speculates_after_a_hand_off(tiny_models, llm_cache):
    """1P1D over DLSlime with the drafter on the decode engine: the hybrid engine's tokens."""
    pytest.importorskip("dlslime", reason="dlslime (and libibverbs1) is needed for KV transfer")
    from tests.test_pd_core import OPTS, hand_off_all
    path = tiny_models["llama"]
    prefill = llm_cache.get(path, role="prefill", **OPTS).engine
    decode = llm_cache.get(path, role="decode", speculative_config=NGRAM, **OPTS).engine
    prompts = repetitive_prompts()
    params = [SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)] + [sampled(i) for i in range(1, 5)]
    expected = tokens(llm_cache.get(path, **OPTS).generate(prompts, params))
    got, _ = hand_off_all(prefill, decode, [(f"s{i}", p, sp) for i, (p, sp) in enumerate(zip(prompts, params))])
    assert [got[f"s{i}"] for i in range(len(prompts))] == expected
    assert decode.stats()["spec_draft_tokens"] > 0


def test_scheduler_reserves_lookahead_slots_for_mtp_chains():
    """An MTP chain of k drafts writes the module's KV at the k - 1 positions after the last kept token: the
    scheduler reserves them with every step's blocks, never past max_model_len."""
    from engine.core.block_manager import BlockManager
    from engine.core.scheduler import Scheduler
    from engine.core.sequence import Sequence
    assert SpeculativeConfig.parse('{"method": "mtp", "num_speculative_tokens": 3}').lookahead_slots == 2
    assert SpeculativeConfig.parse('{"method": "ngram", "num_speculative_tokens": 3}').lookahead_slots == 0
    for max_model_len, blocks in [(64, 3), (9, 3), (8, 2)]:  # 7 prompt tokens + 2 slots, 4-token blocks
        sched = Scheduler(BlockManager(32, 4, False), 4, 64, lookahead_slots=2, max_model_len=max_model_len)
        seq = Sequence("s", [1, 2, 3, 4, 5, 6, 7], SamplingParams(max_tokens=1), 0, 1)
        sched.add(seq)
        (scheduled,) = sched.schedule().scheduled
        assert scheduled.num_new_tokens == 7 and len(seq.block_table) == blocks
        sched.finish(seq, "abort")
        assert sched.block_manager.num_free_blocks == 32
