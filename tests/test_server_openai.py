"""The real server driven by the official `openai` client and by raw DLRouter-shaped HTTP: outputs
equal the offline engine's for the same request (greedy and seeded sampling)."""
from __future__ import annotations

import json
import os

import openai
import pytest

from engine.sampling_params import SamplingParams

from tests.support.server import start_server

PROMPT = "The capital of France is"


@pytest.fixture(scope="module", params=[1, 2], ids=["tp1", "tp2"])
def tiny_server(request, tiny_server, tiny_llama, tmp_path_factory):
    """Every test here runs against one rank and against `--tensor-parallel-size 2` (a worker process)."""
    if request.param == 1:
        yield tiny_server
        return
    server = start_server(tiny_llama, tmp_path_factory.mktemp("server-tp2"), "--tensor-parallel-size", "2")
    assert server.engine_info()["world_size"] == 2
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(tiny_server):
    return openai.OpenAI(base_url=tiny_server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def model(tiny_llama):
    return str(tiny_llama)


def offline(llm, prompt, **params):
    out = llm.generate(prompt, SamplingParams(**params))[0]
    return out.outputs


def chat_ids(llm, messages):
    return llm.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)


def test_models_lists_the_served_name_and_accepts_path_and_basename(tiny_server, client, model):
    assert [m.id for m in client.models.list().data] == [model]
    for name in (model, os.path.basename(model)):
        out = client.completions.create(model=name, prompt=PROMPT, max_tokens=2, temperature=0)
        assert out.model == model and out.choices[0].text is not None


@pytest.mark.parametrize("sampling", [dict(temperature=0), dict(temperature=0.9, seed=1234, top_p=0.9)])
def test_completions_match_offline(client, model, reference_llm, sampling):
    expected = offline(reference_llm, PROMPT, max_tokens=24, ignore_eos=True, **sampling)[0]
    out = client.completions.create(model=model, prompt=PROMPT, max_tokens=24, extra_body={"ignore_eos": True},
                                    **sampling)
    assert out.choices[0].text == expected.text
    assert out.choices[0].finish_reason == "length"
    prompt_len = len(reference_llm.tokenizer.encode(PROMPT))
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (prompt_len, 24)
    assert out.usage.total_tokens == prompt_len + 24

    stream = client.completions.create(model=model, prompt=PROMPT, max_tokens=24, stream=True,
                                       stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
                                       **sampling)
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 24 and not chunks[-1].choices


@pytest.mark.parametrize("sampling", [dict(temperature=0), dict(temperature=0.8, seed=7)])
def test_chat_matches_offline(client, model, reference_llm, sampling):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a capital."}]
    ids = chat_ids(reference_llm, messages)
    expected = offline(reference_llm, {"prompt_token_ids": ids}, max_tokens=20, **sampling)[0]
    out = client.chat.completions.create(model=model, messages=messages, max_tokens=20, **sampling)
    assert out.choices[0].message.content == expected.text
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].finish_reason == expected.finish_reason
    assert out.usage.prompt_tokens == len(ids) and out.usage.completion_tokens == len(expected.token_ids)

    stream = client.chat.completions.create(model=model, messages=messages, max_completion_tokens=20, stream=True,
                                            **sampling)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected.text
    assert chunks[-1].choices[0].finish_reason == expected.finish_reason


def test_n_samples_are_distinct_and_match_offline(client, model, reference_llm):
    expected = offline(reference_llm, PROMPT, n=3, temperature=1.0, seed=99, max_tokens=12, ignore_eos=True)
    out = client.completions.create(model=model, prompt=PROMPT, n=3, temperature=1.0, seed=99, max_tokens=12,
                                    extra_body={"ignore_eos": True})
    texts = [c.text for c in sorted(out.choices, key=lambda c: c.index)]
    assert texts == [e.text for e in expected]
    assert len(set(texts)) == 3
    assert out.usage.completion_tokens == 36


def test_stop_strings_cut_the_text_streaming_and_not(client, model, reference_llm):
    full = offline(reference_llm, PROMPT, temperature=0, max_tokens=30, ignore_eos=True)[0].text
    stop = full[8:11]
    assert stop and stop in full
    expected = full[:full.index(stop)]
    out = client.completions.create(model=model, prompt=PROMPT, max_tokens=30, temperature=0, stop=[stop],
                                    extra_body={"ignore_eos": True})
    assert out.choices[0].text == expected and out.choices[0].finish_reason == "stop"
    stream = client.completions.create(model=model, prompt=PROMPT, max_tokens=30, temperature=0, stop=stop,
                                       stream=True, extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_completion_top_logprobs_always_hold_the_sampled_token(client, model):
    """vLLM's shape: a row's top_logprobs include the sampled token even when it is not among the top N."""
    out = client.completions.create(model=model, prompt=PROMPT, max_tokens=12, temperature=5.0, seed=3, logprobs=1,
                                    extra_body={"ignore_eos": True})
    lp = out.choices[0].logprobs
    assert all(tok in top and top[tok] == v for tok, v, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs))
    assert all(len(top) in (1, 2) for top in lp.top_logprobs) and any(len(top) == 2 for top in lp.top_logprobs)


def test_echo_puts_the_prompt_first(client, model, reference_llm):
    expected = offline(reference_llm, PROMPT, temperature=0, max_tokens=4)[0].text
    out = client.completions.create(model=model, prompt=[PROMPT, [5, 6, 7]], max_tokens=4, temperature=0, echo=True)
    assert out.choices[0].text == PROMPT + expected
    assert out.choices[1].text.startswith(reference_llm.get_tokenizer().decode([5, 6, 7]))
    stream = client.completions.create(model=model, prompt=PROMPT, max_tokens=4, temperature=0, echo=True, stream=True)
    assert "".join(c.choices[0].text for c in stream if c.choices) == PROMPT + expected


def test_prompt_logprobs_and_echo_with_logprobs(client, model, reference_llm):
    """vLLM's prompt_logprobs (None for the first token) equal the offline engine's; echo with logprobs puts the
    prompt's rows first, streamed and not."""
    want = reference_llm.generate([PROMPT], SamplingParams(max_tokens=3, temperature=0, prompt_logprobs=2))[0]
    out = client.completions.create(model=model, prompt=PROMPT, max_tokens=3, temperature=0,
                                    extra_body={"prompt_logprobs": 2})
    got = out.model_dump()["choices"][0]["prompt_logprobs"]
    assert got[0] is None and len(got) == len(want.prompt_token_ids)
    for row, entry, token in zip(got[1:], want.prompt_logprobs[1:], want.prompt_token_ids[1:]):
        assert row[str(token)]["logprob"] == pytest.approx(entry[token].logprob, abs=1e-4)
        assert len(row) in (2, 3)  # the top 2, and the prompt token when it is not among them
    echo = client.completions.create(model=model, prompt=PROMPT, max_tokens=3, temperature=0, logprobs=1, echo=True)
    lp = echo.choices[0].logprobs
    n_prompt = len(want.prompt_token_ids)
    assert lp.token_logprobs[0] is None and len(lp.tokens) == n_prompt + 3
    assert lp.token_logprobs[1:n_prompt] == pytest.approx(
        [e[t].logprob for t, e in zip(want.prompt_token_ids[1:], want.prompt_logprobs[1:])], abs=1e-4)
    assert echo.choices[0].text.startswith(PROMPT) and lp.text_offset[n_prompt] == len(PROMPT)
    chunks = list(client.completions.create(model=model, prompt=PROMPT, max_tokens=3, temperature=0, logprobs=1,
                                            echo=True, stream=True))
    tokens = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    assert tokens == lp.tokens and "".join(c.choices[0].text for c in chunks if c.choices) == echo.choices[0].text


def test_logprobs_shapes_and_values(client, model, reference_llm):
    expected = offline(reference_llm, PROMPT, temperature=0, max_tokens=5, logprobs=3, ignore_eos=True)[0]
    out = client.completions.create(model=model, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=3,
                                    extra_body={"ignore_eos": True})
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    want = [entry[t].logprob for t, entry in zip(expected.token_ids, expected.logprobs)]
    assert lp.token_logprobs == pytest.approx(want, abs=1e-4)
    assert all(len(top) == 3 for top in lp.top_logprobs)
    # greedy: the sampled token is the most likely one
    assert all(max(top.values()) == pytest.approx(v, abs=1e-5) for top, v in zip(lp.top_logprobs, lp.token_logprobs))

    chat = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                          temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content)


def test_prefix_cache_hits_are_reported_as_cached_tokens(client, model):
    prompt = "Block tables map logical blocks to physical blocks in the KV cache. " * 3
    first = client.completions.create(model=model, prompt=prompt, max_tokens=2, temperature=0)
    second = client.completions.create(model=model, prompt=prompt, max_tokens=2, temperature=0)
    assert second.usage.prompt_tokens == first.usage.prompt_tokens >= 32
    assert second.usage.prompt_tokens_details.cached_tokens >= 16


# ---- DLRouter's request shape: only the keys it forwards, temperature always present ---------------
def _sse_events(raw: bytes) -> list[str]:
    text = raw.decode()
    assert text.endswith("data: [DONE]\n\n")
    events = [e for e in text.split("\n\n") if e]
    assert all(e.startswith("data: ") and "\n" not in e for e in events)  # one-line events
    return [e[len("data: "):] for e in events]


@pytest.mark.parametrize("stream", [False, True])
def test_dlrouter_chat_shape(tiny_server, model, reference_llm, stream):
    messages = [{"role": "user", "content": "Once upon a time"}]
    body = {"model": os.path.basename(model), "messages": messages, "stream": stream, "temperature": 0.0,
            "max_tokens": 16, "max_completion_tokens": 16, "ignore_eos": True, "stop": None,
            "kv_transfer_params": None}
    expected = offline(reference_llm, {"prompt_token_ids": chat_ids(reference_llm, messages)}, temperature=0,
                       max_tokens=16, ignore_eos=True)[0].text
    status, raw, headers = tiny_server.request("POST", "/v1/chat/completions", body)
    assert status == 200
    if not stream:
        assert headers["Content-Type"].startswith("application/json")
        assert json.loads(raw)["choices"][0]["message"]["content"] == expected
        return
    assert headers["Content-Type"].startswith("text/event-stream")
    events = _sse_events(raw)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == expected


def test_dlrouter_completion_shape_with_injected_temperature(tiny_server, model):
    body = {"model": model, "prompt": PROMPT, "stream": False, "temperature": 0.7, "max_completion_tokens": 8,
            "ignore_eos": True, "stop": ["never-appears"], "kv_transfer_params": None}
    status, out = tiny_server.post_json("/v1/completions", body)
    assert status == 200, out
    assert out["object"] == "text_completion" and out["choices"][0]["finish_reason"] == "length"
    assert out["usage"]["completion_tokens"] == 8
    tiny_server.wait_kv_free()


def test_lenient_bodies_round_trip_the_assistant_message(tiny_server, client, model):
    """As with vLLM: unknown fields are ignored, explicit nulls mean the default, and the assistant message the
    client received (`model_dump()`: refusal, annotations, audio, function_call, tool_calls all null) goes back
    into the next request unchanged."""
    first = client.chat.completions.create(model=model, max_tokens=4, temperature=0,
                                           messages=[{"role": "user", "content": "hi"}])
    history = [{"role": "user", "content": "hi"}, first.choices[0].message.model_dump(),
               {"role": "user", "content": "and again"}]
    assert history[1]["refusal"] is None and "annotations" in history[1]
    second = client.chat.completions.create(model=model, max_tokens=4, temperature=0, messages=history,
                                            extra_body={"frobnicate": True, "n": None, "top_p": None,
                                                        "stream_options": None, "some_vendor_field": {"x": 1}})
    assert second.choices[0].finish_reason in ("length", "stop")
    # a known field of the wrong type is still a 400 that names it
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model, max_tokens=4, messages=history, extra_body={"n": "two"})
    assert e.value.body["param"] == "n"
    assert "request_field_ignored field=frobnicate" in tiny_server.log_tail(20000)


def test_tokenize_detokenize_version_ping_and_model_card(tiny_server, client, model, reference_llm):
    import urllib.request

    def call(path, body=None):
        req = urllib.request.Request(tiny_server.url + path, data=json.dumps(body).encode() if body else None,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())
    tok = reference_llm.tokenizer
    got = call("/tokenize", {"model": model, "prompt": PROMPT})
    assert got["tokens"] == tok.encode(PROMPT) and got["count"] == len(got["tokens"]) and got["max_model_len"] > 0
    messages = [{"role": "user", "content": "hi"}]
    assert call("/tokenize", {"messages": messages})["tokens"] == chat_ids(reference_llm, messages)
    assert call("/detokenize", {"model": model, "tokens": got["tokens"]})["prompt"] == tok.decode(got["tokens"])
    assert call("/version")["version"] and call("/ping")["status"] == "ok"
    assert client.models.retrieve(model).id == model
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-17")
    for body, param in (({"prompt": "x", "messages": messages}, "prompt"), ({"tokens": [-1]}, "tokens")):
        req = urllib.request.Request(tiny_server.url + ("/tokenize" if "prompt" in body else "/detokenize"),
                                     data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=30)
        assert e.value.code == 400 and json.loads(e.value.read())["error"]["param"] == param
