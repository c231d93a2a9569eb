"""RMSNorm (optionally fused with the residual add), matching Hugging Face's float32 computation.
On CUDA a fused Triton kernel runs; `*_ref` is the torch reference (CPU, and the tests' oracle)."""
from __future__ import annotations

import torch

from kernels.triton import use_triton


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


def add_rms_norm_ref(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    residual = x + residual
    return rms_norm_ref(residual, weight, eps), residual


def _fusable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return use_triton(x) and weight.dtype == x.dtype and x.dim() in (2, 3)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if _fusable(x, weight):
        from kernels.triton.elementwise import rms_norm as fused
        return fused(x, weight, eps)
    return rms_norm_ref(x, weight, eps)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (rms_norm(x + residual), x + residual): the sum becomes the next residual."""
    if _fusable(x, weight) and x.shape == residual.shape:
        from kernels.triton.elementwise import add_rms_norm as fused
        return fused(x, residual, weight, eps)
    return add_rms_norm_ref(x, residual, weight, eps)
