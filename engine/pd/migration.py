"""The migration descriptor: everything a decode engine needs to continue a request that a prefill
engine started (source engine, its transfer endpoint, block ids, prompt and first token, sampling).

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
from engine.sampling_params import SamplingParams

VERSION = 1


class KVGeometry(msgspec.Struct, frozen=True, array_like=True):
    """What must match between the two pools for a block to mean the same bytes."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: str


class Migration(msgspec.Struct, kw_only=True):
    version: int
    engine_id: str  # the source (prefill) engine
    seq_id: int  # its handle for the parked KV (what /pd/free takes)
    transfer: dict[str, Any]  # the source's KVTransferAgent.endpoint_info()
    geometry: KVGeometry
    block_ids: list[int]  # source blocks holding the prompt's KV, in order
    prompt_token_ids: list[int]
    first_token: int
    params: SamplingParams
    sampling_seed: int
    model: str = ""


def encode(m: Migration) -> str:
    body = msgspec.msgpack.encode(m)
    return base64.b64encode(zlib.crc32(body).to_bytes(4, "big") + body).decode()


def decode(text: Any) -> Migration:
    """Parses and checks a migration string; any defect is an InvalidRequestError (HTTP 400)."""
    def bad(why: str) -> InvalidRequestError:
        return InvalidRequestError(f"invalid kv_transfer_params.migration: {why}", param="kv_transfer_params")

    if not isinstance(text, str) or not text:
        raise bad("expected a non-empty string")
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
    if not m.prompt_token_ids or len(m.block_ids) != -(-len(m.prompt_token_ids) // m.geometry.block_size):
        raise bad("block count does not cover the prompt")
    if any(b < 0 for b in m.block_ids) or len(set(m.block_ids)) != len(m.block_ids):
        raise bad("block ids must be distinct and non-negative")
    return m
