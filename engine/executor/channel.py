"""The message channel between rank 0 (the engine core) and its other workers: one ZMQ ROUTER on rank 0, one
DEALER per worker (identity = its rank); over TCP (Ray) with CurveZMQ keyed by a secret of this engine. Rank 0 encodes a message once and sends it to every worker; waits
for replies poll in short slices and ask `alive()` in between, so a dead worker ends a wait at once."""
from __future__ import annotations

import time
from typing import Callable

import msgspec
import zmq

from engine.wire import WorkerInbound, WorkerOutbound, WorkerReady, WorkerReply
from engine.zmq_sockets import bind_router, connect_dealer

POLL_MS = 50


class WorkerLost(RuntimeError):
    """A worker died, stopped answering, or failed a call: the engine cannot go on."""


class DriverChannel:
    def __init__(self, address: str, world_size: int, secret: str | None = None):
        self.world_size = world_size
        self.ctx = zmq.Context()
        self.sock = bind_router(self.ctx, address, secret)
        self.address = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.identities = [f"rank{r}".encode() for r in range(1, world_size)]
        self.encoder = msgspec.msgpack.Encoder()
        self.decoder = msgspec.msgpack.Decoder(WorkerOutbound)
        self.pids: dict[int, int] = {}

    def _recv(self, alive: Callable[[], None], deadline: float | None):
        while True:
            alive()
            if self.sock.poll(POLL_MS):
                _, payload = self.sock.recv_multipart()
                return self.decoder.decode(payload)
            if deadline is not None and time.monotonic() > deadline:
                raise WorkerLost("a worker did not answer in time")

    def wait_ready(self, loaded: bool, alive: Callable[[], None], timeout_s: float | None = None) -> None:
        """Until every worker has said it is connected (`loaded` False) or has its model loaded (True)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        waiting = set(range(1, self.world_size))
        while waiting:
            msg = self._recv(alive, deadline)
            if isinstance(msg, WorkerReply) and msg.error:  # it failed to start
                raise WorkerLost(f"worker rank {msg.rank} failed to start: {msg.error}")
            if isinstance(msg, WorkerReady) and msg.loaded == loaded:
                self.pids[msg.rank] = msg.pid
                waiting.discard(msg.rank)

    def send(self, msg) -> None:
        payload = self.encoder.encode(msg)
        for identity in self.identities:
            try:
                self.sock.send_multipart([identity, payload], copy=False)
            except zmq.ZMQError as e:  # ROUTER_MANDATORY: the worker's socket is gone
                raise WorkerLost(f"worker {identity.decode()} is gone ({e})") from None

    def replies(self, call_id: int, alive: Callable[[], None], timeout_s: float) -> list:
        """Every worker's result of call `call_id`, in rank order (ranks 1..N-1)."""
        deadline = time.monotonic() + timeout_s
        results: dict[int, object] = {}
        while len(results) < self.world_size - 1:
            msg = self._recv(alive, deadline)
            if not isinstance(msg, WorkerReply) or msg.call_id != call_id:
                continue
            if msg.error is not None:
                raise WorkerLost(f"worker rank {msg.rank} failed: {msg.error}")
            results[msg.rank] = msg.result
        return [results[r] for r in range(1, self.world_size)]

    def close(self) -> None:
        self.sock.close(linger=0)
        self.ctx.term()


class WorkerChannel:
    def __init__(self, address: str, rank: int, secret: str | None = None):
        self.rank = rank
        self.ctx = zmq.Context()
        self.sock = connect_dealer(self.ctx, address, secret, identity=f"rank{rank}".encode())
        self.encoder = msgspec.msgpack.Encoder()
        self.decoder = msgspec.msgpack.Decoder(WorkerInbound)

    def recv(self, timeout_ms: int):
        """The next message, or None after `timeout_ms` without one."""
        if not self.sock.poll(timeout_ms):
            return None
        return self.decoder.decode(self.sock.recv(copy=False).buffer)

    def send(self, msg) -> None:
        self.sock.send(self.encoder.encode(msg))

    def close(self) -> None:
        self.sock.close(linger=0)
        self.ctx.term()
