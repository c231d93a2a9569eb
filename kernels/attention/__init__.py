"""Paged attention: `get_attention_backend` picks FlashInfer on CUDA when installed and the shape suits it,
else the portable Triton kernel on CUDA, else the torch reference (CPU).

Every backend implements kernels/attention/base.py's `AttentionBackend`: `configure` once with the
model's attention shape, `plan(meta)` once per step (None for decode steps of graphable backends, so a
CUDA-graph replay needs no re-planning), `attend` per layer (the layer has already written this step's
K/V, see kernels/attn_input.py), and `forward` (store, then attend; the kernel tests' entry point)."""
from __future__ import annotations

import importlib.util

import torch

from kernels.attention.base import AttentionBackend, AttentionShape
from kernels.attention.metadata import AttentionMetadata, PagedHostMeta
from kernels.attention.torch_ref import TorchAttentionBackend, paged_attention, store_kv

__all__ = ["AttentionBackend", "AttentionMetadata", "AttentionShape", "PagedHostMeta", "TorchAttentionBackend",
           "get_attention_backend", "paged_attention", "store_kv"]

FLASHINFER_HEAD_DIMS = (64, 128, 256)


def flashinfer_supports(dtype: torch.dtype | None, head_dim: int | None) -> bool:
    return (importlib.util.find_spec("flashinfer") is not None
            and dtype in (None, torch.float16, torch.bfloat16)
            and head_dim in (None, *FLASHINFER_HEAD_DIMS))


def get_attention_backend(name: str, device: torch.device, *, dtype: torch.dtype | None = None,
                          head_dim: int | None = None, fp8_attention: str = "auto") -> AttentionBackend:
    """`name` is auto | torch | flashinfer | triton. `dtype`/`head_dim` let auto skip FlashInfer where it
    has no kernel (float32 models, head sizes outside 64/128/256). `fp8_attention` (auto | fp8 | exact)
    is how the FlashInfer backend computes over FP8 pages (kernels/attention/flashinfer_backend.py); the
    other backends widen the pages and keep q exact."""
    if name == "auto":
        if device.type != "cuda":
            name = "torch"
        elif flashinfer_supports(dtype, head_dim):
            name = "flashinfer"
        elif importlib.util.find_spec("triton") is not None:
            name = "triton"
        else:
            name = "torch"
    if fp8_attention == "fp8" and name != "flashinfer":
        raise ValueError(f"fp8_attention fp8 comes with the flashinfer attention backend, not {name!r}")
    if name == "torch":
        return TorchAttentionBackend()
    if device.type != "cuda":
        raise ValueError(f"attention backend {name!r} needs a CUDA device")
    if name == "flashinfer":
        from kernels.attention.flashinfer_backend import FlashInferBackend
        return FlashInferBackend(device=device, fp8_attention=fp8_attention)
    if name == "triton":
        from kernels.attention.triton_backend import TritonAttentionBackend
        return TritonAttentionBackend(device=device)
    if name == "flashmla":
        raise ValueError("attention backend flashmla serves latent-attention (MLA) models such as DeepSeek-V3")
    raise ValueError(f"unknown attention backend {name!r}: choose auto, torch, flashinfer or triton")
