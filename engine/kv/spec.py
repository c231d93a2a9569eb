"""What one rank's KV pool holds per block, for each attention kind: `KVCacheSpec` (GQA: K and V per head) and
`MLAKVCacheSpec` (MLA: one latent vector per token). The spec sizes the pool, and the migration descriptor
carries it (a tagged union), so two engines agree on what a block's bytes mean."""
from __future__ import annotations

import math

import msgspec
import torch


class KVCacheSpec(msgspec.Struct, frozen=True, tag="gqa"):
    """Grouped-query attention: per layer a K and a V entry of [kv_heads, head_dim] per token."""

    num_layers: int
    num_kv_heads: int  # this rank's KV heads
    head_dim: int
    block_size: int
    dtype: str  # torch dtype name: bfloat16, float8_e4m3fn, ...

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def block_shape(self) -> tuple[int, ...]:
        """One block of all layers: [layers, 2, block_size, kv_heads, head_dim], one contiguous byte range."""
        return (self.num_layers, 2, self.block_size, self.num_kv_heads, self.head_dim)

    @property
    def block_bytes(self) -> int:
        return math.prod(self.block_shape) * torch.empty((), dtype=self.torch_dtype).element_size()

    @property
    def bytes_per_token(self) -> int:
        return self.block_bytes // self.block_size

    def num_blocks_for(self, budget_bytes: int) -> int:
        return max(0, budget_bytes // self.block_bytes)


class MLAKVCacheSpec(msgspec.Struct, frozen=True, tag="mla"):
    """Multi-head latent attention (DeepSeek-V2/V3, Kimi-K2): per layer one vector per token, the normalised KV
    latent (kv_lora_rank) then the rotated shared key part (qk_rope_head_dim); 576 values for V3. Every
    tensor-parallel rank holds the same latents (the heads are expanded from them)."""

    num_layers: int
    latent_dim: int  # kv_lora_rank + qk_rope_head_dim
    kv_lora_rank: int
    block_size: int
    dtype: str

    torch_dtype = KVCacheSpec.torch_dtype
    block_bytes = KVCacheSpec.block_bytes
    bytes_per_token = KVCacheSpec.bytes_per_token
    num_blocks_for = KVCacheSpec.num_blocks_for

    @property
    def block_shape(self) -> tuple[int, ...]:
        """One block of all layers: [layers, block_size, latent_dim]."""
        return (self.num_layers, self.block_size, self.latent_dim)


AnyKVCacheSpec = KVCacheSpec | MLAKVCacheSpec


def kv_cache_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    """auto -> the model dtype; fp8 / fp8_e4m3 -> torch.float8_e4m3fn (half the bytes of bf16)."""
    if name == "auto":
        return model_dtype
    if name in ("fp8", "fp8_e4m3"):
        return torch.float8_e4m3fn
    raise ValueError(f"unknown kv_cache_dtype {name!r}")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
