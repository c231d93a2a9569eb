"""ParallelContext: one rank's place in its engine's tensor-parallel group and the collectives the layers call.
It is built once per rank and handed to every layer that shards or reduces (no module globals); at tp_size 1
every collective is a no-op, so one GPU pays nothing for the seam.

The group is a torch.distributed process group of its own (NCCL for CUDA ranks, gloo for CPU ranks) over a
TCPStore that rank 0 hosts, not the process-wide default group: a process may hold several engines (tests,
benchmarks), and nothing global is initialised or torn down behind the caller's back."""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ParallelContext:
    tp_rank: int = 0
    tp_size: int = 1
    group: object = None  # the ranks' ProcessGroup (None at tp_size 1)
    store: object = None  # kept alive with the group (rank 0 hosts it)
    # MoE layers split the experts over the ranks (each holds whole experts) instead of splitting every
    # expert's intermediate dimension (vLLM's --enable-expert-parallel)
    expert_parallel: bool = False
    # attention data parallelism: dp_size groups of tp_size ranks, each with its own batch and KV pool
    dp_rank: int = 0
    dp_size: int = 1
    world_group: object = None  # every rank of the engine (expert all-to-all), at dp_size > 1
    leaders_group: object = None  # the first rank of every DP group (logits to rank 0, tokens back)

    @property
    def is_first(self) -> bool:
        """The first rank of its tensor-parallel group (it gathers that group's logits)."""
        return self.tp_rank == 0

    @property
    def is_driver(self) -> bool:
        """Rank 0 of the engine: it samples every row."""
        return self.tp_rank == 0 and self.dp_rank == 0

    @property
    def ep_size(self) -> int:
        """Ranks the experts are spread over (1: every rank holds a slice of every expert)."""
        return self.tp_size * self.dp_size if self.expert_parallel else 1

    @property
    def ep_rank(self) -> int:
        return self.dp_rank * self.tp_size + self.tp_rank if self.expert_parallel else 0

    def gather_rows_to_driver(self, x: torch.Tensor, rows: list[int]) -> torch.Tensor | None:
        """DP leaders: every group's x (rows[d] rows each) concatenated in DP order on rank 0; None elsewhere."""
        if self.dp_size == 1:
            return x
        width = max(rows)
        padded = x.new_zeros(width, *x.shape[1:])
        padded[:x.shape[0]] = x
        parts = [[torch.empty_like(padded) for _ in range(self.dp_size)]] if self.dp_rank == 0 else []
        opts = dist.GatherOptions()
        opts.rootRank = 0
        self.leaders_group.gather(parts, [padded], opts).wait()
        return torch.cat([p[:n] for p, n in zip(parts[0], rows)]) if self.dp_rank == 0 else None

    def broadcast_from_driver(self, x: torch.Tensor) -> torch.Tensor:
        """DP leaders: rank 0's x, in place (the sampled tokens of every DP group)."""
        if self.dp_size > 1:
            opts = dist.BroadcastOptions()
            opts.rootRank = 0
            self.leaders_group.broadcast([x], opts).wait()
        return x

    def shard(self, total: int, what: str) -> tuple[int, int]:
        """(start, size) of this rank's equal share of `total` rows; `what` names it in the error."""
        if total % self.tp_size:
            raise ValueError(f"{what} ({total}) is not divisible by tensor_parallel_size {self.tp_size}")
        size = total // self.tp_size
        return self.tp_rank * size, size

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over the ranks, in place (the output of a row-parallel layer or a vocab-parallel lookup)."""
        if self.tp_size > 1:
            self.group.allreduce([x]).wait()
        return x

    def gather_to_first(self, x: torch.Tensor) -> torch.Tensor | None:
        """Concatenates every rank's x along the last dim on rank 0 (vocab-parallel logits); None elsewhere."""
        if self.tp_size == 1:
            return x
        x = x.contiguous()
        parts = [[torch.empty_like(x) for _ in range(self.tp_size)]] if self.is_first else []
        opts = dist.GatherOptions()
        opts.rootRank = 0
        self.group.gather(parts, [x], opts).wait()
        return torch.cat(parts[0], dim=-1) if self.is_first else None

    def broadcast_from_first(self, x: torch.Tensor) -> torch.Tensor:
        """Rank 0's x on every rank, in place (the sampled tokens: rank 0's are the truth)."""
        if self.tp_size > 1:
            opts = dist.BroadcastOptions()
            opts.rootRank = 0
            self.group.broadcast([x], opts).wait()
        return x

    def close(self) -> None:
        for group in (self.group, self.world_group, self.leaders_group):
            if group is not None and hasattr(group, "shutdown"):
                group.shutdown()


def _group(store, prefix: str, rank: int, size: int, device: torch.device, timeout: datetime.timedelta):
    prefixed = dist.PrefixStore(prefix, store)
    if device.type == "cuda":
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        return dist.ProcessGroupNCCL(prefixed, rank, size, options)
    return dist.ProcessGroupGloo(prefixed, rank, size, timeout)


def init_parallel(rank: int, world_size: int, rendezvous: str | None, device: torch.device,
                  timeout_s: float, expert_parallel: bool = False, tp_size: int | None = None) -> ParallelContext:
    """Joins this rank to its engine's groups; `rendezvous` is rank 0's host:port for the TCPStore. Ranks are
    laid out DP-major: rank = dp_rank * tp_size + tp_rank. Every collective fails after `timeout_s` instead of
    waiting forever on a dead or hung rank."""
    tp_size = tp_size or world_size
    dp_size, dp_rank, tp_rank = world_size // tp_size, rank // tp_size, rank % tp_size
    if world_size == 1:
        return ParallelContext(expert_parallel=expert_parallel)
    host, port = rendezvous.rsplit(":", 1)
    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(host, int(port), world_size, rank == 0, timeout=timeout)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        # a timed-out NCCL collective aborts the communicator (and the process) instead of hanging
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    group = _group(store, f"tp{dp_rank}/", tp_rank, tp_size, device, timeout) if tp_size > 1 else None
    world = leaders = None
    if dp_size > 1:
        world = _group(store, "world/", rank, world_size, device, timeout)
        if tp_rank == 0:
            leaders = _group(store, "leaders/", dp_rank, dp_size, device, timeout)
    return ParallelContext(tp_rank=tp_rank, tp_size=tp_size, group=group, store=store,
                           expert_parallel=expert_parallel, dp_rank=dp_rank, dp_size=dp_size, world_group=world,
                           leaders_group=leaders)
