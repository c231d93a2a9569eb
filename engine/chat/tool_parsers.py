"""Tool-call parsers (`--tool-call-parser`, vLLM's names): a model's text -> content and OpenAI tool calls.

Every parser is a pure function of the text so far, `parse(text, final)`. With `final=False` it holds back any
text that may still turn out to belong to a call (an open call block, a partial start marker), so that the
parse of a prefix is always a prefix of the parse of the whole: content only grows and calls are only
appended. Streaming then sends the differences, and the streamed and the non-streamed answers are equal by
construction (engine/chat/output.py).
"""
from __future__ import annotations

import abc
import json
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class ParsedCall:
    name: str
    arguments: str  # a JSON text (OpenAI's `function.arguments`)
    id: str | None = None  # the model's own call id, when its format has one (Kimi-K2)


def _arguments(value) -> str | None:
    """OpenAI's arguments text of a parsed value (an object), or None when it is not one."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return None
    return json.dumps(value, ensure_ascii=False) if isinstance(value, dict) else None


def partial_suffix(text: str, marker: str) -> int:
    """Length of the longest proper prefix of `marker` that `text` ends with (text to hold back)."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0


class ToolParser(abc.ABC):
    name = ""
    needs_special_tokens = False  # its markers are special tokens: keep them in the detokenized text

    @abc.abstractmethod
    def parse(self, text: str, final: bool) -> tuple[str, list[ParsedCall]]:
        """(content, complete calls) of the output so far (see the module's docstring)."""


class MarkerToolParser(ToolParser):
    """Calls between a start and an end marker, anywhere in the text; everything else is content, except the
    format's section markers, which are dropped."""

    start = end = ""
    section_markers: tuple[str, ...] = ()
    # a call's text between the markers, with groups `name`, `args` and optionally `id` (its own call id)
    _body: re.Pattern | None = None

    def body(self, text: str) -> ParsedCall | None:
        """The call between the markers, or None when the text is not one."""
        m = self._body.match(text)
        args = _arguments(m.group("args").strip()) if m else None
        return None if args is None else ParsedCall(m.group("name"), args, id=m.groupdict().get("id"))

    def parse(self, text: str, final: bool) -> tuple[str, list[ParsedCall]]:
        content, calls, pos = [], [], 0
        while True:
            at = text.find(self.start, pos)
            if at < 0:
                tail = text[pos:]
                if not final:  # a start (or section) marker may be arriving
                    tail = tail[:len(tail) - max(partial_suffix(tail, m) for m in (self.start, *self.section_markers))]
                content.append(tail)
                break
            content.append(text[pos:at])
            close = text.find(self.end, at + len(self.start))
            if close < 0 and not final:
                break  # an open call: wait for its end
            inner = text[at + len(self.start):close if close >= 0 else len(text)]
            call = self.body(inner)
            if call is None:  # not a call after all: its text is content
                content.append(text[at:close + len(self.end) if close >= 0 else len(text)])
            else:
                calls.append(call)
            if close < 0:
                break
            pos = close + len(self.end)
        out = "".join(content)
        for marker in self.section_markers:
            out = out.replace(marker, "")
        return out, calls


class HermesToolParser(MarkerToolParser):
    """Hermes / Qwen2.5 / Qwen3: `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`."""

    name = "hermes"
    start, end = "<tool_call>", "</tool_call>"

    def body(self, text: str) -> ParsedCall | None:
        try:
            obj = json.loads(text)
        except json.JSONDecodeError:
            return None
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            return None
        args = _arguments(obj.get("arguments", obj.get("parameters", {})))
        return None if args is None else ParsedCall(obj["name"], args)


class DeepSeekV3ToolParser(MarkerToolParser):
    """DeepSeek-V3: `<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\\n```json\\n{...}\\n```
    <｜tool▁call▁end｜>...<｜tool▁calls▁end｜>`."""

    name = "deepseek_v3"
    needs_special_tokens = True
    start, end = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>"
    section_markers = ("<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>")
    _body = re.compile(r"^\s*(?:function)?<｜tool▁sep｜>\s*(?P<name>[^\n`]+?)\s*\n```(?:json)?\s*\n?(?P<args>.*?)\n?```\s*$",
                       re.S)


class KimiK2ToolParser(MarkerToolParser):
    """Kimi-K2: `<|tool_calls_section_begin|><|tool_call_begin|>functions.NAME:0<|tool_call_argument_begin|>{...}
    <|tool_call_end|><|tool_calls_section_end|>`; `functions.NAME:0` is the call's id."""

    name = "kimi_k2"
    needs_special_tokens = True
    start, end = "<|tool_call_begin|>", "<|tool_call_end|>"
    section_markers = ("<|tool_calls_section_begin|>", "<|tool_calls_section_end|>")
    _body = re.compile(r"^\s*(?P<id>(?:functions\.)?(?P<name>[\w.\-]+?)(?::\d+)?)\s*<\|tool_call_argument_begin\|>"
                       r"(?P<args>.*)$", re.S)


class Llama3JsonToolParser(ToolParser):
    """Llama 3.x JSON tool calls: the whole answer is `{"name": ..., "parameters": {...}}` (optionally after
    `<|python_tag|>`), several separated by `;`. Anything else is content."""

    name = "llama3_json"
    tag = "<|python_tag|>"

    def parse(self, text: str, final: bool) -> tuple[str, list[ParsedCall]]:
        head = text.lstrip()
        may_be_call = head.startswith(("{", self.tag)) or self.tag.startswith(head)
        if not may_be_call:
            return text, []
        if not final:
            return "", []  # hold it all: the answer is a call only if it parses as one at the end
        calls = self._calls(head[len(self.tag):] if head.startswith(self.tag) else head)
        return ("", calls) if calls else (text, [])

    @staticmethod
    def _calls(text: str) -> list[ParsedCall] | None:
        decoder, calls, pos = json.JSONDecoder(), [], 0
        while True:
            while pos < len(text) and text[pos] in " \t\n;":
                pos += 1
            if pos == len(text):
                return calls or None
            try:
                obj, pos = decoder.raw_decode(text, pos)
            except json.JSONDecodeError:
                return None
            if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
                return None
            args = _arguments(obj.get("parameters", obj.get("arguments", {})))
            if args is None:
                return None
            calls.append(ParsedCall(obj["name"], args))


TOOL_PARSERS: dict[str, type[ToolParser]] = {
    p.name: p for p in (HermesToolParser, Llama3JsonToolParser, DeepSeekV3ToolParser, KimiK2ToolParser)}
TOOL_PARSERS["qwen3"] = HermesToolParser  # Qwen's own name for the Hermes format
