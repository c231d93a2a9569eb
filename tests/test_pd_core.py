"""Prefill/decode hand-off between two engine cores over DLSlime (TCP, one process): the
disaggregated output equals the hybrid output token for token, and every failure frees its KV."""
from __future__ import annotations

import random

import pytest

from engine.errors import InvalidRequestError
from engine.kv.spec import KVCacheSpec
from engine.pd import migration as mig
from engine.sampling_params import SamplingParams
from engine.wire import EngineCoreRequest

pytest.importorskip("dlslime", reason="dlslime (and the system library libibverbs1) is needed for KV transfer")

OPTS = dict(block_size=4, max_model_len=128, kv_pull_timeout_s=5.0)


@pytest.fixture
def pair(tiny_models, llm_cache):
    path = tiny_models["qwen3"]
    prefill = llm_cache.get(path, role="prefill", **OPTS).engine
    decode = llm_cache.get(path, role="decode", **OPTS).engine
    hybrid = llm_cache.get(path, **OPTS)
    return prefill, decode, hybrid


def run_until(engine, done, limit=10_000):
    outs = []
    for _ in range(limit):
        outs.extend(engine.step())
        if done(outs):
            return outs
    raise AssertionError("engine did not finish")


def prefill_stage(prefill, rid, prompt, params):
    prefill.add_request(EngineCoreRequest(request_id=rid, prompt_token_ids=prompt, params=params,
                                          kv_transfer_params={"do_remote_decode": True}))
    outs = run_until(prefill, lambda o: any(x.request_id == rid and x.finished for x in o))
    return next(x for x in outs if x.request_id == rid and x.finished)


def decode_stage(decode, rids_and_migrations):
    for rid, migration in rids_and_migrations:
        decode.add_request(EngineCoreRequest(request_id=rid, prompt_token_ids=[], params=SamplingParams(),
                                             kv_transfer_params={"migration": migration}))
    want = {rid for rid, _ in rids_and_migrations}
    outs = run_until(decode, lambda o: want <= {x.request_id for x in o if x.finished})
    tokens: dict[str, list[int]] = {rid: [] for rid in want}
    finals = {}
    for x in outs:
        tokens[x.request_id].extend(x.new_token_ids)
        if x.finished:
            finals[x.request_id] = x
    return tokens, finals


def hand_off_all(prefill, decode, requests) -> tuple[dict[str, list[int]], list[str]]:
    """Each (rid, prompt, params) prefilled on `prefill`, then all decoded on `decode` from their migrations;
    the decoded tokens by rid and the migrations. Every parked KV is freed afterwards."""
    migrations = []
    for rid, prompt, params in requests:
        kv = prefill_stage(prefill, rid, prompt, params).kv_transfer_params
        migrations.append((rid, kv["migration"], kv["seq_id"]))
    got, _ = decode_stage(decode, [(rid, m) for rid, m, _ in migrations])
    assert prefill.free_parked([seq_id for _, _, seq_id in migrations]) == len(requests)
    return got, [m for _, m, _ in migrations]


def cases():
    rng = random.Random(0)
    out = []
    for i, n in enumerate((3, 9, 17, 33, 40, 6)):
        prompt = [rng.randrange(3, 300) for _ in range(n)]
        params = (SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True) if i % 2 == 0 else
                  SamplingParams(temperature=0.9, top_p=0.95, seed=100 + i, max_tokens=12, ignore_eos=True))
        out.append((f"r{i}", prompt, params))
    return out


def test_disaggregated_equals_hybrid(pair):
    prefill, decode, hybrid = pair
    cs = cases()
    expected = [o.outputs[0].token_ids for o in hybrid.generate([p for _, p, _ in cs], [s for _, _, s in cs])]
    migrations = []
    for rid, prompt, params in cs:
        out = prefill_stage(prefill, rid, prompt, params)
        kv = out.kv_transfer_params
        assert out.finish_reason == "length" and out.new_token_ids == [] and set(kv) == {"migration", "first_token", "seq_id"}
        migrations.append((rid, kv["migration"], kv["seq_id"], kv["first_token"]))
    assert prefill.block_manager.num_free_blocks < prefill.block_manager.num_blocks  # parked KV
    tokens, finals = decode_stage(decode, [(rid, m) for rid, m, _, _ in migrations])
    for (rid, _, _, first), exp in zip(migrations, expected):
        assert tokens[rid][0] == first
        assert tokens[rid] == exp, rid
        assert finals[rid].finish_reason == "length"
    stats = decode.stats()
    assert stats["kv_transfers"] >= len(migrations) and stats["kv_transfer_bytes"] > 0
    assert prefill.free_parked([seq_id for _, _, seq_id, _ in migrations]) == len(migrations)
    assert prefill.free_parked([seq_id for _, _, seq_id, _ in migrations] + [999, "x"]) == 0  # idempotent


def test_first_token_that_ends_the_request_needs_no_migration(pair):
    prefill, _, _ = pair
    out = prefill_stage(prefill, "one", [5, 6, 7], SamplingParams(temperature=0.0, max_tokens=1))
    assert out.kv_transfer_params is None and len(out.new_token_ids) == 1 and out.finish_reason == "length"


def test_unclaimed_prefill_kv_is_reclaimed_after_timeout(pair):
    prefill, _, _ = pair
    out = prefill_stage(prefill, "lost", [5, 6, 7, 8, 9], SamplingParams(temperature=0.0, max_tokens=5))
    assert out.kv_transfer_params["seq_id"] in prefill.handoff.parked
    import time
    assert prefill.handoff.reclaim_expired(time.monotonic() + prefill.config.kv_park_timeout_s + 1) == 1
    assert not prefill.handoff.parked


def test_corrupted_or_forged_migration_is_rejected(pair):
    prefill, decode, _ = pair
    out = prefill_stage(prefill, "c", [5, 6, 7, 8, 9, 10], SamplingParams(temperature=0.0, max_tokens=5))
    good = out.kv_transfer_params["migration"]
    m = mig.decode(good)
    bad_geometry = mig.encode(mig.Migration(**{**{f: getattr(m, f) for f in m.__struct_fields__},
                                              "kv_spec": KVCacheSpec(1, 1, 1, 4, "float32")}))
    other_tp = mig.encode(mig.Migration(**{**{f: getattr(m, f) for f in m.__struct_fields__},
                                          "transfer": m.transfer * 2, "block_ids": m.block_ids * 2,
                                          # a GPU source staged its blocks: one staged list per rank too
                                          "staged_block_ids": m.staged_block_ids and m.staged_block_ids * 2}))
    out_of_range = mig.encode(mig.Migration(**{**{f: getattr(m, f) for f in m.__struct_fields__},
                                              "block_ids": [[10 ** 6, 10 ** 6 + 1]]}))
    flipped = good[:20] + ("A" if good[20] != "A" else "B") + good[21:]
    free_before = decode.block_manager.num_free_blocks
    for payload in ("", "not base64!", flipped, good[:-8], bad_geometry, other_tp, 42):
        with pytest.raises(InvalidRequestError) as e:
            decode.add_request(EngineCoreRequest(request_id="bad", prompt_token_ids=[], params=SamplingParams(),
                                                 kv_transfer_params={"migration": payload}))
        assert e.value.param == "kv_transfer_params"
        if payload is other_tp:  # a different tensor-parallel size is named, not re-sharded
            assert "tensor_parallel_size 2" in e.value.message
    # well-formed but pointing outside the source pool: the pull is refused before any byte moves
    decode.add_request(EngineCoreRequest(request_id="oob", prompt_token_ids=[], params=SamplingParams(),
                                         kv_transfer_params={"migration": out_of_range}))
    outs = run_until(decode, lambda o: any(x.request_id == "oob" and x.finished for x in o))
    err = next(x for x in outs if x.request_id == "oob")
    assert err.finish_reason == "error" and "rejected" in err.error
    assert decode.block_manager.num_free_blocks == free_before and not decode.has_unfinished()
    prefill.free_parked([out.kv_transfer_params["seq_id"]])


def test_dead_source_fails_the_pull_and_frees_blocks(pair, tiny_models):
    """A migration whose source engine is gone: decode fails the request (no hang), frees its blocks."""
    from engine.llm import LLM
    _, decode, _ = pair
    source = LLM(str(tiny_models["qwen3"]), device="cpu", dtype="float32", role="prefill",
                 kv_cache_memory_bytes=32 << 20, **OPTS).engine
    out = prefill_stage(source, "d", [5, 6, 7, 8, 9, 10, 11], SamplingParams(temperature=0.0, max_tokens=5))
    source.handoff.close()  # its DLSlime endpoint goes away, as when the process dies
    decode.add_request(EngineCoreRequest(request_id="d", prompt_token_ids=[], params=SamplingParams(),
                                         kv_transfer_params={"migration": out.kv_transfer_params["migration"]}))
    outs = run_until(decode, lambda o: any(x.request_id == "d" and x.finished for x in o), limit=10 ** 7)
    err = next(x for x in outs if x.request_id == "d")
    assert err.finish_reason == "error" and err.error
    assert not decode.has_unfinished()


def test_disaggregated_logprobs_equal_hybrid(pair):
    """The first token's logprobs travel in the migration: the decode engine returns one entry per token."""
    prefill, decode, hybrid = pair
    prompt, params = [9, 8, 7, 6, 5, 4], SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True, logprobs=2)
    expected = hybrid.generate([prompt], params)[0].outputs[0]
    out = prefill_stage(prefill, "lp", prompt, params)
    decode.add_request(EngineCoreRequest(request_id="lp", prompt_token_ids=[], params=SamplingParams(),
                                         kv_transfer_params={"migration": out.kv_transfer_params["migration"]}))
    outs = run_until(decode, lambda o: any(x.request_id == "lp" and x.finished for x in o))
    tokens = [t for x in outs for t in x.new_token_ids]
    rows = [lp for x in outs for lp in (x.new_logprobs or [])]
    assert tokens == expected.token_ids and len(rows) == len(tokens)
    for token, row, ref in zip(tokens, rows, expected.logprobs):
        assert abs(row.logprob - ref[token].logprob) < 1e-5 and len(row.top_ids) == 2
    prefill.free_parked([out.kv_transfer_params["seq_id"]])


@pytest.mark.parametrize("prefill_dp,decode_dp", [(2, 1), (1, 2), (2, 2)])
def test_data_parallel_engines_hand_off(prefill_dp, decode_dp, tiny_models, llm_cache):
    """The migration names the prefill DP group that holds the KV; the decode engine pulls it into one of its
    own groups (by load). Any pairing of DP sizes gives the hybrid tokens, and every group's pool is full
    afterwards (tests/support/models.py)."""
    path = tiny_models["qwen3"]
    prefill = llm_cache.get(path, role="prefill", data_parallel_size=prefill_dp, **OPTS).engine
    decode = llm_cache.get(path, role="decode", data_parallel_size=decode_dp, **OPTS).engine
    hybrid = llm_cache.get(path, **OPTS)
    cs = cases()
    expected = [o.outputs[0].token_ids for o in hybrid.generate([p for _, p, _ in cs], [s for _, _, s in cs])]
    migrations, groups = [], set()
    for rid, prompt, params in cs:
        kv = prefill_stage(prefill, rid, prompt, params).kv_transfer_params
        groups.add(mig.decode(kv["migration"]).dp_rank)
        migrations.append((rid, kv["migration"], kv["seq_id"], kv["first_token"]))
    # parked KV keeps its blocks, so the prefill engine's next request goes to the emptier group
    assert groups == set(range(prefill_dp))
    placed = []
    real_admit = decode.handoff.admit
    decode.handoff.admit = lambda seq, m: (placed.append(seq.dp_rank), real_admit(seq, m))
    try:
        tokens, finals = decode_stage(decode, [(rid, m) for rid, m, _, _ in migrations])
    finally:
        del decode.handoff.admit
    assert set(placed) == set(range(decode_dp))  # the decode engine spread them over its groups
    assert prefill.free_parked([seq_id for _, _, seq_id, _ in migrations]) == len(cs)
    for (rid, _, _, first), want in zip(migrations, expected):
        assert [first] + tokens[rid][1:] == want and tokens[rid][0] == first
