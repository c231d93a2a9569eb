"""A step's image inputs on the device (`MultiModalStep`, what a multimodal model's forward takes), built from
the step's image parts: each image's embeddings come from the runner's encoder cache or are encoded now, all
images missing from the cache in one vision-tower call."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from engine.multimodal.inputs import StepImage
from engine.multimodal.patches import image_patches
from engine.multimodal.processor import ImageProcessorConfig
from engine.worker.encoder_cache import EncoderCache, ImageEmbedding
from engine.worker.host_copy import to_device


@dataclass
class MultiModalStep:
    """The fed-token rows that are image placeholders, the embeddings that replace them and the deepstack
    features added after the first decoder layers; and, when the step feeds image tokens, every token's
    (time, height, width) rope positions."""

    rows: torch.Tensor  # [M] int64
    embeds: torch.Tensor  # [M, hidden]
    deepstack: list[torch.Tensor]  # per tapped vision block: [M, hidden]
    mrope_positions: torch.Tensor | None  # [3, T] int64


def encode_missing(model, parts: list[StepImage], cache: EncoderCache, cfg: ImageProcessorConfig,
                   device: torch.device) -> dict[str, ImageEmbedding]:
    """The embeddings of every image the step feeds, encoding those the cache lacks."""
    keys = {p.image.content_hash for p in parts}
    found, todo = {}, {}
    for p in parts:
        key = p.image.content_hash
        if key not in found and key not in todo:
            entry = cache.get(key)
            if entry is None:
                todo[key] = p.image
            else:
                found[key] = entry
    for key, img in list(todo.items()):  # EPD: an encoder server computed these rows
        if img.embedding:
            rows = torch.frombuffer(bytearray(img.embedding), dtype=getattr(torch, img.embedding_dtype))
            found[key] = split_rows(rows.view(img.num_tokens, -1).to(device), model.num_deepstack)
            cache.put(key, found[key], keys)
            del todo[key]
    if todo:
        images = list(todo.values())
        patches = torch.cat([image_patches(img, cfg, device) for img in images])
        embeds, deepstack = model.encode_images(patches, [tuple(img.grid_thw) for img in images])
        sizes = [img.num_tokens for img in images]
        split_ds = [d.split(sizes) for d in deepstack]
        for i, (key, e) in enumerate(zip(todo, embeds.split(sizes))):
            found[key] = ImageEmbedding(e, [d[i] for d in split_ds])
            cache.put(key, found[key], keys)
    return found


def join_rows(embeds: torch.Tensor, deepstack: list[torch.Tensor]) -> torch.Tensor:
    """One row per image token: its embedding, then its deepstack features (what an encoder server ships)."""
    return torch.cat([embeds, *deepstack], dim=-1)


def split_rows(rows: torch.Tensor, taps: int) -> ImageEmbedding:
    parts = rows.chunk(1 + taps, dim=-1)
    return ImageEmbedding(parts[0], list(parts[1:]))


def build_step(model, parts: list[StepImage], mrope_positions: np.ndarray | None, cache: EncoderCache,
               cfg: ImageProcessorConfig, device: torch.device) -> MultiModalStep | None:
    if not parts and mrope_positions is None:
        return None
    pos3 = to_device([np.ascontiguousarray(mrope_positions)], np.int64, device)[0] if mrope_positions is not None else None
    if not parts:
        empty = torch.zeros(0, dtype=torch.int64, device=device)
        return MultiModalStep(empty, torch.zeros(0, 1, device=device), [], pos3)
    found = encode_missing(model, parts, cache, cfg, device)
    rows = np.concatenate([np.arange(p.row, p.row + p.length) for p in parts])
    take = lambda get: torch.cat([get(found[p.image.content_hash])[p.start:p.start + p.length] for p in parts])
    depth = len(found[parts[0].image.content_hash].deepstack)
    return MultiModalStep(to_device([rows], np.int64, device)[0], take(lambda e: e.embeds),
                          [take(lambda e, k=k: e.deepstack[k]) for k in range(depth)], pos3)
