"""Fused element-wise Triton kernels: RMSNorm (+ residual add, + per-head q/k norm), neox rotary
embedding and SiLU-and-mul. Each replaces 3-10 torch launches by one, which is what matters in a
decode step (tiny tensors, launch-bound). Rounding follows the torch references in kernels/*.py."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.attention.torch_ref import FP8_MAX
from kernels.triton.pdl import launch_options, pdl_wait

E4M3_MAX = tl.constexpr(FP8_MAX)  # the torch references' saturation bound, for the kernels below


@triton.jit
def _rms_normed(x, w_ptr, cols, mask, eps, D: tl.constexpr):
    """weight * x / rms(x) for one row, rounded as torch's RMSNorm does (the normalised row to x's dtype first)."""
    xf = x.to(tl.float32)
    var = tl.sum(xf * xf, axis=0) / D
    normed = (xf * tl.rsqrt(var + eps)).to(x.dtype)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    return (w.to(tl.float32) * normed.to(tl.float32)).to(x.dtype)


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, H, stride_xt, stride_xh, stride_rt, eps,
                     D: tl.constexpr, BLOCK: tl.constexpr, HAS_RES: tl.constexpr, PDL: tl.constexpr):
    # one program per row; row = (t, h) so that per-head norms read strided q/k views in place
    pdl_wait(PDL)
    row = tl.program_id(0)
    t, h = row // H, row % H
    cols = tl.arange(0, BLOCK)
    mask = cols < D
    x = tl.load(x_ptr + t * stride_xt + h * stride_xh + cols, mask=mask, other=0.0)
    if HAS_RES:
        r = tl.load(res_ptr + t * stride_rt + cols, mask=mask, other=0.0)
        x = x + r  # rounded to the input dtype, as `x + residual` in torch
        tl.store(res_out_ptr + row * D + cols, x, mask=mask)
    tl.store(out_ptr + row * D + cols, _rms_normed(x, w_ptr, cols, mask, eps, D), mask=mask)


def _rows(x: torch.Tensor) -> tuple[int, int, int, int]:
    """(rows, H, stride_t, stride_h) of a [..., D] or [T, H, D] tensor whose last dim is contiguous."""
    if x.dim() == 3:
        return x.shape[0] * x.shape[1], x.shape[1], x.stride(0), x.stride(1)
    x2 = x.reshape(-1, x.shape[-1])
    return x2.shape[0], 1, x2.stride(0), 0


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.stride(-1) != 1:
        x = x.contiguous()
    D = x.shape[-1]
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    rows, H, st, sh = _rows(x)
    if rows:
        _rms_norm_kernel[(rows,)](x, x, weight, out, out, H, st, sh, 0, eps, D=D,
                                  BLOCK=triton.next_power_of_2(D), HAS_RES=False, num_warps=4,
                                  **launch_options(x.device))
    return out


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    x, residual = x.contiguous(), residual.contiguous()
    D = x.shape[-1]
    out, res_out = torch.empty_like(x), torch.empty_like(x)
    rows = x.numel() // D
    if rows:
        _rms_norm_kernel[(rows,)](x, residual, weight, out, res_out, 1, D, 0, D, eps, D=D,
                                  BLOCK=triton.next_power_of_2(D), HAS_RES=True, num_warps=4,
                                  **launch_options(x.device))
    return out, res_out


@triton.jit
def _rotate(x_ptr, out_ptr, H, stride_xh, stride_oh, cos, sin, d,
            HALF: tl.constexpr, BLOCK_H: tl.constexpr, INTERLEAVED: tl.constexpr, SATURATE: tl.constexpr = False):
    hs = tl.arange(0, BLOCK_H)
    hmask = hs[:, None] < H
    base = x_ptr + hs[:, None] * stride_xh
    if INTERLEAVED:
        x1 = tl.load(base + 2 * d[None, :], mask=hmask, other=0.0)
        x2 = tl.load(base + 2 * d[None, :] + 1, mask=hmask, other=0.0)
    else:
        x1 = tl.load(base + d[None, :], mask=hmask, other=0.0)
        x2 = tl.load(base + HALF + d[None, :], mask=hmask, other=0.0)
    dt = x1.dtype
    c, s = cos.to(dt).to(tl.float32)[None, :], sin.to(dt).to(tl.float32)[None, :]
    x1f, x2f = x1.to(tl.float32), x2.to(tl.float32)
    obase = out_ptr + hs[:, None] * stride_oh + d[None, :]
    y1, y2 = (x1f * c - x2f * s).to(dt), (x2f * c + x1f * s).to(dt)
    if SATURATE:  # an FP8 destination: E4M3's range, as the torch store saturates
        y1, y2 = _saturated(y1), _saturated(y2)
    tl.store(obase, y1, mask=hmask)
    tl.store(obase + HALF, y2, mask=hmask)


@triton.jit
def widen_fp16(x):
    """An activation tile (bf16 / fp16) for a product with E4M3 weights in fp16: E4M3 widens to fp16 in one
    instruction per pair on Hopper, to bf16 only through float32 (three), which made a decode GEMM on E4M3
    weights slower than on bf16 ones. bf16 values convert exactly between 2^-14 and 65504 in magnitude (fp16's
    10 mantissa bits to bf16's 7); smaller ones become fp16 subnormals (fewer bits, zero below 2^-24), larger
    ones saturate at +-65504: an activation that large takes this path clipped."""
    return tl.clamp(x.to(tl.float32), -65504.0, 65504.0).to(tl.float16)


@triton.jit
def _saturated(x):
    """x in float32 within E4M3's range: torch's cast to float8_e4m3fn has no saturating mode."""
    return tl.clamp(x.to(tl.float32), -E4M3_MAX, E4M3_MAX)


@triton.jit
def _token_cos_sin(cache_ptr, pos_ptr, t, HALF: tl.constexpr):
    """Token t's row of the [positions, 2 * HALF] cos/sin cache: (cos, sin, the HALF offsets)."""
    pos = tl.load(pos_ptr + t)
    d = tl.arange(0, HALF)
    return tl.load(cache_ptr + pos * 2 * HALF + d), tl.load(cache_ptr + pos * 2 * HALF + HALF + d), d


@triton.jit
def _rope_kernel(q_ptr, k_ptr, q_out_ptr, k_out_ptr, pos_ptr, cache_ptr, HQ, HK,
                 stride_qt, stride_qh, stride_kt, stride_kh, stride_oqt, stride_oqh, stride_okt, stride_okh,
                 HALF: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, INTERLEAVED: tl.constexpr):
    # one program per token: all heads of q and of k rotated with the token's cos/sin row. INTERLEAVED input
    # holds the rotary pairs side by side (x0, x1), (x2, x3), ... (DeepSeek); the output is always in halves
    t = tl.program_id(0).to(tl.int64)
    cos, sin, d = _token_cos_sin(cache_ptr, pos_ptr, t, HALF)
    _rotate(q_ptr + t * stride_qt, q_out_ptr + t * stride_oqt, HQ, stride_qh, stride_oqh, cos, sin, d,
            HALF, BLOCK_HQ, INTERLEAVED)
    _rotate(k_ptr + t * stride_kt, k_out_ptr + t * stride_okt, HK, stride_kh, stride_okh, cos, sin, d,
            HALF, BLOCK_HK, INTERLEAVED)


def apply_rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cache: torch.Tensor,
               interleaved: bool = False, q_out: torch.Tensor | None = None,
               k_out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, HQ, D] and k [T, HK, D] rotated in one launch into q_out / k_out (strided views of the caller's
    buffers; new tensors when None)."""
    T, HQ, D = q.shape
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device) if q_out is None else q_out
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device) if k_out is None else k_out
    if T:
        _rope_kernel[(T,)](q, k, q_out, k_out, positions, cache, HQ, k.shape[1], q.stride(0), q.stride(1),
                           k.stride(0), k.stride(1), q_out.stride(0), q_out.stride(1), k_out.stride(0),
                           k_out.stride(1), HALF=D // 2, BLOCK_HQ=triton.next_power_of_2(HQ),
                           BLOCK_HK=triton.next_power_of_2(k.shape[1]), INTERLEAVED=interleaved, num_warps=4)
    return q_out, k_out


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, N, stride_x, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    g = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    u = tl.load(x_ptr + row * stride_x + N + cols, mask=mask, other=0.0)
    gf = g.to(tl.float32)
    silu = (gf / (1.0 + tl.exp(-gf))).to(g.dtype)
    tl.store(out_ptr + row * N + cols, (silu.to(tl.float32) * u.to(tl.float32)).to(g.dtype), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    N = x2.shape[-1] // 2
    out = torch.empty((x2.shape[0], N), dtype=x.dtype, device=x.device)
    if x2.shape[0]:
        BLOCK = 1024
        _silu_and_mul_kernel[(x2.shape[0], triton.cdiv(N, BLOCK))](x2, out, N, x2.stride(0), BLOCK=BLOCK,
                                                                  num_warps=4)
    return out.view(*x.shape[:-1], N)


@triton.jit
def _saturate_fp8_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    tl.store(out_ptr + offs, _saturated(x).to(out_ptr.dtype.element_ty), mask=mask)


def saturate_fp8(x: torch.Tensor) -> torch.Tensor:
    """x.clamp(-448, 448).to(float8_e4m3fn) in one pass: torch's cast has no saturating mode, and
    clamp-then-cast read and wrote the prefill's q twice (FP8 math, kernels/attention/flashinfer_backend.py)."""
    x = x.contiguous()
    out = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device)
    if x.numel():
        BLOCK = 2048
        _saturate_fp8_kernel[(triton.cdiv(x.numel(), BLOCK),)](x, out, x.numel(), BLOCK=BLOCK, num_warps=4)
    return out
