"""OpenAI `tools` and `tool_choice`: checked once, then turned into how the answer is produced and read.

- `none`: the tools are left out of the prompt and the answer is plain text.
- `auto`: the tools go to the chat template and the server's `--tool-call-parser` reads calls out of the text.
- `required` / a named function: enforced through structured outputs, as vLLM does — `required` makes the
  model write a JSON list of `{"name", "parameters"}` objects (one of the tools each), a named function makes
  it write that function's arguments object. Neither is hoped for.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from engine.chat.tool_parsers import ParsedCall
from engine.errors import InvalidRequestError
from engine.structured.params import StructuredOutputsParams

_NAME = re.compile(r"^[A-Za-z0-9_\-.]{1,64}$")


@dataclass
class ToolPlan:
    mode: str  # "none" | "auto" | "required" | "named"
    tools: list[dict] | None  # what the chat template gets (None: no tools in the prompt)
    structured: StructuredOutputsParams | None = None
    function: str | None = None  # the named function
    parallel: bool = True

    def parse_forced(self, text: str) -> list[ParsedCall] | None:
        """The calls of a `required` / named answer (None when the text is not complete, e.g. cut by length)."""
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            return None
        if self.mode == "named":  # the arguments are the answer's own text (as streamed)
            return [ParsedCall(self.function, text)] if isinstance(value, dict) else None
        if not isinstance(value, list):
            return None
        return [ParsedCall(c["name"], json.dumps(c.get("parameters", {}), ensure_ascii=False)) for c in value
                if isinstance(c, dict) and isinstance(c.get("name"), str)] or None


def check_tools(tools: list[Any]) -> list[dict]:
    """The tools as the chat template takes them; a bad definition is a 400 naming its path."""
    out = []
    for i, tool in enumerate(tools):
        at = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            raise InvalidRequestError('each tool must be {"type": "function", "function": {...}}', param=at)
        fn = tool.get("function")
        if not isinstance(fn, dict):
            raise InvalidRequestError("a tool needs a function object", param=f"{at}.function")
        name = fn.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise InvalidRequestError("function names are 1 to 64 characters of a-z, A-Z, 0-9, _, - and .",
                                      param=f"{at}.function.name")
        if "description" in fn and not isinstance(fn["description"], (str, type(None))):
            raise InvalidRequestError("description must be a string", param=f"{at}.function.description")
        params = fn.get("parameters")
        if params is not None:
            if not isinstance(params, dict):
                raise InvalidRequestError("parameters must be a JSON schema object", param=f"{at}.function.parameters")
            try:
                StructuredOutputsParams(json=params).check()
            except InvalidRequestError as e:
                raise InvalidRequestError(f"{at}.function.parameters: {e.message}",
                                          param=f"{at}.function.parameters") from None
        out.append({"type": "function", "function": {k: v for k, v in fn.items() if v is not None}})
    names = [t["function"]["name"] for t in out]
    if len(set(names)) != len(names):
        raise InvalidRequestError("tool function names must be unique", param="tools")
    return out


def plan_tools(tools: list[Any] | None, tool_choice, parallel_tool_calls: bool | None,
               auto_enabled: bool) -> ToolPlan:
    checked = check_tools(tools) if tools else []
    choice = tool_choice if tool_choice is not None else ("auto" if checked else "none")
    parallel = parallel_tool_calls is not False
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name") if choice.get("type", "function") == "function" else None
        if not isinstance(name, str):
            raise InvalidRequestError('a named tool_choice is {"type": "function", "function": {"name": ...}}',
                                      param="tool_choice")
        fn = next((t["function"] for t in checked if t["function"]["name"] == name), None)
        if fn is None:
            raise InvalidRequestError(f"tool_choice names {name!r}, which is not among the tools", param="tool_choice")
        schema = fn.get("parameters") or {"type": "object"}
        return ToolPlan("named", checked, StructuredOutputsParams(json=schema), function=name, parallel=parallel)
    if choice not in ("none", "auto", "required"):
        raise InvalidRequestError('tool_choice must be "none", "auto", "required" or a named function',
                                  param="tool_choice")
    if choice != "none" and not checked:
        raise InvalidRequestError(f'tool_choice "{choice}" needs tools', param="tool_choice")
    if choice == "none":
        return ToolPlan("none", None)
    if choice == "auto":
        if not auto_enabled:
            raise InvalidRequestError('"auto" tool choice needs the server started with --enable-auto-tool-choice '
                                      'and --tool-call-parser', param="tool_choice")
        return ToolPlan("auto", checked, parallel=parallel)
    spec = StructuredOutputsParams(json=required_schema(checked, parallel))
    spec.check()
    return ToolPlan("required", checked, spec, parallel=parallel)


def required_schema(tools: list[dict], parallel: bool) -> dict:
    """A JSON list of calls, each naming one tool and giving its parameters."""
    items = [{"type": "object", "properties": {"name": {"type": "string", "enum": [t["function"]["name"]]},
                                               "parameters": t["function"].get("parameters") or {"type": "object"}},
              "required": ["name", "parameters"], "additionalProperties": False} for t in tools]
    schema = {"type": "array", "minItems": 1, "items": items[0] if len(items) == 1 else {"anyOf": items}}
    if not parallel:
        schema["maxItems"] = 1
    return schema
