"""`vllm serve` flags around the routes: --chat-template (file), --response-role, --generation-config,
--allowed-origins (CORS, preflight), --root-path, --ssl-keyfile / --ssl-certfile, --disable-log-requests."""
from __future__ import annotations

import json
import ssl
import subprocess
import sys
import time
import urllib.request

import pytest

from engine.sampling_params import SamplingParams

from tests.support.server import ENGINE_ARGS, REPO, free_port, start_server

TEMPLATE = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}[bot] "


@pytest.fixture(scope="module")
def flagged(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("flags")
    (root / "template.jinja").write_text(TEMPLATE)
    gen = root / "gen"
    gen.mkdir()
    (gen / "generation_config.json").write_text(json.dumps({"do_sample": False, "max_new_tokens": 5, "top_k": 3}))
    server = start_server(tiny_llama, root, "--chat-template", str(root / "template.jinja"), "--response-role", "bot",
                          "--generation-config", str(gen), "--allowed-origins", "http://app.example",
                          "--root-path", "/api", "--disable-log-requests", "--metric-names", "vllm")
    yield server
    server.stop()


def test_chat_template_file_and_response_role(flagged, tiny_llama):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(tiny_llama))
    messages = [{"role": "user", "content": "hello"}]
    status, got = flagged.post_json("/tokenize", {"messages": messages})
    assert status == 200 and got["tokens"] == tok.encode("[user] hello\n[bot] ", add_special_tokens=False)
    status, body = flagged.post_json("/v1/chat/completions", {"model": str(tiny_llama), "messages": messages})
    assert status == 200 and body["choices"][0]["message"]["role"] == "bot", body


def test_generation_config_defaults_apply_unless_the_request_sets_them(flagged, tiny_llama, reference_llm):
    status, body = flagged.post_json("/v1/completions", {"model": str(tiny_llama), "prompt": "The capital of",
                                                         "max_tokens": None})
    want = reference_llm.generate(["The capital of"], SamplingParams(temperature=0, max_tokens=5))[0].outputs[0]
    assert status == 200 and body["choices"][0]["text"] == want.text and body["usage"]["completion_tokens"] == 5
    status, body = flagged.post_json("/v1/completions", {"model": str(tiny_llama), "prompt": "The capital of",
                                                         "max_tokens": 3, "temperature": 1.0, "seed": 1})
    want = reference_llm.generate(["The capital of"], SamplingParams(temperature=1.0, seed=1, max_tokens=3,
                                                                    top_k=3))[0].outputs[0]
    assert body["choices"][0]["text"] == want.text  # the request's temperature, the checkpoint's top_k


def test_cors_preflight_and_headers(flagged, tiny_llama):
    status, _, headers = flagged.request("OPTIONS", "/v1/chat/completions", headers={
        "Origin": "http://app.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})
    assert status == 204 and headers["Access-Control-Allow-Origin"] == "http://app.example"
    assert "POST" in headers["Access-Control-Allow-Methods"]
    assert headers["Access-Control-Allow-Headers"] == "authorization, content-type"
    status, _, headers = flagged.request("POST", "/v1/completions", {"model": str(tiny_llama), "prompt": "hi",
                                                                     "max_tokens": 2, "stream": True},
                                         headers={"Origin": "http://app.example"})
    assert status == 200 and headers["Access-Control-Allow-Origin"] == "http://app.example"
    status, _, headers = flagged.request("GET", "/v1/models", headers={"Origin": "http://evil.example"})
    assert status == 200 and "Access-Control-Allow-Origin" not in headers
    status, _, _ = flagged.request("OPTIONS", "/v1/models", headers={"Origin": "http://evil.example",
                                                                     "Access-Control-Request-Method": "GET"})
    assert status == 403


def test_root_path_serves_with_and_without_the_prefix(flagged):
    for path in ("/v1/models", "/api/v1/models", "/api/health"):
        status, _ = flagged.get_json(path)
        assert status == 200, path
    assert flagged.get_json("/other/v1/models")[0] == 404


def test_vllm_metric_names(flagged, tiny_llama):
    flagged.post_json("/v1/completions", {"model": str(tiny_llama), "prompt": "hi", "max_tokens": 3})
    text = flagged.request("GET", "/metrics")[1].decode()
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm:request_success_total",
                 "vllm:time_to_first_token_seconds_bucket", "vllm:inter_token_latency_seconds_bucket",
                 "vllm:e2e_request_latency_seconds_count", "vllm:request_queue_time_seconds_count",
                 "vllm:request_prefill_time_seconds_count", "vllm:request_decode_time_seconds_count",
                 "vllm:request_prompt_tokens_count", "vllm:request_generation_tokens_count"):
        assert name in text, name
    assert "slipstream:" not in text


def test_https_with_a_certificate(tiny_llama, tmp_path):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=127.0.0.1"], check=True, capture_output=True)
    port = free_port()
    log = tmp_path / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "engine.cli.main", "serve", str(tiny_llama), "--port", str(port),
                                 *ENGINE_ARGS, "--ssl-keyfile", str(key), "--ssl-certfile", str(cert)],
                                cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    ctx = ssl.create_default_context(cafile=str(cert))
    ctx.check_hostname = False
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"https://127.0.0.1:{port}/health", context=ctx, timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.1)
        with urllib.request.urlopen(f"https://127.0.0.1:{port}/v1/models", context=ctx, timeout=5) as r:
            assert json.loads(r.read())["data"][0]["id"] == str(tiny_llama)
    finally:
        proc.terminate()
        proc.wait(30)
