"""Block-quantized FP8 checkpoints (DeepSeek-V3, Kimi-K2): linear weights stored as float8_e4m3fn with one
float32 scale per 128 x 128 block (`<name>.weight_scale_inv`, `quantization_config.weight_block_size`).

This module dequantises them while they stream in (weight = fp8 value * its block's scale, in float32, then
the model dtype), so every device runs them with the dense kernels. FP8 GEMMs that consume the blocks as
they are (DeepGEMM, a Triton block-FP8 GEMM) are the GPU path still to come: see the README."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open

from engine.errors import UnsupportedModelError

SCALE_SUFFIX = "_scale_inv"


def block_size_of(hf_config) -> tuple[int, int] | None:
    """(rows, cols) of the checkpoint's FP8 weight blocks, or None when it is not block-quantized FP8."""
    q = getattr(hf_config, "quantization_config", None)
    if q is None:
        return None
    q = q if isinstance(q, dict) else q.to_dict()
    if q.get("quant_method") != "fp8":
        raise UnsupportedModelError(f"quantization {q.get('quant_method')!r} is not supported", param="model")
    block = q.get("weight_block_size")
    if not block or len(block) != 2:
        raise UnsupportedModelError("FP8 checkpoints need quantization_config.weight_block_size (per-tensor FP8 "
                                    "is not supported)", param="model")
    return int(block[0]), int(block[1])


def dequantize_block_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """weight [N, K] fp8, scale_inv [ceil(N/bn), ceil(K/bk)] -> float32 [N, K]."""
    n, k = weight.shape
    scale = scale_inv.float().repeat_interleave(block[0], 0)[:n].repeat_interleave(block[1], 1)[:, :k]
    return weight.float() * scale


def read_scales(files: list[Path]) -> dict[str, torch.Tensor]:
    """Every `<weight>_scale_inv` tensor of the checkpoint, by the weight's name (they are small)."""
    scales = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                if name.endswith(SCALE_SUFFIX):
                    scales[name.removesuffix(SCALE_SUFFIX)] = f.get_tensor(name)
    return scales


def dequantized(weights: Iterator, scales: dict[str, torch.Tensor], block: tuple[int, int],
                dtype: torch.dtype) -> Iterator:
    """(name, CheckpointTensor) pairs with FP8 weights replaced by their dequantised values and the scales
    dropped."""
    from engine.models.weights import CheckpointTensor
    for name, tensor in weights:
        if name.endswith(SCALE_SUFFIX):
            continue
        scale = scales.get(name)
        if scale is None:
            yield name, tensor
            continue
        full = tensor.full()
        if full.dtype != torch.float8_e4m3fn or full.dim() != 2:
            raise UnsupportedModelError(f"{name} has a block scale but is {full.dtype} {tuple(full.shape)}",
                                        param="model")
        yield name, CheckpointTensor.of(dequantize_block_fp8(full, scale, block).to(dtype))
