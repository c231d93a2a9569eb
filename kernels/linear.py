"""Linear layers, y = x @ w^T + b. Decode batches of a few rows on a GPU go to our skinny split-K
GEMM (kernels/triton/skinny_gemm.py); everything else to torch (cuBLAS on a GPU).

`block_fp8_linear` takes E4M3 weights with 128 x 128 block scales as FP8 checkpoints (DeepSeek-V3, Kimi-K2)
ship them: decode batches of up to 256 rows take the skinny GEMM on the E4M3 weights (widened in the kernel, the
activations as they are), larger ones the Triton block-FP8 GEMM on a GPU (kernels/triton/fp8_gemm.py;
activations quantised per token and 128 columns), else the reference, which dequantises the weight and
multiplies in the input's dtype.

On an H200, for 28 layers of Qwen3-0.6B in one CUDA graph, cuBLAS takes 12.7 us for o_proj at one
row (0.33 TB/s) and 6.7 us for down_proj; the skinny GEMM takes 5.0 and 5.7 us. From about 64 rows
cuBLAS is faster on every projection, so only small batches are routed here."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.triton import use_triton
from kernels.triton.skinny_configs import FP8_MAX_ROWS, ROW_TILE, rule_split
from kernels.triton.skinny_configs import skinny_config as tuned_or_rule

SKINNY_MAX_ROWS = ROW_TILE  # one row tile
# router logits (float32 weights): narrow tiles, so that a 64-expert router still spreads over many programs
_ROUTER_BN, _ROUTER_BK, ROUTER_MAX_ROWS = 16, 64, 256


def skinny_config(m: int, n: int, k: int, dtype: torch.dtype, fp8: bool = False):
    """The skinny GEMM's config for an [m, k] x [n, k]^T product (None: use torch): the tuned table's or the rule's
    (kernels/triton/skinny_configs.py); `fp8`: block-FP8 weights."""
    if not (0 < m <= (FP8_MAX_ROWS if fp8 else SKINNY_MAX_ROWS)) or dtype not in (torch.bfloat16, torch.float16):
        return None
    return tuned_or_rule(m, n, k, fp8)


def _skinny(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, cfg, **fp8) -> torch.Tensor:
    from kernels.triton.skinny_gemm import skinny_gemm
    return skinny_gemm(x, weight, bias, cfg.S, BN=cfg.BN, BK=cfg.BK, BM=cfg.BM, num_warps=cfg.num_warps,
                       num_stages=cfg.num_stages, **fp8)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    if x.dim() == 2 and use_triton(x) and weight.dtype == x.dtype and x.stride(1) == 1 and weight.stride(1) == 1:
        cfg = skinny_config(x.shape[0], weight.shape[0], weight.shape[1], x.dtype)
        if cfg is not None:
            return _skinny(x, weight, bias, cfg)
    return F.linear(x, weight, bias)


def router_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """MoE router logits in float32: x (the model's dtype) @ weight (float32)^T as an exact float32 product, as
    DeepSeek's reference computes them. Decode and small prefill batches on a GPU take one skinny launch; torch
    needs three (the cast to float32, cuBLAS's GEMV and its split-K reduction)."""
    if (x.dim() == 2 and 0 < x.shape[0] <= ROUTER_MAX_ROWS and use_triton(x) and weight.dtype == torch.float32
            and x.stride(1) == 1 and weight.stride(1) == 1):
        split = rule_split(weight.shape[0], weight.shape[1], _ROUTER_BN, _ROUTER_BK, 16)
        if split is not None:
            from kernels.triton.skinny_gemm import skinny_gemm
            return skinny_gemm(x, weight, None, split, BN=_ROUTER_BN, BK=_ROUTER_BK, BM=SKINNY_MAX_ROWS)
    return F.linear(x.float(), weight.float())


def dequantize_block_fp8_rows(weight: torch.Tensor, scale: torch.Tensor, block_k: int) -> torch.Tensor:
    """weight [..., N, K] E4M3, scale [..., N, ceil(K / block_k)] (each row its block's scale) -> float32."""
    return weight.float() * scale.repeat_interleave(block_k, dim=-1)[..., :weight.shape[-1]]


def block_fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, block_k: int,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ dequant(weight)^T (+ bias): weight [N, K] E4M3, scale [N, ceil(K / block_k)] float32. Decode
    batches (up to FP8_MAX_ROWS rows) take the skinny GEMM on the E4M3 weights as they are (no activation
    quantisation)."""
    if (use_triton(x) and x.dim() == 2 and x.stride(1) == 1 and weight.stride(1) == 1 and scale.stride(1) == 1
            and weight.shape[1] % block_k == 0):
        cfg = skinny_config(x.shape[0], weight.shape[0], weight.shape[1], x.dtype, fp8=True)
        if cfg is not None and block_k % cfg.BK == 0:
            return _skinny(x, weight, bias, cfg, scale=scale, block_k=block_k)
    if use_triton(x) and x.dim() >= 2:
        from kernels.triton.fp8_gemm import block_fp8_linear as fused
        y = fused(x, weight, scale, block_k)
        return y if bias is None else y + bias
    return F.linear(x, dequantize_block_fp8_rows(weight, scale, block_k).to(x.dtype), bias)
