"""Pure helpers for KV-block transfers: block-id validation, pool-layout checks, coalescing
block pairs into byte ranges, and the typed TransferError they raise. No I/O here."""
from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple


REGION = "kv"        # the KV pool (or its staging area) as one memory region
ID_REGION = "id"     # the agent id, 32 ASCII hex bytes: proves who answers on a link
ID_BYTES = 32


class TransferError(Exception):
    """A pull that must not be issued: bad ids, incompatible layouts, malformed peer info."""


class Run(NamedTuple):
    """`count` blocks starting at `remote` on the peer and at `local` here."""
    remote: int
    local: int
    count: int


class ByteRange(NamedTuple):
    remote_off: int
    local_off: int
    length: int


def check_block_ids(ids: Sequence[int], num_blocks: int, side: str) -> list[int]:
    """Ids as plain ints, each in [0, num_blocks); raises TransferError naming the side."""
    out = []
    for i in ids:
        # bool is an int subclass; a numpy/torch integer is accepted through __index__.
        if isinstance(i, bool) or not hasattr(i, "__index__"):
            raise TransferError(f"{side} block id {i!r} is not an integer")
        i = i.__index__()
        if not 0 <= i < num_blocks:
            raise TransferError(f"{side} block id {i} out of range [0, {num_blocks})")
        out.append(i)
    return out


def check_pull_ids(remote_ids: Sequence[int], local_ids: Sequence[int],
                   remote_blocks: int, local_blocks: int) -> tuple[list[int], list[int]]:
    if len(remote_ids) != len(local_ids):
        raise TransferError(f"length mismatch: {len(remote_ids)} remote block ids, "
                            f"{len(local_ids)} local block ids")
    remote = check_block_ids(remote_ids, remote_blocks, "remote")
    local = check_block_ids(local_ids, local_blocks, "local")
    # Two remote blocks landing in one local block is always a caller bug (and a data race).
    if len(set(local)) != len(local):
        raise TransferError("duplicate local block ids")
    return remote, local


# Fields of the pool layout that must match exactly for a byte-wise copy to be meaningful.
LAYOUT_KEYS = ("block_shape", "dtype", "block_bytes")


def check_compatible(local_layout: dict, peer_layout: dict) -> None:
    for key in LAYOUT_KEYS:
        if local_layout.get(key) != peer_layout.get(key):
            raise TransferError(f"incompatible KV layout: {key} is {peer_layout.get(key)!r} "
                                f"on the peer, {local_layout.get(key)!r} here "
                                "(layers, K/V, block_size, kv_heads, head_dim and dtype "
                                "must all match)")


def coalesce(remote_ids: Sequence[int], local_ids: Sequence[int]) -> list[Run]:
    """Merge consecutive pairs whose blocks are adjacent on BOTH sides into one run.
    Order is kept as given: callers that want more merging sort the pairs first."""
    runs: list[Run] = []
    for r, l in zip(remote_ids, local_ids):
        if runs:
            last = runs[-1]
            if r == last.remote + last.count and l == last.local + last.count:
                runs[-1] = Run(last.remote, last.local, last.count + 1)
                continue
        runs.append(Run(r, l, 1))
    return runs


def to_byte_ranges(runs: Sequence[Run], block_bytes: int, max_bytes: int) -> list[ByteRange]:
    """Byte ranges for `runs`, long runs split into pieces of at most `max_bytes` (rounded
    down to whole blocks) so that one huge range does not serialise on one connection."""
    step = max(1, max_bytes // block_bytes) * block_bytes
    out = []
    for run in runs:
        r0, l0, total = run.remote * block_bytes, run.local * block_bytes, run.count * block_bytes
        for off in range(0, total, step):
            out.append(ByteRange(r0 + off, l0 + off, min(step, total - off)))
    return out


def check_bounds(ranges: Sequence[ByteRange], remote_len: int, local_len: int) -> None:
    """The DLSlime serving side does no bounds checks: every range is checked here."""
    for rg in ranges:
        if rg.length <= 0 or rg.remote_off < 0 or rg.local_off < 0:
            raise TransferError(f"invalid byte range {tuple(rg)}")
        if rg.remote_off + rg.length > remote_len:
            raise TransferError(f"remote range [{rg.remote_off}, {rg.remote_off + rg.length}) "
                                f"exceeds the peer's advertised region of {remote_len} bytes")
        if rg.local_off + rg.length > local_len:
            raise TransferError(f"local range [{rg.local_off}, {rg.local_off + rg.length}) "
                                f"exceeds the local region of {local_len} bytes")


def check_peer_info(info) -> dict:
    """Peer info as received over the wire: check shape and types before trusting it. The KV
    region is only required of a peer that offers TCP (an IPC- or RDMA-only GPU pool registers
    none on its TCP endpoint); the IPC descriptor is checked where it is used (engine/pd/ipc.py),
    the RDMA data endpoint's regions when the handshake answers (engine/pd/transfer.py)."""
    try:
        peer = dict(info)
        transports = peer.setdefault("transports", [peer.get("transport", "tcp")])
        region = peer.get("region", REGION)
        id_mr = peer["mr_info"][ID_REGION]
        ok = (isinstance(peer["host"], str) and isinstance(peer["port"], int)
              and isinstance(transports, list) and all(isinstance(t, str) for t in transports)
              and isinstance(peer.get("host_id", ""), str)
              and isinstance(peer["agent_id"], str) and len(peer["agent_id"]) == ID_BYTES
              and id_mr["length"] == ID_BYTES)
        peer["region_length"] = 0
        if "tcp" in transports:
            mr = peer["mr_info"][region]
            ok = (ok and isinstance(peer["num_blocks"], int) and peer["num_blocks"] >= 0
                  and isinstance(mr["addr"], int) and isinstance(mr["length"], int))
            peer["region_length"] = mr["length"]
        if {"ipc", "rdma"} & set(transports):   # both read the pool itself
            ok = ok and isinstance(peer["pool_blocks"], int) and peer["pool_blocks"] >= 0
        if "ipc" in transports:
            ok = ok and isinstance(peer["ipc"], dict)
    except (KeyError, TypeError, ValueError) as e:
        raise TransferError(f"malformed peer endpoint info: missing or bad {e}") from None
    if not ok:
        raise TransferError("malformed peer endpoint info: bad field types")
    peer["region"] = region
    peer.setdefault("staged", False)
    return peer
