"""Skinny GEMM for decode batches: y[M, N] = x[M, K] @ w[N, K]^T for a few rows (kernels/linear.py
routes M <= 16 here, and up to 256 rows of block-FP8 weights in 32- or 64-row tiles).

cuBLAS reads the weights of the N=1024 projections (o_proj, down_proj) at under 1 TB/s for such
batches: too few output tiles to keep the GPU's memory pipes busy. Here every program streams one
[BN, K/S] slice of the weights (the operands swapped, so the weight rows are the MMA's M) and the
S programs of an output tile meet in a serial split-K fix-up: each leaves its fp32 partial in a
workspace and counts itself in; the last one sums the partials, writes y and re-arms the counter, so
one launch does everything and the counters are zero again for the next launch (CUDA graphs).

Float32 weights (MoE routers, whose logits the references compute in float32) take the activations cast to
float32 and an exact float32 product (no TF32), and write float32. Block-FP8 weights (E4M3, one scale per
128 x 128 block, kept row-expanded) are read as they are, half the bytes of bf16: each K step widens its tile
to fp16 (exact), multiplies it with the activations in fp16 and scales the partial product by the block's
scale; the activations are not quantised (no launch before the GEMM, and more exact than FP8 math)."""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from kernels.triton.elementwise import widen_fp16
from kernels.triton.pdl import launch_options, pdl_wait
from kernels.triton.skinny_configs import WORKSPACE_FLOATS, WORKSPACE_TILES


@triton.jit
def _skinny_gemm_kernel(x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, ws_ptr, cnt_ptr, M, N, K_SPLIT, stride_xm, stride_wn,
                        stride_sn, stride_ym, S, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                        GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, PDL: tl.constexpr):
    pid_n, pid_s, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rn = pid_n * BN + tl.arange(0, BN)
    rm = pid_m * BM + tl.arange(0, BM)
    rk = tl.arange(0, BK)
    k0 = pid_s * K_SPLIT
    w_ptrs = w_ptr + rn[:, None].to(tl.int64) * stride_wn + (k0 + rk)[None, :]
    pdl_wait(PDL)
    x_ptrs = x_ptr + rm[None, :].to(tl.int64) * stride_xm + (k0 + rk)[:, None]  # x^T: [BK, BM]
    m_ok = rm[None, :] < M
    acc = tl.zeros((BN, BM), dtype=tl.float32)  # y^T tile
    s_ptrs = s_ptr + rn.to(tl.int64) * stride_sn
    for k in range(0, K_SPLIT, BK):
        w = tl.load(w_ptrs)
        xt = tl.load(x_ptrs, mask=m_ok, other=0.0)
        if GROUP > 0:  # E4M3 weights: both operands in fp16 (see widen_fp16), the product times its block's scale
            acc += tl.dot(w.to(tl.float16), widen_fp16(xt)) * tl.load(s_ptrs + (k0 + k) // GROUP)[:, None]
        elif IEEE:
            acc = tl.dot(w, xt.to(w.dtype), acc, input_precision="ieee")
        else:
            acc = tl.dot(w, xt.to(w.dtype), acc)
        w_ptrs += BK
        x_ptrs += BK
    y_ptrs = y_ptr + rm[None, :].to(tl.int64) * stride_ym + rn[:, None]
    if S > 1:
        tile = pid_m * tl.num_programs(0) + pid_n
        tile_ws = ws_ptr + tile.to(tl.int64) * S * BN * BM + tl.arange(0, BN)[:, None] * BM + tl.arange(0, BM)[None, :]
        tl.store(tile_ws + pid_s * BN * BM, acc)
        # every thread's partial is written before the one counting atomic (release, GPU scope)
        tl.debug_barrier()
        arrived = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel", scope="gpu")
        if arrived == S - 1:
            acc = tl.zeros((BN, BM), dtype=tl.float32)
            for s in range(0, S):  # a fixed order: the sum does not depend on which program came last
                acc += tl.load(tile_ws + s * BN * BM, cache_modifier=".cg")
            if HAS_BIAS:
                acc += tl.load(b_ptr + rn).to(tl.float32)[:, None]
            tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_ok)
            tl.store(cnt_ptr + tile, 0)
    else:
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn).to(tl.float32)[:, None]
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_ok)


class SkinnyGemmWorkspace:
    """fp32 partials and arrival counters shared by every skinny GEMM on one device: launches on one
    stream never overlap, and each launch leaves the counters at zero."""

    def __init__(self, device: torch.device, max_tiles: int = WORKSPACE_TILES, max_floats: int = WORKSPACE_FLOATS):
        self.partials = torch.empty(max_floats, dtype=torch.float32, device=device)
        self.counters = torch.zeros(max_tiles, dtype=torch.int32, device=device)


@functools.cache
def workspace(device: torch.device) -> SkinnyGemmWorkspace:
    # allocated by the first small decode forward: the eager warm-up that precedes each graph capture
    return SkinnyGemmWorkspace(device)


def skinny_gemm(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, S: int, BN: int, BK: int, BM: int,
                ws: SkinnyGemmWorkspace | None = None, num_warps: int = 4, num_stages: int = 4,
                scale: torch.Tensor | None = None, block_k: int = 0) -> torch.Tensor:
    """x [M, K] @ w[N, K]^T (+ bias) with K split S ways, in [BN, BM] tiles of y^T stepping BK along K;
    N % BN == 0 and K % (S * BK) == 0. y is in w's dtype (float32 weights: an exact float32 product).
    Block-FP8 weights: w E4M3 with `scale` [N, K / block_k] (row-expanded block scales), block_k % BK == 0;
    y is in x's dtype."""
    M, K = x.shape
    N = w.shape[0]
    assert N % BN == 0 and K % (S * BK) == 0 and x.stride(1) == 1 and w.stride(1) == 1
    assert scale is None or (block_k % BK == 0 and scale.shape == (N, K // block_k) and scale.stride(1) == 1)
    ws = ws or workspace(x.device)
    y = torch.empty((M, N), dtype=w.dtype if scale is None else x.dtype, device=x.device)
    grid = (N // BN, S, triton.cdiv(M, BM))
    tiles = grid[0] * grid[2]
    assert S == 1 or (tiles <= ws.counters.numel() and tiles * S * BN * BM <= ws.partials.numel())
    s = scale if scale is not None else ws.partials  # unused without FP8 weights
    _skinny_gemm_kernel[grid](x, w, s, bias if bias is not None else w, y, ws.partials, ws.counters, M, N, K // S,
                              x.stride(0), w.stride(0), s.stride(0) if scale is not None else 0, y.stride(0), S,
                              BM=BM, BN=BN, BK=BK, GROUP=block_k if scale is not None else 0,
                              HAS_BIAS=bias is not None, IEEE=w.dtype == torch.float32, num_warps=num_warps,
                              num_stages=num_stages, **launch_options(x.device))
    return y
