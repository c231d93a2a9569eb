"""SiLU-and-mul, the gated MLP activation (one Triton launch on CUDA, torch elsewhere)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.triton import use_triton


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [..., 2d] = [gate | up] -> silu(gate) * up [..., d]."""
    if use_triton(x):
        from kernels.triton.elementwise import silu_and_mul as fused
        return fused(x)
    return silu_and_mul_ref(x)
