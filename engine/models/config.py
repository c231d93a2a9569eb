"""ModelConfig: a Hugging Face config normalised once (nested `text_config` unwrapped, `head_dim`
derived, rope scaling parsed, dtype resolved), so that no model, layer or KV code re-derives a field."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engine.errors import UnsupportedModelError

ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding settings as the checkpoint states them (transformers 4's `rope_theta` +
    `rope_scaling`, or transformers 5's `rope_parameters`)."""

    theta: float = 10000.0
    type: str = "default"  # one of ROPE_TYPES
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    # yarn: cos/sin scale (None: derived from factor, mscale and mscale_all_dim, as the reference does)
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = True
    # llama3
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0

    @classmethod
    def from_hf(cls, hf_config) -> "RopeConfig":
        params = dict(getattr(hf_config, "rope_parameters", None) or {})
        if not params:  # transformers 4: rope_theta plus an optional rope_scaling dict
            params = {"rope_theta": getattr(hf_config, "rope_theta", 10000.0),
                      **(getattr(hf_config, "rope_scaling", None) or {})}
        rope_type = params.get("rope_type", params.get("type", "default")) or "default"
        if rope_type not in ROPE_TYPES:
            raise UnsupportedModelError(f"rope type {rope_type!r} is not supported (supported: "
                                        f"{', '.join(ROPE_TYPES)})", param="model")
        if float(params.get("partial_rotary_factor", 1.0)) != 1.0:
            raise UnsupportedModelError("partial rotary embeddings (partial_rotary_factor < 1) are not supported",
                                        param="model")
        original = params.get("original_max_position_embeddings") or getattr(
            hf_config, "original_max_position_embeddings", None)
        if original is None and rope_type in ("yarn", "llama3"):
            original = getattr(hf_config, "max_position_embeddings", None)
        factor = params.get("factor")
        if factor is None and rope_type == "yarn" and original:
            # DeepSeek-V3 states the context extension as max_position_embeddings / original
            factor = hf_config.max_position_embeddings / original
        get = lambda key, default: default if params.get(key) is None else params[key]
        return cls(theta=float(params.get("rope_theta") or 10000.0), type=rope_type,
                   factor=float(factor if factor is not None else 1.0),
                   original_max_position_embeddings=int(original) if original else None,
                   attention_factor=params.get("attention_factor"), mscale=params.get("mscale"),
                   mscale_all_dim=params.get("mscale_all_dim"), beta_fast=float(get("beta_fast", 32.0)),
                   beta_slow=float(get("beta_slow", 1.0)), truncate=bool(get("truncate", True)),
                   low_freq_factor=float(get("low_freq_factor", 1.0)),
                   high_freq_factor=float(get("high_freq_factor", 4.0)))


@dataclass(frozen=True)
class ModelConfig:
    """What the engine needs to know about a decoder-only checkpoint. `hf` keeps the (text) config for
    fields that only one family reads."""

    architectures: tuple[str, ...]
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    mlp_bias: bool
    rope: RopeConfig
    dtype: torch.dtype  # the checkpoint's weights dtype
    eos_token_ids: tuple[int, ...]
    hf: Any
    num_mtp_layers: int = 0  # DeepSeek's MTP modules to build (speculative decoding with method mtp)
    vision: Any = None  # the vision tower's config (multimodal checkpoints), with the image placeholder token:
    image_token_id: int | None = None

    @classmethod
    def from_hf(cls, hf_config, path: Path | None = None) -> "ModelConfig":
        """Normalises a transformers config; `path` adds the eos ids of its generation_config.json."""
        archs = list(getattr(hf_config, "architectures", None) or [])
        text = getattr(hf_config, "text_config", None) or hf_config  # multimodal wrappers nest the decoder
        heads = text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        eos = set(_ids(getattr(hf_config, "eos_token_id", None)) + _ids(getattr(text, "eos_token_id", None)))
        if path is not None and (path / "generation_config.json").is_file():
            from transformers import GenerationConfig
            eos.update(_ids(GenerationConfig.from_pretrained(str(path)).eos_token_id))
        return cls(
            architectures=tuple(archs), model_type=getattr(text, "model_type", ""),
            vocab_size=text.vocab_size, hidden_size=text.hidden_size,
            intermediate_size=getattr(text, "intermediate_size", 0) or 0, num_hidden_layers=text.num_hidden_layers,
            num_attention_heads=heads, num_key_value_heads=getattr(text, "num_key_value_heads", None) or heads,
            head_dim=head_dim, rms_norm_eps=float(getattr(text, "rms_norm_eps", 1e-6)),
            max_position_embeddings=getattr(text, "max_position_embeddings", None) or 4096,
            tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", getattr(text, "tie_word_embeddings",
                                                                                       False))),
            attention_bias=bool(getattr(text, "attention_bias", False)), mlp_bias=bool(getattr(text, "mlp_bias", False)),
            rope=RopeConfig.from_hf(text), dtype=checkpoint_dtype(text, hf_config), eos_token_ids=tuple(sorted(eos)),
            hf=text, vision=getattr(hf_config, "vision_config", None),
            image_token_id=getattr(hf_config, "image_token_id", None))


def context_limit(config: ModelConfig) -> int:
    """The longest context the checkpoint supports: its positions, stretched by linear, dynamic or YaRN rope
    scaling (Llama-3's scaling is already counted in max_position_embeddings)."""
    rope = config.rope
    if rope.type in ("linear", "dynamic"):
        return int(config.max_position_embeddings * rope.factor)
    if rope.type == "yarn":
        return int((rope.original_max_position_embeddings or config.max_position_embeddings) * rope.factor)
    return config.max_position_embeddings


def check_tensor_parallel(config: ModelConfig, tp: int, expert_parallel: bool = False, dp: int = 1) -> None:
    """The shapes that tensor parallelism splits must split evenly (KV heads may be replicated instead); MoE
    experts are split by count (expert parallelism) or by their intermediate dimension."""
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    problems = []
    if heads % tp:
        problems.append(f"num_attention_heads {heads}")
    if (kv % tp) if kv >= tp else (tp % kv):
        problems.append(f"num_key_value_heads {kv} (split, or replicated when fewer than the ranks)")
    if config.intermediate_size % tp:
        problems.append(f"intermediate_size {config.intermediate_size}")
    experts = getattr(config.hf, "num_experts", 0) or getattr(config.hf, "n_routed_experts", 0) or 0
    if experts and expert_parallel and experts % (tp * dp):
        problems.append(f"num_experts {experts} (expert parallelism spreads whole experts over {tp * dp} ranks)")
    if experts and dp > 1 and not expert_parallel:
        raise UnsupportedModelError("a MoE model at data_parallel_size > 1 needs --enable-expert-parallel (the "
                                    "experts spread over all the ranks)", param="enable_expert_parallel")
    moe_inter = getattr(config.hf, "moe_intermediate_size", 0) or 0
    if experts and not expert_parallel and moe_inter % tp:
        problems.append(f"moe_intermediate_size {moe_inter} (or enable expert parallelism)")
    if problems:
        raise UnsupportedModelError(f"tensor_parallel_size {tp} does not divide this model's "
                                    f"{', '.join(problems)}", param="tensor_parallel_size")


def load_model_config(path: Path) -> ModelConfig:
    """The normalised config of a checkpoint folder."""
    from transformers import AutoConfig
    if not (path / "config.json").is_file():
        raise UnsupportedModelError(f"{path} is not a Hugging Face checkpoint folder (no config.json)", param="model")
    return ModelConfig.from_hf(AutoConfig.from_pretrained(str(path)), path)


def checkpoint_dtype(*configs) -> torch.dtype:
    """The weights dtype the checkpoint states (transformers 5 `dtype`, 4 `torch_dtype`); float32 if none."""
    for c in configs:
        dtype = getattr(c, "dtype", None) or getattr(c, "torch_dtype", None)
        if dtype is not None:
            return getattr(torch, dtype) if isinstance(dtype, str) else dtype
    return torch.float32


def _ids(value) -> list[int]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]
