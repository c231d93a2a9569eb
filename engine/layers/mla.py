"""MLAAttention: DeepSeek's multi-head latent attention. Per token the cache keeps one vector, the normalised
KV latent (kv_lora_rank) and the shared rotated key part (qk_rope_head_dim), instead of per-head K and V;
queries come from a low-rank projection (q_lora_rank) or a plain one. Heads are split over the
tensor-parallel ranks; every rank stores the same latents. The attention itself is the MLA backend's
(kernels/attention/mla.py: FlashMLA, Triton or torch), computed in the latent space.

The rotary part is DeepSeek's interleaved layout (pairs (x0, x1), (x2, x3), ...) when `rope_interleave`, taken
apart into halves by the rope kernel so the usual rotate-half layout follows (the reference does the same). YaRN scaling
multiplies the softmax scale by mscale(factor, mscale_all_dim)^2, as the reference does."""
from __future__ import annotations

import math

import torch
from torch import nn

from engine.distributed.parallel import ParallelContext
from engine.layers.linear import ColumnParallelLinear, MergedColumnParallelLinear, RowParallelLinear
from engine.layers.norm import RMSNorm
from engine.layers.rotary import RotaryEmbedding
from engine.models.config import ModelConfig
from kernels.attention import AttentionMetadata
from kernels.attention.mla import MLABackend, MLAShape

LATENT_NORM_EPS = 1e-6  # the reference builds q_a_layernorm / kv_a_layernorm with the default eps


def yarn_mscale(scale: float, mscale: float) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def mla_softmax_scale(cfg: ModelConfig) -> float:
    hf = cfg.hf
    scale = (hf.qk_nope_head_dim + hf.qk_rope_head_dim) ** -0.5
    rope = cfg.rope
    if rope.type != "default" and rope.mscale_all_dim:
        m = yarn_mscale(rope.factor, rope.mscale_all_dim)
        scale *= m * m
    return scale


class MLAAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, parallel: ParallelContext, backend: MLABackend, rotary: RotaryEmbedding):
        super().__init__()
        hf = cfg.hf
        heads, hidden = cfg.num_attention_heads, cfg.hidden_size
        self.num_heads = parallel.shard(heads, "num_attention_heads")[1]
        self.q_lora_rank, self.kv_lora_rank = hf.q_lora_rank, hf.kv_lora_rank
        self.nope_dim, self.rope_dim, self.v_dim = hf.qk_nope_head_dim, hf.qk_rope_head_dim, hf.v_head_dim
        qk_dim, bias = self.nope_dim + self.rope_dim, cfg.attention_bias
        # the query's first projection and the latent's in one GEMM (one launch less per layer at decode): q_a_proj
        # (replicated) with a low-rank query, else q_proj (this rank's heads; no bias in the reference)
        self.latent_dim = self.kv_lora_rank + self.rope_dim
        q_source = "q_a_proj" if self.q_lora_rank else "q_proj"
        self.fused_qkv_a_proj = MergedColumnParallelLinear(
            hidden, [self.q_lora_rank or heads * qk_dim, self.latent_dim], (q_source, "kv_a_proj_with_mqa"), bias,
            parallel, replicated=(bool(self.q_lora_rank), True), unbiased=() if self.q_lora_rank else ("q_proj",))
        self.q_out = self.fused_qkv_a_proj.local_sizes[0]  # this rank's query columns of the fused output
        if self.q_lora_rank:
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = ColumnParallelLinear(self.q_lora_rank, heads * qk_dim, False, parallel)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, LATENT_NORM_EPS)
        self.kv_b_proj = ColumnParallelLinear(self.kv_lora_rank, heads * (self.nope_dim + self.v_dim), False, parallel)
        self.kv_b_proj.block_fp8_capable = False  # folded into q and the output: FP8 checkpoints dequantise it
        self.o_proj = RowParallelLinear(heads * self.v_dim, hidden, bias, parallel)
        self.rotary = rotary
        self.interleaved = bool(getattr(hf, "rope_interleave", True))
        self.scale = mla_softmax_scale(cfg)
        self.backend = backend
        self.shape = MLAShape(self.num_heads, self.kv_lora_rank, self.rope_dim, self.nope_dim, self.v_dim, self.scale)
        # this layer's view `pool[:, layer]` [blocks, block_size, latent_dim], bound by the model runner
        self.kv_cache: torch.Tensor | None = None

    def forward(self, positions: torch.Tensor, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        T = x.shape[0]
        q, latent, k_pe = self.fused_qkv_a_proj(x).split([self.q_out, self.kv_lora_rank, self.rope_dim], dim=-1)
        q = self.q_b_proj(self.q_a_layernorm(q)) if self.q_lora_rank else q
        q_nope, q_pe = q.view(T, self.num_heads, -1).split([self.nope_dim, self.rope_dim], dim=-1)
        # the latent query [T, heads, kv_lora_rank + rope]: the rope writes the rotated part (with the latent's
        # norm and the cache store, one launch in the Triton backend), the backend the absorbed q_nope beside it
        q_latent = x.new_empty(T, self.num_heads, self.latent_dim)
        q_pe_out = q_latent[..., self.kv_lora_rank:]
        norm = self.kv_a_layernorm
        self.backend.norm_rope_store(latent, norm.weight, norm.eps, q_pe, k_pe, positions, self.rotary.cos_sin_cache,
                                     self.interleaved, q_pe_out, self.kv_cache, meta.slot_mapping)
        out = self.backend.attend(q_nope, q_pe_out, self.kv_cache, meta, self.kv_b_proj.weight, self.shape, q_latent)
        return self.o_proj(out.reshape(T, self.num_heads * self.v_dim))
