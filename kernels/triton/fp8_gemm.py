"""Block-FP8 GEMM in Triton, DeepSeek-V3's scheme: the weight W [N, K] is E4M3 with one scale per 128 x 128
block, the activation is quantised on the fly to E4M3 with one scale per token and 128 columns. Each BLOCK_K
(= the block's 128 columns) step multiplies FP8 tiles on the tensor cores and rescales the partial product by
the activation's row scales times the weight's row scales before accumulating in float32.

The weight's scales are kept expanded along N ([N, K / 128], each row its block's scale): a shard of rows,
whichever tensor-parallel split or fused projection it comes from, then carries its own scales, and the
kernel reads one scale per output column."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton.pdl import launch_options, pdl_wait

FP8_MAX = 448.0


@triton.jit
def _group_quant_kernel(x_ptr, q_ptr, s_ptr, K, stride_xm, stride_qm, stride_sm, GROUP: tl.constexpr):
    m, g = tl.program_id(0).to(tl.int64), tl.program_id(1)
    cols = g * GROUP + tl.arange(0, GROUP)
    ok = cols < K
    x = tl.load(x_ptr + m * stride_xm + cols, mask=ok, other=0.0).to(tl.float32)
    scale = tl.maximum(tl.max(tl.abs(x), 0), 1e-10) / 448.0
    tl.store(q_ptr + m * stride_qm + cols, tl.clamp(x / scale, -448.0, 448.0).to(q_ptr.dtype.element_ty), mask=ok)
    tl.store(s_ptr + m * stride_sm + g, scale)


def quantize_per_token_group(x: torch.Tensor, group: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (E4M3 [M, K], float32 scales [M, ceil(K / group)]) with x ~= q * scale per group."""
    M, K = x.shape
    assert x.stride(1) == 1
    q = torch.empty((M, K), dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty((M, triton.cdiv(K, group)), dtype=torch.float32, device=x.device)
    if M:
        _group_quant_kernel[(M, s.shape[1])](x, q, s, K, x.stride(0), q.stride(0), s.stride(0), GROUP=group,
                                             num_warps=1)
    return q, s


@triton.jit
def _block_fp8_gemm(a_ptr, as_ptr, b_ptr, bs_ptr, c_ptr, M, N, K, stride_am, stride_asm, stride_bn, stride_bsn,
                    stride_cm, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    GROUP_M: tl.constexpr, PDL: tl.constexpr):
    pdl_wait(PDL)
    pid = tl.program_id(0)
    num_pid_m, num_pid_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_pid_n
    first_m = (pid // group) * GROUP_M
    size_m = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % size_m
    pid_n = (pid % group) // size_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok, n_ok = offs_m < M, offs_n < N
    a_ptrs = a_ptr + offs_m[:, None].to(tl.int64) * stride_am + offs_k[None, :]
    b_ptrs = b_ptr + offs_n[None, :].to(tl.int64) * stride_bn + offs_k[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        k_ok = offs_k < K - kb * BLOCK_K
        a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=n_ok[None, :] & k_ok[:, None], other=0.0)
        a_s = tl.load(as_ptr + offs_m * stride_asm + kb, mask=m_ok, other=0.0)
        b_s = tl.load(bs_ptr + offs_n * stride_bsn + kb, mask=n_ok, other=0.0)
        acc += tl.dot(a, b) * a_s[:, None] * b_s[None, :]
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    c_ptrs = c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def block_fp8_matmul(a: torch.Tensor, a_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
                     out_dtype: torch.dtype, block_k: int = 128) -> torch.Tensor:
    """a [M, K] E4M3 with a_scale [M, K / block_k]; w [N, K] E4M3 with w_scale [N, K / block_k] (row-expanded).
    Returns a @ w^T [M, N] in out_dtype."""
    M, K = a.shape
    N = w.shape[0]
    assert w.shape[1] == K and a.stride(1) == 1 and w.stride(1) == 1
    c = torch.empty((M, N), dtype=out_dtype, device=a.device)
    if M == 0:
        return c
    # small M (decode): narrow row tiles and more column programs; large M: square tiles
    block_m = 16 if M <= 16 else 32 if M <= 32 else 64 if M <= 64 else 128
    block_n = 64 if M <= 64 else 128
    grid = (triton.cdiv(M, block_m) * triton.cdiv(N, block_n),)
    _block_fp8_gemm[grid](a, a_scale, w, w_scale, c, M, N, K, a.stride(0), a_scale.stride(0), w.stride(0),
                          w_scale.stride(0), c.stride(0), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                          GROUP_M=8, num_warps=4 if block_m <= 64 else 8, num_stages=3 if block_m <= 64 else 4,
                          **launch_options(a.device))
    return c


def block_fp8_linear(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, block_k: int = 128) -> torch.Tensor:
    """y = x @ dequant(w)^T for x [..., K] in bf16/fp16: x quantised per token and block_k columns, then the
    block-FP8 GEMM (kernels/linear.py sends decode batches to the skinny GEMM instead)."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    q, s = quantize_per_token_group(x2, block_k)
    return block_fp8_matmul(q, s, w, w_scale, x.dtype, block_k).view(*shape[:-1], w.shape[0])
