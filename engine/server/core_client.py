"""CoreClient: the API front's asyncio client of one engine core over ZMQ (DEALER).

One receive task decodes the core's messages: step deltas go through the OutputProcessor
(detokenise, stop strings, n-way fan-in) and the changed RequestOutputs into per-request asyncio
queues; engine-info replies resolve futures. The client also tracks whether the core is alive.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import time

import msgspec
import zmq
import zmq.asyncio

from ctrl_client.aio import wait_within
from engine.errors import EngineError, UnavailableError
from engine.output_processor import OutputProcessor
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams
from engine.wire import (AbortRequests, AddRequests, CoreOutbound, EngineCoreOutputs, EngineInfo, EngineInfoRequest,
                         ErrorInfo, ErrorReply, RequestsRejected, UtilityCall, UtilityResult)
from engine.zmq_sockets import connect_dealer

log = logging.getLogger(__name__)


class CoreError(EngineError):
    """An error the core reported, carrying its type and status."""

    def __init__(self, info: ErrorInfo):
        super().__init__(info.message, info.param)
        self.type, self.status = info.type, info.status


class RequestHandle:
    """What the front holds for one request in flight: its queue of changed outputs."""

    def __init__(self, request_id: str, n: int, arrival: float, queue: asyncio.Queue | None = None):
        self.request_id = request_id
        self.n = n
        self.arrival = arrival
        # changed outputs (the same cumulative RequestOutput each time) or the error that ended it;
        # several handles may share one queue (a streamed request with several prompts)
        self.queue: asyncio.Queue[RequestOutput | BaseException] = queue if queue is not None else asyncio.Queue()
        self.output: RequestOutput | None = None
        self.finished = False
        self.num_started = 0  # samples that produced their first token
        self.last_token_at: dict[str, float] = {}  # sample id -> monotonic time of its latest token
        self.first_token_at: dict[str, float] = {}  # sample id -> monotonic time of its first token
        self.kv_transfer_params: dict | None = None  # set by a prefill-role core with the hand-off descriptor


class CoreClient:
    def __init__(self, address: str, metrics=None, secret: str | None = None):
        self.address = address
        self.ctx = zmq.asyncio.Context()
        self.sock = connect_dealer(self.ctx, address, secret)
        self.encoder = msgspec.msgpack.Encoder()
        self.decoder = msgspec.msgpack.Decoder(CoreOutbound)
        self.processor: OutputProcessor | None = None  # set once the tokenizer is loaded
        self.handles: dict[str, RequestHandle] = {}
        self.calls: dict[int, asyncio.Future] = {}
        self._call_ids = itertools.count(1)
        self._recv_task: asyncio.Task | None = None
        self.dead_reason: str | None = None  # set once the core is known dead: every request fails
        self.metrics = metrics  # has observe_first_token(s) / observe_inter_token(s), or None

    def start(self, tokenizer) -> None:
        self.processor = OutputProcessor(tokenizer)
        if self._recv_task is None:
            self._recv_task = asyncio.create_task(self._receive_loop())

    async def close(self) -> None:
        if self._recv_task is not None:
            self._recv_task.cancel()
            await asyncio.gather(self._recv_task, return_exceptions=True)
        self.sock.close(linger=0)
        self.ctx.term()

    @property
    def num_in_flight(self) -> int:
        return len(self.handles)

    @property
    def num_unstarted(self) -> int:
        """Samples submitted that have not produced a token yet (queued or in prefill)."""
        return sum(h.n - h.num_started for h in self.handles.values())

    # ---- calls ---------------------------------------------------------------------------------
    async def engine_info(self, timeout: float) -> EngineInfo:
        return await self._call(lambda cid: EngineInfoRequest(call_id=cid), timeout)

    async def utility(self, method: str, *args, timeout: float = 10.0):
        reply: UtilityResult = await self._call(lambda cid: UtilityCall(call_id=cid, method=method, args=list(args)),
                                                timeout)
        if reply.error is not None:
            raise CoreError(reply.error)
        return reply.result

    async def _call(self, make, timeout: float):
        if self._recv_task is None:  # before start(): only engine-info replies, read inline
            return await self._call_inline(make, timeout)
        call_id = next(self._call_ids)
        fut = asyncio.get_running_loop().create_future()
        self.calls[call_id] = fut
        try:
            await self.sock.send(self.encoder.encode(make(call_id)))
            return await wait_within(fut, timeout)
        finally:
            self.calls.pop(call_id, None)

    async def _call_inline(self, make, timeout: float):
        call_id = next(self._call_ids)
        await self.sock.send(self.encoder.encode(make(call_id)))
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if not await self.sock.poll(int(left * 1000) + 1):
                break
            msg = self.decoder.decode(await self.sock.recv())
            if getattr(msg, "call_id", None) == call_id:
                return msg
        raise asyncio.TimeoutError

    # ---- requests ------------------------------------------------------------------------------
    async def add(self, request_id: str, prompt: str | None, prompt_token_ids: list[int], params: SamplingParams,
                  kv_transfer_params: dict | None = None, queue: asyncio.Queue | None = None,
                  images: list | None = None) -> RequestHandle:
        if self.dead_reason is not None:
            raise UnavailableError(self.dead_reason)
        now = time.time()
        handle = RequestHandle(request_id, params.n, time.monotonic(), queue)
        requests = self.processor.add_request(request_id, prompt, prompt_token_ids, params, arrival_time=now,
                                              images=images)
        for r in requests:
            r.kv_transfer_params = kv_transfer_params
        self.handles[request_id] = handle
        try:
            await self.sock.send(self.encoder.encode(AddRequests(requests=requests)))
        except BaseException:
            self._forget(request_id)
            raise
        return handle

    async def abort(self, request_id: str) -> None:
        """Forgets the request and frees its KV in the core at once (client gone, error, drain)."""
        child_ids = self._forget(request_id)
        if child_ids and self.dead_reason is None:
            await self.sock.send(self.encoder.encode(AbortRequests(request_ids=child_ids)))

    def _forget(self, request_id: str) -> list[str]:
        handle = self.handles.pop(request_id, None)
        if handle is not None:
            handle.finished = True
        return self.processor.abort(request_id) if self.processor is not None else []

    def fail_all(self, error: BaseException) -> list[str]:
        """Ends every request in flight with `error`; returns their sample ids."""
        child_ids = []
        for request_id, handle in list(self.handles.items()):
            child_ids += self._forget(request_id)
            handle.queue.put_nowait(error)
        return child_ids

    async def abort_all(self, error: BaseException) -> None:
        """Drain timeout: fail every request in flight and free its KV in the core."""
        child_ids = self.fail_all(error)
        if child_ids and self.dead_reason is None:
            await self.sock.send(self.encoder.encode(AbortRequests(request_ids=child_ids)))

    def mark_dead(self, reason: str) -> None:
        if self.dead_reason is None:
            log.error("event=core_dead reason=%r in_flight=%d", reason, len(self.handles))
            self.dead_reason = reason
            self.fail_all(UnavailableError(f"the engine core is unavailable: {reason}"))

    # ---- receive -------------------------------------------------------------------------------
    async def _receive_loop(self) -> None:
        while True:
            frame = await self.sock.recv()
            try:
                msg = self.decoder.decode(frame)
            except (msgspec.DecodeError, msgspec.ValidationError):
                log.exception("event=bad_core_message bytes=%d", len(frame))
                continue
            try:
                self._dispatch(msg)
            except Exception:
                log.exception("event=dispatch_failed kind=%s", type(msg).__name__)

    def _dispatch(self, msg) -> None:
        if isinstance(msg, EngineCoreOutputs):
            self._on_outputs(msg)
        elif isinstance(msg, RequestsRejected):
            for r in msg.rejected:
                parent = self._parent_of(r.request_id)
                if parent is not None:
                    handle = self.handles.get(parent)
                    asyncio.ensure_future(self.abort(parent))  # its sibling samples too
                    if handle is not None:
                        handle.queue.put_nowait(CoreError(r.error))
        elif isinstance(msg, (EngineInfo, UtilityResult)):
            fut = self.calls.get(msg.call_id)
            if fut is not None and not fut.done():
                fut.set_result(msg)
        elif isinstance(msg, ErrorReply):
            fut = self.calls.get(msg.call_id) if msg.call_id is not None else None
            if fut is not None and not fut.done():
                fut.set_exception(CoreError(msg.error))
            else:
                log.error("event=core_error message=%r", msg.error.message)

    def _parent_of(self, child_id: str) -> str | None:
        child = self.processor.children.get(child_id)
        return child.parent.output.request_id if child is not None else None

    def _on_outputs(self, msg: EngineCoreOutputs) -> None:
        now = time.monotonic()
        for out in msg.outputs:  # token timings, before the processor forgets finished samples
            child = self.processor.children.get(out.request_id)
            handle = self.handles.get(child.parent.output.request_id) if child is not None else None
            if handle is None:
                continue
            if out.kv_transfer_params is not None:
                handle.kv_transfer_params = out.kv_transfer_params
            if not out.new_token_ids:
                continue
            last = handle.last_token_at.get(out.request_id)
            handle.last_token_at[out.request_id] = now
            if last is None:
                handle.num_started += 1
                handle.first_token_at[out.request_id] = now
            if self.metrics is not None:
                if last is None:
                    self.metrics.observe_first_token(now - handle.arrival, out.queue_time_s)
                else:
                    self.metrics.observe_inter_token((now - last) / len(out.new_token_ids))
        failed = {}  # parent request id -> the error that ended one of its samples (e.g. a failed KV pull)
        for out in msg.outputs:
            if out.finish_reason == "error":
                child = self.processor.children.get(out.request_id)
                if child is not None:
                    failed[child.parent.output.request_id] = CoreError(ErrorInfo(
                        message=out.error or "the engine failed this request", type="service_unavailable",
                        status=503))
        changed, to_abort = self.processor.process(msg.outputs)
        if to_abort:  # a stop string ended these: free their KV now
            asyncio.ensure_future(self.sock.send(self.encoder.encode(AbortRequests(request_ids=to_abort))))
        for output in changed:
            handle = self.handles.get(output.request_id)
            if handle is None:
                continue
            handle.output = output
            if output.finished:
                handle.finished = True
                del self.handles[output.request_id]
            error = failed.get(output.request_id)
            handle.queue.put_nowait(output if error is None else error)
