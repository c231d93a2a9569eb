"""Model registry: Hugging Face architecture name -> (module in engine.models, class). Imported on use, so a
process pays only for the family it serves. Adding a family: one file here and one line below."""
from __future__ import annotations

import importlib

from engine.errors import UnsupportedModelError
from engine.models.config import ModelConfig

ARCHITECTURES: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": ("llama", "LlamaForCausalLM"),
    "Qwen2ForCausalLM": ("qwen2", "Qwen2ForCausalLM"),
    "Qwen3ForCausalLM": ("qwen3", "Qwen3ForCausalLM"),
    "Qwen2MoeForCausalLM": ("qwen2_moe", "Qwen2MoeForCausalLM"),
    "Qwen3MoeForCausalLM": ("qwen3_moe", "Qwen3MoeForCausalLM"),
    "DeepseekV2ForCausalLM": ("deepseek_v3", "DeepseekV2ForCausalLM"),
    "DeepseekV3ForCausalLM": ("deepseek_v3", "DeepseekV3ForCausalLM"),
    "Qwen3VLForConditionalGeneration": ("qwen3_vl", "Qwen3VLForConditionalGeneration"),
    "Qwen3VLMoeForConditionalGeneration": ("qwen3_vl", "Qwen3VLMoeForConditionalGeneration"),
}


def model_class(config: ModelConfig) -> type:
    for arch in config.architectures:
        if arch in ARCHITECTURES:
            module, name = ARCHITECTURES[arch]
            return getattr(importlib.import_module(f"engine.models.{module}"), name)
    raise UnsupportedModelError(
        f"unsupported architecture {config.architectures or 'unknown'}: supported are "
        f"{', '.join(sorted(ARCHITECTURES))}", param="model")
