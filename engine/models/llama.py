"""The Llama-family decoder (Llama, Qwen2 with qkv bias, Qwen3 with q/k norm).

One implementation with per-architecture switches; projections are fused (qkv, gate_up) at load.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from engine.layers.attention import PagedAttention
from engine.layers.linear import Linear
from engine.layers.norm import RMSNorm
from engine.layers.rotary import RotaryEmbedding
from kernels.activation import silu_and_mul
from kernels.attn_input import attention_input
from kernels.attention import AttentionMetadata


class ArchSpec:
    """What differs between the supported architectures."""

    def __init__(self, qkv_bias: bool, qk_norm: bool):
        self.qkv_bias, self.qk_norm = qkv_bias, qk_norm

    @classmethod
    def from_config(cls, hf_config) -> "ArchSpec":
        arch = hf_config.architectures[0]
        if arch == "Qwen2ForCausalLM":
            return cls(qkv_bias=True, qk_norm=False)
        if arch == "Qwen3ForCausalLM":
            return cls(qkv_bias=bool(getattr(hf_config, "attention_bias", False)), qk_norm=True)
        return cls(qkv_bias=bool(getattr(hf_config, "attention_bias", False)), qk_norm=False)


class Attention(nn.Module):
    def __init__(self, cfg, spec: ArchSpec, backend, rotary: RotaryEmbedding):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads or cfg.num_attention_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.q_size, self.kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_proj = Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=spec.qkv_bias)
        self.o_proj = Linear(self.q_size, cfg.hidden_size, bias=bool(getattr(cfg, "attention_bias", False)))
        if spec.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.qk_norm = spec.qk_norm
        self.rotary = rotary
        self.attn = PagedAttention(backend, self.num_heads, self.num_kv_heads, self.head_dim, self.head_dim ** -0.5)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        # q/k norm, rotary and the K/V write: one fused launch on the GPU
        backend = self.attn.backend
        q = attention_input(self.qkv_proj(x), positions, self.rotary.cos_sin_cache, self.attn.kv_cache,
                            meta.slot_mapping, self.num_heads, self.num_kv_heads, self.head_dim,
                            self.q_norm.weight if self.qk_norm else None, self.k_norm.weight if self.qk_norm else None,
                            self.q_norm.eps if self.qk_norm else 0.0, backend.k_scale, backend.v_scale)
        out = self.attn(q, meta)
        return self.o_proj(out.reshape(-1, self.q_size))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        bias = bool(getattr(cfg, "mlp_bias", False))
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=bias)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg, spec: ArchSpec, backend, rotary: RotaryEmbedding):
        super().__init__()
        self.self_attn = Attention(cfg, spec, backend, rotary)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, positions, hidden, residual, meta):
        if residual is None:
            hidden, residual = self.input_layernorm(hidden), hidden
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden, meta)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaForCausalLM(nn.Module):
    # checkpoint projection name -> (fused parameter, shard index)
    stacked = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
               "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}

    def __init__(self, hf_config, backend, max_positions: int, device: torch.device):
        super().__init__()
        cfg = hf_config
        spec = ArchSpec.from_config(cfg)
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        rotary = RotaryEmbedding(cfg, head_dim, max_positions, device)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, spec, backend, rotary) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.tie_word_embeddings = bool(getattr(cfg, "tie_word_embeddings", False))
        if not self.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def attention_layers(self) -> list[PagedAttention]:
        return [layer.self_attn.attn for layer in self.layers]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        hidden, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual, meta)
        hidden, _ = self.norm(hidden, residual)
        return hidden

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.embed_tokens.weight if self.tie_word_embeddings else self.lm_head.weight
        return hidden @ weight.t()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copies checkpoint tensors in (HF names), fusing q/k/v and gate/up; every parameter must be filled."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            name = name.removeprefix("model.")
            if "rotary_emb" in name or (name == "lm_head.weight" and self.tie_word_embeddings):
                continue
            parts = name.split(".")
            fused = self.stacked.get(parts[-2]) if len(parts) >= 2 else None
            if fused:
                target, shard = fused
                pname = ".".join(parts[:-2] + [target, parts[-1]])
                param = params[pname]
                sizes = _shard_sizes(param.shape[0], target, self)
                start = sum(sizes[:shard])
                param.data[start:start + sizes[shard]].copy_(tensor)
                loaded.add(f"{pname}#{shard}")
                if sum(1 for s in range(len(sizes)) if f"{pname}#{s}" in loaded) == len(sizes):
                    loaded.add(pname)
                continue
            if name not in params:
                raise KeyError(f"unexpected checkpoint tensor {name!r}")
            params[name].data.copy_(tensor)
            loaded.add(name)
        missing = sorted(set(params) - loaded)
        if missing:
            raise KeyError(f"checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")


def _shard_sizes(total: int, target: str, model: LlamaForCausalLM) -> list[int]:
    if target == "gate_up_proj":
        return [total // 2, total // 2]
    attn = model.layers[0].self_attn
    return [attn.q_size, attn.kv_size, attn.kv_size]
