"""Block-quantized FP8 checkpoints (DeepSeek-V3, Kimi-K2): linear weights stored as float8_e4m3fn with one
float32 scale per 128 x 128 block (`<name>.weight_scale_inv`, `quantization_config.weight_block_size`).

They load as they are: every linear layer and MoE expert block whose checkpoint weights all carry scales
turns FP8 before loading (`keep_block_fp8`: E4M3 weights and row-expanded scales, engine/layers/linear.py),
and computes on them (kernels/linear.block_fp8_linear, the FP8 fused MoE: Triton on a GPU, the dequantising
reference on a CPU). The weights of other layers (MLA's kv_b_proj, which the latent attention folds into q,
or a split that cuts a block) are dequantised while they stream in (fp8 value * its block's scale, in
float32, then the model dtype)."""
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


def read_scales(files: list[Path]) -> tuple[dict[str, tuple[torch.Tensor, tuple]], set[str]]:
    """Every `<weight>_scale_inv` tensor of the checkpoint with its weight's shape, by the weight's name (the
    scales are small), and the names of all the checkpoint's tensors."""
    scales, names, shapes = {}, set(), {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                names.add(name)
                if name.endswith(SCALE_SUFFIX):
                    scales[name.removesuffix(SCALE_SUFFIX)] = f.get_tensor(name)
                else:
                    shapes[name] = tuple(f.get_slice(name).get_shape())
    return {name: (scale, shapes.get(name, ())) for name, scale in scales.items()}, names


class RowScales:
    """A weight's block scales [ceil(N / bn), ceil(K / bk)] seen in the weight's coordinates [N, K], as layers
    read checkpoint tensors (`full`, `narrow`): rows come out expanded (each row its block's scales), a column
    range comes out as the blocks it spans, and must start on a block edge."""

    def __init__(self, scale: torch.Tensor, block: tuple[int, int], weight_shape: tuple):
        self.scale, self.block, self.shape = scale.float(), block, tuple(weight_shape)

    def full(self) -> torch.Tensor:
        return self.scale[torch.arange(self.shape[0]) // self.block[0]]

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        if start < 0 or start + length > self.shape[dim]:
            raise ValueError(f"slice [{start}, {start + length}) of dim {dim} is outside shape {self.shape}")
        if dim == 0:
            return self.scale[torch.arange(start, start + length) // self.block[0]]
        bk = self.block[1]
        if start % bk:
            raise UnsupportedModelError(f"a split at column {start} cuts a {bk}-wide FP8 block", param="model")
        return self.full()[:, start // bk:-(-(start + length) // bk)]


def keep_block_fp8(model, scales: dict, names: set[str], block: tuple[int, int]) -> set[str]:
    """Turns every layer that can compute on FP8 blocks, and whose checkpoint weights all carry scales, to FP8
    (before loading). Returns the checkpoint names of the weights that now load as they are."""
    from engine.models.weights import checkpoint_targets
    targets, _ = checkpoint_targets(model)
    rename = getattr(model, "checkpoint_rename", lambda name: name)  # e.g. DeepSeek's MTP layer -> mtp.0
    checkpoint_name = {rename(name): name for name in names}
    layers: dict[int, tuple] = {}
    for name, (module, pname, _) in targets.items():
        if name in checkpoint_name and pname.endswith("weight") and hasattr(module, "to_block_fp8"):
            layers.setdefault(id(module), (module, []))[1].append(checkpoint_name[name])
    kept = set()
    for module, weights in layers.values():
        if all(name in scales for name in weights) and module.block_fp8_fits(block):
            module.to_block_fp8(block)
            kept.update(weights)
    return kept


def random_block_fp8(model, block: tuple[int, int]) -> None:
    """A random-weights folder whose config declares block-FP8 weights (benchmarks of an FP8 checkpoint's shape):
    every layer that would compute on FP8 blocks turns FP8, as a published checkpoint's do (its routers,
    embeddings, lm_head and norms stay in the model's dtype: they are not layers that take FP8 blocks)."""
    for module in model.modules():
        if hasattr(module, "to_block_fp8") and module.block_fp8_fits(block):
            module.to_block_fp8(block)


def block_fp8_weights(weights: Iterator, scales: dict, block: tuple[int, int], dtype: torch.dtype,
                      kept: set[str]) -> Iterator:
    """(name, CheckpointTensor) pairs: the kept FP8 weights as they are with their scales as `RowScales`, the
    other FP8 weights dequantised (their scales dropped)."""
    from engine.models.weights import CheckpointTensor
    for name, tensor in weights:
        if name.endswith(SCALE_SUFFIX):
            weight = name.removesuffix(SCALE_SUFFIX)
            if weight in kept:
                yield name, RowScales(scales[weight][0], block, scales[weight][1])
            continue
        if name in kept or name not in scales:
            yield name, tensor
        else:  # dequantised when a layer reads it (never for another rank's experts)
            yield name, CheckpointTensor(_Dequantized(name, tensor, scales[name][0], block, dtype), tensor.shape)


class _Dequantized:
    def __init__(self, name: str, tensor, scale: torch.Tensor, block: tuple[int, int], dtype: torch.dtype):
        self.name, self.tensor, self.scale, self.block, self.dtype = name, tensor, scale, block, dtype

    def __getitem__(self, index) -> torch.Tensor:
        full = self.tensor.full()
        if full.dtype != torch.float8_e4m3fn or full.dim() != 2:
            raise UnsupportedModelError(f"{self.name} has a block scale but is {full.dtype} {tuple(full.shape)}",
                                        param="model")
        return dequantize_block_fp8(full, self.scale, self.block).to(self.dtype)[index]
