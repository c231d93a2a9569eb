"""Triton kernels for the GPU fast path. Import the submodules only after `available()` says yes:
CPU builds have no triton, and the torch references in kernels/<op>.py serve them."""
from __future__ import annotations

import functools
import importlib.util

import torch


@functools.cache
def _importable() -> bool:
    return importlib.util.find_spec("triton") is not None and torch.cuda.is_available()


def available() -> bool:
    return _importable()


def use_triton(x: torch.Tensor) -> bool:
    """True when x lives on a GPU and triton is installed (the dispatch rule of every fused op)."""
    return x.is_cuda and _importable()
