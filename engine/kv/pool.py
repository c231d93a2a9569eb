"""The block-major KV pool: one tensor [num_blocks, *spec.block_shape], so that one block of all layers is one
contiguous byte range (prefill -> decode transfers move whole blocks); each layer attends over its strided view
`pool[:, layer]`. The pool holds the model dtype, or FP8 E4M3 (`kv_cache_dtype fp8`) with per-layer scales."""
from __future__ import annotations

import torch

from engine.kv.spec import KVCacheSpec


def allocate_pool(spec: KVCacheSpec, num_blocks: int, device: torch.device) -> torch.Tensor:
    # zeroed: a padded (never written) slot must hold finite values, never NaN garbage
    return torch.zeros((num_blocks, *spec.block_shape), dtype=spec.torch_dtype, device=device)
