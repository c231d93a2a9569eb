"""Qwen2: the Llama decoder with a bias on q, k and v (and none on o_proj)."""
from __future__ import annotations

from engine.models.config import ModelConfig
from engine.models.llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    @staticmethod
    def attention_biases(cfg: ModelConfig) -> tuple[bool, bool]:
        return True, False
