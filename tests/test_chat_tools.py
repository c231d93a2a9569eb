"""Tool calling and reasoning with the real Qwen3 tokenizer and chat template: prompts rendered with tools equal
transformers' `apply_chat_template`; every supported tool-call format and both reasoning formats parse to the
exact OpenAI structure, streamed token by token and not; `required` and named tool choices are enforced by
structured outputs on a random-weights model; the official `openai` client parses every answer and round-trips
an assistant message back into the next request; bad tool definitions are 400s."""
from __future__ import annotations

import json

import openai
import pytest

from engine.chat.output import ChatOutputParser, ChatStream
from engine.chat.reasoning import REASONING_PARSERS
from engine.chat.tool_parsers import TOOL_PARSERS
from engine.chat.tools import plan_tools
from engine.errors import InvalidRequestError

from tests.support.models import qwen3_tokenizer_dir
from tests.support.server import start_server

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                        "unit": {"enum": ["C", "F"]}},
                       "required": ["city", "unit"], "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "add", "description": "Adds two small numbers",
        "parameters": {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                                        "b": {"type": "integer", "minimum": 0, "maximum": 99}},
                       "required": ["a", "b"], "additionalProperties": False}}},
]
PARIS, ROME = {"city": "Paris", "unit": "C"}, {"city": "Rome", "unit": "F"}
# each format's text for two calls, with some content before them
FORMATS = {
    "hermes": ("Let me check.\n<tool_call>\n" + json.dumps({"name": "get_weather", "arguments": PARIS}) +
               "\n</tool_call>\n<tool_call>\n" + json.dumps({"name": "get_weather", "arguments": ROME}) +
               "\n</tool_call>", "Let me check.\n\n"),
    "llama3_json": (json.dumps({"name": "get_weather", "parameters": PARIS}) + "; " +
                    json.dumps({"name": "get_weather", "parameters": ROME}), None),
    "deepseek_v3": ("Let me check.<｜tool▁calls▁begin｜>" + "".join(
        f"<｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n{json.dumps(a)}\n```<｜tool▁call▁end｜>"
        for a in (PARIS, ROME)) + "<｜tool▁calls▁end｜>", "Let me check."),
    "kimi_k2": ("Let me check.<|tool_calls_section_begin|>" + "".join(
        f"<|tool_call_begin|>functions.get_weather:{i}<|tool_call_argument_begin|>{json.dumps(a)}<|tool_call_end|>"
        for i, a in enumerate((PARIS, ROME))) + "<|tool_calls_section_end|>", "Let me check."),
}


@pytest.fixture(scope="module")
def qwen3_tok():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(qwen3_tokenizer_dir()))


def pieces(tok, text: str) -> list[str]:
    """The text as a model streams it: the Qwen3 tokenizer's tokens, decoded one prefix at a time (a prefix that
    ends inside a multi-byte character is held back, as the server's detokenizer holds it)."""
    ids = tok.encode(text, add_special_tokens=False)
    out = [tok.decode(ids[:i]) for i in range(1, len(ids) + 1)]
    return [t for t in out[:-1] if not t.endswith("\ufffd")] + out[-1:]


def stream_message(parser: ChatOutputParser, prefixes: list[str]) -> dict:
    """Accumulates the deltas as the openai client's users do."""
    stream, msg = ChatStream(parser), {"reasoning_content": "", "content": "", "tool_calls": {}}
    for i, text in enumerate(prefixes):
        delta = stream.delta(text, final=i == len(prefixes) - 1)
        msg["reasoning_content"] += delta.get("reasoning_content", "")
        msg["content"] += delta.get("content", "")
        for call in delta.get("tool_calls", []):
            slot = msg["tool_calls"].setdefault(call["index"], {"id": None, "name": "", "arguments": ""})
            slot["id"] = call.get("id") or slot["id"]
            slot["name"] += call.get("function", {}).get("name", "")
            slot["arguments"] += call.get("function", {}).get("arguments", "")
    return msg


def calls_of(message: dict) -> list[tuple[str, dict]]:
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in message["tool_calls"]]


# ---- prompts -----------------------------------------------------------------------------------------------
def test_tools_render_as_transformers_renders_them(qwen3_tok, server):
    history = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": json.dumps(PARIS)}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees"},
        {"role": "assistant", "content": "It is 18 C.", "reasoning_content": "The tool said 18."},
        {"role": "user", "content": "And 2 + 3?"}]
    for kwargs in ({}, {"enable_thinking": False}):
        status, got = server.post_json("/tokenize", {"messages": history, "tools": TOOLS,
                                                     "chat_template_kwargs": kwargs})
        assert status == 200, got
        hf_history = [{**m, "tool_calls": [{**c, "function": {**c["function"], "arguments": PARIS}}
                                           for c in m["tool_calls"]]} if "tool_calls" in m else m for m in history]
        want = qwen3_tok.apply_chat_template(hf_history, tools=TOOLS, add_generation_prompt=True, tokenize=True,
                                             return_dict=False, **kwargs)
        assert got["tokens"] == list(want)


# ---- parsers -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_each_tool_call_format_parses_streamed_and_not(qwen3_tok, fmt):
    text, content = FORMATS[fmt]
    parser = ChatOutputParser(plan_tools(TOOLS, "auto", None, True), TOOL_PARSERS[fmt](), None)
    message, called = parser.message(text)
    assert called and message["content"] == content
    assert calls_of(message) == [("get_weather", PARIS), ("get_weather", ROME)]
    assert all(c["type"] == "function" and c["id"] for c in message["tool_calls"])
    if fmt == "kimi_k2":
        assert [c["id"] for c in message["tool_calls"]] == ["functions.get_weather:0", "functions.get_weather:1"]
    streamed = stream_message(parser, pieces(qwen3_tok, text))
    assert streamed["content"] == (content or "")
    assert [(c["name"], json.loads(c["arguments"])) for c in streamed["tool_calls"].values()] == calls_of(message)


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_text_without_calls_is_content(qwen3_tok, fmt):
    parser = ChatOutputParser(plan_tools(TOOLS, "auto", None, True), TOOL_PARSERS[fmt](), None)
    for text in ("Just words, no tools.", "<tool_call>\nnot json\n</tool_call>", '{"name": 3}'):
        message, called = parser.message(text)
        assert not called and message["content"] == text and message["tool_calls"] == []
        assert stream_message(parser, pieces(qwen3_tok, text))["content"] == text


@pytest.mark.parametrize("name, prompt, text, reasoning, content", [
    ("qwen3", "<|im_start|>assistant\n", "<think>\nWeigh it.\n</think>\n\nParis.", "Weigh it.", "Paris."),
    ("qwen3", "<|im_start|>assistant\n<think>\n", "Weigh it.\n</think>\n\nParis.", "Weigh it.", "Paris."),
    ("qwen3", "<|im_start|>assistant\n", "Paris, no thinking.", "", "Paris, no thinking."),
    ("qwen3", "<|im_start|>assistant\n", "<think>\nCut off mid-tho", "Cut off mid-tho", ""),
    ("deepseek_r1", "<｜Assistant｜><think>\n", "Weigh it.\n</think>\n\nParis.", "Weigh it.", "Paris."),
    ("deepseek_r1", "<｜Assistant｜>", "<think>Weigh it.</think>Paris.", "Weigh it.", "Paris."),
    ("deepseek_r1", "<｜Assistant｜><think>\n", "Still thinking", "Still thinking", ""),
])
def test_reasoning_splits_streamed_and_not(qwen3_tok, name, prompt, text, reasoning, content):
    parser = ChatOutputParser(None, None, REASONING_PARSERS[name](), prompt)
    message, _ = parser.message(text)
    assert (message["reasoning_content"] or "", message["content"] or "") == (reasoning, content)
    streamed = stream_message(parser, pieces(qwen3_tok, text))
    assert (streamed["reasoning_content"], streamed["content"]) == (reasoning, content)


def test_reasoning_then_tool_calls(qwen3_tok):
    text = "<think>\nI need the weather.\n</think>\n\n" + FORMATS["hermes"][0]
    parser = ChatOutputParser(plan_tools(TOOLS, "auto", False, True), TOOL_PARSERS["hermes"](),
                              REASONING_PARSERS["qwen3"](), "")
    message, _ = parser.message(text)
    assert message["reasoning_content"] == "I need the weather."
    assert calls_of(message) == [("get_weather", PARIS)]  # parallel_tool_calls=false keeps the first
    streamed = stream_message(parser, pieces(qwen3_tok, text))
    assert streamed["reasoning_content"] == "I need the weather." and len(streamed["tool_calls"]) == 1


@pytest.mark.parametrize("tools, choice, param", [
    ([{"type": "function", "function": {"name": "bad name!"}}], "auto", "tools[0].function.name"),
    ([{"type": "retrieval"}], "auto", "tools[0]"),
    ([{"type": "function"}], "auto", "tools[0].function"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}], "auto",
     "tools[0].function.parameters"),
    ([{"type": "function", "function": {"name": "f"}}] * 2, "auto", "tools"),
    (TOOLS, {"type": "function", "function": {"name": "missing"}}, "tool_choice"),
    (TOOLS, "sometimes", "tool_choice"),
    (None, "required", "tool_choice"),
])
def test_bad_tools_name_the_field(tools, choice, param):
    with pytest.raises(InvalidRequestError) as e:
        plan_tools(tools, choice, None, True)
    assert e.value.param == param


# ---- the server ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tiny_qwen3_real_tok, tmp_path_factory):
    s = start_server(tiny_qwen3_real_tok, tmp_path_factory.mktemp("tools-server"), "--enable-auto-tool-choice",
                     "--tool-call-parser", "hermes", "--reasoning-parser", "qwen3")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model(server):
    return server.get_json("/v1/models")[1]["data"][0]["id"]


ASK = [{"role": "user", "content": "What is the weather in Paris, and what is 2 + 3?"}]


def test_required_tool_choice_always_yields_a_valid_call(client, server, model):
    import jsonschema
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    for seed in range(20):
        r = client.chat.completions.create(model=model, messages=ASK, tools=TOOLS, tool_choice="required",
                                           parallel_tool_calls=False, max_tokens=120, seed=seed)
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        (call,) = choice.message.tool_calls
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])
    server.wait_kv_free()


def test_required_streamed_equals_not_streamed(client, model):
    args = dict(model=model, messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=200, seed=5,
                parallel_tool_calls=False)
    full = client.chat.completions.create(**args).choices[0].message.tool_calls
    calls, reasons = {}, []
    for chunk in client.chat.completions.create(**args, stream=True):
        for c in chunk.choices:
            reasons.append(c.finish_reason)
            for tc in c.delta.tool_calls or []:
                slot = calls.setdefault(tc.index, ["", ""])
                slot[0] += tc.function.name or ""
                slot[1] += tc.function.arguments or ""
    assert [(c.function.name, json.loads(c.function.arguments)) for c in full] == \
        [(n, json.loads(a)) for n, a in calls.values()]
    assert reasons[-1] == "tool_calls"


def test_named_tool_choice_calls_that_function(client, model):
    for stream in (False, True):
        args = dict(model=model, messages=ASK, tools=TOOLS, max_tokens=60, seed=3,
                    tool_choice={"type": "function", "function": {"name": "add"}})
        if not stream:
            msg = client.chat.completions.create(**args).choices[0].message
            (call,) = msg.tool_calls
            name, arguments = call.function.name, call.function.arguments
        else:
            name = arguments = ""
            for chunk in client.chat.completions.create(**args, stream=True):
                for tc in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
                    name += tc.function.name or ""
                    arguments += tc.function.arguments or ""
        assert name == "add" and set(json.loads(arguments)) == {"a", "b"}


def test_an_assistant_message_round_trips_into_the_next_request(client, model):
    first = client.chat.completions.create(model=model, messages=ASK, tools=TOOLS, tool_choice="required",
                                           parallel_tool_calls=False, max_tokens=120, seed=1)
    assistant = first.choices[0].message.model_dump()  # refusal: None, annotations: None, ... sent back as is
    call = assistant["tool_calls"][0]
    follow = ASK + [assistant, {"role": "tool", "tool_call_id": call["id"], "content": "done"}]
    r = client.chat.completions.create(model=model, messages=follow, tools=TOOLS, max_tokens=8, seed=2)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_reasoning_is_split_on_the_server(client, model, server):
    """A regex makes the random model think first; the server splits it, streamed and not, equally."""
    args = dict(model=model, messages=[{"role": "user", "content": "Think first."}], max_tokens=40, seed=9,
                extra_body={"structured_outputs": {"regex": "<think>[a-z ]{3,12}</think>[A-Z]{2,5}"}})
    msg = client.chat.completions.create(**args).choices[0].message
    reasoning, content = "", ""
    for chunk in client.chat.completions.create(**args, stream=True):
        for c in chunk.choices:
            reasoning += getattr(c.delta, "reasoning_content", None) or ""
            content += c.delta.content or ""
    assert msg.reasoning_content and msg.content and "<think>" not in msg.content
    assert (reasoning, content) == (msg.reasoning_content.strip(), msg.content)
    server.wait_kv_free()


@pytest.mark.parametrize("extra, param", [
    ({"tools": [{"type": "function", "function": {"name": "x y"}}]}, "tools[0].function.name"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 5}}}]},
     "tools[0].function.parameters"),
])
def test_bad_tool_requests_are_400s(server, model, extra, param):
    status, err = server.post_json("/v1/chat/completions", {"model": model, "messages": ASK, "max_tokens": 4, **extra})
    assert status == 400 and err["error"]["param"] == param, err


def test_auto_tool_choice_needs_the_flag(tiny_qwen3_real_tok, tmp_path):
    s = start_server(tiny_qwen3_real_tok, tmp_path)
    try:
        model = s.get_json("/v1/models")[1]["data"][0]["id"]
        status, err = s.post_json("/v1/chat/completions", {"model": model, "messages": ASK, "tools": TOOLS})
        assert status == 400 and "--enable-auto-tool-choice" in err["error"]["message"], err
        status, ok = s.post_json("/v1/chat/completions", {"model": model, "messages": ASK, "tools": TOOLS,
                                                          "tool_choice": "none", "max_tokens": 3})
        assert status == 200 and ok["choices"][0]["message"]["content"] is not None
    finally:
        s.stop()


def test_the_readme_tools_example_runs_as_written(server, model):
    """The README's tools / structured outputs / reasoning example, against this server (its URL and model)."""
    import re
    import subprocess
    import sys
    from pathlib import Path
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("### Tools, structured outputs, reasoning"):]
    block = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    block = block.replace("http://127.0.0.1:8000/v1", server.url + "/v1").replace('MODEL = "qwen3"',
                                                                                 f"MODEL = {model!r}")
    out = subprocess.run([sys.executable, "-c", block], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.startswith("tool_calls get_weather "), out.stdout


# ---- /v1/responses --------------------------------------------------------------------------------------------
FLAT_TOOLS = [{"type": "function", **t["function"]} for t in TOOLS]


def test_responses_text_equals_chat(client, model):
    chat = client.chat.completions.create(model=model, messages=[{"role": "system", "content": "Be brief."},
                                                                 {"role": "user", "content": "Hello"}],
                                          max_tokens=8, temperature=0)
    r = client.responses.create(model=model, instructions="Be brief.", input="Hello", max_output_tokens=8,
                                temperature=0)
    assert r.object == "response" and r.output_text == chat.choices[0].message.content
    assert r.status == ("incomplete" if chat.choices[0].finish_reason == "length" else "completed")
    assert r.usage.input_tokens == chat.usage.prompt_tokens and r.usage.output_tokens == chat.usage.completion_tokens
    events = list(client.responses.create(model=model, instructions="Be brief.", input="Hello", max_output_tokens=8,
                                          temperature=0, stream=True))
    assert events[0].type == "response.created" and events[-1].type in ("response.completed", "response.incomplete")
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == r.output_text
    assert [e.sequence_number for e in events] == list(range(len(events)))


def test_responses_function_calls_round_trip(client, model):
    for stream in (False, True):
        args = dict(model=model, input="Weather in Paris?", tools=FLAT_TOOLS, tool_choice="required",
                    parallel_tool_calls=False, max_output_tokens=120, extra_body={"seed": 4})
        if stream:
            events = list(client.responses.create(**args, stream=True))
            output = events[-1].response.output
            assert any(e.type == "response.function_call_arguments.done" for e in events)
        else:
            output = client.responses.create(**args).output
        (call,) = output
        assert call.type == "function_call" and call.name in ("get_weather", "add")
        json.loads(call.arguments)
    follow = client.responses.create(model=model, tools=FLAT_TOOLS, max_output_tokens=6, input=[
        {"role": "user", "content": "Weather in Paris?"}, call.model_dump(),
        {"type": "function_call_output", "call_id": call.call_id, "output": "18 C"}])
    assert follow.output and follow.output[-1].type == "message"


def test_responses_structured_text_and_reasoning_items(client, model):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    r = client.responses.create(model=model, input="json please", max_output_tokens=30,
                                text={"format": {"type": "json_schema", "name": "x", "schema": schema}})
    assert json.loads(r.output_text) in ({"ok": True}, {"ok": False})
    regex = {"structured_outputs": {"regex": "<think>[a-z ]{3,12}</think>[A-Z]{2,5}"}}
    regex["seed"] = 2
    r = client.responses.create(model=model, input="think", max_output_tokens=40, extra_body=regex)
    assert [o.type for o in r.output] == ["reasoning", "message"]
    events = list(client.responses.create(model=model, input="think", max_output_tokens=40, extra_body=regex,
                                          stream=True))
    assert [o.model_dump(exclude={"id"}) for o in events[-1].response.output] == \
        [o.model_dump(exclude={"id"}) for o in r.output]


def test_responses_refuses_what_it_cannot_do(server, model):
    for body, param in (({"previous_response_id": "resp_1"}, "previous_response_id"),
                        ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
                        ({"input": [{"type": "image_generation_call"}]}, "input[0].type")):
        status, err = server.post_json("/v1/responses", {"model": model, "input": "hi", **body})
        assert status == 400 and err["error"]["param"] == param, err


def test_continue_final_message_and_request_chat_template(qwen3_tok, server, model):
    partial = [{"role": "user", "content": "Count:"}, {"role": "assistant", "content": "one, two,"}]
    status, got = server.post_json("/tokenize", {"messages": partial, "add_generation_prompt": False,
                                                 "continue_final_message": True})
    want = qwen3_tok.apply_chat_template(partial, continue_final_message=True, tokenize=True, return_dict=False)
    assert status == 200 and got["tokens"] == list(want)
    status, err = server.post_json("/v1/chat/completions", {"model": model, "messages": partial,
                                                            "continue_final_message": True})
    assert status == 400 and err["error"]["param"] == "continue_final_message"
    template = "{% for m in messages %}<<{{ m['content'] }}>>{% endfor %}"
    status, got = server.post_json("/tokenize", {"messages": partial, "chat_template": template})
    assert status == 200 and got["tokens"] == qwen3_tok.encode("<<Count:>><<one, two,>>", add_special_tokens=False)
