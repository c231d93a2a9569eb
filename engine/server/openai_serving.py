"""/v1/completions and /v1/chat/completions: validate, tokenize, submit to the engine core, and
answer one JSON body or a `text/event-stream` of one-line `data: {json}` events ending `data: [DONE]`."""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, field

from aiohttp import web

from engine.chat.output import ChatOutputParser, ChatStream
from engine.chat.tools import plan_tools
from engine.errors import (DeadlineExceededError, EngineError, InvalidRequestError, ModelNotFoundError,
                           OverloadedError, error_body)
from engine.output_processor import child_id
from engine.outputs import CompletionOutput
from engine.pd import migration as mig
from engine.sampling_params import SamplingParams
from engine.server import openai_protocol as proto
from engine.server import responses_api
from engine.server.front_state import FrontState
from engine.server.responses import json_encoder, json_response

log = logging.getLogger(__name__)


@dataclass
class Job:
    """One HTTP request in flight: its prompts (one engine request each, n samples per prompt)."""

    kind: str  # "completion" | "chat"
    model: str
    params: SamplingParams
    prompts: list[tuple[str | None, list[int]]]
    stream: bool
    include_usage: bool
    kv_transfer_params: dict | None
    id: str = ""
    parser: ChatOutputParser | None = None  # chat answers read for reasoning / tool calls (None: plain text)
    echo: list[str] | None = None  # completions with echo: each prompt's text, put before its samples' text
    # chat with images: the image parts' (url, field path), loaded and placed on the prompt before it is sent
    image_urls: list[tuple[str, str]] = field(default_factory=list)
    images: list | None = None  # the placed ImageInputs (engine/multimodal/inputs.py)
    created: int = field(default_factory=lambda: int(time.time()))
    handles: list = field(default_factory=list)


class OpenAIServing:
    def __init__(self, state: FrontState):
        self.state = state
        self._ignored_fields: set[str] = set()  # unknown request field names already logged

    # ---- parsing -------------------------------------------------------------------------------
    def _ignore_fields(self, paths: list[str]) -> None:
        """Unknown request fields are ignored, as vLLM ignores them; each name is logged once."""
        for path in paths:
            name = path.rsplit(".", 1)[-1]
            if name not in self._ignored_fields:
                self._ignored_fields.add(name)
                log.warning("event=request_field_ignored field=%s (unknown to this server; logged once)", path)

    def _check_model(self, model: str) -> None:
        if model not in self.state.model_names:
            raise ModelNotFoundError(f"the model {model!r} does not exist; this server serves "
                                     f"{self.state.served_model_name!r}", param="model")

    def _check_tokens(self, ids: list[int], params: SamplingParams) -> None:
        info = self.state.info
        if ids and (min(ids) < 0 or max(ids) >= info.vocab_size):
            raise InvalidRequestError(f"prompt token ids must be in [0, {info.vocab_size})", param="prompt")
        proto.check_prompt_fits(len(ids), params, info.max_model_len)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        req = proto.decode_body(await request.read(), proto.CompletionRequest, self._ignore_fields)
        self._check_model(req.model)
        params = proto.completion_params(req, self.state.sampling_defaults)
        prompts = proto.completion_prompts(req.prompt)
        if len(prompts) * params.n > proto.MAX_SAMPLES:
            raise InvalidRequestError(f"at most {proto.MAX_SAMPLES} prompts x n per request", param="n")
        tok = self.state.tokenizer
        pairs = [(p, tok.encode(p)) if isinstance(p, str) else (None, list(p)) for p in prompts]
        for _, ids in pairs:
            if not ids:
                raise InvalidRequestError("prompt must not be empty", param="prompt")
            self._check_tokens(ids, params)
        job = Job("completion", self.state.served_model_name, params, pairs, req.stream,
                  req.stream_options is not None and req.stream_options.include_usage, req.kv_transfer_params,
                  id=f"cmpl-{uuid.uuid4().hex}")
        if req.echo:
            job.echo = [text if text is not None else tok.decode(ids) for text, ids in pairs]
        return await self._run(request, job)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        req = proto.decode_body(await request.read(), proto.ChatCompletionRequest, self._ignore_fields)
        return await self._run(request, self.chat_job(req))

    def chat_job(self, req: proto.ChatCompletionRequest, kind: str = "chat", id_prefix: str = "chatcmpl-") -> Job:
        """A chat request, checked, rendered and planned (tools, structured outputs, reasoning)."""
        self._check_model(req.model)
        st = self.state
        plan = plan_tools(req.tools, req.tool_choice, req.parallel_tool_calls, st.config.enable_auto_tool_choice)
        keep_special = plan.mode == "auto" and st.tool_parser.needs_special_tokens
        params = proto.chat_params(req, plan.structured, keep_special, st.sampling_defaults)
        kwargs = dict(req.chat_template_kwargs or {})
        if req.reasoning_effort is not None:
            kwargs.setdefault("reasoning_effort", req.reasoning_effort)
        text, ids, urls = self._render_chat(req.messages, plan.tools, req.add_generation_prompt,
                                            req.continue_final_message, req.chat_template, kwargs)
        self._check_tokens(ids, params)
        if urls:
            st.images.check_count(len(urls))
        parser = ChatOutputParser(plan, st.tool_parser, st.reasoning_parser, text)
        return Job(kind, st.served_model_name, params, [(None, list(ids))], req.stream,
                   req.stream_options is not None and req.stream_options.include_usage, req.kv_transfer_params,
                   id=f"{id_prefix}{uuid.uuid4().hex}", parser=None if parser.trivial else parser, image_urls=urls)

    def _render_chat(self, messages, tools: list | None = None, add_generation_prompt: bool = True,
                     continue_final_message: bool = False, chat_template: str | None = None,
                     template_kwargs: dict | None = None) -> tuple[str, list[int], list[tuple[str, str]]]:
        """The prompt text and token ids of chat messages, rendered by the chat template (the request's, the
        server's --chat-template, or the tokenizer's) exactly as transformers' apply_chat_template does; and the
        image parts' (url, field path) for a model that takes images (one placeholder token each so far)."""
        urls = [] if self.state.images is not None else None
        messages = proto.chat_messages(messages, urls)
        if continue_final_message and add_generation_prompt:
            raise InvalidRequestError("continue_final_message needs add_generation_prompt=false",
                                      param="continue_final_message")
        if continue_final_message and messages[-1]["role"] != "assistant":
            raise InvalidRequestError("continue_final_message continues an assistant message; the last is not one",
                                      param="continue_final_message")
        tok = self.state.tokenizer
        template = chat_template or tok.chat_template
        if not template:
            raise InvalidRequestError("this model has no chat template; use /v1/completions or send chat_template",
                                      param="messages")
        try:
            text = tok.apply_chat_template(messages, tools=tools, chat_template=template, tokenize=False,
                                           add_generation_prompt=add_generation_prompt,
                                           continue_final_message=continue_final_message, **(template_kwargs or {}))
        except Exception as e:  # template errors (raise_exception in the template, bad kwargs)
            raise InvalidRequestError(f"the chat template failed: {e}", param="messages") from None
        return text, list(tok.encode(text, add_special_tokens=False)), urls or []

    # ---- tokenizer endpoints (vLLM's) ------------------------------------------------------------
    async def tokenize(self, request: web.Request) -> web.Response:
        req = proto.decode_body(await request.read(), proto.TokenizeRequest, self._ignore_fields)
        if req.model is not None:
            self._check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise InvalidRequestError("give exactly one of prompt or messages", param="prompt")
        if req.prompt is not None:
            ids = list(self.state.tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens))
        else:
            tools = plan_tools(req.tools, "none" if not req.tools else "auto", None, True).tools
            _, ids, urls = self._render_chat(req.messages, tools, req.add_generation_prompt,
                                             req.continue_final_message, req.chat_template, req.chat_template_kwargs)
            if urls:  # counted as the engine will see the prompt: each image as its placeholder tokens
                ids, _ = await self.state.images.place(ids, urls)
        return json_response({"count": len(ids), "max_model_len": self.state.info.max_model_len, "tokens": ids})

    async def detokenize(self, request: web.Request) -> web.Response:
        req = proto.decode_body(await request.read(), proto.DetokenizeRequest, self._ignore_fields)
        if req.model is not None:
            self._check_model(req.model)
        vocab = self.state.info.vocab_size
        if any(t < 0 or t >= vocab for t in req.tokens):
            raise InvalidRequestError(f"token ids must be in [0, {vocab})", param="tokens")
        return json_response({"prompt": self.state.tokenizer.decode(req.tokens)})

    # ---- running -------------------------------------------------------------------------------
    async def _submit(self, job: Job, queue: asyncio.Queue | None) -> None:
        client, limit = self.state.client, self.state.config.max_waiting_requests
        samples = len(job.prompts) * job.params.n
        if client.num_unstarted + samples > limit:
            raise OverloadedError(f"more than {limit} requests are waiting; retry later")
        for i, (text, ids) in enumerate(job.prompts):
            rid = job.id if len(job.prompts) == 1 else f"{job.id}-{i}"
            job.handles.append(await client.add(rid, text, ids, job.params, job.kv_transfer_params, queue=queue,
                                                images=job.images))
            self.state.metrics.request_started(len(ids))

    async def _abort_unfinished(self, job: Job) -> None:
        for h in job.handles:
            if not h.finished:
                await self.state.client.abort(h.request_id)

    async def _run(self, request: web.Request, job: Job) -> web.StreamResponse:
        if not self.state.config.disable_log_requests and log.isEnabledFor(logging.DEBUG):
            log.debug("event=request_received id=%s kind=%s prompts=%d prompt_tokens=%d stream=%s params=%s", job.id,
                      job.kind, len(job.prompts), sum(len(ids) for _, ids in job.prompts), job.stream, job.params)
        if job.kv_transfer_params and self.state.kv_sources is not None:
            await self.state.kv_sources.check(job.kv_transfer_params)
        kv = job.kv_transfer_params or {}
        if job.image_urls and kv.get("migration") is not None:
            # decode half of a PD pair: the migration says where the images sit in the prompt as prefill expanded
            # it, which usage counts; nothing is loaded here
            job.image_urls = []
            job.prompts = [(None, list(mig.decode(kv["migration"]).prompt_token_ids))]
        if job.image_urls:
            if kv.get("encoded_images") is not None:  # EPD: an encoder server has the embeddings
                ids, job.images = await self.state.images.place_encoded(job.prompts[0][1], job.image_urls,
                                                                        kv["encoded_images"])
            else:
                ids, job.images = await self.state.images.place(job.prompts[0][1], job.image_urls)
            job.prompts = [(None, ids)]
            self._check_tokens(ids, job.params)
        if job.kv_transfer_params and "encoded_images" in job.kv_transfer_params:  # the front's business only
            job.kv_transfer_params = {k: v for k, v in job.kv_transfer_params.items() if k != "encoded_images"} or None
        shared = asyncio.Queue() if job.stream else None
        limit = self.state.config.request_timeout
        deadline = asyncio.get_running_loop().call_later(limit, self._expire, job, limit) if limit else None
        try:
            await self._submit(job, shared)
            if job.stream and job.kind == "response":
                return await responses_api.stream(self, request, job, shared)
            if job.stream:
                return await self._stream(request, job, shared)
            for h in job.handles:
                while True:
                    item = await h.queue.get()
                    if isinstance(item, BaseException):
                        raise item
                    if item.finished:
                        break
            self._record_finished(job)
            if job.kind == "response":
                return json_response(responses_api.full_body(self, job))
            return json_response(self._full_response(job))
        finally:
            if deadline is not None:
                deadline.cancel()
            await self._abort_unfinished(job)  # client gone, error, deadline or drain: free the KV now

    @staticmethod
    def _expire(job: Job, limit: float) -> None:
        """The deadline passed: the request ends with a 504 (an error event when streaming)."""
        error = DeadlineExceededError(f"the request did not finish within --request-timeout {limit:g} s")
        for h in job.handles:
            if not h.finished:
                h.queue.put_nowait(error)

    def _record_finished(self, job: Job) -> None:
        now = time.monotonic()
        for h in job.handles:
            decode = now - min(h.first_token_at.values()) if h.first_token_at else None
            self.state.metrics.request_finished(h.output, now - h.arrival, decode)

    # ---- bodies --------------------------------------------------------------------------------
    def _choices(self, job: Job):
        """(choice index, sample id, CompletionOutput) over every prompt and sample."""
        for p, h in enumerate(job.handles):
            for c in (h.output.outputs if h.output is not None else ()):
                yield p * job.params.n + c.index, child_id(h.request_id, c.index, job.params.n), c

    def _usage(self, job: Job) -> dict:
        prompt = sum(len(ids) for _, ids in job.prompts)
        completion = sum(len(c.token_ids) for h in job.handles if h.output for c in h.output.outputs)
        cached = sum(h.output.num_cached_tokens for h in job.handles if h.output)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": cached}}

    def _logprobs(self, job: Job, c: CompletionOutput, start: int, end: int, text_offset: int = 0):
        if c.logprobs is None:
            return None
        n = job.params.logprobs or 0
        rows = []
        for token, entry in zip(c.token_ids[start:end], c.logprobs[start:end]):
            top = sorted((e for e in entry.values() if e.rank is not None and e.rank <= n), key=lambda e: e.rank)
            rows.append((entry[token], top))
        if job.kind == "chat":
            def item(e):
                text = e.decoded_token or ""
                return {"token": text, "logprob": e.logprob, "bytes": list(text.encode())}
            return {"content": [{**item(lp), "top_logprobs": [item(e) for e in top]} for lp, top in rows]}
        offsets, pos = [], text_offset
        for lp, _ in rows:
            offsets.append(pos)
            pos += len(lp.decoded_token or "")
        return {"tokens": [lp.decoded_token for lp, _ in rows], "token_logprobs": [lp.logprob for lp, _ in rows],
                # vLLM's shape: each row holds the sampled token too, whatever its rank (last: where two
                # tokens decode to the same text, the sampled one's value stands)
                "top_logprobs": [{**{e.decoded_token: e.logprob for e in top}, lp.decoded_token: lp.logprob}
                                 for lp, top in rows],
                "text_offset": offsets}

    @staticmethod
    def _prompt_logprobs(h) -> list | None:
        """vLLM's `prompt_logprobs` of a choice: None for the first prompt token, then {token id: logprob entry}."""
        rows = h.output.prompt_logprobs if h.output is not None else None
        if rows is None:
            return None
        return [None if e is None else {str(t): {"logprob": v.logprob, "rank": v.rank, "decoded_token": v.decoded_token}
                                        for t, v in e.items()} for e in rows]

    def _echo_logprobs(self, job: Job, h) -> dict:
        """The prompt's rows of an echoed completion's logprobs (the first token has none, as in vLLM)."""
        n, ids, rows = job.params.logprobs or 0, h.output.prompt_token_ids, h.output.prompt_logprobs or []
        tokens = [self.state.tokenizer.decode([t]) for t in ids]
        offsets = [0]
        for text in tokens[:-1]:
            offsets.append(offsets[-1] + len(text))
        top = [None] + [{**{e.decoded_token: e.logprob for e in entry.values() if e.rank is not None and e.rank <= n},
                         entry[t].decoded_token: entry[t].logprob} for t, entry in zip(ids[1:], rows[1:])]
        return {"tokens": tokens, "token_logprobs": [None] + [entry[t].logprob for t, entry in zip(ids[1:], rows[1:])],
                "top_logprobs": top, "text_offset": offsets}

    def _with_echo(self, job: Job, index: int, text: str, lp: dict | None) -> tuple[str, dict | None]:
        """An echoed choice: the prompt's text before its own, and with logprobs the prompt's rows before its."""
        h = job.handles[index // job.params.n]
        prompt = job.echo[index // job.params.n]
        if lp is not None:
            head = self._echo_logprobs(job, h)
            lp = {k: head[k] + lp[k] for k in head}
        return prompt + text, lp

    def _full_response(self, job: Job) -> dict:
        choices = []
        for index, _, c in self._choices(job):
            offset = len(job.echo[index // job.params.n]) if job.echo else 0
            lp = self._logprobs(job, c, 0, len(c.token_ids), offset)
            if job.kind == "chat":
                msg, called = job.parser.message(c.text) if job.parser else ({"content": c.text}, False)
                msg["role"] = self.state.config.response_role
                choices.append({"index": index, "message": msg, "logprobs": lp,
                                "finish_reason": self._finish_reason(job, c, called), "stop_reason": c.stop_reason})
            else:
                text = c.text
                if job.echo:
                    text, lp = self._with_echo(job, index, text, lp)
                choices.append({"index": index, "text": text, "logprobs": lp, "finish_reason": c.finish_reason,
                                "stop_reason": c.stop_reason})
            if job.params.prompt_logprobs is not None:
                choices[-1]["prompt_logprobs"] = self._prompt_logprobs(job.handles[index // job.params.n])
        choices.sort(key=lambda ch: ch["index"])
        body = {"id": job.id, "object": "chat.completion" if job.kind == "chat" else "text_completion",
                "created": job.created, "model": job.model, "choices": choices, "usage": self._usage(job)}
        kv = [h.kv_transfer_params for h in job.handles if h.kv_transfer_params is not None]
        if kv:  # prefill role: the hand-off descriptor for the decode engine (DLRouter's PD flow)
            body["kv_transfer_params"] = kv[0]
        return body

    @staticmethod
    def _finish_reason(job: Job, c: CompletionOutput, called: bool) -> str | None:
        """OpenAI's "tool_calls" when the model chose to call (auto / required; a named call stays "stop")."""
        if called and c.finish_reason == "stop" and job.parser.plan.mode in ("auto", "required"):
            return "tool_calls"
        return c.finish_reason

    # ---- streaming -----------------------------------------------------------------------------
    def _chunk(self, job: Job, choices: list[dict], usage: dict | None = None) -> bytes:
        body = {"id": job.id, "object": "chat.completion.chunk" if job.kind == "chat" else "text_completion",
                "created": job.created, "model": job.model, "choices": choices}
        if usage is not None:
            body["usage"] = usage
        return b"data: " + json_encoder.encode(body) + b"\n\n"

    def _stream_choice(self, job: Job, index: int, text: str | dict, c: CompletionOutput, lp, finished: bool,
                       called: bool = False) -> dict:
        reason = self._finish_reason(job, c, called) if finished and job.parser else c.finish_reason if finished else None
        stop_reason = c.stop_reason if finished else None
        if job.kind == "chat":
            delta = text if isinstance(text, dict) else {"content": text} if text else {}
            return {"index": index, "delta": delta, "logprobs": lp, "finish_reason": reason,
                    "stop_reason": stop_reason}
        return {"index": index, "text": text, "logprobs": lp, "finish_reason": reason, "stop_reason": stop_reason}

    async def _stream(self, request: web.Request, job: Job, queue: asyncio.Queue) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        sent_chars: dict[str, int] = {}
        sent_tokens: dict[str, int] = {}
        streams: dict[str, ChatStream] = {}
        if job.kind == "chat":  # OpenAI opens every choice with the assistant role
            role = self.state.config.response_role
            first = [{"index": i, "delta": {"role": role, "content": ""}, "logprobs": None,
                      "finish_reason": None} for i in range(len(job.prompts) * job.params.n)]
            await resp.write(self._chunk(job, first))
        echo_pending = bool(job.echo)  # the prompts come first (with their logprobs: once the first token brings them)
        processor = self.state.client.processor
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                while not queue.empty():  # coalesce what piled up while we were writing
                    item = queue.get_nowait()
                    if isinstance(item, BaseException):
                        raise item
                choices = []
                if echo_pending and (job.params.logprobs is None or all(h.output is not None and h.output.prompt_logprobs
                                                                        is not None for h in job.handles)):
                    echo_pending = False
                    await resp.write(self._chunk(job, [
                        {"index": i, "text": job.echo[i // job.params.n], "finish_reason": None,
                         "logprobs": None if job.params.logprobs is None else
                         self._echo_logprobs(job, job.handles[i // job.params.n])}
                        for i in range(len(job.prompts) * job.params.n)]))
                for index, sid, c in self._choices(job):
                    if c.finish_reason is not None and sent_chars.get(sid) == -1:
                        continue  # already closed
                    finished = c.finish_reason is not None
                    child = processor.children.get(sid)
                    safe = len(c.text) if finished or child is None else child.detok.stream_safe_len(False)
                    start, ntok = sent_chars.get(sid, 0), sent_tokens.get(sid, 0)
                    text = c.text[start:max(start, safe)]
                    base = len(job.echo[index // job.params.n]) if job.echo else 0
                    lp = self._logprobs(job, c, ntok, len(c.token_ids), base + start) if len(c.token_ids) > ntok else None
                    if job.parser is not None:  # reasoning / tool calls: the parsed difference, not raw text
                        stream = streams.setdefault(sid, ChatStream(job.parser))
                        delta = stream.delta(c.text[:start + len(text)], finished)
                        if delta or lp or finished:
                            choices.append(self._stream_choice(job, index, delta, c, lp, finished, stream.has_calls))
                    elif text or lp or finished:
                        choices.append(self._stream_choice(job, index, text, c, lp, finished))
                    sent_chars[sid] = -1 if finished else start + len(text)
                    sent_tokens[sid] = len(c.token_ids)
                if choices:
                    await resp.write(self._chunk(job, choices))
                if queue.empty() and all(h.finished for h in job.handles):
                    break  # a handle is marked finished before its last output is queued
            self._record_finished(job)
            if job.include_usage:
                await resp.write(self._chunk(job, [], usage=self._usage(job)))
        except EngineError as e:  # headers are out: the error travels as an event
            await resp.write(b"data: " + json_encoder.encode(error_body(e)) + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp
