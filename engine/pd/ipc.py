"""CUDA IPC between engines on one host: the source exports its GPU pool once (torch's handle of the pool's
allocation, plus a 32-byte tensor holding its agent id); a puller on the same host opens it once per peer and
pulls blocks with device-to-device copies on a side stream (within one GPU, or over NVLink / PCIe P2P between
two), finished when a CUDA event says so. Nothing is staged through host memory and nothing is polled over a
socket.

Safety, as for the DLSlime transports:
- everything in the descriptor is type-checked, every block id is checked against the advertised pool, and the
  handle's allocation must be large enough for the pool it claims before a view of it is made;
- a handle is only trusted once the id tensor it comes with reads back the peer's agent id (a stale or forged
  handle that opens some other allocation fails there);
- copies cannot be cancelled: a pull that times out leaves its local blocks unsafe to reuse (quarantined).

An open mapping keeps the peer's pool allocated, even after the peer died: the next pull closes mappings unused
for IDLE_CLOSE_S, and a failed pull closes its peer's mapping.
"""
from __future__ import annotations

import math
import os
import time

import torch

from engine.pd.pull import Pull, TransferState
from kernels.block_copy import copy_blocks
from engine.pd.ranges import ID_BYTES, TransferError, coalesce

IDLE_CLOSE_S = 30.0
_PART_FIELDS = {"handle": str, "size": int, "offset": int, "tensor_offset": int, "ref_counter": str,
                "ref_counter_offset": int, "event": str, "event_sync": bool}


def device_uuid(device) -> str:
    return str(torch.cuda.get_device_properties(device).uuid)


def _share(t: torch.Tensor) -> dict:
    """torch.multiprocessing's handle of `t`'s allocation (what its CUDA tensor pickling sends), as JSON."""
    _, handle, size, offset, ref_counter, ref_counter_offset, event, event_sync = t.untyped_storage()._share_cuda_()
    return {"handle": bytes(handle).hex(), "size": int(size), "offset": int(offset),
            "tensor_offset": t.storage_offset() * t.element_size(), "ref_counter": bytes(ref_counter).hex(),
            "ref_counter_offset": int(ref_counter_offset), "event": bytes(event or b"").hex(),
            "event_sync": bool(event_sync)}


class IpcExport:
    """This rank's pool exported for pullers on the same host; `descriptor` goes into its endpoint info."""

    def __init__(self, pool: torch.Tensor, agent_id: str):
        self._id = torch.tensor(list(agent_id.encode()), dtype=torch.uint8, device=pool.device)
        # pid: a process cannot open its own CUDA IPC handles (engines paired in one process use another transport)
        self.descriptor = {"device_uuid": device_uuid(pool.device), "pool": _share(pool), "id": _share(self._id),
                           "pid": os.getpid()}


def check_descriptor(desc) -> dict:
    """The `ipc` part of a peer's endpoint info as received over the wire: shape and types."""
    try:
        ok = isinstance(desc["device_uuid"], str)
        for part in (desc["pool"], desc["id"]):
            ok = ok and all(isinstance(part[k], t) and (t is not int or part[k] >= 0)
                            for k, t in _PART_FIELDS.items())
            bytes.fromhex(part["handle"]), bytes.fromhex(part["ref_counter"]), bytes.fromhex(part["event"])
    except (KeyError, TypeError, ValueError) as e:
        raise TransferError(f"malformed CUDA IPC descriptor: missing or bad {e}") from None
    if not ok:
        raise TransferError("malformed CUDA IPC descriptor: bad field types")
    return desc


def check_extent(part: dict, nbytes: int, what: str) -> None:
    """The shared allocation must hold the tensor the peer claims it holds (before any view is made)."""
    if part["tensor_offset"] + nbytes > part["size"]:
        raise TransferError(f"the peer's CUDA IPC {what} allocation is {part['size']} bytes, smaller than the "
                            f"{part['tensor_offset'] + nbytes} bytes its layout needs")


def _local_device(uuid: str) -> int:
    for i in range(torch.cuda.device_count()):
        if device_uuid(i) == uuid:
            return i
    raise TransferError(f"the source's GPU {uuid} is not visible to this process (CUDA_VISIBLE_DEVICES)")


def _open(part: dict, device: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    elem = torch.empty((), dtype=dtype).element_size()
    check_extent(part, math.prod(shape) * elem, "pool" if len(shape) > 1 else "id")
    storage = torch.UntypedStorage._new_shared_cuda(
        device, bytes.fromhex(part["handle"]), part["size"], part["offset"], bytes.fromhex(part["ref_counter"]),
        part["ref_counter_offset"], bytes.fromhex(part["event"]) or None, part["event_sync"])
    typed = torch.storage.TypedStorage(wrap_storage=storage, dtype=dtype, _internal=True)
    strides = [math.prod(shape[i + 1:]) for i in range(len(shape))]
    return torch._utils._rebuild_tensor(typed, part["tensor_offset"] // elem, shape, strides)


class _Peer:
    def __init__(self, view: torch.Tensor):
        self.view, self.last_used = view, time.monotonic()


class IpcPeers:
    """The peers' pools this rank has opened (by agent id), and the side stream its copies run on."""

    def __init__(self, pool: torch.Tensor):
        self.pool = pool
        self.stream = torch.cuda.Stream(pool.device)
        self._peers: dict[str, _Peer] = {}

    def __len__(self) -> int:
        return len(self._peers)

    def view(self, peer: dict) -> torch.Tensor:
        """The peer's pool as a tensor on its GPU; opened and identity-checked on first use."""
        now = time.monotonic()
        for agent_id in [a for a, p in self._peers.items() if now - p.last_used > IDLE_CLOSE_S]:
            self.drop(agent_id)
        entry = self._peers.get(peer["agent_id"])
        if entry is None:
            desc = peer["ipc"]
            device = _local_device(desc["device_uuid"])
            dtype = getattr(torch, peer["dtype"])
            ident = _open(desc["id"], device, torch.uint8, (ID_BYTES,))
            if bytes(ident.cpu().tolist()) != peer["agent_id"].encode():
                raise TransferError("the CUDA IPC handle does not open the pool of the agent it names "
                                    "(stale or forged endpoint info)")
            view = _open(desc["pool"], device, dtype, (peer["pool_blocks"], *peer["block_shape"]))
            entry = self._peers[peer["agent_id"]] = _Peer(view)
        entry.last_used = now
        return entry.view

    def drop(self, agent_id: str) -> None:
        self._peers.pop(agent_id, None)  # the mapping closes with the last tensor on it

    def close(self) -> None:
        self.stream.synchronize()
        self._peers.clear()


class IpcPull(Pull):
    """Copies of the peer's pool blocks into ours on the side stream: pulling -> done | failed | timed_out."""
    transport = "ipc"

    def __init__(self, peers: IpcPeers, peer: dict, remote: list[int], local: list[int], block_bytes: int,
                 timeout_s: float, record=None):
        super().__init__(len(remote), block_bytes, timeout_s, record)
        self._peers, self._agent_id = peers, peer["agent_id"]
        self._event = None
        try:
            src = peers.view(peer)
        except (TransferError, RuntimeError) as e:  # RuntimeError: CUDA refused the handle (peer gone)
            peers.drop(self._agent_id)
            self._end(TransferState.FAILED, f"CUDA IPC pull from {self._agent_id[:8]}: {e}")
            return
        pairs = sorted(zip(remote, local))  # sorted by remote id: most runs merge
        runs = coalesce([p[0] for p in pairs], [p[1] for p in pairs])
        dst, stream = peers.pool, peers.stream
        # the blocks were just allocated here: work queued on the main stream that last used them comes first
        stream.wait_stream(torch.cuda.current_stream(dst.device))
        with torch.cuda.device(dst.device), torch.cuda.stream(stream):
            copy_blocks(dst, src, runs)  # one launch for scattered blocks (not one copy each)
            self._event = torch.cuda.Event()
            self._event.record(stream)
        self.num_ranges, self.num_calls = len(runs), 1
        self.state = TransferState.PULLING

    def abort(self, error: str) -> TransferState:
        if self._event is not None:
            self._event.synchronize()  # nothing lands in the local blocks after this
        return super().abort(error)

    def poll(self) -> TransferState:
        if self.state is not TransferState.PULLING:
            return self.state
        if self._event.query():
            return self._end(TransferState.DONE, None)
        if self._expired():
            self.safe_to_free = False  # the copies cannot be recalled: they may still land
            self._peers.drop(self._agent_id)
            return self._end(TransferState.TIMED_OUT, f"CUDA IPC copies from {self._agent_id[:8]} not done "
                                                      f"within {self._timeout_s} s")
        return self.state
