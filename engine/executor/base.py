"""Executor: how the engine core drives its ranks. Rank 0's Worker (`driver`) always runs in the engine-core
process and is called directly; `uni` has only it. `mp` and `ray` (engine/executor/distributed.py) add
workers in other processes, reached over a channel with one small message per step."""
from __future__ import annotations

import abc
import os

import numpy as np

from engine.worker.input_batch import StepBatch
from engine.worker.model_runner import LaunchedStep
from engine.worker.worker import Worker


def resolve_method(obj, dotted: str):
    """`pd.poll` -> obj.pd.poll; private names are not reachable."""
    for name in dotted.split("."):
        if not name or name.startswith("_"):
            raise AttributeError(f"no callable {dotted!r}")
        obj = getattr(obj, name)
    return obj


def call(obj, dotted: str, args) -> object:
    return resolve_method(obj, dotted)(*args)


class Executor(abc.ABC):
    world_size = 1
    driver: Worker

    @abc.abstractmethod
    def collective_rpc(self, method: str, *args) -> list:
        """Runs `method` (a Worker method; dotted names reach its parts, e.g. `pd.poll`) on every rank;
        the results in rank order."""

    def launch(self, scheduled, stop_ids_of, prev: LaunchedStep | None,
               dp_rows: list[int] | None = None) -> LaunchedStep | None:
        """Queues one step on every rank; rank 0's LaunchedStep (None: nothing sampled). With data parallelism
        `scheduled` holds every DP group's rows back to back, `dp_rows` how many each."""
        batch = StepBatch.from_scheduled(scheduled)
        dp_samples = None
        if dp_rows:
            ends = np.cumsum([0, *dp_rows])
            rows = batch.sample_rows()
            dp_samples = [int(rows[a:b].sum()) for a, b in zip(ends[:-1], ends[1:])]
        self._send_step(batch, scheduled, dp_rows or [], dp_samples or [])
        n0 = dp_rows[0] if dp_rows else len(scheduled)
        return self.driver.runner.launch(batch.part(0, n0), [s.seq.block_table for s in scheduled[:n0]], prev,
                                         [s.seq for s in scheduled if s.samples], stop_ids_of, dp_samples)

    def _send_step(self, batch: StepBatch, scheduled, dp_rows: list[int], dp_samples: list[int]) -> None:
        """Hands the step to the other ranks before rank 0 runs it."""

    def worker_failure(self, wait_s: float = 0.0) -> str | None:
        """Why a worker rank is gone (waiting up to `wait_s` for the monitor to tell), or None: an error
        raised by a collective is often the first sign of a rank that died."""
        return None

    def rank_pids(self) -> list[int]:
        """The process of every rank, rank 0 first."""
        return [os.getpid()]

    def on_free(self, seq_id: str) -> None:
        """The block manager released a sequence's blocks (its table is gone on every rank)."""

    def shutdown(self) -> None:
        self.driver.close()


class UniExecutor(Executor):
    """One process, one rank: today's path, with no copies or messages."""

    def __init__(self, config, model_path, max_model_len: int, progress: bool = False):
        self.driver = Worker(config, model_path, max_model_len, rank=0, world_size=1, rendezvous=None,
                             progress=progress)

    def collective_rpc(self, method: str, *args) -> list:
        return [call(self.driver, method, args)]


def make_executor(config, model_path, max_model_len: int, progress: bool = False, on_worker_failure=None) -> Executor:
    """`on_worker_failure(reason)` runs (on a monitor thread) when a worker process dies; an engine-core
    server passes one that exits, since rank 0 may be blocked in a collective with the dead rank."""
    backend = config.distributed_executor_backend
    if backend == "auto":
        backend = "uni" if config.world_size == 1 else "mp"
    if backend == "uni":
        return UniExecutor(config, model_path, max_model_len, progress)
    if backend == "mp":
        from engine.executor.multiproc import MultiprocExecutor
        return MultiprocExecutor(config, model_path, max_model_len, progress, on_worker_failure)
    from engine.executor.ray_executor import RayExecutor
    return RayExecutor(config, model_path, max_model_len, progress, on_worker_failure)
