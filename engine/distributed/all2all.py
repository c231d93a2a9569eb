"""Expert-parallel dispatch and combine across data-parallel groups, through torch.distributed all-to-all.

At data_parallel_size > 1 every DP group has its own tokens, and the experts are spread over all the
engine's ranks. Each (token, expert) pair travels to the rank that holds its expert, the rank runs its
experts on what it received, and the results travel back and are summed per token. Within a DP group the
tokens are the same on every tensor-parallel rank, so each TP rank sends an even share of them and the
group's results are gathered afterwards: no pair is computed twice.

The split sizes are exchanged first (one small all-to-all), so a layer costs host syncs: DP > 1 steps run
eagerly, not in CUDA graphs. A rank with no tokens still takes part (its splits are zero): idle DP groups run
every MoE layer with an empty batch so that the collectives of all ranks stay matched."""
from __future__ import annotations

import torch
import torch.distributed as dist

from engine.distributed.parallel import ParallelContext


def _all_to_all(group, x: torch.Tensor, send: list[int], recv: list[int]) -> torch.Tensor:
    out = x.new_empty(sum(recv), *x.shape[1:])
    group.alltoall_base(out, x.contiguous(), recv, send, dist.AllToAllOptions()).wait()
    return out


def tp_share(parallel: ParallelContext, num_tokens: int) -> tuple[int, int]:
    """(start, end) of the tokens this TP rank dispatches for its DP group."""
    per = -(-num_tokens // parallel.tp_size)
    start = min(parallel.tp_rank * per, num_tokens)
    return start, min(start + per, num_tokens)


def moe_all_to_all(parallel: ParallelContext, owner: torch.Tensor, x: torch.Tensor, topk_weights: torch.Tensor,
                   topk_ids: torch.Tensor, expert_map: torch.Tensor, compute) -> torch.Tensor:
    """`owner` [E]: the rank of every expert; `compute(x, weights [R, 1], local ids [R, 1])` runs this rank's
    experts on the received pairs (weighted). Returns [T, H]: every token's sum over its k experts."""
    T, k = topk_ids.shape
    start, end = tp_share(parallel, T)
    ids = topk_ids[start:end].reshape(-1).long()
    weights = topk_weights[start:end].reshape(-1)
    dest = owner[ids]
    order = torch.argsort(dest, stable=True)
    world = parallel.world_group
    send_counts = torch.bincount(dest, minlength=parallel.ep_size)
    recv_counts = torch.empty_like(send_counts)
    world.alltoall_base(recv_counts, send_counts, [], [], dist.AllToAllOptions()).wait()
    send, recv = send_counts.tolist(), recv_counts.tolist()
    tokens = start + order // k
    got_x = _all_to_all(world, x[tokens], send, recv)
    got_ids = _all_to_all(world, ids[order], send, recv)
    got_w = _all_to_all(world, weights[order].float(), send, recv)
    y = compute(got_x, got_w[:, None], expert_map[got_ids][:, None])
    back = _all_to_all(world, y, recv, send)
    out = torch.zeros(end - start, x.shape[1], dtype=torch.float32, device=x.device)
    out.index_add_(0, tokens - start, back.float())
    out = out.to(x.dtype)
    if parallel.tp_size == 1:
        return out
    # the group's shares, gathered on every TP rank (equal sizes: pad to the largest share)
    per = -(-T // parallel.tp_size)
    padded = x.new_zeros(per, x.shape[1])
    padded[:end - start] = out
    parts = [torch.empty_like(padded) for _ in range(parallel.tp_size)]
    parallel.group.allgather([parts], [padded]).wait()
    return torch.cat(parts)[:T]
