"""Model registry: Hugging Face architecture name -> implementation."""
from __future__ import annotations

from engine.errors import UnsupportedModelError
from engine.models.llama import LlamaForCausalLM

MODEL_REGISTRY = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": LlamaForCausalLM,
}


def model_class(hf_config):
    archs = getattr(hf_config, "architectures", None) or []
    for arch in archs:
        if arch in MODEL_REGISTRY:
            return MODEL_REGISTRY[arch]
    raise UnsupportedModelError(
        f"unsupported architecture {archs or 'unknown'}: supported are {', '.join(sorted(MODEL_REGISTRY))}",
        param="model")
