"""OpenAI request bodies (completions, chat completions) as msgspec Structs, and their validation into
SamplingParams. Lenient where vLLM is: unknown fields are ignored (reported to the caller, which logs each
name once) and an explicit `null` means "the default", so a client may send back the assistant message it
received (`refusal: null`, `tool_calls`, ...). Wrong types and bad values of known fields stay
InvalidRequestErrors that name the offending field (`param`)."""
from __future__ import annotations

import json
import re
import typing
from typing import Any

import msgspec

from engine.errors import InvalidRequestError
from engine.sampling_params import MAX_LOGPROBS, SamplingParams
from engine.structured.params import StructuredOutputsParams

MAX_STOP_STRINGS = 64
MAX_STOP_CHARS = 1024
MAX_SAMPLES = 256  # prompts x n in one completions request
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")


class StreamOptions(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class _SamplingFields(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    model: str
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # vLLM extensions
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    prompt_logprobs: int | None = None
    # structured outputs: OpenAI's response_format, vLLM's structured_outputs and its older guided_* names
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    # prefill/decode hand-off (DLRouter); opaque here, passed through to the engine core
    kv_transfer_params: dict[str, Any] | None = None


class CompletionRequest(_SamplingFields, kw_only=True, forbid_unknown_fields=True):
    prompt: str | list[Any]
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


class ContentPart(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    type: str
    text: str | None = None
    image_url: dict[str, Any] | None = None  # parsed so that the error says what is unsupported


class ChatMessage(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None
    # history an OpenAI client sends back: the assistant's calls and reasoning, and tool results
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None


class ChatCompletionRequest(_SamplingFields, kw_only=True, forbid_unknown_fields=True):
    messages: list[ChatMessage]
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    reasoning_effort: str | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None


class TokenizeRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """vLLM's /tokenize: a prompt, or chat messages rendered by the chat template."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    tools: list[Any] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = True
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None


class DetokenizeRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    model: str | None = None
    tokens: list[int]


_AT = re.compile(r"at `\$\.?([^`]*)`")
_UNKNOWN = re.compile(r"unknown field `([^`]*)`")
_MISSING = re.compile(r"missing required field `([^`]*)`")


def _known(obj, cls: type, path: str, unknown: list[str]):
    """obj without the keys `cls` does not know (their paths go to `unknown`) and without null values, the
    same through nested Structs, lists of them and their unions (a chat message's content parts)."""
    if isinstance(obj, list):
        return [_known(v, cls, f"{path}[{i}]", unknown) for i, v in enumerate(obj)]
    if not isinstance(obj, dict) or not (isinstance(cls, type) and issubclass(cls, msgspec.Struct)):
        return obj
    hints = typing.get_type_hints(cls)
    out = {}
    for key, value in obj.items():
        if key not in hints:
            unknown.append(f"{path}.{key}" if path else key)
        elif value is not None:
            out[key] = _known(value, _struct_in(hints[key]), f"{path}.{key}" if path else key, unknown)
    return out


def _struct_in(hint):
    """The Struct a field holds (directly, in a list, or in a union), or None."""
    if isinstance(hint, type) and issubclass(hint, msgspec.Struct):
        return hint
    for arg in typing.get_args(hint):
        found = _struct_in(arg)
        if found is not None:
            return found
    return None


def decode_body(body: bytes, cls: type, on_unknown=None):
    """Parses a JSON body into `cls`; errors name the field (`param`) where msgspec says which. Unknown fields
    are dropped and their paths passed to `on_unknown`; null values mean the field's default."""
    try:
        raw = msgspec.json.decode(body)
    except msgspec.DecodeError as e:
        raise InvalidRequestError(f"request body is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise InvalidRequestError("request body must be a JSON object")
    unknown: list[str] = []
    raw = _known(raw, cls, "", unknown)
    if unknown and on_unknown is not None:
        on_unknown(unknown)
    try:
        return msgspec.convert(raw, cls)
    except msgspec.ValidationError as e:
        text = str(e)
        at = _AT.search(text)
        path = at.group(1) if at else ""
        field = _UNKNOWN.search(text) or _MISSING.search(text)
        if field:
            path = f"{path}.{field.group(1)}" if path else field.group(1)
        raise InvalidRequestError(f"invalid request body: {text}", param=path or None) from None


def _check(ok: bool, param: str, message: str) -> None:
    if not ok:
        raise InvalidRequestError(message, param=param)


def _stop_list(stop) -> list[str] | None:
    if stop is None:
        return None
    stops = [stop] if isinstance(stop, str) else stop
    _check(len(stops) <= MAX_STOP_STRINGS, "stop", f"at most {MAX_STOP_STRINGS} stop strings are allowed")
    _check(all(0 < len(s) <= MAX_STOP_CHARS for s in stops), "stop",
           f"stop strings must be 1 to {MAX_STOP_CHARS} characters long")
    return stops or None


def structured_outputs(req: _SamplingFields) -> StructuredOutputsParams | None:
    """The request's one output constraint, from whichever of its spellings it used (checked: a bad schema,
    regex or grammar is a 400 here)."""
    given = {}
    if req.response_format is not None:
        spec = _response_format(req.response_format)
        if spec is not None:
            given["response_format"] = spec
    if req.structured_outputs is not None:
        fields = {k: v for k, v in req.structured_outputs.items() if v is not None and k != "backend"}
        try:
            given["structured_outputs"] = msgspec.convert(fields, StructuredOutputsParams)
        except msgspec.ValidationError as e:
            raise InvalidRequestError(f"invalid structured_outputs: {e}", param="structured_outputs") from None
    for name, kind in (("guided_json", "json"), ("guided_regex", "regex"), ("guided_choice", "choice"),
                       ("guided_grammar", "grammar")):
        if getattr(req, name) is not None:
            given[name] = StructuredOutputsParams(**{kind: getattr(req, name)})
    _check(len(given) <= 1, next(iter(given), "structured_outputs"),
           f"give one output constraint, not {len(given)} ({', '.join(given)})")
    if not given:
        return None
    spec = next(iter(given.values()))
    spec.check()
    return spec


def _response_format(fmt: dict) -> StructuredOutputsParams | None:
    kind = fmt.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutputsParams(json_object=True)
    if kind == "json_schema":
        body = fmt.get("json_schema")
        schema = body.get("schema", body.get("json_schema")) if isinstance(body, dict) else None
        _check(isinstance(schema, (dict, str)), "response_format.json_schema.schema",
               "response_format json_schema needs json_schema.schema (a JSON schema object)")
        return StructuredOutputsParams(json=schema)
    raise InvalidRequestError('response_format.type must be "text", "json_object" or "json_schema"',
                              param="response_format.type")


def _logit_bias(bias: dict[str, float] | None) -> dict[int, float] | None:
    if not bias:
        return None
    try:
        return {int(k): v for k, v in bias.items()}
    except ValueError:
        raise InvalidRequestError("logit_bias keys must be token ids", param="logit_bias") from None


def sampling_params(req: _SamplingFields, logprobs: int | None, default_max_tokens: int | None,
                    structured: StructuredOutputsParams | None = None, defaults: dict | None = None) -> SamplingParams:
    """The engine's SamplingParams for an OpenAI request (SamplingParams validates the values). `defaults`: the
    checkpoint's generation_config values, used where the request leaves a field unset."""
    defaults = defaults or {}
    _check(req.stream_options is None or req.stream, "stream_options", "stream_options needs stream=true")
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    if max_tokens is None:
        max_tokens = defaults.get("max_tokens", default_max_tokens)
    _check(req.stop_token_ids is None or len(req.stop_token_ids) <= MAX_STOP_STRINGS, "stop_token_ids",
           f"at most {MAX_STOP_STRINGS} stop token ids are allowed")

    def pick(value, default, name=None):
        return defaults.get(name, default) if value is None else value

    return SamplingParams(
        n=req.n, temperature=pick(req.temperature, 1.0, "temperature"), top_p=pick(req.top_p, 1.0, "top_p"),
        top_k=pick(req.top_k, 0, "top_k"), min_p=pick(req.min_p, 0.0, "min_p"), seed=req.seed,
        presence_penalty=pick(req.presence_penalty, 0.0), frequency_penalty=pick(req.frequency_penalty, 0.0),
        repetition_penalty=pick(req.repetition_penalty, 1.0, "repetition_penalty"),
        max_tokens=max_tokens, min_tokens=req.min_tokens, stop=_stop_list(req.stop),
        stop_token_ids=req.stop_token_ids, ignore_eos=req.ignore_eos, logprobs=logprobs,
        skip_special_tokens=req.skip_special_tokens, include_stop_str_in_output=req.include_stop_str_in_output,
        logit_bias=_logit_bias(req.logit_bias), structured_outputs=structured, prompt_logprobs=req.prompt_logprobs)


def completion_params(req: CompletionRequest, defaults: dict | None = None) -> SamplingParams:
    _check(req.suffix is None, "suffix", "suffix is not supported")
    _check(req.best_of is None or req.best_of == req.n, "best_of", "best_of must equal n (or be omitted)")
    _check(req.logprobs is None or 0 <= req.logprobs <= MAX_LOGPROBS, "logprobs",
           f"logprobs must be an integer in [0, {MAX_LOGPROBS}]")
    params = sampling_params(req, req.logprobs, default_max_tokens=16, structured=structured_outputs(req),
                             defaults=defaults)
    if req.echo and req.logprobs is not None and params.prompt_logprobs is None:  # echoed prompt rows need them
        params = msgspec.structs.replace(params, prompt_logprobs=req.logprobs)
    return params


def chat_params(req: ChatCompletionRequest, forced: StructuredOutputsParams | None = None,
                keep_special_tokens: bool = False, defaults: dict | None = None) -> SamplingParams:
    """`forced`: the constraint a `required` or named tool_choice imposes (it excludes any other);
    `keep_special_tokens`: the tool parser's markers are special tokens."""
    _check(req.top_logprobs is None or 0 <= req.top_logprobs <= MAX_LOGPROBS, "top_logprobs",
           f"top_logprobs must be an integer in [0, {MAX_LOGPROBS}]")
    _check(req.top_logprobs is None or req.logprobs, "top_logprobs", "top_logprobs needs logprobs=true")
    own = structured_outputs(req)
    _check(own is None or forced is None, "tool_choice",
           "a required or named tool_choice already constrains the output; drop response_format / structured_outputs")
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    params = sampling_params(req, logprobs, default_max_tokens=None, structured=forced or own, defaults=defaults)
    if keep_special_tokens:
        params = msgspec.structs.replace(params, skip_special_tokens=False)
    return params


def completion_prompts(prompt) -> list[str | list[int]]:
    """The prompts of a completions request: a string, token ids, or a list of either."""
    if isinstance(prompt, str):
        prompts = [prompt]
    elif prompt and all(_is_token(t) for t in prompt):
        prompts = [prompt]
    elif prompt and all(isinstance(p, str) or (isinstance(p, list) and all(_is_token(t) for t in p))
                        for p in prompt):
        prompts = list(prompt)
    else:
        raise InvalidRequestError("prompt must be a string, a list of token ids, or a non-empty list of either",
                                  param="prompt")
    _check(all(len(p) > 0 for p in prompts), "prompt", "prompt must not be empty")
    return prompts


def _is_token(t) -> bool:
    return isinstance(t, int) and not isinstance(t, bool)


def chat_messages(messages: list[ChatMessage], images: list[tuple[str, str]] | None = None) -> list[dict]:
    """Messages as the tokenizer's chat template takes them. Text parts are joined; with `images` (a list to fill:
    the model takes images) image_url parts stay in place as {"type": "image"} parts, as multimodal templates
    read them, and their (url, field path) are appended to `images` in prompt order."""
    _check(len(messages) > 0, "messages", "messages must not be empty")
    out = []
    for i, m in enumerate(messages):
        _check(m.role in CHAT_ROLES, f"messages[{i}].role", f"role must be one of {', '.join(CHAT_ROLES)}")
        content = m.content
        if isinstance(content, list):
            content = _content_parts(content, f"messages[{i}].content", images)
        _check(content is not None or m.role == "assistant", f"messages[{i}].content", "content is required")
        msg = {"role": m.role, "content": content or ""}
        for key in ("name", "tool_call_id", "reasoning_content"):
            if getattr(m, key) is not None:
                msg[key] = getattr(m, key)
        if m.tool_calls:
            msg["tool_calls"] = [_history_call(c, f"messages[{i}].tool_calls[{j}]") for j, c in enumerate(m.tool_calls)]
        out.append(msg)
    return out


def _content_parts(parts: list[ContentPart], at: str, images: list[tuple[str, str]] | None) -> str | list[dict]:
    has_image = False
    for j, p in enumerate(parts):
        if p.type == "image_url":
            _check(images is not None, f"{at}[{j}]", "this model does not take images")
            _check(isinstance(p.image_url, dict) and isinstance(p.image_url.get("url"), str),
                   f"{at}[{j}].image_url", 'an image part is {"type": "image_url", "image_url": {"url": "..."}}')
            has_image = True
        else:
            _check(p.type == "text" and p.text is not None, f"{at}[{j}]",
                   "content parts are text" + (" or image_url" if images is not None else ""))
    if not has_image:
        return "".join(p.text for p in parts)
    out = []
    for j, p in enumerate(parts):
        if p.type == "image_url":
            images.append((p.image_url["url"], f"{at}[{j}].image_url"))
            out.append({"type": "image"})
        else:
            out.append({"type": "text", "text": p.text})
    return out


def _history_call(call: dict, at: str) -> dict:
    """An assistant's earlier tool call as chat templates read it: `function.arguments` as an object (OpenAI
    sends the JSON text; templates write `arguments | tojson`), as vLLM does."""
    fn = call.get("function")
    _check(isinstance(fn, dict) and isinstance(fn.get("name"), str), f"{at}.function",
           "a tool call needs function.name")
    args = fn.get("arguments")
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError:
            raise InvalidRequestError("function.arguments must be a JSON text", param=f"{at}.function.arguments") from None
    return {**call, "function": {**fn, "arguments": args if args is not None else {}}}


def check_prompt_fits(num_prompt_tokens: int, params: SamplingParams, max_model_len: int) -> None:
    """vLLM's rule: the prompt plus the requested output must fit the context."""
    from engine.errors import PromptTooLongError
    if num_prompt_tokens >= max_model_len:
        raise PromptTooLongError(f"this model's maximum context length is {max_model_len} tokens; the prompt has "
                                 f"{num_prompt_tokens} tokens and at least one must remain for the output",
                                 param="prompt")
    if params.max_tokens is not None and num_prompt_tokens + params.max_tokens > max_model_len:
        raise InvalidRequestError(f"this model's maximum context length is {max_model_len} tokens; you requested "
                                  f"{num_prompt_tokens + params.max_tokens} ({num_prompt_tokens} in the prompt, "
                                  f"{params.max_tokens} for the output)", param="max_tokens")
