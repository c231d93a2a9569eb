"""Concurrency and aborts on the real server: 64 concurrent streams complete with the offline
engine's outputs while /health stays fast; a client that goes away frees its KV at once."""
from __future__ import annotations

import asyncio
import json
import socket
import time

import aiohttp

from engine.sampling_params import SamplingParams

NUM_STREAMS = 64
MAX_TOKENS = 16


async def _stream(session: aiohttp.ClientSession, url: str, model: str, prompt: str) -> tuple[str, str]:
    body = {"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True,
            "ignore_eos": True}
    text, reason = [], None
    async with session.post(url + "/v1/completions", json=body) as resp:
        assert resp.status == 200, await resp.text()
        async for line in resp.content:
            line = line.strip()
            if not line or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[len(b"data: "):])
            assert "error" not in chunk, chunk
            text.append(chunk["choices"][0]["text"])
            reason = chunk["choices"][0]["finish_reason"] or reason
    return "".join(text), reason


async def _watch_health(session: aiohttp.ClientSession, url: str, stop: asyncio.Event, latencies: list[float]):
    while not stop.is_set():
        t0 = time.monotonic()
        async with session.get(url + "/health", timeout=aiohttp.ClientTimeout(total=5)) as resp:
            assert resp.status == 200
        latencies.append(time.monotonic() - t0)
        await asyncio.sleep(0.02)


def test_64_concurrent_streams_complete_correctly_while_health_stays_fast(tiny_server, tiny_llama, reference_llm):
    prompts = [f"Request {i}: once upon a time there was" for i in range(NUM_STREAMS)]
    expected = [o.outputs[0].text for o in reference_llm.generate(
        prompts, SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True))]

    async def run():
        latencies: list[float] = []
        stop = asyncio.Event()
        async with aiohttp.ClientSession() as health_session, aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0)) as session:
            watcher = asyncio.create_task(_watch_health(health_session, tiny_server.url, stop, latencies))
            results = await asyncio.gather(*(_stream(session, tiny_server.url, str(tiny_llama), p) for p in prompts))
            stop.set()
            await watcher
        return results, latencies

    results, latencies = asyncio.run(run())
    assert [text for text, _ in results] == expected
    assert all(reason == "length" for _, reason in results)
    assert len(set(expected)) > 1  # distinct prompts, distinct answers
    assert latencies and max(latencies) < 1.0, max(latencies)
    tiny_server.wait_kv_free()

    status, raw, headers = tiny_server.request("GET", "/metrics")
    text = raw.decode()
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    count = next(line for line in text.splitlines() if line.startswith("slipstream:time_to_first_token_seconds_count"))
    assert int(float(count.split()[-1])) >= NUM_STREAMS
    for name in ("num_requests_waiting", "num_requests_running", "kv_cache_usage_perc", "prefix_cache_hit_rate",
                 "inter_token_latency_seconds_bucket", "e2e_request_latency_seconds_sum",
                 "generation_tokens_per_second", "request_queue_time_seconds_count", "request_prefill_time_seconds_sum",
                 "request_decode_time_seconds_bucket", "request_prompt_tokens_count", "request_generation_tokens_sum"):
        assert f"slipstream:{name}" in text
    decode = next(line for line in text.splitlines() if line.startswith("slipstream:request_decode_time_seconds_count"))
    assert int(float(decode.split()[-1])) >= NUM_STREAMS


def _generated(server) -> int:
    return server.engine_info()["stats"]["num_generated_tokens"]


def test_client_closing_a_stream_frees_its_blocks(tiny_server, tiny_llama):
    before = _generated(tiny_server)
    body = json.dumps({"model": str(tiny_llama), "prompt": "Prefill computes the prompt", "max_tokens": 400,
                       "temperature": 0, "stream": True, "ignore_eos": True}).encode()
    with socket.create_connection(("127.0.0.1", tiny_server.port), timeout=30) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        received = b""
        while received.count(b"data: ") < 3:  # a few tokens in, then the client goes away
            received += sock.recv(65536)
    info = tiny_server.wait_kv_free()
    assert info["stats"]["num_generated_tokens"] - before < 400


def test_client_dropping_a_non_streaming_request_frees_its_blocks(tiny_server, tiny_llama):
    before = _generated(tiny_server)
    body = json.dumps({"model": str(tiny_llama), "prompt": "Decode extends it", "max_tokens": 480,
                       "temperature": 0, "ignore_eos": True}).encode()
    with socket.create_connection(("127.0.0.1", tiny_server.port), timeout=30) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        deadline = time.monotonic() + 10
        while _generated(tiny_server) == before:  # running in the engine
            assert time.monotonic() < deadline
            time.sleep(0.005)
    info = tiny_server.wait_kv_free()
    assert info["stats"]["num_generated_tokens"] - before < 480


def test_bench_serve_prints_a_table(tiny_server, tmp_path, capsys):
    from engine.bench.serve import main
    out = tmp_path / "bench.json"
    assert main(["--url", tiny_server.url, "--rate", "50", "--num-prompts", "8", "--input-len", "12",
                 "--output-len", "6", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "ttft_ms" in text and "itl_ms" in text and "e2e_ms" in text and "rate=50.0" in text
    summary = json.loads(out.read_text())
    assert summary["completed"] == 8 and summary["ttft_ms"]["p99"] > 0
    assert summary["output_throughput_tok_s"] > 0
    tiny_server.wait_kv_free()
