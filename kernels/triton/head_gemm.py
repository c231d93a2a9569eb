"""Per-head products of a few tokens: out[t, h] = x[t, h] @ w[h] for up to 16 tokens, in one launch.

MLA's absorbed attention multiplies every head's query by its slice of `kv_b_proj` before the latent kernel and
every head's latent output by the value slice after it (kernels/attention/mla.py). At decode batch sizes cuBLAS's
batched GEMM for these 2 MB per layer was two of the step's few launches that do not take part in programmatic
dependent launch (kernels/triton/pdl.py), so the chain of kernels stalled around each. Here one program per
(head, BN output columns) multiplies the head's tokens, padded to the MMA's 16 rows, by a [K, BN] slice of its
weights, in float32, rounded once to the output's dtype (as cuBLAS). Any strides: the weights are views of one
tensor ([heads, K, N] and its transposed half), the outputs strided views of the caller's buffers."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton.pdl import launch_options, pdl_wait

MAX_TOKENS = 16  # one MMA row tile
BLOCK_K, MIN_BLOCK_N = 64, 16


@triton.jit
def _head_gemm_kernel(x_ptr, w_ptr, y_ptr, T, K, stride_xt, stride_xh, stride_wh, stride_wk, stride_wn,
                      stride_yt, stride_yh, BT: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr,
                      PDL: tl.constexpr):
    pdl_wait(PDL)
    h, pid_n = tl.program_id(0).to(tl.int64), tl.program_id(1)
    rt = tl.arange(0, BT)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    t_ok = rt[:, None] < T
    x_ptrs = x_ptr + h * stride_xh + rt[:, None] * stride_xt + rk[None, :]
    w_ptrs = w_ptr + h * stride_wh + rk[:, None] * stride_wk + rn[None, :] * stride_wn
    acc = tl.zeros((BT, BN), dtype=tl.float32)
    for _ in range(0, K, BK):
        x = tl.load(x_ptrs, mask=t_ok, other=0.0)
        acc = tl.dot(x, tl.load(w_ptrs), acc)
        x_ptrs += BK
        w_ptrs += BK * stride_wk
    tl.store(y_ptr + rt[:, None] * stride_yt + h * stride_yh + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=t_ok)


def fits(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor) -> bool:
    """Whether head_gemm takes this product: a few tokens, contiguous rows, whole K steps and column tiles."""
    T, _, K = x.shape
    return (T <= MAX_TOKENS and x.stride(2) == 1 and out.stride(2) == 1 and K % BLOCK_K == 0
            and w.shape[2] % MIN_BLOCK_N == 0)


def head_gemm(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor) -> None:
    """x [T, H, K] (last dim contiguous), w [H, K, N] (any strides), out [T, H, N] (last dim contiguous):
    out[t, h] = x[t, h] @ w[h], where `fits` says so."""
    T, H, K = x.shape
    N = w.shape[2]
    assert fits(x, w, out)
    # column tiles narrow enough for ~128 programs (Moonlight's value product: 16 heads x 128 columns -> 16 wide)
    bn = 64
    while bn > MIN_BLOCK_N and (N % bn or H * (N // bn) < 128):
        bn //= 2
    if T:
        _head_gemm_kernel[(H, N // bn)](x, w, out, T, K, x.stride(0), x.stride(1), w.stride(0), w.stride(1),
                                        w.stride(2), out.stride(0), out.stride(1), BT=MAX_TOKENS, BK=BLOCK_K, BN=bn,
                                        num_warps=4, **launch_options(x.device))
