"""StructuredOutputsParams: vLLM's constraint on a request's output, exactly one of json / regex / choice /
grammar / json_object. `check()` parses it into a tokenizer-independent xgrammar Grammar, so that a bad schema,
regex or grammar is a 400 at the door instead of a failure inside the engine core."""
from __future__ import annotations

import json
import re
from typing import Any

import msgspec

from engine.errors import InvalidRequestError

KINDS = ("json", "regex", "choice", "grammar", "json_object")
MAX_SPEC_CHARS = 1 << 20
_XGRAMMAR_PREFIX = re.compile(r"^\[[^\]]*\]\s*\S+:\d+:\s*")  # "[12:00:00] /project/cpp/x.cc:94: " on every error


class StructuredOutputsParams(msgspec.Struct, kw_only=True, omit_defaults=True):
    json: str | dict[str, Any] | None = None  # a JSON schema (object or its text)
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None  # EBNF, xgrammar's dialect (GBNF-like: `root ::= ...`)
    json_object: bool = False  # any JSON object

    def __post_init__(self) -> None:
        given = [k for k in KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise InvalidRequestError(f"structured_outputs takes exactly one of {', '.join(KINDS)}; got "
                                      f"{', '.join(given) or 'none'}", param="structured_outputs")
        if self.choice is not None and (not self.choice or not all(isinstance(c, str) and c for c in self.choice)):
            raise InvalidRequestError("structured_outputs.choice must be a non-empty list of non-empty strings",
                                      param="structured_outputs.choice")
        if len(self.key) > MAX_SPEC_CHARS:
            raise InvalidRequestError(f"structured_outputs is larger than {MAX_SPEC_CHARS} characters",
                                      param="structured_outputs")

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) not in (None, False))

    @property
    def key(self) -> str:
        """A canonical text of the constraint (the compile cache's key)."""
        value = getattr(self, self.kind)
        return f"{self.kind}:{value if isinstance(value, str) else json.dumps(value, sort_keys=True)}"

    def schema_text(self) -> str:
        return self.json if isinstance(self.json, str) else json.dumps(self.json)

    def to_grammar(self):
        """The tokenizer-independent xgrammar Grammar (raises InvalidRequestError naming what is wrong)."""
        import xgrammar as xgr
        kind = self.kind
        try:
            if kind == "json":
                # compact JSON: a model may not pad it with whitespace without end
                return _strict_json_strings(xgr.Grammar.from_json_schema(self.schema_text(), any_whitespace=False))
            if kind == "json_object":  # OpenAI's: an object (xgrammar's builtin JSON grammar takes any value)
                return _strict_json_strings(xgr.Grammar.from_json_schema('{"type": "object"}', any_whitespace=False))
            if kind == "regex":
                return xgr.Grammar.from_regex(self.regex)
            if kind == "choice":
                alternatives = " | ".join(json.dumps(c, ensure_ascii=False) for c in self.choice)
                return xgr.Grammar.from_ebnf(f"root ::= {alternatives}")
            return xgr.Grammar.from_ebnf(self.grammar)
        except (RuntimeError, ValueError, TypeError) as e:
            what = {"json": "JSON schema", "regex": "regex", "grammar": "grammar", "choice": "choice list",
                    "json_object": "JSON grammar"}[kind]
            raise InvalidRequestError(f"invalid {what} in structured_outputs: {clean_error(e)}",
                                      param=f"structured_outputs.{kind}") from None

    def check(self) -> None:
        self.to_grammar()


# xgrammar (0.2.9) writes the characters of a string with minLength / maxLength as [^"\\\r\n], which lets raw
# control characters (a tab, say) into it: not JSON. Its other strings exclude \0-\x1f; so do these, then.
_LOOSE_CHARS = r'[^\"\\\r\n]'
_STRICT_CHARS = r'[^\0-\x1f\"\\\r\n]'


def _strict_json_strings(grammar):
    import xgrammar as xgr
    text = str(grammar)
    return xgr.Grammar.from_ebnf(text.replace(_LOOSE_CHARS, _STRICT_CHARS)) if _LOOSE_CHARS in text else grammar


def clean_error(e: BaseException) -> str:
    """xgrammar's message without its timestamp and C++ source location."""
    return _XGRAMMAR_PREFIX.sub("", str(e).strip()).strip()
