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

    @property
    def is_first(self) -> bool:
        return self.tp_rank == 0

    @property
    def ep_size(self) -> int:
        """Ranks the experts are spread over (1: every rank holds a slice of every expert)."""
        return self.tp_size if self.expert_parallel else 1

    @property
    def ep_rank(self) -> int:
        return self.tp_rank if self.expert_parallel else 0

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
        if self.group is not None and hasattr(self.group, "shutdown"):
            self.group.shutdown()


def init_parallel(rank: int, world_size: int, rendezvous: str | None, device: torch.device,
                  timeout_s: float, expert_parallel: bool = False) -> ParallelContext:
    """Joins this rank to its engine's group; `rendezvous` is rank 0's host:port for the TCPStore. Every
    collective then fails after `timeout_s` instead of waiting forever on a dead or hung rank."""
    if world_size == 1:
        return ParallelContext(expert_parallel=expert_parallel)
    host, port = rendezvous.rsplit(":", 1)
    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(host, int(port), world_size, rank == 0, timeout=timeout)
    prefixed = dist.PrefixStore("tp/", store)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        # a timed-out NCCL collective aborts the communicator (and the process) instead of hanging
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        group = dist.ProcessGroupNCCL(prefixed, rank, world_size, options)
    else:
        group = dist.ProcessGroupGloo(prefixed, rank, world_size, timeout)
    return ParallelContext(tp_rank=rank, tp_size=world_size, group=group, store=store, expert_parallel=expert_parallel)
