"""The contract every paged-attention backend fulfils (torch reference, Triton, FlashInfer): the engine
configures it once with the model's attention shape, plans each step once (`plan`: the per-step metadata
that every layer reuses), and per layer stores K/V and attends. `supports_cuda_graph` promises that decode
steps need no plan (the kernels read seq_lens and block tables on the device), so a captured graph replays
without re-planning; `supports_verify_graph` that the plan of a step of a few tokens per sequence (speculative
verification) is device work only, captured with the forward; `needs_block_tables` asks the runner for dense
[batch, pages] tables."""
from __future__ import annotations

import abc
from dataclasses import dataclass

import torch

from kernels.attention.metadata import AttentionMetadata


@dataclass(frozen=True)
class AttentionShape:
    """One rank's attention: its query and KV heads, the softmax scale, the q and page dtypes."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    scale: float
    q_dtype: torch.dtype
    kv_dtype: torch.dtype
    block_size: int = 16


class AttentionBackend(abc.ABC):
    name: str = "?"
    supports_cuda_graph: bool = False
    supports_verify_graph: bool = False
    needs_block_tables: bool = True

    def __init__(self) -> None:
        self.shape: AttentionShape | None = None

    def configure(self, shape: AttentionShape) -> None:
        """The model's attention shape; called once before the first plan (backends pick kernels here)."""
        self.shape = shape

    @abc.abstractmethod
    def plan(self, meta: AttentionMetadata) -> object:
        """Per-step state every layer reuses (goes in `meta.plan`); None for decode steps of graphable backends."""

    @abc.abstractmethod
    def attend(self, q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
               k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
        """Causal attention of q [T, heads, head_dim] over the cached K/V (this step's already stored).
        kv_cache is one layer's [blocks, 2, block_size, kv_heads, head_dim]; FP8 pages hold x / scale."""

    def store_kv(self, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
                 k_scale: float = 1.0, v_scale: float = 1.0) -> None:
        """Writes k, v [T, kv_heads, head_dim] at slot_mapping (-1: nowhere)."""
        from kernels.attn_input import store_kv
        store_kv(k, v, kv_cache, slot_mapping, k_scale, v_scale)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata, scale: float, k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
        """Stores k, v at `meta.slot_mapping`, then attends (the kernel tests' entry point; the model stores
        through its fused attention input instead, kernels/attn_input.py)."""
        self.store_kv(k, v, kv_cache, meta.slot_mapping, k_scale, v_scale)
        return self.attend(q, kv_cache, meta, scale, k_scale, v_scale)
