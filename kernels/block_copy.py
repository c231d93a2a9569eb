"""Copy whole KV blocks between pools: dst[dst_ids[i]] = src[src_ids[i]] for every i, in one launch on CUDA (a
Triton kernel reading and writing each block once; `src` may be another process's pool opened over CUDA IPC).
`copy_blocks_ref` is the torch reference: one copy per run of adjacent blocks (CPU, other devices, the tests'
oracle)."""
from __future__ import annotations

import torch

from kernels.triton import use_triton


def copy_blocks_ref(dst: torch.Tensor, src: torch.Tensor, runs) -> None:
    """`runs`: (src start, dst start, count) of adjacent blocks (engine.pd.ranges.Run)."""
    for src_start, dst_start, count in runs:
        dst[dst_start:dst_start + count].copy_(src[src_start:src_start + count], non_blocking=True)


def copy_blocks(dst: torch.Tensor, src: torch.Tensor, runs) -> None:
    """On the current stream. Pools are [num_blocks, ...] and contiguous, with equal block shapes and dtypes."""
    runs = list(runs)
    if len(runs) > 1 and use_triton(dst) and src.device == dst.device and dst[0].nbytes % 4 == 0:
        from kernels.triton.block_copy import copy_blocks as fused
        return fused(dst, src, runs)
    return copy_blocks_ref(dst, src, runs)
