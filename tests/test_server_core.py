"""The engine-core ZMQ server, in process: every frame is validated (undecodable, malformed, oversized,
invalid values) and answered with a typed error or dropped, never crashing the loop; a client that
vanishes gets its requests aborted and their KV freed."""
from __future__ import annotations

import threading
import time

import msgspec
import pytest
import zmq

from engine.config import EngineConfig
from engine.core import EngineCore
from engine.sampling_params import SamplingParams
from engine.server.config import CoreServerConfig
from engine.server.core_server import EngineCoreServer
from engine.wire import (AbortRequests, AddRequests, CoreOutbound, EngineCoreOutputs, EngineCoreRequest, EngineInfo,
                         EngineInfoRequest, ErrorReply, RequestsRejected, UtilityCall, UtilityResult)

encode = msgspec.msgpack.Encoder().encode
decode = msgspec.msgpack.Decoder(CoreOutbound).decode


@pytest.fixture(scope="module")
def engine(tiny_llama):
    return EngineCore(EngineConfig(model=str(tiny_llama), device="cpu", dtype="float32", num_kv_blocks=64))


@pytest.fixture
def core(engine):
    """Starts an EngineCoreServer (on a thread) with the given options; returns its address."""
    ctx = zmq.Context()
    running: list[tuple[EngineCoreServer, threading.Thread]] = []

    def start(**options) -> str:
        server = EngineCoreServer(engine, CoreServerConfig(zmq_address="tcp://127.0.0.1:*", **options))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        running.append((server, thread))
        return server.address

    yield start
    for server, thread in running:
        server.stopped = True
        thread.join(10)
    ctx.term()


def dealer(address: str) -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    return sock


def recv(sock: zmq.Socket, timeout: float = 10.0):
    assert sock.poll(int(timeout * 1000)), "no reply from the core"
    return decode(sock.recv())


def info(sock: zmq.Socket, call_id: int = 1) -> EngineInfo:
    sock.send(encode(EngineInfoRequest(call_id=call_id)))
    while True:
        msg = recv(sock)
        if isinstance(msg, EngineInfo) and msg.call_id == call_id:
            return msg


def request(rid: str, prompt_len: int = 8, **params) -> EngineCoreRequest:
    return EngineCoreRequest(request_id=rid, prompt_token_ids=list(range(1, prompt_len + 1)),
                             params=SamplingParams(**params))


@pytest.mark.parametrize("frames,needle", [
    ([b"\xc1\xff garbage"], "bad message"),
    ([encode({"type": "teleport", "call_id": 1})], "bad message"),
    ([encode({"type": "add", "requests": [{"request_id": "x", "prompt_token_ids": [1, 2],
                                           "params": {"temperature": -1}}]})], "temperature"),
    ([encode({"type": "add", "requests": "nope"})], "bad message"),
    ([b"one", b"two"], "one frame"),
])
def test_bad_frames_get_typed_errors(core, frames, needle):
    sock = dealer(core())
    sock.send_multipart(frames)
    reply = recv(sock)
    assert isinstance(reply, ErrorReply) and reply.error.status == 400 and needle in reply.error.message
    assert info(sock).stats.num_free_blocks == info(sock).stats.num_blocks  # still serving


def test_oversized_frame_is_dropped_and_the_core_keeps_serving(core):
    address = core(max_frame_bytes=4096)
    big = dealer(address)
    big.send(encode(AddRequests(requests=[request("big", prompt_len=5000)])))
    assert not big.poll(300)
    assert info(dealer(address)).stats.num_waiting == 0


def test_rejected_requests_carry_typed_errors(core, engine):
    sock = dealer(core(max_waiting_requests=1))
    too_long = request("long", prompt_len=engine.max_model_len)
    sock.send(encode(AddRequests(requests=[too_long, request("a", max_tokens=2), request("b", max_tokens=2)])))
    rejected = {}
    while len(rejected) < 2:
        msg = recv(sock)
        if isinstance(msg, RequestsRejected):
            rejected.update({r.request_id: r.error for r in msg.rejected})
    assert rejected["long"].status == 400 and rejected["long"].param == "prompt"
    assert rejected["b"].status == 429 and rejected["b"].type == "rate_limit_error"


def test_utility_calls(core):
    sock = dealer(core())
    sock.send(encode(UtilityCall(call_id=5, method="stats")))
    reply = recv(sock)
    assert isinstance(reply, UtilityResult) and reply.call_id == 5 and reply.result["num_blocks"] == 64
    sock.send(encode(UtilityCall(call_id=6, method="rm -rf")))
    reply = recv(sock)
    assert reply.call_id == 6 and reply.error.status == 400


def test_abort_frees_blocks_at_once(core):
    sock = dealer(core())
    before = info(sock).stats.num_generated_tokens
    sock.send(encode(AddRequests(requests=[request("r", max_tokens=400, ignore_eos=True)])))
    assert isinstance(recv(sock), EngineCoreOutputs)
    sock.send(encode(AbortRequests(request_ids=["r", "unknown-id"])))
    stats = info(sock).stats  # handled in order: the abort is done when the info comes back
    assert stats.num_free_blocks == stats.num_blocks and stats.num_running == 0
    assert stats.num_generated_tokens - before < 400


def test_vanished_client_has_its_requests_aborted(core):
    address = core()
    sock = dealer(address)
    before = info(sock).stats.num_generated_tokens
    sock.send(encode(AddRequests(requests=[request("orphan", max_tokens=400, ignore_eos=True)])))
    assert isinstance(recv(sock), EngineCoreOutputs)
    sock.close(linger=0)
    probe = dealer(address)
    deadline = time.monotonic() + 10
    while (stats := info(probe).stats).num_running:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert stats.num_free_blocks == stats.num_blocks
    assert stats.num_generated_tokens - before < 400
