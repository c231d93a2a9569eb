"""Programmatic dependent launch (PDL, compute capability 9.0 and later) for the decode step's kernels (those of
a MoE layer: norms, skinny GEMMs, attention input and stores, decode attention and merges, router, fused MoE).

A batch-1 decode step is a chain of ~12 small kernels a layer, each a few microseconds, and each pays its launch
after the previous one has drained. With PDL a kernel is launched while the previous one still runs: its
programs are placed on the SMs and wait (`griddepcontrol.wait`) until the previous kernel has finished and its
writes are visible. Every kernel launched with PDL therefore waits first, before it reads or writes anything,
and lets the next kernel launch only after its own wait (so that at most one kernel waits ahead: a chain of
waiting kernels would hold the GPU's slots). Loading weights (which no step writes) into the L2 before the wait
was tried and left out: it gained nothing measurable on an H200 and slowed the larger skinny GEMMs (README).

Kernels launched without PDL (torch's, cuBLAS's) wait for the full completion of the previous one as always, so
mixing them in is safe; the overlap is lost only around them (FlashInfer launches its kernels with PDL on these
GPUs, so its attention joins the chain). CUDA graphs keep the launch attribute as a programmatic edge. `PDL` is a
constexpr of each kernel: CPU builds and the Triton interpreter compile it out."""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl


@functools.cache
def _capable(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def pdl_enabled(device: torch.device) -> bool:
    """Whether kernels on `device` launch with PDL (a Hopper or newer GPU)."""
    if device.type != "cuda":
        return False
    return _capable(device.index if device.index is not None else torch.cuda.current_device())


def launch_options(device: torch.device) -> dict:
    """The launch keywords of a PDL-aware kernel: its `PDL` constexpr and Triton's `launch_pdl`."""
    on = pdl_enabled(device)
    return {"PDL": on, "launch_pdl": True} if on else {"PDL": False}


@triton.jit
def pdl_wait(PDL: tl.constexpr):
    """Wait for the previous kernel (its writes visible), then let the next one launch."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
