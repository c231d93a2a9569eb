"""Qwen3-MoE: Qwen3's attention; the feed-forward of most layers is a sparse MoE block (a softmax router over
`num_experts`, top `num_experts_per_tok`, renormalised when `norm_topk_prob`). Layers listed in
`mlp_only_layers`, or off the `decoder_sparse_step` stride, keep a dense MLP."""
from __future__ import annotations

import torch
from torch import nn

from engine.distributed.parallel import ParallelContext
from engine.layers.fused_moe import FusedMoE, Routing
from engine.layers.linear import ReplicatedLinear
from engine.models.config import ModelConfig
from engine.models.llama import LlamaForCausalLM, LlamaMLP


def is_sparse_layer(hf, layer_idx: int) -> bool:
    """The reference's rule for which layers are MoE."""
    return (layer_idx not in (getattr(hf, "mlp_only_layers", None) or []) and hf.num_experts > 0
            and (layer_idx + 1) % getattr(hf, "decoder_sparse_step", 1) == 0)


class Qwen3MoeSparseMoeBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, parallel: ParallelContext, device: torch.device):
        super().__init__()
        hf = cfg.hf
        self.gate = ReplicatedLinear(cfg.hidden_size, hf.num_experts)
        # the router stays in the model's dtype in FP8 checkpoints (as vLLM builds it: no quantisation)
        self.gate.block_fp8_capable = False
        # Qwen3-VL-MoE's text config has no norm_topk_prob: its router always renormalises
        routing = Routing(hf.num_experts_per_tok, bool(getattr(hf, "norm_topk_prob", True)))
        self.experts = FusedMoE(hf.num_experts, routing, cfg.hidden_size, hf.moe_intermediate_size, parallel, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.experts(x, self.gate(x))


class Qwen3MoeForCausalLM(LlamaForCausalLM):
    qk_norm = True

    def make_mlp(self, cfg: ModelConfig, parallel: ParallelContext, layer_idx: int, device: torch.device) -> nn.Module:
        if is_sparse_layer(cfg.hf, layer_idx):
            return Qwen3MoeSparseMoeBlock(cfg, parallel, device)
        return LlamaMLP(cfg, parallel)
