"""MoE experts on DeepGEMM's M-grouped bf16 GEMM (contiguous layout), used when `deep_gemm` imports: it is not
on the package index, `../shared/device/kernels.sh` builds it from source on the GPU machine (README: MoE).

The contiguous layout wants every expert's rows padded to DeepGEMM's M alignment (128 on Hopper) and the
layout sized on the host, so this path takes the large, eager batches (prefill); decode steps, which run
inside CUDA graphs, stay on the Triton kernel. Padding rows are marked -1 and skipped by the kernel."""
from __future__ import annotations

import functools
import importlib.util

import torch

from kernels.activation import silu_and_mul
from kernels.moe.torch_ref import local_ids

# from this many (token, expert) pairs on, DeepGEMM takes the call (the Triton kernel falls from ~90% of the
# copy bandwidth at <= 2k pairs to compute-bound tiles beyond; see README's MoE table)
MIN_PAIRS = 4096


@functools.cache
def available() -> bool:
    return importlib.util.find_spec("deep_gemm") is not None


def supports(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_ids: torch.Tensor) -> bool:
    return (available() and x.is_cuda and x.dtype == w13.dtype == torch.bfloat16 and topk_ids.numel() >= MIN_PAIRS
            and x.shape[1] % 64 == 0 and w2.shape[2] % 64 == 0 and not torch.cuda.is_current_stream_capturing())


def fused_experts(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor, expert_map: torch.Tensor | None = None) -> torch.Tensor:
    import deep_gemm
    align = deep_gemm.get_mk_alignment_for_contiguous_layout()
    T, k = topk_ids.shape
    E, H = w13.shape[0], x.shape[1]
    ids = local_ids(topk_ids, expert_map).flatten()
    key = torch.where(ids >= 0, ids, E)
    counts = torch.bincount(key, minlength=E + 1)
    padded = (counts[:E] + align - 1) // align * align
    rows = int(padded.sum())  # the one host sync: the layout's size
    order = torch.argsort(key, stable=True)
    sorted_key = key[order]
    keep = sorted_key < E
    order, sorted_key = order[keep], sorted_key[keep]
    rank_in_expert = torch.arange(order.numel(), device=x.device) - (torch.cumsum(counts, 0) - counts)[sorted_key]
    dest = (torch.cumsum(padded, 0) - padded)[sorted_key] + rank_in_expert
    layout = torch.full((rows,), -1, dtype=torch.int32, device=x.device)
    layout[dest] = sorted_key.to(torch.int32)
    a = torch.zeros(rows, H, dtype=x.dtype, device=x.device)
    a[dest] = x[order // k]
    up = torch.empty(rows, w13.shape[1], dtype=x.dtype, device=x.device)
    deep_gemm.m_grouped_bf16_gemm_nt_contiguous(a, w13, up, layout)
    act = silu_and_mul(up)
    down = torch.empty(rows, H, dtype=x.dtype, device=x.device)
    deep_gemm.m_grouped_bf16_gemm_nt_contiguous(act, w2, down, layout)
    out = torch.zeros(T * k, H, dtype=torch.float32, device=x.device)
    out[order] = down[dest].float() * topk_weights.flatten()[order, None]
    return out.view(T, k, H).sum(dim=1).to(x.dtype)
