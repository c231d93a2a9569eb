"""DeepSeek's multi-token prediction (MTP) module, the drafter of its speculative decoding. The checkpoint keeps
it as one more layer, `model.layers.{num_hidden_layers}.*`: `enorm` / `hnorm` (RMSNorms of the next token's
embedding and of the main model's hidden state), `eh_proj` (the two, concatenated, back to the hidden size), a
decoder layer (MLA attention with its own latent KV layer in the pool, and a MoE block) and `shared_head` (a
norm and an LM head). At position i it reads (token i + 1, main hidden state i) and predicts token i + 2.
The embedding is the main model's (the checkpoint's copy, `embed_tokens`, is the same and is not loaded)."""
from __future__ import annotations

import torch
from torch import nn

from engine.distributed.parallel import ParallelContext
from engine.layers.linear import ReplicatedLinear
from engine.layers.norm import RMSNorm
from engine.layers.vocab_embedding import VocabParallelEmbedding
from engine.models.config import ModelConfig
from engine.models.llama import LlamaDecoderLayer


class SharedHead(nn.Module):
    def __init__(self, cfg: ModelConfig, parallel: ParallelContext):
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.head = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, parallel)


class DeepseekMTPLayer(LlamaDecoderLayer):
    def __init__(self, cfg: ModelConfig, attention: nn.Module, mlp: nn.Module, parallel: ParallelContext):
        super().__init__(cfg, attention, mlp)
        H = cfg.hidden_size
        self.enorm = RMSNorm(H, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(H, cfg.rms_norm_eps)
        self.eh_proj = ReplicatedLinear(2 * H, H)
        self.shared_head = SharedHead(cfg, parallel)

    def predict(self, positions: torch.Tensor, embeds: torch.Tensor, hidden: torch.Tensor, meta) -> torch.Tensor:
        """The module's hidden state [T, H] for (next-token embeddings, main hidden states) at `positions`."""
        x = self.eh_proj(torch.cat([self.enorm(embeds), self.hnorm(hidden)], dim=-1))
        out, residual = super().forward(positions, x, None, meta)
        return out + residual

    def logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        return self.shared_head.head.logits(self.shared_head.norm(hidden))
