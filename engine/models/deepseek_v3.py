"""DeepSeek-V3 (and V2, Kimi-K2 and Moonlight, which load through the same classes): multi-head latent
attention with a latent KV cache (engine/layers/mla.py); the first `first_k_dense_replace` layers have a dense
MLP, the others a MoE block: routed experts chosen by DeepSeek's routing (V3: sigmoid scores, correction bias,
group-limited top-k; V2: softmax scores, greedy or group-limited greedy; both: routed scaling factor) plus
always-on shared experts."""
from __future__ import annotations

import re

import torch
from torch import nn

from engine.distributed.parallel import ParallelContext
from engine.kv.spec import MLAKVCacheSpec
from engine.layers.fused_moe import FusedMoE, Routing
from engine.layers.mla import MLAAttention
from engine.layers.rotary import RotaryEmbedding
from engine.models.config import ModelConfig
from engine.models.deepseek_mtp import DeepseekMTPLayer
from engine.models.llama import LlamaForCausalLM, LlamaMLP
from kernels.attention.mla import MLABackend
from kernels.linear import router_linear

MTP_LAYER = re.compile(r"model\.layers\.(\d+)\.")
SHARED_EXPERTS = re.compile(r"\.mlp\.shared_experts\.")


def shared_in_routed_stacks(hf, parallel: ParallelContext) -> int:
    """How many shared experts run inside the routed experts' GEMMs (engine/layers/fused_moe.py): all of them
    where every rank holds every expert; none under expert parallelism (a separate, replicated MLP there)."""
    return (getattr(hf, "n_shared_experts", 0) or 0) if parallel.ep_size == 1 else 0


class MoEGate(nn.Module):
    """The router: logits in float32 (as the reference computes them) and the score correction bias."""

    float32_parameters = ("weight", "e_score_correction_bias")  # see engine/models/weights.keep_float32

    def __init__(self, hidden_size: int, num_experts: int, with_bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size), requires_grad=False)
        self.e_score_correction_bias = (nn.Parameter(torch.empty(num_experts), requires_grad=False)
                                        if with_bias else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return router_linear(x, self.weight)


class DeepseekV3MoE(nn.Module):
    def __init__(self, cfg: ModelConfig, parallel: ParallelContext, device: torch.device):
        super().__init__()
        hf = cfg.hf
        method = getattr(hf, "topk_method", None)
        # V3's "noaux_tc" routing (transformers 5 names no method for V3: it is the only one it implements);
        # V2's "greedy" / "group_limited_greedy" (softmax scores, no correction bias)
        v3 = method in (None, "noaux_tc")
        self.gate = MoEGate(cfg.hidden_size, hf.n_routed_experts, with_bias=v3)
        groups = (getattr(hf, "n_group", 1) or 1) if v3 or method == "group_limited_greedy" else 1
        fused = shared_in_routed_stacks(hf, parallel)
        routing = Routing(hf.num_experts_per_tok, bool(hf.norm_topk_prob), "sigmoid" if v3 else "softmax",
                          groups, getattr(hf, "topk_group", 1) or 1, float(getattr(hf, "routed_scaling_factor", 1.0)),
                          num_shared=fused)
        self.experts = FusedMoE(hf.n_routed_experts, routing, cfg.hidden_size, hf.moe_intermediate_size, parallel,
                                device)
        separate = 0 if fused else getattr(hf, "n_shared_experts", 0) or 0
        self.shared_experts = LlamaMLP(cfg, parallel, hf.moe_intermediate_size * separate) if separate else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.experts(x, self.gate(x), self.gate.e_score_correction_bias)
        return out if self.shared_experts is None else out + self.shared_experts(x)


class DeepseekV3ForCausalLM(LlamaForCausalLM):
    attention_kind = "mla"

    def make_rotary(self, cfg: ModelConfig, max_positions: int, device: torch.device) -> RotaryEmbedding:
        return RotaryEmbedding(cfg.rope, cfg.hf.qk_rope_head_dim, cfg.max_position_embeddings, max_positions, device)

    def __init__(self, cfg: ModelConfig, parallel: ParallelContext, backend: MLABackend, max_positions: int,
                 device: torch.device):
        super().__init__(cfg, parallel, backend, max_positions, device)
        self.mla_backend = backend  # the model runner picks an MLABackend for attention_kind "mla"
        self.shared_in_experts = shared_in_routed_stacks(cfg.hf, parallel) > 0
        # the MTP drafter (speculative decoding with method mtp): built after the decoder layers, its
        # checkpoint names `model.layers.{N + i}.*` mapped onto `mtp.{i}.*` (checkpoint_rename)
        n, rotary = cfg.num_hidden_layers, self.model.layers[0].self_attn.rotary
        self.mtp = nn.ModuleList(DeepseekMTPLayer(cfg, MLAAttention(cfg, parallel, backend, rotary),
                                                  self.make_mlp(cfg, parallel, n + i, device), parallel)
                                 for i in range(cfg.num_mtp_layers))

    def make_attention(self, cfg, parallel, backend, rotary) -> nn.Module:
        return MLAAttention(cfg, parallel, backend, rotary)

    def checkpoint_rename(self, name: str) -> str:
        """`model.layers.{N + i}.x` (the checkpoint's MTP modules after the N decoder layers) -> `mtp.{i}.x`;
        `mlp.shared_experts.x` -> `mlp.experts.shared.x` where the shared experts run in the routed stacks."""
        if self.shared_in_experts:
            name = SHARED_EXPERTS.sub(".mlp.experts.shared.", name)
        match = MTP_LAYER.match(name)
        if match is None or int(match.group(1)) < len(self.model.layers):
            return name
        return f"mtp.{int(match.group(1)) - len(self.model.layers)}.{name[match.end():]}"

    def skips_checkpoint_tensor(self, name: str) -> bool:
        """MTP modules not built (all, without speculative decoding by MTP), and their copy of the embedding."""
        if not name.startswith("mtp."):
            return False
        index, rest = name[4:].split(".", 1)
        return int(index) >= len(self.mtp) or rest == "embed_tokens.weight"

    def mtp_hidden(self, input_ids: torch.Tensor, positions: torch.Tensor, hidden: torch.Tensor,
                   meta) -> torch.Tensor:
        """The first MTP module over a step's tokens: at each position the token after it and the main model's
        hidden state there (`hidden`, as forward returns it). Writes the module's latent KV."""
        embeds = self.model.embed_tokens(input_ids)
        return self.mtp[0].predict(positions, embeds, hidden, self.mla_backend.begin_forward(meta))

    def mtp_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        return self.mtp[0].logits(hidden)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta) -> torch.Tensor:
        return super().forward(input_ids, positions, self.mla_backend.begin_forward(meta))

    def make_mlp(self, cfg: ModelConfig, parallel: ParallelContext, layer_idx: int, device: torch.device) -> nn.Module:
        hf = cfg.hf
        if getattr(hf, "n_routed_experts", None) and layer_idx >= getattr(hf, "first_k_dense_replace", 0):
            return DeepseekV3MoE(cfg, parallel, device)
        return LlamaMLP(cfg, parallel)

    def attention_layers(self) -> list[MLAAttention]:
        """The decoder's, then the MTP modules' (each has its own latent KV layer in the pool)."""
        return [layer.self_attn for layer in [*self.model.layers, *self.mtp]]

    def kv_cache_spec(self, block_size: int, dtype: str) -> MLAKVCacheSpec:
        attn = self.attention_layers()
        return MLAKVCacheSpec(len(attn), attn[0].latent_dim, attn[0].kv_lora_rank, block_size, dtype)


class DeepseekV2ForCausalLM(DeepseekV3ForCausalLM):
    """DeepSeek-V2 / V2-Lite: V3's layers; only the routing differs (chosen from `topk_method`)."""
