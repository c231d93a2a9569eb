"""Start-up warm-up of the GEMM kernels a step may pick by its row count.

cuBLAS chooses its kernel by shape, and CUDA loads each kernel lazily on its first launch (torch sets
CUDA_MODULE_LOADING=LAZY). That first load waits for the device to drain: the host stalls mid-step
and the GPU then idles while the host catches up. Unwarmed, the logits GEMM (one new row count per
prefill step: the sequences whose prompt completes in it) cost ~3 ms of GPU idle per prefill step of
the throughput bench (H200). So before serving, the logits GEMM runs once for every row count a step
can sample (1..max_num_seqs, exact), and every distinct projection for row counts 1, 2, 3, 4, 6, 8, ...
up to max_num_batched_tokens (cuBLAS switches kernels at row-count boundaries; this catches most of
them, not every one). Decode-graph buckets are warmed by their capture already."""
from __future__ import annotations

import time

import torch
from torch import nn

from engine.layers.linear import LinearBase


def projection_row_counts(max_tokens: int) -> list[int]:
    """1, 2, 3, 4, 6, 8, 12, 16, ... (powers of two and their 1.5x) up to max_tokens, which is included."""
    counts, p = set(), 1
    while p <= max_tokens:
        counts.update(n for n in (p, p + p // 2) if n <= max_tokens)
        p *= 2
    counts.add(max_tokens)
    return sorted(counts)


@torch.inference_mode()
def warm_up_gemms(model: nn.Module, hidden_size: int, dtype: torch.dtype, device: torch.device,
                  max_num_seqs: int, max_num_batched_tokens: int) -> float:
    """Runs the logits GEMM for 1..max_num_seqs rows and each distinct decoder projection (by shape)
    for `projection_row_counts`; returns the seconds it took."""
    t0 = time.perf_counter()
    hidden = torch.zeros(max_num_seqs, hidden_size, dtype=dtype, device=device)
    for rows in range(1, max_num_seqs + 1):
        model.compute_logits(hidden[:rows])
    del hidden
    shapes = {}
    for m in model.modules():
        # the decoder's projections by their (shard's) shape; the GEMM alone, so no rank waits on a collective
        if isinstance(m, LinearBase):
            shapes.setdefault((*m.weight.shape, m.bias is not None, m.weight.dtype), m)
    for proj in shapes.values():
        # the layer's own GEMM (block-FP8 layers take model-dtype inputs)
        x = torch.zeros(max_num_batched_tokens, proj.weight.shape[1], dtype=dtype, device=device)
        for rows in projection_row_counts(max_num_batched_tokens):
            proj.gemm(x[:rows], proj.bias)
        del x
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0
