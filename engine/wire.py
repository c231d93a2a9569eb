"""Every message that crosses a process boundary, as msgspec Structs (the only wire schema).

Engine cores ship deltas: each step's new token ids per request, never whole sequences.
"""
from __future__ import annotations

from typing import Any, Union

import msgspec

from engine.multimodal.inputs import ImageInput, StepImage
from engine.sampling_params import SamplingParams


class EngineCoreRequest(msgspec.Struct, kw_only=True):
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams  # n == 1: the front fans n out into child requests
    arrival_time: float = 0.0
    kv_transfer_params: dict[str, Any] | None = None  # opaque to hybrid engines (prefill/decode hand-off)
    images: list[ImageInput] | None = None  # multimodal prompts: each image at its placeholder tokens


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
    kv_transfer_params: dict[str, Any] | None = None  # prefill: {migration, first_token, seq_id}
    queue_time_s: float | None = None  # with a sequence's first token: how long it waited to be scheduled
    prompt_logprobs: list[TokenLogprobs] | None = None  # with the first token: prompt tokens 1.. (if asked)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


# ---- engine core server <-> its clients (API fronts, gateways), over one ZMQ ROUTER/DEALER pair ----
# Client -> core messages and core -> client replies are tagged unions: the core decodes a frame
# as `CoreInbound`, a client as `CoreOutbound`. Calls that expect a reply carry a client-chosen
# `call_id` that the reply echoes.

class ErrorInfo(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A typed error (engine.errors.EngineError) as data: OpenAI error type, HTTP status, field."""

    message: str
    type: str = "internal_error"
    status: int = 500
    param: str | None = None


class AddRequests(msgspec.Struct, kw_only=True, tag="add"):
    requests: list[EngineCoreRequest]


class AbortRequests(msgspec.Struct, kw_only=True, tag="abort"):
    request_ids: list[str]


class EngineInfoRequest(msgspec.Struct, kw_only=True, tag="info"):
    """Also the heartbeat: a client that gets no EngineInfo back in time deems the core unresponsive."""

    call_id: int


class UtilityCall(msgspec.Struct, kw_only=True, tag="call"):
    """A named core method from the server's allow-list (see EngineCoreServer.utilities)."""

    call_id: int
    method: str
    args: list[Any] = []


CoreInbound = Union[AddRequests, AbortRequests, EngineInfoRequest, UtilityCall]


class EngineStats(msgspec.Struct, kw_only=True):
    """EngineCore.stats() as a typed snapshot."""

    num_running: int = 0
    num_waiting: int = 0
    num_blocks: int = 0
    num_free_blocks: int = 0
    kv_usage: float = 0.0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    num_preemptions: int = 0
    num_parked: int = 0  # prefill role: KV kept for a decode engine to pull
    num_pulling: int = 0  # decode role: KV pulls in flight
    num_generated_tokens: int = 0
    spec_draft_tokens: int = 0  # speculative decoding: drafts fed to verify steps, those kept, and verify rows
    spec_accepted_tokens: int = 0
    spec_verify_rows: int = 0
    kv_transfers: int = 0  # KV pulls by this engine: finished, failed, timed out
    kv_transfers_failed: int = 0
    kv_transfer_bytes: int = 0  # of the successful ones, and their summed wall time
    kv_transfer_ms: float = 0.0


class EngineCoreOutputs(msgspec.Struct, kw_only=True, tag="outputs"):
    """One step's deltas for the requests of one client."""

    outputs: list[EngineCoreOutput]
    timestamp: float = 0.0


class RejectedRequest(msgspec.Struct, kw_only=True):
    request_id: str
    error: ErrorInfo


class RequestsRejected(msgspec.Struct, kw_only=True, tag="rejected"):
    """Requests of an AddRequests that the core did not admit (invalid, overloaded, draining)."""

    rejected: list[RejectedRequest]


class EngineInfo(msgspec.Struct, kw_only=True, tag="engine_info"):
    call_id: int
    engine_id: str
    pid: int
    role: str
    model_path: str
    max_model_len: int
    block_size: int
    vocab_size: int
    draining: bool
    stats: EngineStats
    world_size: int = 1  # ranks of the engine (tensor parallelism)
    rank_pids: list[int] = []  # the process of each rank, rank 0 (the core) first
    kv_source: dict[str, Any] | None = None  # prefill role: KVHandoff.source_info(), registered for checks


class UtilityResult(msgspec.Struct, kw_only=True, tag="result", omit_defaults=True):
    call_id: int
    result: Any = None
    error: ErrorInfo | None = None


class ErrorReply(msgspec.Struct, kw_only=True, tag="error", omit_defaults=True):
    """A frame the core could not accept (too large, undecodable, unknown message)."""

    error: ErrorInfo
    call_id: int | None = None


CoreOutbound = Union[EngineCoreOutputs, RequestsRejected, EngineInfo, UtilityResult, ErrorReply]


# ---- engine core (rank 0) <-> its other model workers, over one ZMQ ROUTER/DEALER pair ----------
# Rank 0 sends every worker the same message; a step needs no reply (rank 0's samples are the truth, and
# the other ranks get them by broadcast on the device), a call is answered by every worker. `freed` carries
# the block tables rank 0 dropped since its last message, so the workers' copies never go stale.

class WorkerStep(msgspec.Struct, tag="step", array_like=True):
    """One step as deltas: per row a handle, the blocks appended to its table since the last step (the whole
    table for a handle the workers have not seen), and the step's numbers as raw little-endian arrays
    (engine/worker/input_batch.py StepBatch: int64 num_computed, num_new, pending_rows, token_ids; bool samples)."""

    freed: list[int]
    handles: list[int]
    new_blocks: list[list[int]]
    num_computed: bytes
    num_new: bytes
    pending_rows: bytes
    samples: bytes
    token_ids: bytes
    # data parallelism: the rows of every DP group, in DP order (the rows above are all groups' back to back),
    # and how many of each group's rows are sampled; empty at data_parallel_size 1
    dp_rows: list[int] = []
    dp_samples: list[int] = []
    # prompt_logprobs (engine/worker/input_batch.py): int64 rows and next tokens, and the most alternatives wanted
    prompt_idx: bytes = b""
    prompt_targets: bytes = b""
    prompt_topn: int = 0
    # multimodal steps (input_batch.py): int64 rope offsets per row and [3, T] positions; the image parts fed
    rope_offsets: bytes = b""
    mrope_positions: bytes = b""
    images: list[StepImage] = []
    # speculative decoding: int64 drafts per row (input_batch.py StepBatch.spec_lens); empty without drafts
    spec_lens: bytes = b""
    next_ids: bytes = b""  # int64 per row: the prompt token after a chunk (StepBatch.next_ids)


class WorkerCall(msgspec.Struct, tag="call", array_like=True):
    """A Worker method (dotted names reach its parts, e.g. `pd.poll`) run on every worker; each replies."""

    call_id: int
    method: str
    args: list[Any]
    freed: list[int] = []


WorkerInbound = Union[WorkerStep, WorkerCall]


class WorkerReady(msgspec.Struct, tag="ready", array_like=True):
    """Sent once connected (before joining the process group), and again with `loaded` once the model is in."""

    rank: int
    pid: int
    loaded: bool


class WorkerReply(msgspec.Struct, tag="reply", array_like=True, omit_defaults=True):
    call_id: int
    rank: int
    result: Any = None
    error: str | None = None


WorkerOutbound = Union[WorkerReady, WorkerReply]
