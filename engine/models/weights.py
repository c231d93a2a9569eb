"""Weight loading: streams a Hugging Face folder's safetensors files (single or sharded) tensor by tensor and
hands each to the layer that owns the parameter, which reads only its rank's slice (`CheckpointTensor` reads
slices lazily). No rank ever materialises the whole model. Checkpoint names map to parameters through the
module tree: a parameter's own name, or a fused layer's `checkpoint_shards` (q/k/v -> qkv_proj)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open
from torch import nn

from engine.errors import UnsupportedModelError
from engine.layers.linear import copy_checked
from engine.models.fp8_checkpoint import (SCALE_SUFFIX, block_fp8_weights, block_size_of, keep_block_fp8,
                                          random_block_fp8, read_scales)

# a checkpoint folder holding config.json and this file (no weights) loads with random weights:
# throughput benchmarks of a model shape need no real weights
RANDOM_WEIGHTS_MARKER = "slipstream_random_weights"
# tensors some checkpoints carry that no parameter corresponds to
SKIPPED_SUFFIXES = ("rotary_emb.inv_freq",)


class CheckpointTensor:
    """One checkpoint tensor, read on demand: `narrow` reads only the rows or columns asked for."""

    def __init__(self, source, shape: tuple[int, ...]):
        self._source, self.shape = source, tuple(shape)

    @classmethod
    def of(cls, tensor: torch.Tensor) -> "CheckpointTensor":
        return cls(tensor, tensor.shape)

    def full(self) -> torch.Tensor:
        return self._source[...] if not isinstance(self._source, torch.Tensor) else self._source

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        if start < 0 or start + length > self.shape[dim]:
            raise ValueError(f"slice [{start}, {start + length}) of dim {dim} is outside shape {self.shape}")
        index = (slice(None),) * dim + (slice(start, start + length),)
        return self._source[index]


def safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [path / name for name in sorted(set(weight_map.values()))]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise UnsupportedModelError(f"no .safetensors weights in {path}", param="model")
    return files


def iter_checkpoint(path: Path, progress: bool = False) -> Iterator[tuple[str, CheckpointTensor]]:
    files = safetensors_files(path)
    if progress and files:
        from tqdm import tqdm  # imported for the bar alone: `import engine` needs no tqdm
        files = tqdm(files, desc="loading weights", unit="file")
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                lazy = f.get_slice(name)
                yield name, CheckpointTensor(lazy, lazy.get_shape())


def checkpoint_targets(model: nn.Module) -> tuple[dict[str, tuple[nn.Module, str, object]], set[str]]:
    """(checkpoint name -> (owning module, parameter name, shard id), names to ignore). A module reached
    under a second path (a tied LM head is the embedding) is loaded through its first path only."""
    targets: dict[str, tuple[nn.Module, str, object]] = {}
    ignored: set[str] = set()
    seen: set[int] = set()
    for prefix, module in model.named_modules(remove_duplicate=False):
        own = [name for name, _ in module.named_parameters(recurse=False)]
        dot = f"{prefix}." if prefix else ""
        if id(module) in seen:
            ignored.update(f"{dot}{name}" for name in own)
            continue
        seen.add(id(module))
        if hasattr(module, "checkpoint_names"):  # a layer that maps names itself (stacked MoE experts)
            targets.update({f"{dot}{name}": (module, pname, shard)
                            for name, (pname, shard) in module.checkpoint_names().items()})
            ignored.update(f"{dot}{name}" for name in module.ignored_checkpoint_names())
            continue
        shards = getattr(module, "checkpoint_shards", None) or {}
        parent = prefix.rsplit(".", 1)[0] + "." if "." in prefix else ""
        for name in own:
            if shards:
                for source, shard_id in shards.items():
                    targets[f"{parent}{source}.{name}"] = (module, name, shard_id)
            else:
                targets[f"{dot}{name}"] = (module, name, None)
    return targets, ignored


def load_weights(model: nn.Module, weights) -> None:
    """Copies (name, CheckpointTensor) pairs into the model; every shard of every parameter must arrive."""
    targets, ignored = checkpoint_targets(model)
    skips = getattr(model, "skips_checkpoint_tensor", None)  # a family's tensors the model does not run
    rename = getattr(model, "checkpoint_rename", None)  # a family's names that differ from its module tree
    loaded: set[tuple[int, str, object]] = set()
    for name, tensor in weights:
        name = rename(name) if rename is not None else name
        if name in ignored or name.endswith(SKIPPED_SUFFIXES) or (skips is not None and skips(name)):
            continue
        if name not in targets:
            raise KeyError(f"unexpected checkpoint tensor {name!r}")
        module, pname, shard = targets[name]
        if hasattr(module, "load_weight"):
            module.load_weight(pname, tensor, shard)
        else:  # a replicated parameter (norms): the whole tensor
            copy_checked(getattr(module, pname).data, tensor.full(), name)
        loaded.add((id(module), pname, shard))
    missing = []
    for prefix, module in model.named_modules():
        for pname, _ in module.named_parameters(recurse=False):
            shards = module.shard_ids(pname) if hasattr(module, "shard_ids") else (None,)
            missing += [f"{prefix}.{pname}" + (f" ({s})" if s is not None else "") for s in shards
                        if (id(module), pname, s) not in loaded]
    if missing:
        raise KeyError(f"checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")


def is_random_weights(path: Path | None) -> bool:
    return path is not None and (path / RANDOM_WEIGHTS_MARKER).is_file()


def fill_random(model: nn.Module, seed: int, device: torch.device) -> None:
    """Small random matrices, ones elsewhere (benchmarks of a shape). Drawn where the weights live: a 0.6B
    model's draws take seconds on a CPU, milliseconds on a GPU. Block-FP8 weights get standard normal E4M3
    values and block scales of 0.02, the same magnitudes once dequantised."""
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(SCALE_SUFFIX):
                p.fill_(0.02)
            elif p.dim() > 1:
                draw = torch.randn(p.shape, generator=gen, device=device, dtype=torch.float32)
                p.copy_(draw if p.dtype == torch.float8_e4m3fn else draw.mul_(0.02))
            else:
                p.fill_(1.0)


def keep_float32(model: nn.Module) -> None:
    """Parameters a module names in `float32_parameters` stay float32 whatever the model's dtype (routers the
    reference computes in float32: casting a bf16 weight up on every call was a kernel per layer and step)."""
    for module in model.modules():
        for name in getattr(module, "float32_parameters", ()):
            param = getattr(module, name)
            if param is not None:
                setattr(module, name, nn.Parameter(param.data.float(), requires_grad=False))


def load_model(model_cls, model_config, parallel, path: Path | None, backend, dtype: torch.dtype,
               device: torch.device, max_positions: int, progress: bool = False) -> nn.Module:
    """Builds the model without initialising its weights, then fills this rank's shards from the
    checkpoint (or with small random values for a random-weights folder: benchmarks of a shape)."""
    if is_random_weights(path):
        path = None
    with torch.device("meta"):
        model = model_cls(model_config, parallel, backend, max_positions, device)
    model = model.to_empty(device=device).to(dtype)
    keep_float32(model)
    block = block_size_of(model_config.hf)
    if path is None:
        if block is not None:
            random_block_fp8(model, block)
        fill_random(model, parallel.tp_rank, device)
    else:
        weights = iter_checkpoint(path, progress and parallel.is_first)
        if block is not None:  # FP8 blocks: kept as they are where the layer computes on them, else dequantised
            scales, names = read_scales(safetensors_files(path))
            kept = keep_block_fp8(model, scales, names, block)
            weights = block_fp8_weights(weights, scales, block, dtype, kept)
        with torch.no_grad():
            load_weights(model, weights)
    return model.eval()
