"""SamplingParams: vLLM-shaped, validated once at construction (also when decoded off the wire)."""
from __future__ import annotations

import math

import msgspec

from engine.errors import InvalidRequestError
from engine.structured.params import StructuredOutputsParams

MAX_TOKENS_LIMIT = 1 << 20  # beyond any context we serve: a larger value is a client bug
MAX_N = 128
MAX_LOGPROBS = 20
MAX_LOGIT_BIAS = 1024  # entries per request (OpenAI allows 300)


class SamplingParams(msgspec.Struct, kw_only=True, omit_defaults=True):
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    max_tokens: int | None = 16  # None: up to max_model_len
    min_tokens: int = 0
    stop: list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None  # number of top logprobs besides the sampled token
    prompt_logprobs: int | None = None  # the same for every prompt token after the first
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit, in [-100, 100]
    structured_outputs: StructuredOutputsParams | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        _check(isinstance(self.n, int) and 1 <= self.n <= MAX_N, "n", f"must be an integer in [1, {MAX_N}]")
        _check(_finite(self.temperature) and 0.0 <= self.temperature <= 1e4, "temperature",
               "must be a finite number >= 0")
        _check(_finite(self.top_p) and 0.0 < self.top_p <= 1.0, "top_p", "must be in (0, 1]")
        _check(isinstance(self.top_k, int) and self.top_k >= -1, "top_k", "must be -1, 0 (disabled) or >= 1")
        _check(_finite(self.min_p) and 0.0 <= self.min_p <= 1.0, "min_p", "must be in [0, 1]")
        _check(self.seed is None or (isinstance(self.seed, int) and -(1 << 63) <= self.seed < (1 << 63)),
               "seed", "must be a 64-bit integer")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check(_finite(value) and -2.0 <= value <= 2.0, name, "must be in [-2, 2]")
        _check(_finite(self.repetition_penalty) and 0.0 < self.repetition_penalty <= 10.0,
               "repetition_penalty", "must be in (0, 10]")
        _check(self.max_tokens is None or (isinstance(self.max_tokens, int) and 1 <= self.max_tokens <= MAX_TOKENS_LIMIT),
               "max_tokens", f"must be an integer in [1, {MAX_TOKENS_LIMIT}]")
        _check(isinstance(self.min_tokens, int) and 0 <= self.min_tokens, "min_tokens", "must be >= 0")
        _check(self.max_tokens is None or self.min_tokens <= self.max_tokens, "min_tokens",
               "must not exceed max_tokens")
        _check(self.logprobs is None or (isinstance(self.logprobs, int) and 0 <= self.logprobs <= MAX_LOGPROBS),
               "logprobs", f"must be an integer in [0, {MAX_LOGPROBS}]")
        _check(self.prompt_logprobs is None or (isinstance(self.prompt_logprobs, int)
                                                and 0 <= self.prompt_logprobs <= MAX_LOGPROBS),
               "prompt_logprobs", f"must be an integer in [0, {MAX_LOGPROBS}]")
        _check(self.stop is None or all(isinstance(s, str) and s for s in self.stop), "stop",
               "must be a non-empty string or a list of them")
        _check(self.stop_token_ids is None or all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids),
               "stop_token_ids", "must be non-negative token ids")
        if self.logit_bias is not None:
            _check(len(self.logit_bias) <= MAX_LOGIT_BIAS, "logit_bias", f"must have at most {MAX_LOGIT_BIAS} entries")
            _check(all(isinstance(t, int) and t >= 0 and _finite(b) and -100 <= b <= 100
                       for t, b in self.logit_bias.items()), "logit_bias",
                   "must map token ids to numbers in [-100, 100]")

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5

    def child(self, index: int) -> "SamplingParams":
        """The params of the index-th of n samples: one sequence each, seeds kept distinct."""
        seed = None if self.seed is None else (self.seed + index + (1 << 63)) % (1 << 64) - (1 << 63)
        return msgspec.structs.replace(self, n=1, seed=seed)


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check(ok: bool, field: str, message: str) -> None:
    if not ok:
        raise InvalidRequestError(f"{field} {message}", param=field)
