"""Every message that crosses a process boundary, as msgspec Structs (the only wire schema).

Engine cores ship deltas: each step's new token ids per request, never whole sequences.
"""
from __future__ import annotations

import msgspec

from engine.sampling_params import SamplingParams


class EngineCoreRequest(msgspec.Struct, kw_only=True):
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams  # n == 1: the front fans n out into child requests
    arrival_time: float = 0.0


class TokenLogprobs(msgspec.Struct, array_like=True):
    """Logprob of one sampled token, its rank, and the top-N alternatives (raw model distribution)."""

    logprob: float
    rank: int
    top_ids: list[int]
    top_logprobs: list[float]


class EngineCoreOutput(msgspec.Struct, kw_only=True, omit_defaults=True):
    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprobs] | None = None
    finish_reason: str | None = None  # stop | length | abort | error
    stop_reason: int | str | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
