"""The connect-back handshake of transports whose endpoints connect both ways (RDMA queue pairs): a puller
cannot just read from a source's published endpoint; the source must make an endpoint for that puller and
connect it to the puller's. The request goes over the DLSlime TCP link every agent already serves:

- the source's agent serves a mailbox region ("hs": SLOTS slots of a request half and a reply half);
- the puller makes its data endpoint, writes {its agent id, that endpoint's info} into a random slot's request
  half (body first, then a fresh nonce, so a reader that sees the nonce sees the whole body), then reads the
  reply half until it carries the same nonce;
- a thread of the source's agent watches the request nonces, makes a data endpoint per puller (serving the
  pool and the id region), connects it to the puller's, and answers with its info (body first, then nonce);
- the puller connects its endpoint to that info; the link then starts with the same identity probe as TCP.

Only the data endpoints' constructor differs between RDMA and a test run with TCP endpoints: everything else
(mailbox, threads, validation, the reads of a pull) is shared. Two pullers that pick the same slot at the same
moment: one of them never sees its nonce answered, and its pull times out (a link is made once per peer pair, so
this is rare); a retry picks another random slot.
"""
from __future__ import annotations

import json
import random
import threading

import numpy as np
import torch

from engine.pd.ranges import ID_BYTES, ID_REGION, REGION, TransferError

HS_REGION = "hs"
SLOTS, HALF, HEADER = 32, 4096, 12  # a slot: request half + reply half; a half: u64 nonce, u32 length, JSON
POLL_S = 0.002


def _encode(half: torch.Tensor, body: dict) -> int:
    raw = json.dumps(body).encode()
    if len(raw) > HALF - HEADER:
        raise TransferError(f"handshake message of {len(raw)} bytes exceeds {HALF - HEADER}")
    half[8:12] = torch.tensor(list(len(raw).to_bytes(4, "little")), dtype=torch.uint8)
    half[HEADER:HEADER + len(raw)] = torch.tensor(list(raw), dtype=torch.uint8)
    return len(raw)


def _nonce(half: torch.Tensor) -> int:
    return int.from_bytes(bytes(half[:8].tolist()), "little")


def _decode(half: torch.Tensor) -> dict:
    n = int.from_bytes(bytes(half[8:12].tolist()), "little")
    if not 0 < n <= HALF - HEADER:
        raise ValueError(f"bad length {n}")
    body = json.loads(bytes(half[HEADER:HEADER + n].tolist()))
    if not isinstance(body, dict):
        raise ValueError("not an object")
    return body


class Mailbox:
    """Source side: answers handshake requests from a thread, one data endpoint per puller agent."""

    def __init__(self, make_endpoint, region: torch.Tensor, id_buf: torch.Tensor):
        self.buf = torch.zeros(SLOTS * 2 * HALF, dtype=torch.uint8)
        self._make, self._region, self._id_buf = make_endpoint, region, id_buf
        # every slot's request nonce in one strided view: a poll is one vector compare (the GIL is the
        # engine loop's)
        self._nonces = self.buf.numpy().view(np.uint64)[::2 * HALF // 8]
        self._seen = np.zeros(SLOTS, dtype=np.uint64)
        self._served: dict[str, object] = {}  # puller agent id -> its data endpoint
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kv-handshake", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(POLL_S):
            self.serve_once()

    def serve_once(self) -> int:
        """Answers every new request; returns how many."""
        answered = 0
        for slot in np.flatnonzero((self._nonces != self._seen) & (self._nonces != 0)).tolist():
            req = self.buf[slot * 2 * HALF:slot * 2 * HALF + HALF]
            nonce = _nonce(req)
            self._seen[slot] = nonce
            try:
                reply = {"info": self._answer(_decode(req))}
            except Exception as e:  # noqa: BLE001 - a bad request is answered, never fatal
                reply = {"error": f"{type(e).__name__}: {e}"}
            out = self.buf[slot * 2 * HALF + HALF:(slot + 1) * 2 * HALF]
            try:
                _encode(out, reply)
            except TransferError as e:
                _encode(out, {"error": str(e)})
            out[:8] = torch.tensor(list(nonce.to_bytes(8, "little")), dtype=torch.uint8)
            answered += 1
        return answered

    def _answer(self, req: dict) -> dict:
        agent_id, info = req.get("agent_id"), req.get("info")
        if not (isinstance(agent_id, str) and len(agent_id) == ID_BYTES and isinstance(info, dict)):
            raise ValueError("expected {agent_id, info}")
        endpoint = self._make()
        handles = [endpoint.register_memory_region(REGION, self._region.data_ptr(), 0,
                                                   self._region.numel() * self._region.element_size()),
                   endpoint.register_memory_region(ID_REGION, self._id_buf.data_ptr(), 0, ID_BYTES)]
        if min(handles) < 0:
            endpoint.shutdown()
            raise TransferError("cannot register the KV regions on a new endpoint")
        endpoint.connect(info)
        with self._lock:
            old = self._served.pop(agent_id, None)   # the puller reconnects: its old endpoint goes
            self._served[agent_id] = endpoint
        if old is not None:
            old.shutdown()
        return endpoint.endpoint_info()

    @property
    def num_served(self) -> int:
        with self._lock:
            return len(self._served)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        with self._lock:
            served, self._served = list(self._served.values()), {}
        for endpoint in served:
            endpoint.shutdown()


class Handshake:
    """Puller side, non-blocking: advance() returns None while under way and the source's data endpoint info
    once answered; raises TransferError if the source refused or the link failed. `control` is a TCP endpoint
    connected to the source's agent; `endpoint` is this puller's data endpoint for that source."""

    def __init__(self, control, endpoint, peer: dict, agent_id: str):
        self.control, self.endpoint, self.key = control, endpoint, f"{peer['host']}:{peer['port']}"
        self._buf = torch.zeros(2 * HALF, dtype=torch.uint8)
        self._local = control.register_memory_region("hsbuf", self._buf.data_ptr(), 0, 2 * HALF)
        self._remote = control.register_remote_memory_region(f"{self.key}/hs", peer["mr_info"][HS_REGION])
        self._off = random.randrange(SLOTS) * 2 * HALF
        self._nonce = random.getrandbits(62) + 1
        n = _encode(self._buf[:HALF], {"agent_id": agent_id, "info": endpoint.endpoint_info()})
        self._future = control.write([(self._local, self._remote, self._off + 8, 8, 4 + n)])
        self._step = "body"

    def advance(self) -> dict | None:
        status = self._future.wait_for(0)
        if status is None:
            return None
        if status != 0:
            raise TransferError(f"handshake with {self.key} failed ({self._step}, status {status})")
        if self._step == "body":  # the body landed: now the nonce that publishes it
            self._buf[:8] = torch.tensor(list(self._nonce.to_bytes(8, "little")), dtype=torch.uint8)
            self._future = self.control.write([(self._local, self._remote, self._off, 0, 8)])
            self._step = "nonce"
            return None
        if self._step == "reply" and _nonce(self._buf[HALF:]) == self._nonce:
            try:
                reply = _decode(self._buf[HALF:])
            except ValueError as e:
                raise TransferError(f"malformed handshake reply from {self.key}: {e}") from None
            if "error" in reply or not isinstance(reply.get("info"), dict):
                raise TransferError(f"{self.key} refused the handshake: {reply.get('error', 'no info')}")
            return reply["info"]
        self._future = self.control.read([(self._local, self._remote, self._off + HALF, HALF, HALF)])
        self._step = "reply"
        return None
