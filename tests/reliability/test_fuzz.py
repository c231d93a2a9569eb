"""Property-based fuzzing (hypothesis): the migration decoder, the engine core's ZMQ frames, and every HTTP
endpoint of a real engine front and a real router. Every case gets a typed error (or a valid answer) and
nothing crashes, hangs or stops serving. Case counts are printed (`pytest -s`) and asserted."""
from __future__ import annotations

import base64
import json
import threading
import zlib

import msgspec
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.errors import InvalidRequestError
from engine.pd import migration as mig
from engine.sampling_params import SamplingParams
from tests.reliability.load import request

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


def values(ints):
    return st.recursive(st.none() | st.booleans() | ints | st.floats(allow_nan=False) | st.text(max_size=20),
                        lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                        max_leaves=12)


json_values = values(st.integers(-2 ** 70, 2 ** 70))  # JSON has big integers
pack_values = values(st.integers(-2 ** 63, 2 ** 63 - 1))  # msgpack has 64-bit ones


# ---- the migration decoder ----------------------------------------------------------------------------
def _wrap(body: bytes) -> str:
    return base64.b64encode(zlib.crc32(body).to_bytes(4, "big") + body).decode()


GOOD = mig.Migration(version=mig.VERSION, engine_id="e" * 32, seq_id=1, transfer=[{"host": "127.0.0.1"}],
                     kv_spec=mig.KVCacheSpec(2, 2, 32, 4, "float32"), block_ids=[[0, 1]],
                     prompt_token_ids=[5, 6, 7, 8, 9], first_token=3, params=SamplingParams(), sampling_seed=1)


@FUZZ
@given(st.one_of(
    st.text(max_size=200),                                             # anything a client may send
    st.binary(max_size=300).map(lambda b: base64.b64encode(b).decode()),  # base64 that is not ours
    st.binary(max_size=300).map(_wrap),                                # right checksum, random payload
    pack_values.map(lambda v: _wrap(msgspec.msgpack.encode(v))),       # right checksum, wrong shape
    st.integers(0, 400).map(lambda n: mig.encode(GOOD)[:n]),           # truncated
    st.dictionaries(st.sampled_from(sorted(msgspec.structs.asdict(GOOD))), pack_values).map(
        lambda d: _wrap(msgspec.msgpack.encode({**msgspec.to_builtins(GOOD), **d}))),  # a field of a wrong type
))
def test_migration_decoder_answers_only_typed_errors(text):
    try:
        m = mig.decode(text)
    except InvalidRequestError as e:
        assert e.param == "kv_transfer_params"
    else:  # accepted: it must be a well-formed descriptor
        assert m.version == mig.VERSION and all(len(ids) == len(m.block_ids[0]) for ids in m.block_ids)


# ---- the engine core's ZMQ frames -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def core_address(tiny_llama):
    from engine.config import EngineConfig
    from engine.core import EngineCore
    from engine.server.config import CoreServerConfig
    from engine.server.core_server import EngineCoreServer
    engine = EngineCore(EngineConfig(model=str(tiny_llama), device="cpu", dtype="float32", num_kv_blocks=64))
    server = EngineCoreServer(engine, CoreServerConfig(zmq_address="tcp://127.0.0.1:*", max_frame_bytes=1 << 16))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    yield server.address, engine
    server.stopped = True
    thread.join(10)


def _frames():
    from engine.wire import AddRequests, EngineCoreRequest, EngineInfoRequest, UtilityCall
    valid = [msgspec.msgpack.encode(m) for m in (
        EngineInfoRequest(call_id=7),
        UtilityCall(call_id=8, method="free_parked", args=[[1, 2]]),
        AddRequests(requests=[EngineCoreRequest(request_id="r", prompt_token_ids=[5, 6],
                                                params=SamplingParams(max_tokens=2))]))]
    return st.one_of(
        st.binary(max_size=400),
        st.sampled_from(valid).flatmap(lambda v: st.integers(0, len(v)).map(lambda n: v[:n])),  # truncated
        pack_values.map(msgspec.msgpack.encode),
        st.dictionaries(st.just("type"), st.sampled_from(["add", "abort", "info", "call", "x"])).flatmap(
            lambda d: st.dictionaries(st.text(max_size=12), pack_values, max_size=4).map(
                lambda extra: msgspec.msgpack.encode({**extra, **d}))),
        st.integers(1 << 16, 1 << 17).map(lambda n: b"\x00" * n),  # over max_frame_bytes: the peer is dropped
    )


def test_core_server_survives_random_frames(core_address):
    from engine.wire import CoreOutbound, EngineInfo, EngineInfoRequest
    address, engine = core_address
    decoder = msgspec.msgpack.Decoder(CoreOutbound)
    cases = []

    @FUZZ
    @given(_frames())
    def one(frame):
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(address)
        try:
            sock.send(frame)
            if len(frame) >= 1 << 16:  # over the limit: the core drops that peer; ask on a new connection
                sock.close()
                sock = zmq.Context.instance().socket(zmq.DEALER)
                sock.setsockopt(zmq.LINGER, 0)
                sock.connect(address)
            sock.send(msgspec.msgpack.encode(EngineInfoRequest(call_id=99)))  # the core still answers
            while True:  # replies to the fuzzed frame (if any) come first, and are well-formed
                assert sock.poll(10_000), "the core stopped answering"
                if isinstance(decoder.decode(sock.recv()), EngineInfo):
                    break
        finally:
            sock.close()
        cases.append(len(frame))

    one()
    for _ in range(200):  # requests the fuzz added finish on their own
        if not engine.has_unfinished():
            break
        threading.Event().wait(0.05)
    print(f"\nZMQ fuzz: {len(cases)} frames")
    assert len(cases) >= 300 and not engine.has_unfinished()


# ---- every HTTP endpoint -----------------------------------------------------------------------------
FIELDS = ["model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
          "n", "stream", "stop", "seed", "logprobs", "top_logprobs", "min_tokens", "ignore_eos", "stream_options",
          "kv_transfer_params", "presence_penalty", "repetition_penalty", "stop_token_ids", "echo", "x-unknown"]
small = st.one_of(st.integers(-3, 12), st.floats(-2, 3, allow_nan=False), st.booleans(), st.none(),
                  st.text(max_size=12), st.lists(st.integers(-5, 500), max_size=6), json_values)
bodies = st.one_of(
    st.fixed_dictionaries({}, optional={f: small for f in FIELDS}),
    st.fixed_dictionaries({"prompt": st.lists(st.integers(0, 300), min_size=1, max_size=8),
                           "max_tokens": st.integers(-2, 6)},
                          optional={f: small for f in FIELDS if f not in ("prompt", "max_tokens")}),
    json_values)
ENDPOINTS = [("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("POST", "/pd/free"),
             ("GET", "/v1/models"), ("GET", "/health"), ("GET", "/engine_info"), ("GET", "/metrics"),
             ("POST", "/nodes/add"), ("GET", "/no/such/route")]
TYPED = {200, 400, 401, 404, 405, 413, 422, 429, 503}


def _fuzz_http(url: str, model: str, counter: list, endpoints=ENDPOINTS, bodies=bodies) -> None:
    import http.client
    from urllib.parse import urlparse
    host = urlparse(url)

    @FUZZ
    @given(st.sampled_from(endpoints), bodies, st.booleans())
    def one(endpoint, body, raw):
        method, path = endpoint
        if isinstance(body, dict) and "model" not in body and path.startswith("/v1/"):
            body["model"] = model
        data = (json.dumps(body).encode() if not raw else json.dumps(body).encode()[:-1]) if method == "POST" else None
        conn = http.client.HTTPConnection(host.hostname, host.port, timeout=60)
        try:
            conn.request(method, path, data, {"Content-Type": "application/json"})
            resp = conn.getresponse()
            payload = resp.read()
            assert resp.status in TYPED, (path, body, resp.status, payload[:300])
            if resp.getheader("Content-Type", "").startswith("application/json"):
                json.loads(payload)
            elif resp.status != 200:
                raise AssertionError(f"{path}: non-JSON error body {payload[:200]!r}")
        finally:
            conn.close()
        counter.append(path)

    one()


def test_engine_http_endpoints_fuzzed(tiny_server, tiny_llama):
    counter: list = []
    _fuzz_http(tiny_server.url, str(tiny_llama), counter)
    print(f"\nHTTP fuzz (engine): {len(counter)} requests")
    assert len(counter) >= 300 and tiny_server.health() == 200
    tiny_server.wait_kv_free()


def test_router_http_endpoints_fuzzed(cluster):
    prefill, _ = cluster.engines_of("prefill", "decode")
    router = cluster.start_router()
    router.wait_engines(2)
    model = prefill.get_json("/v1/models")[1]["data"][0]["id"]
    counter: list = []
    _fuzz_http(router.url, model, counter)
    print(f"\nHTTP fuzz (router): {len(counter)} requests")
    assert len(counter) >= 300
    assert request(router.url + "/v1/completions", {"model": model, "prompt": [5, 6], "max_tokens": 2}).ok
    for e in cluster.engines:
        e.wait_kv_free(timeout=15)


# the encoder role: chat messages with image parts, image lists and lease ids, well-formed and not
urls = st.one_of(st.text(max_size=30), st.sampled_from(["data:image/png;base64,AAAA", "data:,", "http://127.0.0.1:1/x.png",
                                                      "file:///etc/passwd", "data:image/png;base64,@@"]))
image_parts = st.fixed_dictionaries({"type": st.sampled_from(["image_url", "text", "image"])},
                                    optional={"image_url": st.one_of(st.fixed_dictionaries({"url": urls}), small),
                                              "text": small})
ENCODER_FIELDS = {"model": small, "images": st.one_of(st.lists(st.fixed_dictionaries({"url": urls}), max_size=3), small),
                  "messages": st.one_of(st.lists(st.fixed_dictionaries(
                      {"role": st.sampled_from(["user", "system", "x"]),
                       "content": st.one_of(st.lists(image_parts, max_size=3), small)}), max_size=2), small),
                  "lease_ids": st.one_of(st.lists(st.text(max_size=20), max_size=3), small), "x-unknown": small}
encoder_bodies = st.one_of(st.fixed_dictionaries({}, optional=ENCODER_FIELDS), json_values)
ENCODER_ENDPOINTS = [("POST", "/v1/encode"), ("POST", "/v1/encode/free"), ("GET", "/health"), ("GET", "/metrics"),
                     ("GET", "/v1/models"), ("GET", "/encoder_info"), ("GET", "/v1/encode"), ("GET", "/no/such/route")]


def test_encoder_http_endpoints_fuzzed(tiny_qwen3_vl, tmp_path):
    from tests.support.multimodal import EncoderProcess
    encoder = EncoderProcess(tiny_qwen3_vl, tmp_path).wait_healthy()
    try:
        counter: list = []
        _fuzz_http(encoder.url, str(tiny_qwen3_vl), counter, ENCODER_ENDPOINTS, encoder_bodies)
        print(f"\nHTTP fuzz (encoder): {len(counter)} requests")
        assert len(counter) >= 300 and encoder.http.health() == 200
        assert encoder.info()["leases"] == 0  # refused requests hold no embeddings
    finally:
        encoder.stop()
