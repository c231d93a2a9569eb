"""KV-block data plane: a KVTransferAgent per engine rank serves its KV pool and pulls remote
blocks into local ones, over the transport both sides share (engine/pd/topology.py): CUDA IPC
(engine/pd/ipc.py, IpcPull) or DLSlime (this module: the pool, or its pinned staging area, as one
memory region, read as PullTransfer state machines).

Measured DLSlime 0.1.23 behaviour this module is shaped by (see shared/notes/dlslime.md):
- one TcpEndpoint talks to ONE peer: a second connect() silently re-targets it and reads
  against the first peer then never complete, so every peer gets its own client endpoint;
- > 32 assignments in one read() can complete early; > ~64 in flight per peer stall 1 s;
- the serving side does no bounds checks; wait() spins a core (we poll wait_for(0));
- a read that is abandoned (peer hung) can still land bytes after shutdown(): its local
  destination is unsafe to reuse (PullTransfer.safe_to_free);
- connect() "succeeds" against any listener, and a read from something that is not a
  DLSlime peer can return 0 with garbage landed: each new link first reads the peer's agent
  id from a tiny "id" region and checks it against the endpoint info.

Not thread-safe: one thread (the engine loop) drives an agent and its transfers.
"""
from __future__ import annotations

import bisect
import uuid

import dlslime
import torch

from engine.pd import topology
from engine.pd.pull import POLL_SLEEP_S, TERMINAL, Pull, TransferMetrics, TransferState
from engine.pd.ranges import (ID_BYTES, ID_REGION, REGION, ByteRange, TransferError,
                              check_block_ids, check_bounds, check_compatible, check_peer_info,
                              check_pull_ids, coalesce, to_byte_ranges)
from kernels.block_copy import copy_blocks_ref

__all__ = ["POLL_SLEEP_S", "TERMINAL", "KVTransferAgent", "PullTransfer", "StagedBlocks",
           "TransferError", "TransferMetrics", "TransferState"]


def _make_endpoint(transport: str, host: str, port: int = 0):
    if transport == "tcp":
        return dlslime.TcpEndpoint(host, port)
    if transport == "rdma":
        nics = dlslime.available_nic()
        if not nics:
            raise TransferError("transport 'rdma' requested but no RDMA NIC was found "
                                "(dlslime.available_nic() is empty); use transport='tcp'")
        return dlslime.RDMAEndpoint(device_name=nics[0], ib_port=1, link_type="auto")
    raise TransferError(f"unknown transport {transport!r} (expected 'tcp' or 'rdma')")


def _copy_blocks(dst: torch.Tensor, dst_ids, src: torch.Tensor, src_ids):
    """dst[dst_ids] = src[src_ids], one copy per adjacent run (slices of pinned memory stay
    pinned, so non_blocking really is async). Returns a CUDA event, or None if synchronous."""
    copy_blocks_ref(dst, src, coalesce(src_ids, dst_ids))
    device = dst.device if dst.is_cuda else src.device
    if device.type != "cuda":
        return None
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(device))
    return event


class _Staging:
    """Host buffer of whole blocks with a free-list allocator. Pinned for a CUDA pool so that
    stage-out (GPU -> host) and stage-in (host -> GPU) copies are asynchronous."""

    def __init__(self, pool: torch.Tensor, num_blocks: int):
        self.buf = torch.empty((num_blocks, *pool.shape[1:]), dtype=pool.dtype,
                               pin_memory=pool.is_cuda)
        self.capacity = num_blocks
        self._free = list(range(num_blocks))   # sorted: allocations tend to be contiguous
        self.quarantined = 0

    def alloc(self, n: int) -> list[int] | None:
        if n > len(self._free):
            return None
        slots, self._free = self._free[:n], self._free[n:]
        return slots

    def free(self, slots) -> None:
        for s in slots:
            bisect.insort(self._free, s)

    def quarantine(self, slots) -> None:
        # Slots that an abandoned read may still write into are never handed out again.
        self.quarantined += len(slots)


class StagedBlocks:
    """Blocks made pullable by stage_out: put `remote_ids` in the migration descriptor once
    ready() is true, and release() them when the peer has pulled (or given up)."""

    def __init__(self, remote_ids: list[int], slots: list[int] | None, event):
        self.remote_ids, self.slots, self._event, self.released = remote_ids, slots, event, False
        self.staged = slots is not None   # remote_ids are staging slots (else pool blocks)

    def ready(self) -> bool:
        return self._event is None or self._event.query()

    def wait(self) -> None:
        if self._event is not None:
            self._event.synchronize()


def _link_key(transport: str, peer: dict) -> str:
    return f"{transport}:{peer['host']}:{peer['port']}"


class _PeerLink:
    """A client endpoint connected to one peer, its registered regions and in-flight budget.
    Usable once the identity probe (a read of the peer's id region) has come back right. A
    connect-back link (RDMA) first completes its handshake (engine/pd/handshake.py)."""

    def __init__(self, endpoint, local_handle: int, remote_handle: int | None, peer: dict,
                 probe_buf: torch.Tensor, probe_future, transport: str = "tcp", handshake=None,
                 probe_handle: int = 0, remote_len: int = 0):
        self.endpoint, self.local_handle, self.remote_handle = endpoint, local_handle, remote_handle
        self.key, self.agent_id = f"{peer['host']}:{peer['port']}", peer["agent_id"]
        self.cache_key = _link_key(transport, peer)   # the agent's link cache
        self._probe_buf, self._probe = probe_buf, probe_future
        self.handshake, self._probe_handle, self._remote_len = handshake, probe_handle, remote_len
        self.inflight = 0 if handshake is not None else 1      # the probe
        self.verified = False
        self.broken = False    # out of the cache; shut down once nothing is in flight
        self.closed = False

    def check_probe(self) -> str | None:
        """None while the handshake or probe is out or once verified; an error message if it failed."""
        if self.handshake is not None:
            try:
                info = self.handshake.advance()
            except TransferError as e:
                return str(e)
            if info is None:
                return None
            return self._connected(info)
        if self.verified or self._probe is None:
            return None if self.verified else f"identity probe of {self.key} failed"
        status = self._probe.wait_for(0)
        if status is None:
            return None
        self._probe, self.inflight = None, self.inflight - 1
        got = bytes(self._probe_buf.tolist())
        if status == 0 and got == self.agent_id.encode():
            self.verified = True
            return None
        return (f"identity probe of {self.key} failed (status {status}): the listener there "
                "is not the KV agent its endpoint info describes (stale info or restarted)")

    def _connected(self, info: dict) -> str | None:
        """The source answered the handshake with its data endpoint: connect, then probe it."""
        handshake, self.handshake = self.handshake, None
        handshake.control.shutdown()
        try:
            mr, id_mr = info["mr_info"][REGION], info["mr_info"][ID_REGION]
            if mr["length"] < self._remote_len or id_mr["length"] != ID_BYTES:
                return (f"{self.key}'s data endpoint serves {mr['length']} bytes, less than the "
                        f"{self._remote_len} its pool needs")
            self.endpoint.connect(info)
            self.remote_handle = self.endpoint.register_remote_memory_region(self.key, mr)
            id_h = self.endpoint.register_remote_memory_region(f"{self.key}/id", id_mr)
        except (KeyError, TypeError) as e:
            return f"malformed handshake reply from {self.key}: missing or bad {e}"
        self._probe = self.endpoint.read([(self._probe_handle, id_h, 0, 0, ID_BYTES)])
        self.inflight += 1
        return None

    def close_if_drained(self) -> None:
        if self.broken and self.inflight == 0 and not self.closed:
            self.closed = True
            if self.handshake is not None:
                self.handshake.control.shutdown()
            self.endpoint.shutdown()


class PullTransfer(Pull):
    """Pull of remote blocks into local ones over a DLSlime link (TCP, or RDMA once connected):
    pending -> pulling -> done | failed | timed_out."""
    transport = "tcp"

    def __init__(self, agent: KVTransferAgent, link: _PeerLink | None, remote: list[int],
                 local: list[int], remote_len: int, timeout_s: float, staging=None,
                 local_len: int = 0, transport: str = "tcp"):
        super().__init__(len(remote), agent.block_bytes, timeout_s, agent._record)
        self._agent, self._link, self._remote_len = agent, link, remote_len
        self._staging, self._local_len, self.transport = staging, local_len, transport
        self._remote, self._local = remote, local
        self._ranges: list[ByteRange] | None = None
        self._next = 0
        self._inflight: list[tuple[object, int]] = []   # (future, assignments)
        self._slots: list[int] | None = None            # local staging slots, if staged
        self._landing = False                           # staging -> pool copy started
        self._event = None                              # ... and its CUDA event
        self._read_error: str | None = None

    def poll(self) -> TransferState:
        if self.state in TERMINAL:
            return self.state
        self._reap()
        if self._read_error is not None and not self._inflight:
            return self._finish(TransferState.FAILED, self._read_error)
        if self._expired():
            return self._finish(TransferState.TIMED_OUT, f"pull of {len(self._remote)} blocks "
                                f"from {self._link.key} not done within {self._timeout_s} s")
        if self._read_error is not None:
            return self.state      # let the other reads drain so the local blocks are safe
        if not self._link.verified:
            error = self._link.check_probe()
            if error is not None:
                self._agent._break(self._link)
                return self._finish(TransferState.FAILED, error)
            if not self._link.verified:
                return self.state
        if self._ranges is None and not self._plan():
            return self.state      # no staging slots free yet
        self._issue()
        if self._next == len(self._ranges) and not self._inflight:
            return self._land()
        return self.state

    def _plan(self) -> bool:
        staging = self._staging
        if staging is None:
            dst = self._local
        else:
            self._slots = staging.alloc(len(self._local))
            if self._slots is None:
                return False
            dst = self._slots
        pairs = sorted(zip(self._remote, dst))   # sorted by remote id: most runs merge
        ranges = to_byte_ranges(coalesce([p[0] for p in pairs], [p[1] for p in pairs]),
                                self._agent.block_bytes, self._agent.max_range_bytes)
        check_bounds(ranges, self._remote_len, self._local_len)
        self._ranges, self.num_ranges = ranges, len(ranges)
        return True

    def _issue(self) -> None:
        link, agent = self._link, self._agent
        while self._next < len(self._ranges) and not link.broken:
            n = min(agent.max_assignments_per_call, len(self._ranges) - self._next,
                    agent.max_inflight_per_peer - link.inflight)
            if n <= 0:
                return
            batch = self._ranges[self._next:self._next + n]
            try:
                fut = link.endpoint.read([(link.local_handle, link.remote_handle, r.remote_off,
                                           r.local_off, r.length) for r in batch])
            except Exception as e:  # noqa: BLE001 - any binding error fails this pull only
                self._read_error = f"DLSlime read to {link.key} raised: {e}"
                agent._break(link)
                return
            self._inflight.append((fut, n))
            link.inflight += n
            agent._peak_inflight = max(agent._peak_inflight, link.inflight)
            self._next += n
            self.num_calls += 1
            self.state = TransferState.PULLING
        if link.broken and self._next < len(self._ranges) and self._read_error is None:
            self._read_error = f"connection to {link.key} was dropped by another pull"

    def _reap(self) -> None:
        pending = []
        for fut, n in self._inflight:
            status = fut.wait_for(0)
            if status is None:
                pending.append((fut, n))
                continue
            self._link.inflight -= n
            if status != 0 and self._read_error is None:
                self._read_error = (f"DLSlime read from {self._link.key} returned {status} "
                                    "(peer dead or connection reset)")
                self._agent._break(self._link)
        self._inflight = pending
        if self._link is not None:
            self._link.close_if_drained()

    def abort(self, error: str) -> TransferState:
        return self.state if self.state in TERMINAL else self._finish(TransferState.FAILED, error)

    def _land(self) -> TransferState:
        """All reads done: staged pulls still copy staging -> pool (async on CUDA)."""
        staging = self._staging
        if staging is None:
            return self._finish(TransferState.DONE)
        if not self._landing:
            self._landing = True
            self._event = _copy_blocks(self._agent.pool, self._local, staging.buf, self._slots)
        if self._event is None or self._event.query():
            return self._finish(TransferState.DONE)
        return self.state

    def _finish(self, state: TransferState, error: str | None = None) -> TransferState:
        if self._inflight:
            # Abandoned reads may still write into their destination; the connection is
            # dropped, and the destination is either quarantined (staging) or flagged.
            abandoned = sum(n for _, n in self._inflight)
            self._link.inflight -= abandoned
            self._agent._break(self._link)
            self._inflight = []
            if self._slots is None:
                self.safe_to_free = False
            else:
                self._staging.quarantine(self._slots)
                self._slots = None
        if state is TransferState.TIMED_OUT and not self._link.verified:
            self._agent._break(self._link)    # hung at the probe: later pulls reconnect
        if self._slots is not None and (state is TransferState.DONE or self._event is None):
            self._staging.free(self._slots)
            self._slots = None
        # else: a staging -> pool copy is still in flight (only on close); leak the slots.
        return self._end(state, error)


class KVTransferAgent:
    """One rank's KV data plane: it serves this rank's pool to pullers and pulls peers' blocks into
    it, over the transports `transport` allows (topology.offers): CUDA IPC for a GPU pool (exported
    once), and a DLSlime endpoint serving the CPU pool, or for a GPU pool a pinned staging area
    (`staging_blocks` > 0 required when TCP is offered). Pulls use the best transport shared with
    the peer (topology.choose); DLSlime links are cached per peer, IPC mappings per peer agent."""

    def __init__(self, pool: torch.Tensor, host: str = "127.0.0.1", port: int = 0,
                 transport: str = "auto", staging_blocks: int = 0,
                 max_assignments_per_call: int = 32, max_inflight_per_peer: int = 64,
                 max_range_bytes: int = 64 << 20, data_endpoint=None):
        if pool.dim() < 2 or not pool.is_contiguous() or pool.numel() == 0:
            raise ValueError("pool must be a non-empty contiguous [num_blocks, ...] tensor")
        if not 1 <= max_assignments_per_call <= 32 or not 1 <= max_inflight_per_peer <= 64:
            raise ValueError("DLSlime defects: <= 32 assignments per call, <= 64 in flight")
        # data_endpoint: how the connect-back transport's endpoints are made (RDMAEndpoint by
        # default; tests run the same path with TCP endpoints)
        self._make_data_endpoint = data_endpoint or (lambda: _make_endpoint("rdma", host))
        # the NIC is probed only where RDMA is asked for (auto leaves it out: topology.offers)
        nic = data_endpoint is not None or (transport == "rdma" and bool(dlslime.available_nic()))
        self.transports = topology.offers(transport, pool.is_cuda, nic)
        # the PyPI dlslime has no CUDA: TCP reads a GPU pool through pinned host memory (RDMA
        # registers the pool itself: GPUDirect)
        tcp = "tcp" in self.transports
        staged = tcp and staging_blocks > 0   # CPU pools stage only when asked (tests)
        if pool.is_cuda and tcp and not staged:
            raise ValueError("a CUDA pool served over TCP needs staging_blocks > 0 (the dlslime "
                             "wheel has no CUDA: GPU KV is staged through pinned host memory)")
        self.pool, self.host = pool, host
        self.block_bytes = pool[0].numel() * pool.element_size()
        self.max_assignments_per_call = max_assignments_per_call
        self.max_inflight_per_peer = max_inflight_per_peer
        self.max_range_bytes = max_range_bytes
        self._staging = _Staging(pool, staging_blocks) if staged else None
        # what DLSlime serves: the staging area, the CPU pool, or nothing (a GPU pool over IPC only)
        self._region = (self._staging.buf if staged else None if pool.is_cuda else pool)
        self.region_bytes = 0 if self._region is None else self._region.numel() * self._region.element_size()
        # the endpoint always listens: its id region answers identity probes and liveness checks
        self._endpoint = _make_endpoint("tcp", host, port)
        self.agent_id = uuid.uuid4().hex
        self._id_buf = torch.tensor(list(self.agent_id.encode()), dtype=torch.uint8)
        handles = [self._endpoint.register_memory_region(ID_REGION, self._id_buf.data_ptr(), 0, ID_BYTES)]
        if self._region is not None:
            handles.append(self._endpoint.register_memory_region(REGION, self._region.data_ptr(), 0,
                                                                 self.region_bytes))
        self._mailbox = None
        if "rdma" in self.transports:   # connect-back requests arrive in a mailbox region
            from engine.pd.handshake import HS_REGION, Mailbox
            self._mailbox = Mailbox(self._make_data_endpoint, pool, self._id_buf)
            handles.append(self._endpoint.register_memory_region(
                HS_REGION, self._mailbox.buf.data_ptr(), 0, self._mailbox.buf.numel()))
        if min(handles) < 0:
            raise TransferError("DLSlime refused to register the KV regions")
        self._ipc, self._gpus = None, frozenset()
        if "ipc" in self.transports:
            from engine.pd.ipc import IpcExport, device_uuid
            self._ipc = IpcExport(pool, self.agent_id)
            self._gpus = frozenset(device_uuid(i) for i in range(torch.cuda.device_count()))
        self._ipc_peers = None   # opened on the first IPC pull
        self.host_id = topology.host_id()
        self._layout = {"block_shape": list(pool.shape[1:]),
                        "dtype": str(pool.dtype).removeprefix("torch."),
                        "block_bytes": self.block_bytes}
        self._links: dict[str, _PeerLink] = {}
        self._dropped: list[_PeerLink] = []    # broken links with reads still out
        self._active: set[Pull] = set()
        self._counts = {s: 0 for s in TERMINAL}
        self._bytes, self._ms, self._peak_inflight = 0, 0.0, 0
        self._closed = False

    # -- what peers need ---------------------------------------------------------------
    def endpoint_info(self) -> dict:
        """JSON-serialisable description a peer needs to choose a transport, validate and pull
        our blocks. `num_blocks` counts the blocks DLSlime reads address (staging slots if
        staged), `pool_blocks` those of the pool (what IPC reads address)."""
        info = self._endpoint.endpoint_info()
        return {"agent_id": self.agent_id, "host": info["host"], "port": info["port"],
                "host_id": self.host_id, "transports": list(self.transports),
                "region": REGION, "mr_info": info["mr_info"],
                "num_blocks": 0 if self._region is None else self._region.shape[0],
                "staged": self._staging is not None, "pool_blocks": self.pool.shape[0],
                "ipc": None if self._ipc is None else self._ipc.descriptor, **self._layout}

    def stage_out(self, block_ids, wait: bool = True) -> StagedBlocks | None:
        """Make pool blocks pullable over DLSlime. Unstaged (CPU pool, or IPC only): the ids
        themselves, no copy. Staged: copy into staging slots; while the staging area is full,
        None (retry later), or unstaged blocks when IPC is offered (`staged` tells). With
        wait=False the GPU -> host copy is left running: publish remote_ids only once ready()."""
        ids = check_block_ids(block_ids, self.pool.shape[0], "local")
        if self._staging is None:
            return StagedBlocks(ids, None, None)
        slots = self._staging.alloc(len(ids))
        if slots is None:
            # full: over IPC the pool blocks are pullable as they are (TCP pullers are refused)
            return StagedBlocks(ids, None, None) if self._ipc is not None else None
        staged = StagedBlocks(slots, slots, _copy_blocks(self._staging.buf, slots, self.pool, ids))
        if wait:
            staged.wait()
        return staged

    def release(self, staged: StagedBlocks) -> None:
        if staged.slots is not None and not staged.released:
            staged.wait()   # the stage-out copy must finish before the slots are reused
            self._staging.free(staged.slots)
        staged.released = True

    # -- pulling -------------------------------------------------------------------------
    def choose(self, peer_info: dict) -> str:
        """The transport a pull from this peer would use (TransferError: none in common)."""
        return topology.choose(self.transports, check_peer_info(peer_info), self.host_id, self._gpus)

    def start_pull(self, peer_info: dict, remote_block_ids, local_block_ids,
                   timeout_s: float = 30.0, staged_block_ids=None) -> Pull:
        """Validate, choose the transport, then start pulling. `remote_block_ids` are blocks of
        the peer's pool; `staged_block_ids`, where the peer staged them for DLSlime reads (None:
        unstaged, read the pool ids). Raises TransferError for anything that must not be issued;
        runtime problems (unreachable, dead or hung peer) end as failed / timed_out."""
        if self._closed:
            raise TransferError("agent is closed")
        peer = check_peer_info(peer_info)
        check_compatible(self._layout, peer)
        transport = topology.choose(self.transports, peer, self.host_id, self._gpus)
        if transport == "ipc":
            return self._start_ipc(peer, remote_block_ids, local_block_ids, timeout_s)
        if transport == "rdma":   # the pool itself on both sides, over a connect-back link
            remote, local = check_pull_ids(remote_block_ids, local_block_ids,
                                           peer["pool_blocks"], self.pool.shape[0])
            remote_len = peer["pool_blocks"] * self.block_bytes
            pool_len = self.pool.numel() * self.pool.element_size()
            check_bounds(to_byte_ranges(coalesce(remote, local), self.block_bytes,
                                        self.max_range_bytes), remote_len, pool_len)
            return self._start_dlslime(peer, "rdma", remote, local, remote_len, timeout_s,
                                       None, pool_len)
        if peer["staged"]:
            if staged_block_ids is None:
                raise TransferError("the source stages its GPU pool for TCP reads, and this "
                                    "request's KV was not staged (its staging area was full): "
                                    "pull over IPC on its host, or raise its --kv-staging-bytes")
            remote_block_ids = staged_block_ids
        remote, local = check_pull_ids(remote_block_ids, local_block_ids,
                                       peer["num_blocks"], self.pool.shape[0])
        if self._staging is not None and len(local) > self._staging.capacity:
            raise TransferError(f"pull of {len(local)} blocks exceeds the staging area of "
                                f"{self._staging.capacity} blocks")
        if self._region is None:
            raise TransferError("this engine's GPU pool offers no staging area for TCP pulls")
        remote_len = min(peer["num_blocks"] * self.block_bytes, peer["region_length"])
        if self._staging is None:   # staged pulls are checked once their slots are known
            check_bounds(to_byte_ranges(coalesce(remote, local), self.block_bytes,
                                        self.max_range_bytes), remote_len, self.region_bytes)
        return self._start_dlslime(peer, "tcp", remote, local, remote_len, timeout_s,
                                   self._staging, self.region_bytes)

    def _start_dlslime(self, peer: dict, transport: str, remote: list[int], local: list[int],
                       remote_len: int, timeout_s: float, staging, local_len: int) -> Pull:
        link, error = self._link_to(peer, transport)
        transfer = PullTransfer(self, link, remote, local, remote_len, timeout_s, staging,
                                local_len, transport)
        self._active.add(transfer)
        if error is not None:
            transfer._finish(TransferState.FAILED, error)
        transfer.poll()
        return transfer

    def _start_ipc(self, peer: dict, remote_block_ids, local_block_ids, timeout_s: float) -> Pull:
        from engine.pd.ipc import IpcPeers, IpcPull, check_descriptor
        check_descriptor(peer["ipc"])
        remote, local = check_pull_ids(remote_block_ids, local_block_ids, peer["pool_blocks"],
                                       self.pool.shape[0])
        if self._ipc_peers is None:
            self._ipc_peers = IpcPeers(self.pool)
        transfer = IpcPull(self._ipc_peers, peer, remote, local, self.block_bytes, timeout_s,
                           self._record)
        if transfer.state not in TERMINAL:
            self._active.add(transfer)
        return transfer

    def _link_to(self, peer: dict, transport: str) -> tuple[_PeerLink | None, str | None]:
        link = self._links.get(_link_key(transport, peer))
        if link is not None and link.agent_id == peer["agent_id"] and not link.broken:
            return link, None
        if link is not None:        # the peer restarted on the same address
            self._break(link)
        control = _make_endpoint("tcp", self.host)   # to the peer's agent endpoint
        control.connect({"host": peer["host"], "port": peer["port"], "mr_info": peer["mr_info"]})
        if not control.is_connected():
            control.shutdown()
            return None, f"cannot connect to KV peer {peer['host']}:{peer['port']}"
        probe_buf = torch.zeros(ID_BYTES, dtype=torch.uint8)
        if transport == "rdma":
            from engine.pd.handshake import HS_REGION, Handshake
            if HS_REGION not in peer["mr_info"]:
                control.shutdown()
                return None, "the peer serves no connect-back mailbox"
            data = self._make_data_endpoint()
            local_h = data.register_memory_region(REGION, self.pool.data_ptr(), 0,
                                                  self.pool.numel() * self.pool.element_size())
            probe_h = data.register_memory_region("probe", probe_buf.data_ptr(), 0, ID_BYTES)
            link = _PeerLink(data, local_h, None, peer, probe_buf, None, transport,
                             Handshake(control, data, peer, self.agent_id), probe_h,
                             peer["pool_blocks"] * self.block_bytes)
        else:
            local_h = control.register_memory_region(REGION, self._region.data_ptr(), 0,
                                                     self.region_bytes)
            remote_h = control.register_remote_memory_region(f"{peer['host']}:{peer['port']}",
                                                             peer["mr_info"][peer["region"]])
            probe_h = control.register_memory_region("probe", probe_buf.data_ptr(), 0, ID_BYTES)
            id_h = control.register_remote_memory_region(f"{peer['host']}:{peer['port']}/id",
                                                         peer["mr_info"][ID_REGION])
            link = _PeerLink(control, local_h, remote_h, peer, probe_buf,
                             control.read([(probe_h, id_h, 0, 0, ID_BYTES)]))
        self._links[link.cache_key] = link
        return link, None

    def _break(self, link: _PeerLink) -> None:
        if not link.broken:
            link.broken = True
            if self._links.get(link.cache_key) is link:
                del self._links[link.cache_key]
            # Shut-down links are let go (their destructor joins DLSlime's I/O threads).
            self._dropped = [d for d in self._dropped if not d.closed] + [link]
        link.close_if_drained()

    def _record(self, transfer: Pull) -> None:
        self._active.discard(transfer)
        self._counts[transfer.state] += 1
        if transfer.state is TransferState.DONE:
            self._bytes += transfer.bytes
            self._ms += transfer.elapsed_ms

    def metrics(self) -> TransferMetrics:
        c = self._counts
        return TransferMetrics(c[TransferState.DONE], c[TransferState.FAILED],
                               c[TransferState.TIMED_OUT], self._bytes, self._ms,
                               self._peak_inflight)

    def close(self) -> None:
        """Fail active pulls, shut every endpoint down. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for transfer in list(self._active):
            transfer.abort("transfer agent closed")
        for link in list(self._links.values()):
            self._break(link)
        for link in self._dropped:
            if not link.closed:
                link.closed = True
                link.endpoint.shutdown()
        if self._mailbox is not None:
            self._mailbox.close()
        self._endpoint.shutdown()
        self._links.clear()
        if self._ipc_peers is not None:
            self._ipc_peers.close()

    def __enter__(self) -> KVTransferAgent:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

