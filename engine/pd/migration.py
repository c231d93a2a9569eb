"""The migration descriptor: everything a decode engine needs to continue a request that a prefill engine
started: the source engine, its ranks' transfer endpoints, the data-parallel group that holds the KV and
that group's block ids per tensor-parallel rank, its KV-cache spec, the prompt and first token, and the
sampling parameters.

DLRouter passes only the opaque `migration` string to the decode node, so it is self-contained:
msgpack, a CRC32 against corruption, base64 for JSON.
"""
from __future__ import annotations

import base64
import binascii
import zlib
from typing import Any

import msgspec

from engine.errors import InvalidRequestError
from engine.kv.spec import AnyKVCacheSpec, KVCacheSpec  # noqa: F401 (KVCacheSpec: tests build specs here)
from engine.multimodal.inputs import ImageInput
from engine.sampling_params import SamplingParams
from engine.wire import TokenLogprobs

VERSION = 4
# a prompt of max_model_len tokens is a few MB at most; anything larger is refused before decoding
MAX_MIGRATION_CHARS = 32 << 20


class Migration(msgspec.Struct, kw_only=True):
    version: int
    engine_id: str  # the source (prefill) engine
    seq_id: int  # its handle for the parked KV (what /pd/free takes)
    transfer: list[dict[str, Any]]  # every rank of the source engine: its KVTransferAgent.endpoint_info()
    kv_spec: AnyKVCacheSpec  # one rank's pool layout (every rank's is the same)
    # per tensor-parallel rank of DP group `dp_rank`: the source pool's blocks holding the prompt's KV, in order
    # (what CUDA IPC reads), and where a GPU source staged them for DLSlime reads (None: unstaged, read block_ids)
    block_ids: list[list[int]]
    staged_block_ids: list[list[int]] | None = None
    dp_rank: int = 0  # the source's data-parallel group that holds the KV (its ranks: dp_rank * tp + t)
    prompt_token_ids: list[int]
    first_token: int
    first_logprobs: TokenLogprobs | None = None  # the first token's, when the request asked for logprobs
    params: SamplingParams
    sampling_seed: int
    model: str = ""
    # a multimodal prompt's images, without their pixels or embeddings: their places set the decode side's rope
    images: list[ImageInput] = []

    @property
    def tensor_parallel_size(self) -> int:
        return len(self.block_ids)

    def source_peers(self) -> list[dict[str, Any]]:
        """The endpoints of the DP group that holds the KV, by tensor-parallel rank."""
        tp = self.tensor_parallel_size
        return self.transfer[self.dp_rank * tp:(self.dp_rank + 1) * tp]


def encode(m: Migration) -> str:
    body = msgspec.msgpack.encode(m)
    return base64.b64encode(zlib.crc32(body).to_bytes(4, "big") + body).decode()


def decode(text: Any) -> Migration:
    """Parses and checks a migration string; any defect is an InvalidRequestError (HTTP 400)."""
    def bad(why: str) -> InvalidRequestError:
        return InvalidRequestError(f"invalid kv_transfer_params.migration: {why}", param="kv_transfer_params")

    if not isinstance(text, str) or not text:
        raise bad("expected a non-empty string")
    if len(text) > MAX_MIGRATION_CHARS:
        raise bad(f"{len(text)} characters, more than {MAX_MIGRATION_CHARS}")
    try:
        raw = base64.b64decode(text.encode(), validate=True)
    except (binascii.Error, ValueError):
        raise bad("not base64") from None
    if len(raw) < 5 or zlib.crc32(raw[4:]).to_bytes(4, "big") != raw[:4]:
        raise bad("checksum mismatch (corrupted)")
    try:
        m = msgspec.msgpack.decode(raw[4:], type=Migration)
    except (msgspec.DecodeError, msgspec.ValidationError, InvalidRequestError) as e:
        raise bad(str(e)) from None
    if m.version != VERSION:
        raise bad(f"version {m.version} (this engine reads {VERSION})")
    if not m.block_ids or len(m.transfer) % len(m.block_ids):
        raise bad("one transfer endpoint per rank and one block list per tensor-parallel rank expected")
    if not 0 <= m.dp_rank < len(m.transfer) // len(m.block_ids):
        raise bad(f"dp_rank {m.dp_rank} outside the source's {len(m.transfer) // len(m.block_ids)} DP groups")
    blocks = -(-len(m.prompt_token_ids) // m.kv_spec.block_size) if m.kv_spec.block_size > 0 else -1
    if m.staged_block_ids is not None and len(m.staged_block_ids) != len(m.block_ids):
        raise bad("one staged block list per tensor-parallel rank expected")
    for ids in m.block_ids + (m.staged_block_ids or []):
        if not m.prompt_token_ids or len(ids) != blocks:
            raise bad("block count does not cover the prompt")
        if any(b < 0 for b in ids) or len(set(ids)) != len(ids):
            raise bad("block ids must be distinct and non-negative")
    return m
