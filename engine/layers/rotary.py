"""Rotary embedding tables from a RopeConfig: default, linear, dynamic NTK, YaRN (with its cos/sin
attention factor) and Llama-3 scaling, each computed as the Hugging Face reference computes it (float32)."""
from __future__ import annotations

import math

import torch

from engine.models.config import RopeConfig
from kernels.rope import rope_cos_sin_cache


def _default_inv_freq(base: float, dim: int) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(rope: RopeConfig, dim: int, max_position_embeddings: int) -> tuple[torch.Tensor, float]:
    factor, base = rope.factor, rope.theta
    original = rope.original_max_position_embeddings or max_position_embeddings
    attention_factor = rope.attention_factor
    if attention_factor is None:
        if rope.mscale and rope.mscale_all_dim:
            attention_factor = _yarn_mscale(factor, rope.mscale) / _yarn_mscale(factor, rope.mscale_all_dim)
        else:
            attention_factor = _yarn_mscale(factor)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation = 1 - ramp  # share of each frequency kept as trained (high frequencies)
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attention_factor)


def _llama3(rope: RopeConfig, dim: int) -> torch.Tensor:
    inv_freq = _default_inv_freq(rope.theta, dim)
    old = rope.original_max_position_embeddings
    low_wavelen, high_wavelen = old / rope.low_freq_factor, old / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def inv_freq_for(rope: RopeConfig, head_dim: int, max_position_embeddings: int,
                 max_model_len: int) -> tuple[torch.Tensor, float]:
    """(inverse frequencies [head_dim / 2] float32, cos/sin scale). Dynamic NTK depends on the sequence
    length in the reference; a paged cache cannot re-rotate cached keys, so the base is fixed for the
    longest sequence this engine serves (max_model_len), as vLLM fixes it for its longest."""
    if rope.type == "linear":
        return _default_inv_freq(rope.theta, head_dim) / rope.factor, 1.0
    if rope.type == "dynamic":
        seq_len = max(max_model_len, max_position_embeddings)
        base = rope.theta * ((rope.factor * seq_len / max_position_embeddings) - (rope.factor - 1)) ** (
            head_dim / (head_dim - 2))
        return _default_inv_freq(base, head_dim), 1.0
    if rope.type == "yarn":
        return _yarn(rope, head_dim, max_position_embeddings)
    if rope.type == "llama3":
        return _llama3(rope, head_dim), 1.0
    return _default_inv_freq(rope.theta, head_dim), 1.0


class RotaryEmbedding:
    """Holds the cos/sin table; kernels/attn_input.py applies it (fused with q/k norm and the KV write).
    A plain object, not a module: the table is computed here, never loaded or materialised from meta."""

    def __init__(self, rope: RopeConfig, head_dim: int, max_position_embeddings: int, max_positions: int,
                 device: torch.device):
        with torch.device("cpu"):  # the model is built on the meta device; this table is real
            inv_freq, scaling = inv_freq_for(rope, head_dim, max_position_embeddings, max_positions)
        self.cos_sin_cache = rope_cos_sin_cache(inv_freq.to(device), max_positions, scaling)
