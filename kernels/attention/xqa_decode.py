"""Decode attention with FlashInfer's XQA kernel (TensorRT-LLM's), for FP8 pages on Hopper.

On SM90 with E4M3 pages XQA runs both products on FP8 tensor cores (wgmma), fed by TMA with warp
specialisation: q and the softmax probabilities are rounded to E4M3 inside the kernel. That is what
makes it faster than the Triton kernel, which widens the pages to fp16 and keeps q exact (H100,
Qwen3-0.6B shape, `slipstream bench attention`: 2.4-2.6 against 1.9-2.0 TB/s at batch 64-256), and
it is also why its error against the fp32 reference is ~20x larger (3e-2 against 1.7e-3 relative on
the attention output; `python3 -m engine.bench.kv_accuracy` measures what that does to generation).
vLLM's FP8 KV path on Hopper (FlashAttention 3) quantises q the same way.

The pool's per-layer view `pool[:, layer]` ([blocks, 2, block_size, kv_heads, head_dim], strided over
blocks) gives XQA its K and V page views; XQA takes the page, token and head strides, so nothing is
copied. The block table is read as [B, pages] with pages * block_size as the longest sequence, so a
CUDA-graph bucket's fixed-width table fixes the kernel's grid too."""
from __future__ import annotations

import importlib.util

import torch

XQA_PAGE_SIZES = (16, 32, 64, 128)
SEMAPHORE_BYTES = 1 << 20  # a uint32 per (sequence, KV head) of a multi-block launch
# Partial results of multi-block launches (small batches split a sequence over CTAs): XQA splits
# only while sequences x KV heads < 3/4 of the SMs, so this is a few MB even at head_dim 256.
SCRATCH_BYTES = 16 << 20


def split_sm_count(num_sms: int, num_seq_heads: int) -> int:
    """The `sm_count` XQA is given: it only sets how many CTAs share one sequence, 0.75 * sm_count /
    (sequences x KV heads), rounded down twice, so 32-192 sequence-heads get few splits (as few as 64
    CTAs on 132 SMs). Four times the SM count there gives ~400 CTAs: on an H100 (FP8 pages, 500-2000
    tokens, 8 KV heads) batch 4 went 10.9 -> 7.7 us, 8 15.4 -> 9.4, 16 24.5 -> 15.0, 24 30.9 -> 26.9;
    batch 1 and >= 32 were best (or within 2 %) with the real count."""
    return 4 * num_sms if 32 <= num_seq_heads <= 192 else num_sms


def xqa_fp8_supported(device: torch.device, q_dtype: torch.dtype | None, kv_dtype: torch.dtype | None,
                      block_size: int | None, head_dim: int | None) -> bool:
    """Whether XQA's FP8 Hopper kernel can run this shape."""
    return (device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9
            and importlib.util.find_spec("flashinfer") is not None
            and q_dtype in (torch.float16, torch.bfloat16) and kv_dtype == torch.float8_e4m3fn
            and block_size in XQA_PAGE_SIZES and head_dim is not None and head_dim % 16 == 0 and head_dim <= 256)


class XqaDecode:
    """One-token-per-sequence attention over the paged pool: `__call__(q, kv_cache, seq_lens, block_tables,
    out, scale, k_scale, v_scale)`."""

    def __init__(self, device: torch.device, num_kv_heads: int, head_dim: int, block_size: int):
        from flashinfer.utils import get_device_sm_count
        self.num_kv_heads, self.head_dim, self.block_size = num_kv_heads, head_dim, block_size
        self.sm_count = get_device_sm_count(device)
        # semaphores must start at zero (the last CTA of a multi-block group resets its own)
        self.semaphores = torch.zeros(SEMAPHORE_BYTES, dtype=torch.uint8, device=device)
        self.scratch = torch.empty(SCRATCH_BYTES, dtype=torch.uint8, device=device)

    def __call__(self, q: torch.Tensor, kv_cache: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor,
                 out: torch.Tensor, scale: float, k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
        """q, out [B, heads, D] dense; kv_cache [blocks, 2, block_size, kv_heads, D]; seq_lens [B] int32;
        block_tables [B, pages] int32 with dense rows."""
        from flashinfer.xqa import xqa
        B, H, D = q.shape
        if B == 0:
            return out
        # XQA computes q.k * q_scale * kv_scale / sqrt(head_dim) and (p.v) * kv_scale: kv_scale is the V
        # scale, and q_scale carries the K scale relative to it and the model's softmax scale
        q_scale = scale * self.head_dim ** 0.5 * k_scale / v_scale
        xqa(q.contiguous().view(B, 1, H, D), kv_cache[:, 0], kv_cache[:, 1], block_tables.contiguous(),
            seq_lens.view(torch.uint32).view(B, 1), out.view(B, 1, H, D), self.scratch, self.semaphores,
            self.num_kv_heads, self.block_size, q_scale=q_scale, kv_scale=v_scale,
            sm_count=split_sm_count(self.sm_count, B * self.num_kv_heads))
        return out
