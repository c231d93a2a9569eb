"""Paged attention: `get_attention_backend` picks FlashInfer on CUDA when installed, else the torch reference."""
from __future__ import annotations

import importlib.util

import torch

from kernels.attention.metadata import AttentionMetadata
from kernels.attention.torch_ref import TorchAttentionBackend, paged_attention, store_kv

__all__ = ["AttentionMetadata", "TorchAttentionBackend", "get_attention_backend", "paged_attention", "store_kv"]


def get_attention_backend(name: str, device: torch.device, **kwargs):
    """`name` is auto | torch | flashinfer | triton."""
    if name == "auto":
        use_flashinfer = device.type == "cuda" and importlib.util.find_spec("flashinfer") is not None
        name = "flashinfer" if use_flashinfer else "torch"
    if name == "torch":
        return TorchAttentionBackend()
    if device.type != "cuda":
        raise ValueError(f"attention backend {name!r} needs a CUDA device")
    if name == "flashinfer":
        from kernels.attention.flashinfer_backend import FlashInferBackend
        return FlashInferBackend(device=device, **kwargs)
    if name == "triton":
        from kernels.attention.triton_backend import TritonAttentionBackend
        return TritonAttentionBackend(device=device, **kwargs)
    raise ValueError(f"unknown attention backend {name!r}: choose auto, torch, flashinfer or triton")
