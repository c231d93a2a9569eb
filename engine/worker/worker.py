"""Worker: one rank of an engine. It joins the engine's process group, holds the rank's device, model shard and
KV pool (ModelRunner), serves and pulls the rank's KV shard for hand-offs (RankKV), and, on ranks > 0, keeps
the block tables that rank 0 sends as deltas. Rank 0's worker lives in the engine-core process and is called
directly; the others live in worker processes (engine/executor/) and are driven by messages."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch

from engine.config import EngineConfig
from engine.distributed.parallel import init_parallel
from engine.errors import UnsupportedModelError
from engine.models.config import load_model_config
from engine.pd.rank_kv import RankKV
from engine.wire import WorkerStep
from engine.worker.input_batch import StepBatch
from engine.worker.kv_budget import kv_budget_blocks
from engine.worker.model_runner import LaunchedStep, ModelRunner

log = logging.getLogger(__name__)


def resolve_device(name: str, index: int = 0) -> torch.device:
    """The device of a rank: `index` is the CUDA device it takes on its node."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise UnsupportedModelError("device 'cuda' requested but CUDA is not available", param="device")
        if index >= torch.cuda.device_count():
            raise UnsupportedModelError(f"rank needs CUDA device {index}, but only {torch.cuda.device_count()} "
                                        "are visible", param="tensor_parallel_size")
        return torch.device("cuda", index)
    return torch.device(name)


def kv_transfer_host(configured: str) -> str:
    """`auto`: this machine's routable address (containers: their own IP, unknown when the command is written)."""
    if configured == "auto":
        from ctrl_client.schema import routable_host
        return routable_host()
    return configured


class Worker:
    def __init__(self, config: EngineConfig, model_path: Path, max_model_len: int, rank: int, world_size: int,
                 rendezvous: str | None, device_index: int | None = None, progress: bool = False):
        self.rank, self.world_size = rank, world_size
        model_config = load_model_config(model_path)
        self.device = resolve_device(config.device, rank if device_index is None else device_index)
        self.parallel = init_parallel(rank, world_size, rendezvous, self.device, config.distributed_timeout_s,
                                      config.enable_expert_parallel, config.tensor_parallel_size)
        self.runner = ModelRunner(config, model_config, model_path, max_model_len, self.parallel, self.device,
                                  progress and rank == 0)
        self.pd = RankKV(rank, kv_transfer_host(config.kv_transfer_host), config.kv_staging_bytes,
                         self.parallel.dp_rank, self.parallel.tp_rank, config.kv_transport)
        self.tables: dict[int, list[int]] = {}  # ranks > 0: rank 0's block tables, by handle
        self._prev: LaunchedStep | None = None  # ranks > 0: the last step that sampled

    # ---- called on every rank through the executor ------------------------------------------
    def determine_num_blocks(self) -> int:
        return kv_budget_blocks(self.runner)

    def allocate_kv_pool(self, num_blocks: int) -> None:
        self.pd.bind(self.runner.allocate_kv_pool(num_blocks))

    def num_block_tables(self) -> int:
        """Block tables this rank holds for rank 0 (0 once every sequence has been freed)."""
        return len(self.tables)

    def ping(self) -> int:
        return os.getpid()

    # ---- ranks > 0 ---------------------------------------------------------------------------
    def drop_tables(self, handles: list[int]) -> None:
        for h in handles:
            self.tables.pop(h, None)

    def execute_step(self, msg: WorkerStep) -> None:
        """The same forward as rank 0's (with data parallelism: this DP group's rows of it), from the deltas."""
        lo, hi = 0, len(msg.handles)
        dp = self.parallel.dp_rank
        if msg.dp_rows:
            lo = sum(msg.dp_rows[:dp])
            hi = lo + msg.dp_rows[dp]
        tables = []
        for handle, new in zip(msg.handles[lo:hi], msg.new_blocks[lo:hi]):
            table = self.tables.setdefault(handle, [])
            table.extend(new)
            tables.append(table)
        batch = StepBatch(num_computed=np.frombuffer(msg.num_computed, np.int64),
                          num_new=np.frombuffer(msg.num_new, np.int64),
                          pending_rows=np.frombuffer(msg.pending_rows, np.int64),
                          samples=np.frombuffer(msg.samples, np.bool_),
                          token_ids=np.frombuffer(msg.token_ids, np.int64),
                          prompt_idx=np.frombuffer(msg.prompt_idx, np.int64),
                          prompt_targets=np.frombuffer(msg.prompt_targets, np.int64),
                          prompt_topn=msg.prompt_topn,
                          rope_offsets=np.frombuffer(msg.rope_offsets, np.int64) if msg.rope_offsets else None,
                          mrope_positions=(np.frombuffer(msg.mrope_positions, np.int64).reshape(3, -1)
                                           if msg.mrope_positions else None),
                          images=msg.images,
                          spec_lens=np.frombuffer(msg.spec_lens, np.int64) if msg.spec_lens else None,
                          next_ids=np.frombuffer(msg.next_ids, np.int64) if msg.next_ids else None).part(lo, hi)
        self._prev = self.runner.launch(batch, tables, self._prev, dp_samples=msg.dp_samples or None)

    def close(self) -> None:
        self.pd.close()
        self.parallel.close()
