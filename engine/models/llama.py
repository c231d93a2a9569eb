"""The Llama decoder, built from the parallel layers; Qwen2 and Qwen3 (engine/models/qwen2.py, qwen3.py) are
Llama with other attention biases and per-head q/k norms. Module names follow the Hugging Face checkpoint,
so the weight loader maps names through the module tree (engine/models/weights.py)."""
from __future__ import annotations

import torch
from torch import nn

from engine.distributed.parallel import ParallelContext
from engine.kv.spec import KVCacheSpec
from engine.layers.attention import PagedAttention
from engine.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from engine.layers.norm import RMSNorm
from engine.layers.rotary import RotaryEmbedding
from engine.layers.vocab_embedding import VocabParallelEmbedding
from engine.models.config import ModelConfig
from kernels.activation import silu_and_mul
from kernels.attention import AttentionBackend, AttentionMetadata
from kernels.attn_input import attention_input


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, parallel: ParallelContext, backend: AttentionBackend,
                 rotary: RotaryEmbedding, qkv_bias: bool, o_bias: bool, qk_norm: bool):
        super().__init__()
        self.qkv_proj = QKVParallelLinear(cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads,
                                          cfg.num_key_value_heads, bias=qkv_bias, parallel=parallel)
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.head_dim, self.q_size = cfg.head_dim, self.qkv_proj.q_size
        self.o_proj = RowParallelLinear(cfg.num_attention_heads * cfg.head_dim, cfg.hidden_size, bias=o_bias,
                                        parallel=parallel)
        self.qk_norm = qk_norm
        if qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.rotary = rotary
        self.attn = PagedAttention(backend, self.num_heads, self.num_kv_heads, cfg.head_dim, cfg.head_dim ** -0.5)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, meta: AttentionMetadata,
                cos_sin: torch.Tensor | None = None) -> torch.Tensor:
        """`cos_sin`: a step's own rotary table that `positions` index (multimodal rope), instead of the
        model's table."""
        # q/k norm, rotary and the K/V write: one fused launch on the GPU
        norm = (self.q_norm.weight, self.k_norm.weight, self.q_norm.eps) if self.qk_norm else (None, None, 0.0)
        table = self.rotary.cos_sin_cache if cos_sin is None else cos_sin
        q = attention_input(self.qkv_proj(x), positions, table, self.attn.kv_cache,
                            meta.slot_mapping, self.num_heads, self.num_kv_heads, self.head_dim, *norm,
                            self.attn.k_scale, self.attn.v_scale)
        return self.o_proj(self.attn(q, meta).reshape(-1, self.q_size))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig, parallel: ParallelContext, intermediate_size: int | None = None):
        super().__init__()
        n = intermediate_size or cfg.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(cfg.hidden_size, [n, n], ("gate_proj", "up_proj"),
                                                       bias=cfg.mlp_bias, parallel=parallel)
        self.down_proj = RowParallelLinear(n, cfg.hidden_size, bias=cfg.mlp_bias, parallel=parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, attention: nn.Module, mlp: nn.Module):
        super().__init__()
        self.self_attn = attention
        self.mlp = mlp
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, positions, hidden, residual, meta, cos_sin=None):
        if residual is None:
            hidden, residual = self.input_layernorm(hidden), hidden
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        # a step's own rotary table (multimodal rope) only reaches attention that takes one (not MLA)
        hidden = self.self_attn(positions, hidden, meta, *(() if cos_sin is None else (cos_sin,)))
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig, parallel: ParallelContext, layers: list[nn.Module]):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, parallel)
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        hidden, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual, meta)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class LlamaForCausalLM(nn.Module):
    """`forward(input_ids, positions, meta)` -> final hidden states; `compute_logits(hidden)` -> logits on rank 0
    (None on the other tensor-parallel ranks)."""

    qk_norm = False  # per-head RMSNorm of q and k before the rotary embedding (Qwen3)

    @staticmethod
    def attention_biases(cfg: ModelConfig) -> tuple[bool, bool]:
        """(bias on q/k/v, bias on o_proj)."""
        return cfg.attention_bias, cfg.attention_bias

    def make_rotary(self, cfg: ModelConfig, max_positions: int, device: torch.device) -> RotaryEmbedding:
        return RotaryEmbedding(cfg.rope, cfg.head_dim, cfg.max_position_embeddings, max_positions, device)

    def make_attention(self, cfg: ModelConfig, parallel: ParallelContext, backend: AttentionBackend,
                       rotary: RotaryEmbedding) -> nn.Module:
        qkv_bias, o_bias = self.attention_biases(cfg)
        return LlamaAttention(cfg, parallel, backend, rotary, qkv_bias, o_bias, self.qk_norm)

    def make_mlp(self, cfg: ModelConfig, parallel: ParallelContext, layer_idx: int, device: torch.device) -> nn.Module:
        """The feed-forward block of layer `layer_idx` (MoE families choose per layer)."""
        return LlamaMLP(cfg, parallel)

    def __init__(self, cfg: ModelConfig, parallel: ParallelContext, backend: AttentionBackend, max_positions: int,
                 device: torch.device):
        super().__init__()
        rotary = self.make_rotary(cfg, max_positions, device)
        layers = [LlamaDecoderLayer(cfg, self.make_attention(cfg, parallel, backend, rotary),
                                    self.make_mlp(cfg, parallel, i, device)) for i in range(cfg.num_hidden_layers)]
        self.model = LlamaModel(cfg, parallel, layers)
        self.lm_head = (self.model.embed_tokens if cfg.tie_word_embeddings
                        else VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, parallel))

    def attention_layers(self) -> list[PagedAttention]:
        return [layer.self_attn.attn for layer in self.model.layers]

    def kv_cache_spec(self, block_size: int, dtype: str) -> KVCacheSpec:
        attn = self.attention_layers()
        return KVCacheSpec(len(attn), attn[0].num_kv_heads, attn[0].head_dim, block_size, dtype)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        return self.model(input_ids, positions, meta)

    def idle_step(self, hidden_size: int, dtype: torch.dtype, device: torch.device) -> None:
        """A data-parallel group with no tokens this step: its MoE layers still take part in the expert
        all-to-alls (other groups' tokens route to its experts), in the same order as a forward."""
        empty = torch.empty(0, hidden_size, dtype=dtype, device=device)
        for layer in self.model.layers:
            if hasattr(layer.mlp, "experts"):
                layer.mlp(empty)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        return self.lm_head.logits(hidden)
