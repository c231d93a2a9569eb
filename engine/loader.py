"""Checkpoint loading: a Hugging Face folder (config.json + safetensors, single or sharded) into our model."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open
from tqdm import tqdm

from engine.errors import UnsupportedModelError

# a checkpoint folder holding config.json and this file (no weights) loads with random weights:
# throughput benchmarks of a model shape need no real weights
RANDOM_WEIGHTS_MARKER = "slipstream_random_weights"


def load_hf_config(path: Path):
    from transformers import AutoConfig
    if not (path / "config.json").is_file():
        raise UnsupportedModelError(f"{path} is not a Hugging Face checkpoint folder (no config.json)", param="model")
    return AutoConfig.from_pretrained(str(path))


def checkpoint_dtype(hf_config) -> torch.dtype:
    dtype = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None) or torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [path / name for name in sorted(set(weight_map.values()))]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise UnsupportedModelError(f"no .safetensors weights in {path}", param="model")
    return files


def iter_weights(path: Path, progress: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    files = safetensors_files(path)
    for file in tqdm(files, desc="loading weights", unit="file", disable=not progress or len(files) < 1):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def load_model(model_cls, hf_config, path: Path | None, backend, dtype: torch.dtype, device: torch.device,
               max_positions: int, progress: bool = False) -> torch.nn.Module:
    """Builds the model without initialising its weights, then fills them from the checkpoint
    (or with small random values when `path` is None: throughput runs need no real weights)."""
    if path is not None and (path / RANDOM_WEIGHTS_MARKER).is_file():
        path = None
    with torch.device("meta"):
        model = model_cls(hf_config, backend, max_positions, device)
    model = model.to_empty(device=device).to(dtype)
    if path is None:
        # drawn where the weights live: a 0.6B model's draws take seconds on a CPU, milliseconds on a GPU
        gen = torch.Generator(device=device).manual_seed(0)
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() > 1:
                    p.copy_(torch.randn(p.shape, generator=gen, device=device, dtype=torch.float32).mul_(0.02))
                else:
                    p.fill_(1.0)
    else:
        model.load_weights(iter_weights(path, progress))
    return model.eval()
