"""`--speculative-config`, shaped like vLLM's: a JSON object, e.g. {"method": "ngram", "num_speculative_tokens": 3,
"prompt_lookup_max": 4, "prompt_lookup_min": 2}."""
from __future__ import annotations

import json
from dataclasses import dataclass

from engine.errors import InvalidRequestError

METHODS = ("ngram", "mtp")


@dataclass(frozen=True)
class SpeculativeConfig:
    # ngram: drafts copied from the sequence's own earlier tokens (prompt lookup); mtp: the checkpoint's
    # multi-token-prediction module (DeepSeek-V3, Kimi-K2), chained for k > 1 (each draft feeds the next)
    method: str
    num_speculative_tokens: int  # drafts per step (k): a verify step feeds k + 1 tokens

    @property
    def lookahead_slots(self) -> int:
        """KV slots a step reserves past its fed tokens: an MTP chain writes the module's KV at the k - 1
        positions after the last kept token before the next step feeds them."""
        return self.num_speculative_tokens - 1 if self.method == "mtp" else 0
    prompt_lookup_max: int = 4  # ngram: the longest suffix looked up
    prompt_lookup_min: int = 1  # ngram: the shortest

    @classmethod
    def parse(cls, text: str) -> "SpeculativeConfig":
        fail = lambda why: InvalidRequestError(f"speculative_config {why}", param="speculative_config")
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise fail(f"is not JSON: {e}") from None
        if not isinstance(raw, dict):
            raise fail("must be a JSON object")
        unknown = sorted(set(raw) - {"method", "num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min"})
        if unknown:
            raise fail(f"has unknown keys: {', '.join(unknown)}")
        method = raw.get("method", "ngram")
        method = "mtp" if method == "deepseek_mtp" else method  # vLLM's older name
        if method not in METHODS:
            raise fail(f"method {method!r} is not available: choose {', '.join(METHODS)}")
        ints = {k: raw[k] for k in ("num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min") if k in raw}
        if any(not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in ints.values()):
            raise fail("counts must be integers >= 1")
        if "num_speculative_tokens" not in ints:
            raise fail("needs num_speculative_tokens")
        out = cls(method, **ints)
        if out.prompt_lookup_min > out.prompt_lookup_max:
            raise fail("prompt_lookup_min must not exceed prompt_lookup_max")
        return out
