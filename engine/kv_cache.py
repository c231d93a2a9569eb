"""The block-major KV pool: one tensor [num_blocks, layers, 2, block_size, kv_heads, head_dim], so that
one block of all layers is one contiguous byte range (prefill -> decode transfers move whole blocks).
The pool holds the model dtype, or FP8 E4M3 (`kv_cache_dtype fp8`) with per-tensor k/v scales."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KVCacheSpec:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype

    @property
    def block_shape(self) -> tuple[int, ...]:
        return (self.num_layers, 2, self.block_size, self.num_kv_heads, self.head_dim)

    @property
    def block_bytes(self) -> int:
        n = 1
        for d in self.block_shape:
            n *= d
        return n * torch.empty((), dtype=self.dtype).element_size()

    @property
    def bytes_per_token(self) -> int:
        return self.block_bytes // self.block_size

    def num_blocks_for(self, budget_bytes: int) -> int:
        return max(0, budget_bytes // self.block_bytes)


def kv_cache_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    """auto -> the model dtype; fp8 / fp8_e4m3 -> torch.float8_e4m3fn (half the bytes of bf16)."""
    if name == "auto":
        return model_dtype
    if name in ("fp8", "fp8_e4m3"):
        return torch.float8_e4m3fn
    raise ValueError(f"unknown kv_cache_dtype {name!r}")


def allocate_pool(spec: KVCacheSpec, num_blocks: int, device: torch.device) -> torch.Tensor:
    # zeroed: a padded (never written) slot must hold finite values, never NaN garbage
    return torch.zeros((num_blocks, *spec.block_shape), dtype=spec.dtype, device=device)
