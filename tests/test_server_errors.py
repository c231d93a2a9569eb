"""Bad inputs: each gets an OpenAI-shaped JSON error with the right status and type, and the server
keeps serving (a good request right after each one succeeds)."""
from __future__ import annotations

import json

import pytest

MODEL = object()  # replaced by the served model name
CHAT = "/v1/chat/completions"
COMPL = "/v1/completions"
BAD = "invalid_request_error"


def chat(**fields):
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **fields}


def compl(**fields):
    return {"model": MODEL, "prompt": "hello", "max_tokens": 4, **fields}


LONG_PROMPT = "hello world " * 400  # > 512 tokens, the tiny model's context

# (case id, path, body (dict, or raw bytes), expected status, expected error type, expected param or None)
CASES = [
    ("malformed-json", CHAT, b'{"model": "x", "messages": [', 400, BAD, None),
    ("not-an-object", CHAT, b'[1, 2, 3]', 400, BAD, None),
    ("empty-body", COMPL, b"", 400, BAD, None),
    ("missing-model", CHAT, {"messages": [{"role": "user", "content": "hi"}]}, 400, BAD, "model"),
    ("unknown-model", CHAT, {**chat(), "model": "gpt-17"}, 404, "not_found_error", "model"),
    ("prompt-too-long", COMPL, compl(prompt=LONG_PROMPT), 400, BAD, "prompt"),
    ("max-tokens-zero", COMPL, compl(max_tokens=0), 400, BAD, "max_tokens"),
    ("max-tokens-negative", CHAT, chat(max_tokens=-5), 400, BAD, "max_tokens"),
    ("max-tokens-absurd", COMPL, compl(max_tokens=10 ** 12), 400, BAD, "max_tokens"),
    ("max-tokens-over-context", COMPL, compl(max_tokens=600), 400, BAD, "max_tokens"),
    ("max-tokens-float", COMPL, compl(max_tokens=3.5), 400, BAD, "max_tokens"),
    ("n-zero", COMPL, compl(n=0), 400, BAD, "n"),
    ("n-huge", CHAT, chat(n=100000), 400, BAD, "n"),
    ("temperature-negative", CHAT, chat(temperature=-1), 400, BAD, "temperature"),
    ("temperature-string", CHAT, chat(temperature="hot"), 400, BAD, "temperature"),
    ("top-p-two", COMPL, compl(top_p=2), 400, BAD, "top_p"),
    ("top-k-bad", COMPL, compl(top_k=-7), 400, BAD, "top_k"),
    ("presence-penalty-range", CHAT, chat(presence_penalty=5), 400, BAD, "presence_penalty"),
    ("logprobs-100", COMPL, compl(logprobs=100), 400, BAD, "logprobs"),
    ("top-logprobs-100", CHAT, chat(logprobs=True, top_logprobs=100), 400, BAD, "top_logprobs"),
    ("top-logprobs-without-logprobs", CHAT, chat(top_logprobs=2), 400, BAD, "top_logprobs"),
    ("empty-prompt", COMPL, compl(prompt=""), 400, BAD, "prompt"),
    ("empty-prompt-list", COMPL, compl(prompt=[]), 400, BAD, "prompt"),
    ("prompt-token-out-of-vocab", COMPL, compl(prompt=[1, 2, 10 ** 6]), 400, BAD, "prompt"),
    ("prompt-wrong-type", COMPL, compl(prompt={"text": "x"}), 400, BAD, "prompt"),
    ("empty-messages", CHAT, chat(messages=[]), 400, BAD, "messages"),
    ("bad-role", CHAT, chat(messages=[{"role": "wizard", "content": "hi"}]), 400, BAD, "messages[0].role"),
    ("content-wrong-type", CHAT, chat(messages=[{"role": "user", "content": 42}]), 400, BAD,
     "messages[0].content"),
    ("image-content", CHAT, chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]),
     400, BAD, "messages[0].content[0]"),
    ("stream-not-bool", CHAT, chat(stream="yes"), 400, BAD, "stream"),
    ("stream-options-without-stream", CHAT, chat(stream_options={"include_usage": True}), 400, BAD,
     "stream_options"),
    ("stop-10000-strings", COMPL, compl(stop=[f"s{i}" for i in range(10000)]), 400, BAD, "stop"),
    ("stop-huge-string", COMPL, compl(stop="x" * 100000), 400, BAD, "stop"),
    ("stop-wrong-type", COMPL, compl(stop=5), 400, BAD, "stop"),
    ("seed-too-big", COMPL, compl(seed=2 ** 70), 400, BAD, "seed"),
    ("logit-bias-out-of-vocab", COMPL, compl(logit_bias={"999999": 10}), 400, BAD, "logit_bias"),
    ("logit-bias-too-big", COMPL, compl(logit_bias={"5": 1000}), 400, BAD, "logit_bias"),
    ("tool-bad-name", CHAT, chat(tools=[{"type": "function", "function": {"name": "f g"}}]), 400, BAD,
     "tools[0].function.name"),
    ("tools-auto-without-parser", CHAT, chat(tools=[{"type": "function", "function": {"name": "f"}}]), 400, BAD,
     "tool_choice"),
    ("bad-json-schema", CHAT, chat(response_format={"type": "json_schema", "json_schema": {"schema": {"type": 1}}}),
     400, BAD, "structured_outputs.json"),
    ("prompt-logprobs-100", COMPL, compl(prompt_logprobs=100), 400, BAD, "prompt_logprobs"),
    ("body-too-large", COMPL, compl(prompt="x" * (17 << 20)), 413, BAD, None),
]


@pytest.mark.parametrize("path,body,status,kind,param", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_gets_a_typed_error_and_the_server_keeps_serving(tiny_server, tiny_llama, path, body, status,
                                                                    kind, param):
    if isinstance(body, dict):
        body = {k: (str(tiny_llama) if v is MODEL else v) for k, v in body.items()}
    got_status, raw, headers = tiny_server.request("POST", path, body)
    assert headers["Content-Type"].startswith("application/json")
    error = json.loads(raw)["error"]
    assert (got_status, error["type"]) == (status, kind), error
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param, error
    ok_status, ok = tiny_server.post_json(COMPL, {"model": str(tiny_llama), "prompt": "hi", "max_tokens": 2})
    assert ok_status == 200 and ok["choices"][0]["finish_reason"] in ("length", "stop"), ok


def test_unknown_route_and_method_are_json_errors(tiny_server):
    status, body = tiny_server.get_json("/v1/nope")
    assert status == 404 and body["error"]["type"] == "not_found_error"
    status, body = tiny_server.get_json("/v1/completions")
    assert status == 405 and body["error"]["type"] == BAD


def test_errors_leave_no_kv_behind(tiny_server):
    tiny_server.wait_kv_free()
