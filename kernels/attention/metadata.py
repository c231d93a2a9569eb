"""AttentionMetadata: the per-step description of a ragged batch over the paged KV cache."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    """Built once per step by the model runner and passed down explicitly to every layer.

    Sequence b contributes query tokens `cu_seqlens_q[b]:cu_seqlens_q[b+1]`, the last ones of
    its `seq_lens[b]` tokens whose KV lives in the blocks `block_tables[b]`.
    """

    slot_mapping: torch.Tensor  # [num_tokens] int64: cache slot (block * block_size + offset) per token
    cu_seqlens_q: torch.Tensor  # [num_seqs + 1] int32
    seq_lens: torch.Tensor  # [num_seqs] int32: KV length of each sequence after this step
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int32, padded with 0
    max_seqlen_q: int
    max_seqlen_k: int
    block_size: int
    is_decode: bool = False  # every sequence feeds exactly one token
    plan: object = None  # backend-specific state built once per step, reused by every layer

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]
