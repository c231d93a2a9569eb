"""Prefill/decode disaggregation end to end with real processes: Redis + dlslime-ctrl + prefill and
decode `slipstream serve` engines + `slipstream router`. Outputs equal one hybrid engine's."""
from __future__ import annotations

import json
import random
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from engine.sampling_params import SamplingParams

pytest.importorskip("dlslime", reason="dlslime (and libibverbs1) is needed for KV transfer")


def post(url: str, body: dict, timeout: float = 60.0) -> tuple[int, dict | str]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw, status, ctype = r.read().decode(), r.status, r.headers.get("Content-Type", "")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())
    if ctype.startswith("text/event-stream"):
        return status, raw
    return status, json.loads(raw)


def stream_text(raw: str) -> tuple[str, str | None]:
    text, reason = "", None
    for line in raw.splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            event = json.loads(line[6:])
            assert "error" not in event, event
            for ch in event["choices"]:
                text += ch.get("text", "")
                reason = ch.get("finish_reason") or reason
    assert raw.rstrip().endswith("data: [DONE]")
    return text, reason


def workload(n: int, seed: int = 0):
    rng = random.Random(seed)
    reqs = []
    for i in range(n):
        prompt = [rng.randrange(3, 300) for _ in range(rng.randrange(2, 60))]
        body = {"model": "x", "prompt": prompt, "max_tokens": rng.randrange(2, 14), "stream": i % 2 == 0}
        if i % 3 == 0:
            body.update(temperature=0.0)
        else:
            body.update(temperature=0.8, top_p=0.95, seed=1000 + i)
        reqs.append(body)
    return reqs


def expected_texts(llm, reqs) -> list[str]:
    params = [SamplingParams(max_tokens=b["max_tokens"], temperature=b["temperature"], top_p=b.get("top_p", 1.0),
                             seed=b.get("seed")) for b in reqs]
    return [o.outputs[0].text for o in llm.generate([b["prompt"] for b in reqs], params)]


def run_all(url: str, reqs) -> list[str]:
    def one(body):
        status, answer = post(url + "/v1/completions", body)
        assert status == 200, answer
        if body["stream"]:
            return stream_text(answer)[0]
        return answer["choices"][0]["text"]
    with ThreadPoolExecutor(32) as pool:
        return list(pool.map(one, reqs))


def url(server, path: str) -> str:
    return f"http://127.0.0.1:{server.port}{path}"


def model_name(server) -> str:
    return server.get_json("/v1/models")[1]["data"][0]["id"]


def assert_pools_full(cluster) -> None:
    for e in cluster.engines:
        info = e.wait_kv_free(timeout=15)
        assert info["stats"]["num_free_blocks"] == info["stats"]["num_blocks"], (e.role, info)


@pytest.fixture(scope="module")
def one_p_one_d(tiny_llama, shared_ctrl_plane, tmp_path_factory):
    """A 1P1D cluster and its router for the tests that leave it as they found it (every pool full again): one
    start-up for them all. (cluster, prefill, decode, router)."""
    from tests.support.cluster import Cluster
    c = Cluster(tiny_llama, shared_ctrl_plane, tmp_path_factory.mktemp("pd"))
    try:
        prefill, decode = c.engines_of("prefill", "decode")
        router = c.start_router()
        router.wait_engines(2)
        yield c, prefill, decode, router
    finally:
        c.stop()


def test_1p1d_then_2p1d_equal_hybrid(cluster, reference_llm):
    prefill, decode = cluster.engines_of("prefill", "decode")
    router = cluster.start_router()
    router.wait_engines(2)
    reqs = workload(32)
    for b in reqs:
        b["model"] = model_name(prefill)
    expected = expected_texts(reference_llm, reqs)
    assert run_all(router.url, reqs) == expected
    assert_pools_full(cluster)

    second = cluster.engine("prefill")  # a second prefill engine joins the same scope
    router.wait_engines(3)
    reqs = workload(32, seed=1)
    for b in reqs:
        b["model"] = model_name(prefill)
    assert run_all(router.url, reqs) == expected_texts(reference_llm, reqs)
    assert second.engine_info()["stats"]["num_generated_tokens"] > 0  # the router used both prefill engines
    assert_pools_full(cluster)


def test_1p1d_with_tensor_parallel_2_equals_hybrid(cluster, reference_llm):
    """Both sides at tensor_parallel_size 2: each rank's KV shard moves rank to rank (its own DLSlime
    endpoint, advertised in the migration). A decode engine of another size refuses the migration (400)."""
    prefill, decode = cluster.engines_of(("prefill", "--tensor-parallel-size", "2"),
                                         ("decode", "--tensor-parallel-size", "2"))
    router = cluster.start_router()
    router.wait_engines(2)
    reqs = workload(16, seed=2)
    for b in reqs:
        b["model"] = model_name(prefill)
    assert run_all(router.url, reqs) == expected_texts(reference_llm, reqs)
    assert decode.engine_info()["stats"]["kv_transfer_bytes"] > 0
    assert_pools_full(cluster)

    other = cluster.engine("decode")  # one rank
    body = {"model": model_name(prefill), "prompt": [5, 6, 7, 8, 9], "max_tokens": 4, "stream": False,
            "kv_transfer_params": {"do_remote_decode": True}}
    status, answer = post(url(prefill, "/v1/completions"), body)
    assert status == 200, answer
    body["kv_transfer_params"] = {"migration": answer["kv_transfer_params"]["migration"]}
    status, err = post(url(other, "/v1/completions"), body)
    assert status == 400 and err["error"]["param"] == "kv_transfer_params", err
    assert "tensor_parallel_size 2" in err["error"]["message"]
    post(url(prefill, "/pd/free"), {"seq_ids": [answer["kv_transfer_params"]["seq_id"]]})
    assert_pools_full(cluster)


def test_prefill_protocol_as_dlrouter_drives_it(one_p_one_d):
    cluster, prefill, decode, _ = one_p_one_d
    model = model_name(prefill)
    before = decode.engine_info()["stats"]
    body = {"model": model, "prompt": [5, 6, 7, 8, 9, 10, 11, 12], "max_tokens": 6, "temperature": 0.7, "stream": False,
            "ignore_eos": True, "kv_transfer_params": {"do_remote_decode": True}}
    status, answer = post(url(prefill, "/v1/completions"), body)
    assert status == 200, answer
    kv = answer["kv_transfer_params"]
    assert set(kv) >= {"migration", "first_token", "seq_id"}
    assert answer["choices"][0]["text"] == "" and answer["choices"][0]["finish_reason"] == "length"
    assert answer["usage"]["completion_tokens"] == 0
    # the decode node gets only the migration, and returns the whole answer including the first token
    d_body = {k: v for k, v in body.items() if k != "kv_transfer_params"}
    d_body["kv_transfer_params"] = {"migration": kv["migration"]}
    status, full = post(url(decode, "/v1/completions"), d_body)
    assert status == 200, full
    assert full["usage"]["completion_tokens"] == 6 and full["choices"][0]["finish_reason"] == "length"
    stats = decode.engine_info()["stats"]  # the pull is counted (and exported on /metrics)
    assert stats["kv_transfers"] == before["kv_transfers"] + 1
    assert stats["kv_transfer_bytes"] > before["kv_transfer_bytes"]
    assert stats["kv_transfers_failed"] == before["kv_transfers_failed"]
    metrics = urllib.request.urlopen(url(decode, "/metrics"), timeout=5).read().decode()
    assert "kv_transfer_gbps" in metrics and "kv_transfers_total" in metrics
    # /pd/free is idempotent and accepts unknown ids
    for ids in ([kv["seq_id"]], [kv["seq_id"]], [123456, 7]):
        status, freed = post(url(prefill, "/pd/free"), {"seq_ids": ids})
        assert status == 200 and freed["status"] == "ok"
    # a request whose first token ends it: a normal full completion, no migration
    one = {**body, "max_tokens": 1}
    status, answer = post(url(prefill, "/v1/completions"), one)
    assert status == 200 and "kv_transfer_params" not in answer and answer["usage"]["completion_tokens"] == 1
    assert_pools_full(cluster)


def test_forged_or_corrupted_migration_is_400(one_p_one_d):
    cluster, prefill, decode, _ = one_p_one_d
    model = model_name(prefill)
    body = {"model": model, "prompt": [5, 6, 7, 8, 9], "max_tokens": 4, "temperature": 0.0,
            "kv_transfer_params": {"do_remote_decode": True}}
    kv = post(url(prefill, "/v1/completions"), body)[1]["kv_transfer_params"]
    good = kv["migration"]
    for bad in ["", "%%%", good[:-10], good[:30] + ("Q" if good[30] != "Q" else "R") + good[31:], 17]:
        status, answer = post(url(decode, "/v1/completions"),
                              {"model": model, "prompt": [5, 6, 7, 8, 9], "max_tokens": 4,
                               "kv_transfer_params": {"migration": bad}})
        assert status == 400 and answer["error"]["param"] == "kv_transfer_params", answer
    post(url(prefill, "/pd/free"), {"seq_ids": [kv["seq_id"]]})
    assert_pools_full(cluster)


def test_prefill_dies_before_the_pull(cluster):
    prefill, decode = cluster.engines_of("prefill", "decode")
    model = model_name(prefill)
    body = {"model": model, "prompt": list(range(5, 45)), "max_tokens": 4, "temperature": 0.0,
            "kv_transfer_params": {"do_remote_decode": True}}
    kv = post(url(prefill, "/v1/completions"), body)[1]["kv_transfer_params"]
    prefill.stop(sig=9)
    t0 = time.monotonic()
    status, answer = post(url(decode, "/v1/completions"), {**body, "kv_transfer_params": {"migration": kv["migration"]}})
    assert status == 503 and "transfer" in answer["error"]["message"], answer
    assert time.monotonic() - t0 < 10
    info = decode.wait_kv_free(timeout=10)
    assert info["stats"]["num_free_blocks"] == info["stats"]["num_blocks"]


def test_decode_dies_prefill_reclaims(cluster):
    prefill, decode = cluster.engines_of("prefill", "decode")
    router = cluster.start_router()
    router.wait_engines(2)
    decode.stop(sig=9)
    body = {"model": model_name(prefill), "prompt": list(range(5, 40)), "max_tokens": 8, "temperature": 0.0}
    status, answer = post(router.url + "/v1/completions", body)
    assert status >= 500 and "error" in answer
    # the router frees on failure; the prefill engine's timeout reclaims anything left
    info = prefill.wait_kv_free(timeout=15)
    assert info["stats"]["num_free_blocks"] == info["stats"]["num_blocks"]


def test_bench_pd_prints_its_table(tiny_llama):
    import subprocess
    import sys

    from tests.support.server import ENGINE_ARGS, REPO
    out = subprocess.run([sys.executable, "-m", "engine.cli.main", "bench", "pd", str(tiny_llama), "--rates", "4",
                          "--num-prompts", "4", "--input-len", "16", "--output-len", "4",
                          "--engine-args", " ".join(ENGINE_ARGS)], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "TTFT p50" in out.stdout and "hybrid" in out.stdout and "1P1D" in out.stdout


def test_router_retries_prefill_on_a_dead_engine(cluster, reference_llm):
    p1, p2, _ = cluster.engines_of("prefill", "prefill", "decode")
    router = cluster.start_router()
    router.wait_engines(3)
    p1.stop(sig=9)  # still registered until its key expires: the router meets a dead engine
    reqs = workload(4, seed=2)
    for b in reqs:
        b["model"] = model_name(p2)
    assert run_all(router.url, reqs) == expected_texts(reference_llm, reqs)
    # a request that met it retried elsewhere, or the load poll had found it dead first: either way it is down
    metrics = urllib.request.urlopen(router.url + "/metrics", timeout=5).read().decode()
    assert f'slipstream_router_engine_up{{url="http://127.0.0.1:{p1.port}",role="prefill"}} 0' in metrics
    for e in cluster.engines[1:]:
        e.wait_kv_free(timeout=15)


def test_client_abort_through_the_router_frees_everything(one_p_one_d):
    cluster, prefill, decode, router = one_p_one_d
    body = {"model": model_name(prefill), "prompt": list(range(5, 30)), "max_tokens": 400, "ignore_eos": True,
            "temperature": 0.0, "stream": True}
    req = urllib.request.Request(router.url + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    resp = urllib.request.urlopen(req, timeout=30)
    assert resp.readline().startswith(b"data: ")  # decoding has started
    resp.close()  # the client goes away mid-stream
    assert_pools_full(cluster)


def test_structured_outputs_through_1p1d_equal_hybrid(one_p_one_d, reference_llm):
    """The prefill engine samples the first token under the grammar; the decode engine rebuilds the grammar
    state from the prompt and that token, and the answers equal one hybrid engine's (seeded sampling)."""
    import re
    from engine.structured import StructuredOutputsParams
    cluster, prefill, decode, router = one_p_one_d
    transfers = decode.engine_info()["stats"]["kv_transfers"]
    schema = {"type": "object", "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 999},
                                               "ok": {"type": "boolean"}}, "required": ["id", "ok"],
              "additionalProperties": False}
    cases = [({"structured_outputs": {"json": schema}}, StructuredOutputsParams(json=schema)),
             ({"structured_outputs": {"regex": "[a-z]{3}-[0-9]{2}"}}, StructuredOutputsParams(regex="[a-z]{3}-[0-9]{2}")),
             ({"guided_choice": ["alpha", "beta gamma"]}, StructuredOutputsParams(choice=["alpha", "beta gamma"]))]
    for i, (fields, spec) in enumerate(cases):
        for seed in range(3):
            body = {"model": model_name(prefill), "prompt": "Hello there", "max_tokens": 40, "temperature": 1.0,
                    "seed": seed, "stream": seed == 1, **fields}
            got = run_all(router.url, [body])[0]
            want = reference_llm.generate(["Hello there"], SamplingParams(max_tokens=40, temperature=1.0, seed=seed,
                                                                          structured_outputs=spec))[0].outputs[0].text
            assert got == want, (fields, seed)
            if i == 0:
                assert set(json.loads(got)) == {"id", "ok"}
            elif i == 1:
                assert re.fullmatch("[a-z]{3}-[0-9]{2}", got), got
            else:
                assert got in ("alpha", "beta gamma")
    assert decode.engine_info()["stats"]["kv_transfers"] - transfers >= 9
    assert_pools_full(cluster)
