"""Qwen2-MoE: Qwen2's attention (q/k/v biases); the sparse block adds a shared expert, always on, scaled by a
sigmoid gate, to the routed experts (top-k weights not renormalised unless `norm_topk_prob`)."""
from __future__ import annotations

import torch
from torch import nn

from engine.distributed.parallel import ParallelContext
from engine.layers.linear import ReplicatedLinear
from engine.models.config import ModelConfig
from engine.models.llama import LlamaMLP
from engine.models.qwen2 import Qwen2ForCausalLM
from engine.models.qwen3_moe import Qwen3MoeSparseMoeBlock, is_sparse_layer


class Qwen2MoeSparseMoeBlock(Qwen3MoeSparseMoeBlock):
    def __init__(self, cfg: ModelConfig, parallel: ParallelContext, device: torch.device):
        super().__init__(cfg, parallel, device)
        self.shared_expert = LlamaMLP(cfg, parallel, cfg.hf.shared_expert_intermediate_size)
        self.shared_expert_gate = ReplicatedLinear(cfg.hidden_size, 1)
        self.shared_expert_gate.block_fp8_capable = False  # a gate like the router: kept in the model dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shared = torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return super().forward(x) + shared


class Qwen2MoeForCausalLM(Qwen2ForCausalLM):
    def make_mlp(self, cfg: ModelConfig, parallel: ParallelContext, layer_idx: int, device: torch.device) -> nn.Module:
        if is_sparse_layer(cfg.hf, layer_idx):
            return Qwen2MoeSparseMoeBlock(cfg, parallel, device)
        return LlamaMLP(cfg, parallel)
