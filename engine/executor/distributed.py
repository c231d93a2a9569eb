"""DistributedExecutor: rank 0 in the engine-core process, ranks 1..N-1 in worker processes that a subclass
starts (`mp`: children on this node; `ray`: actors of a placement group). Each step goes to the workers as
one WorkerStep of deltas before rank 0 runs it; calls (`collective_rpc`) go to every rank and wait for all
answers. A monitor thread watches the workers: one that dies makes every later call fail at once, and
`on_worker_failure` (the engine-core server exits there) runs with the reason."""
from __future__ import annotations

import abc
import atexit
import itertools
import logging
import secrets
import socket
import threading
import time
from typing import Callable

from engine.executor.base import Executor, call
from engine.executor.channel import DriverChannel, WorkerLost
from engine.wire import WorkerCall, WorkerStep
from engine.worker.input_batch import StepBatch
from engine.worker.worker import Worker

log = logging.getLogger(__name__)
SHUTDOWN_TIMEOUT_S = 10.0


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class BlockTableSync:
    """Rank 0's record of the block tables its workers hold, so that a step sends each sequence's new blocks
    only (the whole table the first time). A sequence whose blocks are freed is forgotten here and its
    handle is sent as `freed`: if it runs again (after a preemption) it comes back under a new handle."""

    def __init__(self):
        self._sent: dict[str, list[int]] = {}  # seq_id -> [handle, blocks sent]
        self._freed: list[int] = []
        self._handles = itertools.count()

    def release(self, seq_id: str) -> None:
        entry = self._sent.pop(seq_id, None)
        if entry is not None:
            self._freed.append(entry[0])

    def take_freed(self) -> list[int]:
        freed, self._freed = self._freed, []
        return freed

    def rows(self, scheduled) -> tuple[list[int], list[list[int]]]:
        handles, new_blocks = [], []
        for s in scheduled:
            table = s.seq.block_table
            entry = self._sent.get(s.seq.seq_id)
            if entry is None:
                entry = self._sent[s.seq.seq_id] = [next(self._handles), 0]
            handles.append(entry[0])
            new_blocks.append(table[entry[1]:])
            entry[1] = len(table)
        return handles, new_blocks


class DistributedExecutor(Executor):
    def __init__(self, config, model_path, max_model_len: int, progress: bool = False,
                 on_worker_failure: Callable[[str], None] | None = None):
        self.config = config
        self._model_path, self._max_model_len = model_path, max_model_len
        self.world_size = config.world_size
        self.timeout_s = config.distributed_timeout_s
        self.on_worker_failure = on_worker_failure
        self.dead_reason: str | None = None
        self.sync = BlockTableSync()
        self._calls = itertools.count(1)
        self._stopping = False
        self.driver: Worker | None = None
        host = self.driver_host()
        address = self.channel_address(host)
        # over TCP the channel is reachable from the network: only this engine's workers may talk on it
        self.channel_secret = secrets.token_hex(16) if address.startswith("tcp://") else None
        self.channel = DriverChannel(address, self.world_size, self.channel_secret)
        rendezvous = f"{host}:{free_port(host)}"  # rank 0 hosts the TCPStore of the group
        try:
            self.start_workers(rendezvous, self.channel.address)
            threading.Thread(target=self._monitor, name="slipstream-worker-monitor", daemon=True).start()
            self.channel.wait_ready(False, self.check_alive, self.timeout_s)  # connected, not yet loading
            self.driver = Worker(config, model_path, max_model_len, 0, self.world_size, rendezvous,
                                 self.driver_device_index(), progress)
            self.channel.wait_ready(True, self.check_alive)
        except BaseException:
            self.shutdown()
            raise
        # at interpreter exit, stop the workers before multiprocessing / Ray tear them down under us
        atexit.register(self.shutdown)
        log.info("event=workers_ready world_size=%d pids=%s", self.world_size, self.channel.pids)

    # ---- what a kind of executor provides -------------------------------------------------------
    @abc.abstractmethod
    def driver_host(self) -> str:
        """The address workers reach rank 0 at (channel and process-group rendezvous)."""

    @abc.abstractmethod
    def channel_address(self, host: str) -> str:
        ...

    @abc.abstractmethod
    def start_workers(self, rendezvous: str, channel_address: str) -> None:
        ...

    @abc.abstractmethod
    def wait_for_worker_exit(self) -> str | None:
        """Blocks until a worker exits; why (None: the executor is shutting down)."""

    @abc.abstractmethod
    def stop_workers(self) -> None:
        ...

    def driver_device_index(self) -> int | None:
        return None

    # ---- failure -----------------------------------------------------------------------------------
    def _monitor(self) -> None:
        reason = self.wait_for_worker_exit()
        if reason is None or self._stopping:
            return
        self.dead_reason = reason
        log.error("event=worker_died %s", reason)
        if self.on_worker_failure is not None:
            self.on_worker_failure(reason)

    def worker_failure(self, wait_s: float = 0.0) -> str | None:
        deadline = time.monotonic() + wait_s
        while self.dead_reason is None and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.dead_reason

    def check_alive(self) -> None:
        if self.dead_reason is not None:
            raise WorkerLost(self.dead_reason)

    # ---- driving ---------------------------------------------------------------------------------
    def rank_pids(self) -> list[int]:
        return [*super().rank_pids(), *(self.channel.pids[r] for r in range(1, self.world_size))]

    def on_free(self, seq_id: str) -> None:
        self.sync.release(seq_id)

    def collective_rpc(self, method: str, *args) -> list:
        self.check_alive()
        call_id = next(self._calls)
        self.channel.send(WorkerCall(call_id=call_id, method=method, args=list(args), freed=self.sync.take_freed()))
        local = call(self.driver, method, args)  # after the send: a method with collectives meets the others
        return [local, *self.channel.replies(call_id, self.check_alive, self.timeout_s)]

    def _send_step(self, batch: StepBatch, scheduled, dp_rows: list[int], dp_samples: list[int]) -> None:
        self.check_alive()
        handles, new_blocks = self.sync.rows(scheduled)
        self.channel.send(WorkerStep(freed=self.sync.take_freed(), handles=handles, new_blocks=new_blocks,
                                     num_computed=batch.num_computed.tobytes(), num_new=batch.num_new.tobytes(),
                                     pending_rows=batch.pending_rows.tobytes(), samples=batch.samples.tobytes(),
                                     token_ids=batch.token_ids.tobytes(), dp_rows=dp_rows, dp_samples=dp_samples,
                                     prompt_idx=batch.prompt_idx.tobytes(),
                                     prompt_targets=batch.prompt_targets.tobytes(), prompt_topn=batch.prompt_topn,
                                     rope_offsets=b"" if batch.rope_offsets is None else batch.rope_offsets.tobytes(),
                                     mrope_positions=(b"" if batch.mrope_positions is None
                                                      else batch.mrope_positions.tobytes()),
                                     images=batch.images,
                                     spec_lens=b"" if batch.spec_lens is None else batch.spec_lens.tobytes(),
                                     next_ids=b"" if batch.next_ids is None else batch.next_ids.tobytes()))

    def shutdown(self) -> None:
        if self._stopping:
            return
        self._stopping = True
        atexit.unregister(self.shutdown)
        if self.dead_reason is None and self.channel.pids:
            try:
                call_id = next(self._calls)
                self.channel.send(WorkerCall(call_id=call_id, method="shutdown", args=[]))
                self.channel.replies(call_id, self.check_alive, SHUTDOWN_TIMEOUT_S)
            except WorkerLost as e:
                log.warning("event=worker_shutdown_unanswered %s", e)
        self.stop_workers()
        self.channel.close()
        if self.driver is not None:
            self.driver.close()
