"""A chat choice's text -> OpenAI message fields (`reasoning_content`, `content`, `tool_calls`), whole or as
streaming deltas. The reasoning parser runs first, then the tool plan reads calls out of what is left.
Streaming sends the difference between the parse of the text so far and what was sent: the parsers are
prefix-monotonic (engine/chat/tool_parsers.py), so the deltas add up to the non-streamed message."""
from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from engine.chat.reasoning import ThinkParser
from engine.chat.tool_parsers import ParsedCall, ToolParser
from engine.chat.tools import ToolPlan


@dataclass
class Parsed:
    reasoning: str = ""
    content: str = ""
    calls: list[ParsedCall] = field(default_factory=list)


def call_id() -> str:
    return f"chatcmpl-tool-{uuid.uuid4().hex[:24]}"


class ChatOutputParser:
    """How one request's choices are read: its reasoning parser, tool plan and the server's tool parser."""

    def __init__(self, plan: ToolPlan | None, tool_parser: ToolParser | None, reasoning: ThinkParser | None,
                 prompt_text: str = ""):
        self.plan = plan
        self.tool_parser = tool_parser if plan is not None and plan.mode == "auto" else None
        self.reasoning = reasoning
        self.opened = reasoning.opens(prompt_text) if reasoning is not None else False

    @property
    def trivial(self) -> bool:
        """Plain text in, plain content out."""
        return self.reasoning is None and (self.plan is None or self.plan.mode == "none")

    def parse(self, text: str, final: bool) -> Parsed:
        reasoning = ""
        if self.reasoning is not None:
            reasoning, text = self.reasoning.split(text, final, self.opened)
        mode = self.plan.mode if self.plan is not None else "none"
        if mode == "auto" and self.tool_parser is not None:
            content, calls = self.tool_parser.parse(text, final)
        elif mode in ("required", "named"):
            calls = self.plan.parse_forced(text) if final else None
            if mode == "named" and not final:
                return Parsed(reasoning)  # streamed as argument deltas by ChatStream
            content, calls = ("", calls) if calls else (text if final else "", [])
        else:
            content, calls = text, []
        if self.plan is not None and not self.plan.parallel:
            calls = calls[:1]
        return Parsed(reasoning, content, calls)

    def message(self, text: str) -> tuple[dict, bool]:
        """The final assistant message, and whether it holds tool calls."""
        p = self.parse(text, final=True)
        msg = {"role": "assistant", "content": p.content or (None if p.calls else p.content)}
        if p.reasoning or self.reasoning is not None:
            msg["reasoning_content"] = p.reasoning or None
        msg["tool_calls"] = [tool_call(c, c.id or call_id()) for c in p.calls]
        return msg, bool(p.calls)


def tool_call(call: ParsedCall, id_: str, index: int | None = None) -> dict:
    out = {"id": id_, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
    return out if index is None else {"index": index, **out}


class ChatStream:
    """One streamed choice: what was sent so far, and the next delta."""

    def __init__(self, parser: ChatOutputParser):
        self.parser = parser
        self.sent_reasoning = self.sent_content = self.sent_calls = 0
        self.named_id: str | None = None
        self.sent_arguments = 0

    @property
    def has_calls(self) -> bool:
        return self.sent_calls > 0 or self.named_id is not None

    def delta(self, text: str, final: bool) -> dict:
        p = self.parser.parse(text, final)
        delta: dict = {}
        if len(p.reasoning) > self.sent_reasoning:
            delta["reasoning_content"] = p.reasoning[self.sent_reasoning:]
            self.sent_reasoning = len(p.reasoning)
        if len(p.content) > self.sent_content:
            delta["content"] = p.content[self.sent_content:]
            self.sent_content = len(p.content)
        calls = []
        plan = self.parser.plan
        if plan is not None and plan.mode == "named":
            calls = self._named_delta(text, final)
        else:
            for i, c in enumerate(p.calls[self.sent_calls:], start=self.sent_calls):
                calls.append(tool_call(c, c.id or call_id(), index=i))
            self.sent_calls = len(p.calls)
        if calls:
            delta["tool_calls"] = calls
        return delta

    def _named_delta(self, text: str, final: bool) -> list[dict]:
        """A named function's arguments are the answer itself: streamed as argument text as it comes."""
        if self.parser.reasoning is not None:
            _, text = self.parser.reasoning.split(text, final, self.parser.opened)
        out = []
        if self.named_id is None and (text or final):
            self.named_id = call_id()
            out.append({"index": 0, "id": self.named_id, "type": "function",
                        "function": {"name": self.parser.plan.function, "arguments": ""}})
        if len(text) > self.sent_arguments:
            if out:
                out[0]["function"]["arguments"] = text[self.sent_arguments:]
            else:
                out.append({"index": 0, "function": {"arguments": text[self.sent_arguments:]}})
            self.sent_arguments = len(text)
        return out
