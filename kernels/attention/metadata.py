"""AttentionMetadata: the per-step description of a ragged batch over the paged KV cache."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class PagedHostMeta:
    """Host (numpy int32) copies of the batch layout, built by the model runner while it prepares
    inputs, so that planning (FlashInfer's plan runs on the CPU) never reads back from the GPU."""

    qo_indptr: np.ndarray  # [num_seqs + 1]
    kv_indptr: np.ndarray  # [num_seqs + 1]: pages of sequence b are kv_indices[kv_indptr[b]:kv_indptr[b+1]]
    kv_indices: np.ndarray  # [total pages]
    kv_last_page_len: np.ndarray  # [num_seqs]: tokens in each sequence's last page (1..block_size)
    seq_lens: np.ndarray  # [num_seqs]


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
    host: PagedHostMeta | None = None  # host copies of the layout (None: derived with a device read)

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]

    def paged_host(self) -> PagedHostMeta:
        """The host layout; computed from the device tensors (a sync) when the runner gave none."""
        if self.host is None:
            self.host = host_meta_from_tables(self.cu_seqlens_q.cpu().numpy(), self.seq_lens.cpu().numpy(),
                                              self.block_tables.cpu().numpy(), self.block_size)
        return self.host


def host_meta_from_tables(cu_q: np.ndarray, seq_lens: np.ndarray, block_tables: np.ndarray,
                          block_size: int) -> PagedHostMeta:
    seq_lens = seq_lens.astype(np.int32)
    pages = (seq_lens + block_size - 1) // block_size
    kv_indptr = np.zeros(len(seq_lens) + 1, np.int32)
    np.cumsum(pages, out=kv_indptr[1:])
    used = np.arange(block_tables.shape[1])[None, :] < pages[:, None]
    return PagedHostMeta(cu_q.astype(np.int32), kv_indptr, block_tables[used].astype(np.int32),
                         (seq_lens - (pages - 1) * block_size).astype(np.int32), seq_lens)
