"""Rotary embedding tables from a Hugging Face config (default, linear, llama3, yarn, longrope)."""
from __future__ import annotations

import torch
from torch import nn

from engine.errors import UnsupportedModelError
from kernels.rope import rope_cos_sin_cache


def rope_parameters(hf_config) -> dict:
    """The rope settings under both transformers 4 (rope_theta + rope_scaling) and 5 (rope_parameters)."""
    params = dict(getattr(hf_config, "rope_parameters", None) or {})
    if not params:
        params = {"rope_theta": getattr(hf_config, "rope_theta", 10000.0), **(getattr(hf_config, "rope_scaling", None) or {})}
    params.setdefault("rope_type", params.get("type", "default"))
    return params


def inv_freq_from_config(hf_config, head_dim: int) -> tuple[torch.Tensor, float]:
    params = rope_parameters(hf_config)
    rope_type = params["rope_type"]
    if rope_type == "default":
        base = params["rope_theta"]
        return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim)), 1.0
    if rope_type == "dynamic":
        raise UnsupportedModelError("rope_type 'dynamic' is not supported (it depends on the batch's length)")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise UnsupportedModelError(f"unknown rope_type {rope_type!r}")
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf_config, torch.device("cpu"))
    return inv_freq, float(scaling)


class RotaryEmbedding(nn.Module):
    """Holds the cos/sin table; kernels/attn_input.py applies it (fused with q/k norm and the KV write)."""

    def __init__(self, hf_config, head_dim: int, max_positions: int, device: torch.device):
        super().__init__()
        inv_freq, scaling = inv_freq_from_config(hf_config, head_dim)
        # a plain attribute, not a buffer: it is computed here, never loaded or materialised from meta
        self.cos_sin_cache = rope_cos_sin_cache(inv_freq.to(device), max_positions, scaling)
