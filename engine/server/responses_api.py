"""POST /v1/responses: OpenAI's Responses API for text, tools and structured output, streaming events included.

A request is translated into a chat request (input items -> messages, flat function tools -> chat tools,
`text.format` -> response_format, `reasoning.effort` -> reasoning_effort) and runs through the chat machinery
(engine/server/openai_serving.py); its answer comes back as output items: `reasoning`, `message` with
`output_text`, and `function_call`s. Nothing is stored, so `previous_response_id` is refused."""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

import msgspec
from aiohttp import web

from engine.chat.output import ChatStream, call_id
from engine.errors import EngineError, InvalidRequestError, error_body
from engine.server import openai_protocol as proto
from engine.server.responses import json_encoder


class ResponsesRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    model: str
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stream: bool = False
    text: dict[str, Any] | None = None
    reasoning: dict[str, Any] | None = None
    previous_response_id: str | None = None
    store: bool | None = None
    metadata: dict[str, Any] | None = None
    user: str | None = None
    # vLLM extensions also taken here
    seed: int | None = None
    top_k: int | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None
    kv_transfer_params: dict[str, Any] | None = None  # prefill/decode hand-off, as on chat


def to_chat(req: ResponsesRequest) -> proto.ChatCompletionRequest:
    if req.previous_response_id is not None:
        raise InvalidRequestError("this server stores no responses; send the whole conversation in input",
                                  param="previous_response_id")
    body: dict[str, Any] = {"model": req.model, "messages": _messages(req), "stream": req.stream}
    for name in ("temperature", "top_p", "seed", "top_k", "parallel_tool_calls", "chat_template_kwargs",
                 "structured_outputs", "kv_transfer_params"):
        if getattr(req, name) is not None:
            body[name] = getattr(req, name)
    if req.max_output_tokens is not None:
        body["max_tokens"] = req.max_output_tokens
    if req.tools:
        body["tools"] = [_chat_tool(t, i) for i, t in enumerate(req.tools)]
    if req.tool_choice is not None:
        choice = req.tool_choice
        if isinstance(choice, dict) and choice.get("type") == "function" and "function" not in choice:
            choice = {"type": "function", "function": {"name": choice.get("name")}}
        body["tool_choice"] = choice
    fmt = (req.text or {}).get("format")
    if fmt is not None:
        if not isinstance(fmt, dict):
            raise InvalidRequestError("text.format must be an object", param="text.format")
        if fmt.get("type") == "json_schema":
            body["response_format"] = {"type": "json_schema", "json_schema": {
                "name": fmt.get("name", "output"), "schema": fmt.get("schema"), "strict": fmt.get("strict")}}
        else:
            body["response_format"] = {"type": fmt.get("type")}
    if req.reasoning and req.reasoning.get("effort") is not None:
        body["reasoning_effort"] = req.reasoning["effort"]
    try:
        return msgspec.convert(body, proto.ChatCompletionRequest)
    except msgspec.ValidationError as e:
        raise InvalidRequestError(f"invalid request: {e}") from None


def _messages(req: ResponsesRequest) -> list[dict]:
    out: list[dict] = [{"role": "system", "content": req.instructions}] if req.instructions else []
    items = [{"role": "user", "content": req.input}] if isinstance(req.input, str) else req.input
    for i, item in enumerate(items):
        kind = item.get("type", "message")
        if kind == "message":
            content = item.get("content")
            if isinstance(content, list):
                texts = [p.get("text") for p in content if isinstance(p, dict)]
                if not all(isinstance(t, str) for t in texts) or len(texts) != len(content):
                    raise InvalidRequestError("only text content parts are supported", param=f"input[{i}].content")
                content = "".join(texts)
            out.append({"role": item.get("role"), "content": content})
        elif kind == "function_call":
            call = {"id": item.get("call_id"), "type": "function",
                    "function": {"name": item.get("name"), "arguments": item.get("arguments", "{}")}}
            if out and out[-1]["role"] == "assistant" and out[-1].get("tool_calls") is not None:
                out[-1]["tool_calls"].append(call)  # parallel calls: one assistant turn
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            out.append({"role": "tool", "tool_call_id": item.get("call_id"),
                        "content": output if isinstance(output, str) else json.dumps(output)})
        elif kind == "reasoning":
            continue  # earlier reasoning is not sent back to the model
        else:
            raise InvalidRequestError(f"input items of type {kind!r} are not supported", param=f"input[{i}].type")
    return out


def _chat_tool(tool: dict, i: int) -> dict:
    if tool.get("type") != "function":
        raise InvalidRequestError(f"only function tools are supported, not {tool.get('type')!r}",
                                  param=f"tools[{i}].type")
    return {"type": "function", "function": {k: tool[k] for k in ("name", "description", "parameters")
                                             if tool.get(k) is not None}}


# ---- answers ---------------------------------------------------------------------------------------------------
def _envelope(serving, job, status: str, output: list[dict], usage: dict | None, incomplete: str | None) -> dict:
    return {"id": job.id, "object": "response", "created_at": job.created, "status": status, "model": job.model,
            "output": output, "parallel_tool_calls": True, "tool_choice": "auto", "tools": [], "store": False,
            "incomplete_details": {"reason": incomplete} if incomplete else None, "error": None,
            "usage": usage, "metadata": {}, "temperature": job.params.temperature, "top_p": job.params.top_p}


def _usage(serving, job) -> dict:
    u = serving._usage(job)
    return {"input_tokens": u["prompt_tokens"], "output_tokens": u["completion_tokens"],
            "total_tokens": u["total_tokens"], "input_tokens_details": u["prompt_tokens_details"],
            "output_tokens_details": {"reasoning_tokens": 0}}


def _items(reasoning: str | None, content: str | None, calls: list[dict]) -> list[dict]:
    items = []
    if reasoning:
        items.append({"type": "reasoning", "id": f"rs_{uuid.uuid4().hex}", "summary": [],
                      "content": [{"type": "reasoning_text", "text": reasoning}], "status": "completed"})
    if content:
        items.append({"type": "message", "id": f"msg_{uuid.uuid4().hex}", "role": "assistant", "status": "completed",
                      "content": [{"type": "output_text", "text": content, "annotations": [], "logprobs": []}]})
    for c in calls:
        items.append({"type": "function_call", "id": f"fc_{uuid.uuid4().hex}", "call_id": c["id"],
                      "name": c["function"]["name"], "arguments": c["function"]["arguments"], "status": "completed"})
    return items


def full_body(serving, job) -> dict:
    (_, _, c), = serving._choices(job)
    if job.parser is not None:
        msg, _ = job.parser.message(c.text)
    else:
        msg = {"content": c.text, "tool_calls": []}
    incomplete = "max_output_tokens" if c.finish_reason == "length" else None
    output = _items(msg.get("reasoning_content"), msg.get("content"), msg.get("tool_calls") or [])
    body = _envelope(serving, job, "incomplete" if incomplete else "completed", output, _usage(serving, job),
                     incomplete)
    kv = [h.kv_transfer_params for h in job.handles if h.kv_transfer_params is not None]
    if kv:  # prefill role: the hand-off descriptor for the decode engine
        body["kv_transfer_params"] = kv[0]
    return body


class _Events:
    """Server-sent events of one response, numbered."""

    def __init__(self, resp: web.StreamResponse):
        self.resp, self.seq = resp, 0

    async def send(self, kind: str, **fields) -> None:
        body = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        await self.resp.write(f"event: {kind}\n".encode() + b"data: " + json_encoder.encode(body) + b"\n\n")


async def stream(serving, request: web.Request, job, queue: asyncio.Queue) -> web.StreamResponse:
    """response.created, then per output item: added, its deltas, done; then response.completed."""
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await resp.prepare(request)
    ev = _Events(resp)
    await ev.send("response.created", response=_envelope(serving, job, "in_progress", [], None, None))
    await ev.send("response.in_progress", response=_envelope(serving, job, "in_progress", [], None, None))
    parser = job.parser
    chat_stream = ChatStream(parser) if parser is not None else None
    open_item: dict | None = None  # the reasoning or message item being streamed
    done_items: list[dict] = []
    text_of = {"reasoning": "", "message": ""}

    async def close_open() -> None:
        nonlocal open_item
        if open_item is None:
            return
        kind, index = open_item["type"], len(done_items)
        text = text_of[kind]
        if kind == "message":
            part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
            await ev.send("response.output_text.done", item_id=open_item["id"], output_index=index, content_index=0,
                          text=text, logprobs=[])
        else:
            part = {"type": "reasoning_text", "text": text}
            await ev.send("response.reasoning_text.done", item_id=open_item["id"], output_index=index,
                          content_index=0, text=text)
        await ev.send("response.content_part.done", item_id=open_item["id"], output_index=index, content_index=0,
                      part=part)
        item = {**open_item, "status": "completed", "content": [part]}
        await ev.send("response.output_item.done", output_index=index, item=item)
        done_items.append(item)
        open_item = None

    async def text_delta(kind: str, delta: str) -> None:
        nonlocal open_item
        if open_item is not None and open_item["type"] != kind:
            await close_open()
        index = len(done_items)
        if open_item is None:
            item_id = f"{'rs' if kind == 'reasoning' else 'msg'}_{uuid.uuid4().hex}"
            open_item = {"type": kind, "id": item_id, "status": "in_progress", "content": []}
            if kind == "message":
                open_item["role"] = "assistant"
            else:
                open_item["summary"] = []
            await ev.send("response.output_item.added", output_index=index, item=open_item)
            part = {"type": "output_text", "text": "", "annotations": []} if kind == "message" else \
                {"type": "reasoning_text", "text": ""}
            await ev.send("response.content_part.added", item_id=item_id, output_index=index, content_index=0,
                          part=part)
        text_of[kind] += delta
        event = "response.output_text.delta" if kind == "message" else "response.reasoning_text.delta"
        extra = {"logprobs": []} if kind == "message" else {}
        await ev.send(event, item_id=open_item["id"], output_index=index, content_index=0, delta=delta, **extra)

    async def function_call(call: dict) -> None:
        await close_open()
        index = len(done_items)
        item = {"type": "function_call", "id": f"fc_{uuid.uuid4().hex}", "call_id": call.get("id") or call_id(),
                "name": call["function"]["name"], "arguments": "", "status": "in_progress"}
        await ev.send("response.output_item.added", output_index=index, item=item)
        args = call["function"]["arguments"]
        await ev.send("response.function_call_arguments.delta", item_id=item["id"], output_index=index, delta=args)
        await ev.send("response.function_call_arguments.done", item_id=item["id"], output_index=index, arguments=args)
        item = {**item, "arguments": args, "status": "completed"}
        await ev.send("response.output_item.done", output_index=index, item=item)
        done_items.append(item)

    processor = serving.state.client.processor
    (handle,) = job.handles
    sent = 0
    named: dict | None = None  # a named function's call, its arguments streamed as the text comes
    try:
        while True:
            item = await queue.get()
            if isinstance(item, BaseException):
                raise item
            while not queue.empty():
                item = queue.get_nowait()
                if isinstance(item, BaseException):
                    raise item
            for _, sid, c in serving._choices(job):
                finished = c.finish_reason is not None
                child = processor.children.get(sid)
                safe = len(c.text) if finished or child is None else child.detok.stream_safe_len(False)
                safe = max(safe, sent)
                if chat_stream is None:
                    if safe > sent:
                        await text_delta("message", c.text[sent:safe])
                else:
                    delta = chat_stream.delta(c.text[:safe], finished)
                    if delta.get("reasoning_content"):
                        await text_delta("reasoning", delta["reasoning_content"])
                    if delta.get("content"):
                        await text_delta("message", delta["content"])
                    for call in delta.get("tool_calls", []):
                        if parser.plan.mode == "named":  # argument pieces: gather, emit whole at the end
                            named = named or {"id": call.get("id"), "function": {"name": parser.plan.function,
                                                                                  "arguments": ""}}
                            named["function"]["arguments"] += call.get("function", {}).get("arguments", "")
                        else:
                            await function_call(call)
                sent = safe
            if queue.empty() and handle.finished:
                break
        if named is not None:
            await function_call(named)
        await close_open()
        serving._record_finished(job)
        (_, _, c), = serving._choices(job)
        incomplete = "max_output_tokens" if c.finish_reason == "length" else None
        final = _envelope(serving, job, "incomplete" if incomplete else "completed", done_items,
                          _usage(serving, job), incomplete)
        await ev.send("response.incomplete" if incomplete else "response.completed", response=final)
    except EngineError as e:
        err = error_body(e)["error"]
        await ev.send("error", message=err["message"], code=err["type"], param=err["param"])
    await resp.write_eof()
    return resp


async def create(serving, request: web.Request) -> web.StreamResponse:
    req = proto.decode_body(await request.read(), ResponsesRequest, serving._ignore_fields)
    job = serving.chat_job(to_chat(req), kind="response", id_prefix="resp_")
    job.created = int(time.time())
    return await serving._run(request, job)
