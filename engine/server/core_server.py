"""EngineCoreServer: the engine-core process loop. Owns one EngineCore and a ZMQ ROUTER socket;
steps the engine in a busy loop while it has work and blocks on the socket when idle. Every frame
is validated here (size, decoding, admission); the core trusts what passes."""
from __future__ import annotations

import logging
import math
import os
import signal
import sys
import time
import uuid

import msgspec
import zmq

from engine.core import EngineCore
from engine.processes import die_with_parent
from engine.zmq_sockets import bind_router
from engine.errors import EngineError, OverloadedError, UnavailableError
from engine.server.config import CoreServerConfig
from engine.wire import (AbortRequests, AddRequests, CoreInbound, EngineCoreOutput, EngineCoreOutputs, EngineInfo,
                         EngineInfoRequest, EngineStats, ErrorInfo, ErrorReply, RejectedRequest, RequestsRejected,
                         UtilityCall, UtilityResult)

log = logging.getLogger(__name__)

IDLE_POLL_S = 0.2  # idle wake-ups: signals, parent liveness
MAX_MESSAGES_PER_STEP = 256  # inbox messages handled between two steps (keeps steps flowing)


def error_info(e: BaseException) -> ErrorInfo:
    if isinstance(e, EngineError):
        return ErrorInfo(message=e.message, type=e.type, status=e.status, param=e.param)
    return ErrorInfo(message=f"internal error: {type(e).__name__}: {e}", type="internal_error", status=500)


def engine_stats(engine: EngineCore) -> EngineStats:
    return msgspec.convert(engine.stats(), EngineStats)


class EngineCoreServer:
    def __init__(self, engine: EngineCore, config: CoreServerConfig, parent_pid: int | None = None):
        self.engine = engine
        self.config = config
        self.parent_pid = parent_pid
        self.engine_id = uuid.uuid4().hex[:12]
        self.ctx = zmq.Context()
        # a send to a vanished client raises: we abort its work
        self.sock = bind_router(self.ctx, config.zmq_address, config.zmq_secret, config.max_frame_bytes)
        self.address = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.decoder = msgspec.msgpack.Decoder(CoreInbound)
        self.encoder = msgspec.msgpack.Encoder()
        self.owners: dict[str, bytes] = {}  # request id -> identity of the client that added it
        self.draining = False
        self.drain_deadline = 0.0
        self.stopped = False
        self.utilities = {  # what UtilityCall may invoke
            "stats": lambda: msgspec.to_builtins(engine_stats(self.engine)),
            "ping": lambda: "pong",
            "free_parked": lambda seq_ids: self.engine.free_parked(list(seq_ids)),  # the router's /pd/free
        }

    # ---- lifecycle -----------------------------------------------------------------------------
    def request_drain(self, *_args) -> None:
        """SIGTERM/SIGINT: stop admitting, finish in-flight work within drain_timeout, then exit."""
        if not self.draining:
            log.info("event=drain in_flight=%d timeout_s=%.1f", len(self.owners), self.config.drain_timeout)
            self.draining = True
            self.drain_deadline = time.monotonic() + self.config.drain_timeout

    def run(self) -> None:
        """Steps while there is work; otherwise blocks on the socket until a message or the engine's next
        timer (parked KV's deadline, the next poll of a KV pull), so an idle engine holding parked KV costs
        no CPU."""
        log.info("event=core_ready address=%s engine_id=%s pid=%d", self.address, self.engine_id, os.getpid())
        try:
            while not self.stopped:
                wait = self.engine.seconds_until_work()
                if self.sock.poll(math.ceil(min(wait, IDLE_POLL_S) * 1000)):
                    self._drain_inbox()
                    if wait > 0:  # woken by a message: look at the work again
                        self._check_stop()
                        continue
                elif wait > IDLE_POLL_S:  # the idle wake-up, not a timer
                    self._check_stop()
                    continue
                self._send_outputs(self.engine.step())
                self._check_stop()
        finally:
            self.close()

    def _check_stop(self) -> None:
        if self.parent_pid is not None and os.getppid() != self.parent_pid:
            log.warning("event=parent_gone parent_pid=%d", self.parent_pid)
            self.request_drain()
            self.drain_deadline = 0.0
        if not self.draining:
            return
        if self.engine.has_unfinished() and time.monotonic() >= self.drain_deadline:
            self._abort(list(self.engine.seqs), notify=True)
        if not self.engine.has_unfinished():
            self.stopped = True

    def close(self) -> None:
        self.sock.close(linger=0)
        self.ctx.term()

    # ---- inbox ---------------------------------------------------------------------------------
    def _drain_inbox(self) -> None:
        for _ in range(MAX_MESSAGES_PER_STEP):
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            if len(frames) != 2:
                if frames:
                    self._reply(frames[0].bytes, ErrorReply(error=ErrorInfo(
                        message="expected one frame per message", type="invalid_request_error", status=400)))
                continue
            self._handle(frames[0].bytes, frames[1].buffer)

    def _handle(self, identity: bytes, payload) -> None:
        try:
            msg = self.decoder.decode(payload)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            # SamplingParams validation errors surface here too (msgspec wraps __post_init__ errors)
            self._reply(identity, ErrorReply(error=ErrorInfo(message=f"bad message: {e}",
                                                             type="invalid_request_error", status=400)))
            return
        try:
            if isinstance(msg, AddRequests):
                self._add(identity, msg.requests)
            elif isinstance(msg, AbortRequests):
                self._abort(msg.request_ids, notify=False)  # the client already forgot them
            elif isinstance(msg, EngineInfoRequest):
                self._reply(identity, self.info(msg.call_id))
            elif isinstance(msg, UtilityCall):
                self._reply(identity, self._call(msg))
        except Exception as e:  # never let one message take the core down
            log.exception("event=message_failed kind=%s", type(msg).__name__)
            self._reply(identity, ErrorReply(error=error_info(e), call_id=getattr(msg, "call_id", None)))

    def _add(self, identity: bytes, requests) -> None:
        rejected = []
        for r in requests:
            try:
                if self.draining:
                    raise UnavailableError("the engine is draining (shutting down)")
                if self.engine.num_waiting >= self.config.max_waiting_requests:
                    raise OverloadedError(f"more than {self.config.max_waiting_requests} requests are waiting; "
                                          "retry later")
                self.engine.add_request(r)
                self.owners[r.request_id] = identity
            except Exception as e:
                if not isinstance(e, EngineError):
                    log.exception("event=add_failed request_id=%s", r.request_id)
                rejected.append(RejectedRequest(request_id=r.request_id, error=error_info(e)))
        if rejected:
            self._reply(identity, RequestsRejected(rejected=rejected))

    def _call(self, msg: UtilityCall) -> UtilityResult:
        fn = self.utilities.get(msg.method)
        if fn is None:
            return UtilityResult(call_id=msg.call_id, error=ErrorInfo(
                message=f"unknown utility {msg.method!r}", type="invalid_request_error", status=400, param="method"))
        try:
            return UtilityResult(call_id=msg.call_id, result=fn(*msg.args))
        except Exception as e:
            return UtilityResult(call_id=msg.call_id, error=error_info(e))

    def info(self, call_id: int) -> EngineInfo:
        e = self.engine
        return EngineInfo(call_id=call_id, engine_id=self.engine_id, pid=os.getpid(), role=e.config.role,
                          model_path=str(e.model_path), max_model_len=e.max_model_len,
                          block_size=e.config.block_size, vocab_size=e.runner.vocab_size,
                          draining=self.draining, stats=engine_stats(e), world_size=e.executor.world_size,
                          rank_pids=e.executor.rank_pids(),
                          kv_source=e.handoff.source_info() if e.config.role == "prefill" else None)

    # ---- outbox --------------------------------------------------------------------------------
    def _send_outputs(self, outputs: list[EngineCoreOutput]) -> None:
        if not outputs:
            return
        by_client: dict[bytes, list[EngineCoreOutput]] = {}
        for out in outputs:
            identity = self.owners.get(out.request_id)
            if out.finished:
                self.owners.pop(out.request_id, None)
            if identity is not None:
                by_client.setdefault(identity, []).append(out)
        now = time.time()
        for identity, outs in by_client.items():
            self._reply(identity, EngineCoreOutputs(outputs=outs, timestamp=now))

    def _reply(self, identity: bytes, msg) -> None:
        try:
            self.sock.send_multipart([identity, self.encoder.encode(msg)], copy=False)
        except zmq.ZMQError as e:
            if e.errno != zmq.EHOSTUNREACH:
                raise
            self._client_gone(identity)

    def _client_gone(self, identity: bytes) -> None:
        """A client vanished: free the KV of everything it had in flight, at once."""
        ids = [rid for rid, who in self.owners.items() if who == identity]
        if ids:
            log.warning("event=client_gone aborted=%d", len(ids))
            self._abort(ids, notify=False)

    def _abort(self, request_ids: list[str], notify: bool) -> None:
        """Frees the requests' KV now; with `notify`, their clients get a finish_reason "abort" output."""
        self.engine.abort(request_ids)
        outputs = [EngineCoreOutput(request_id=rid, new_token_ids=[], finish_reason="abort")
                   for rid in request_ids if rid in self.owners]
        if notify:
            self._send_outputs(outputs)
        for rid in request_ids:
            self.owners.pop(rid, None)


def exit_on_failure(reason: str) -> None:
    """A worker rank died or hung: rank 0 may be blocked in a collective with it, so the process ends here,
    at once (its front sees the core exit, answers 503 and exits too; worker processes die with us)."""
    log.critical("event=engine_failed %s", reason)
    print(f"error: {reason}", file=sys.stderr, flush=True)
    logging.shutdown()
    os._exit(1)


def run_engine_core(engine_config, core_config: CoreServerConfig, parent_pid: int | None = None) -> int:
    """Process entry: load the engine, serve until SIGTERM/SIGINT (then drain) and return 0."""
    if parent_pid is not None:
        die_with_parent()
    engine = EngineCore(engine_config, on_worker_failure=exit_on_failure)
    server = EngineCoreServer(engine, core_config, parent_pid)
    signal.signal(signal.SIGTERM, server.request_drain)
    signal.signal(signal.SIGINT, server.request_drain)
    try:
        server.run()
    except Exception as e:
        log.exception("event=core_loop_failed")
        # a collective that failed because a rank died: name the rank, not the socket error; one that timed
        # out (a hung rank) says so itself
        first = (str(e).splitlines() or [""])[0]
        exit_on_failure(engine.executor.worker_failure(wait_s=2.0)
                        or f"the engine core failed: {type(e).__name__}: {first}")
    engine.shutdown()
    log.info("event=core_exit")
    return 0
