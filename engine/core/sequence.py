"""Sequence: one generation stream's tokens, KV blocks and progress, as the scheduler sees it."""
from __future__ import annotations

import enum
import time

from engine.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    """Prompt + output token ids; `num_computed_tokens` of them have KV in `block_table`."""

    def __init__(self, seq_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 sampling_seed: int, max_output_tokens: int, arrival_time: float = 0.0):
        self.seq_id = seq_id
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params = params
        self.sampling_seed = sampling_seed  # the request's seed, or one drawn for it by the engine
        self.max_output_tokens = max_output_tokens
        self.arrival_time = arrival_time
        self.status = SequenceStatus.WAITING
        self.block_table: list[int] = []
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0  # prompt tokens served from the prefix cache at admission
        self.block_hashes: list[int] = []  # chained hashes of its full blocks (token-based: survive preemption)
        self.num_published_blocks = 0  # leading blocks of block_table already in the prefix cache
        self.num_preemptions = 0
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.remote_decode = False  # prefill half of a PD pair: park the KV after the first token
        # async scheduling: tokens sampled by launched steps but not yet read back to the host, and
        # the row of the newest one in its step's sampled tokens (the next step feeds it from there)
        self.num_pending_tokens = 0
        self.pending_row = -1
        self.dp_rank = 0  # the data-parallel group (scheduler slice, KV pool) that holds the sequence
        self.created = time.monotonic()
        self.queue_time: float | None = None  # seconds from arrival at the core to its first scheduling
        # prompt_logprobs: the logprobs of prompt tokens 1.. as prefill computes them (None: not wanted)
        self.prompt_logprobs: list | None = [] if params.prompt_logprobs is not None else None
        self.grammar = None  # structured outputs: its matcher (engine/structured/grammar.py), advanced per token
        # multimodal prompts (engine/multimodal): the images at their placeholder offsets, the prompt's
        # (time, height, width) rope positions [3, prompt] and what positions past the prompt add to their index
        self.images: list = []
        self.mrope_positions = None
        self.rope_delta = 0
        self.spec_token_ids: list[int] = []  # speculative decoding: drafts the next step feeds after the last token

    @property
    def can_recompute(self) -> bool:
        """Whether preemption may drop its KV: a migrated multimodal prompt has no pixels or embeddings here."""
        return all(img.pixels or img.embedding for img in self.images)

    def image_keys(self, start: int, end: int) -> tuple[str, ...]:
        """Content hashes of the images whose placeholders overlap prompt tokens [start, end): part of the prefix
        cache key of a block, so that prompts differing only in an image never share KV."""
        return tuple(img.content_hash for img in self.images if img.offset < end and start < img.end)

    def __len__(self) -> int:
        """Tokens the scheduler plans with: those known on the host plus those still in flight."""
        return len(self.token_ids) + self.num_pending_tokens

    @property
    def num_output_tokens(self) -> int:
        """Output tokens known on the host (stop rules and outputs see only these)."""
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def next_output_index(self) -> int:
        """Index of the output token the next sampling step draws (in-flight ones counted)."""
        return len(self) - self.num_prompt_tokens

    @property
    def last_token_pending(self) -> bool:
        """A token is in flight and it is the last this sequence takes (its length limit, or the
        first token of a PD prefill), so no further step needs to feed it."""
        return self.num_pending_tokens > 0 and (self.remote_decode or self.next_output_index >= self.max_output_tokens)

    def prompt_logprob_span(self, start: int, num_new: int) -> tuple[int, int]:
        """The prompt positions [lo, hi) of a chunk fed from `start` whose next token's logprob is still wanted."""
        if self.prompt_logprobs is None:
            return 0, 0
        lo, hi = max(start, len(self.prompt_logprobs)), min(start + num_new, self.num_prompt_tokens - 1)
        return lo, max(lo, hi)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)
