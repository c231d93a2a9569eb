"""The vision tower's input geometry, read once from the checkpoint (preprocessor_config.json beside
config.json's vision_config), and the front's half of preprocessing: resize an RGB image so that both sides
are multiples of patch_size x merge_size and its area lies within [min_pixels, max_pixels] (Qwen-VL's
smart_resize, bicubic as the reference processor), then count its placeholder tokens."""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.errors import InvalidRequestError
from engine.multimodal.inputs import ImageInput, content_hash

MAX_ASPECT_RATIO = 200


@dataclass(frozen=True)
class ImageProcessorConfig:
    patch_size: int
    temporal_patch_size: int
    merge_size: int
    min_pixels: int
    max_pixels: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]

    @classmethod
    def from_model(cls, vision_config, path: Path | None) -> "ImageProcessorConfig":
        """preprocessor_config.json where the checkpoint has one; the vision config's patch sizes otherwise."""
        pre = {}
        if path is not None and (path / "preprocessor_config.json").is_file():
            pre = json.loads((path / "preprocessor_config.json").read_text())
        size = pre.get("size") or {}
        merge = pre.get("merge_size", getattr(vision_config, "spatial_merge_size", 2))
        patch = pre.get("patch_size", getattr(vision_config, "patch_size", 16))
        return cls(patch_size=int(patch), temporal_patch_size=int(pre.get(
                       "temporal_patch_size", getattr(vision_config, "temporal_patch_size", 2))),
                   merge_size=int(merge),
                   min_pixels=int(pre.get("min_pixels") or size.get("shortest_edge") or 65536),
                   max_pixels=int(pre.get("max_pixels") or size.get("longest_edge") or 16777216),
                   image_mean=tuple(pre.get("image_mean", (0.5, 0.5, 0.5))),
                   image_std=tuple(pre.get("image_std", (0.5, 0.5, 0.5))))

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        """smart_resize: (height, width) multiples of `factor`, area within the pixel limits, aspect kept."""
        if max(height, width) / max(1, min(height, width)) > MAX_ASPECT_RATIO:
            raise InvalidRequestError(f"an image's aspect ratio must be below {MAX_ASPECT_RATIO}, got "
                                      f"{width}x{height}", param="image_url")
        f = self.factor
        h_bar, w_bar = round(height / f) * f, round(width / f) * f
        if h_bar * w_bar > self.max_pixels:
            beta = math.sqrt(height * width / self.max_pixels)
            h_bar = max(f, math.floor(height / beta / f) * f)
            w_bar = max(f, math.floor(width / beta / f) * f)
        elif h_bar * w_bar < self.min_pixels:
            beta = math.sqrt(self.min_pixels / (height * width))
            h_bar, w_bar = math.ceil(height * beta / f) * f, math.ceil(width * beta / f) * f
        return h_bar, w_bar

    def num_tokens(self, grid_thw: tuple[int, int, int]) -> int:
        return grid_thw[0] * grid_thw[1] * grid_thw[2] // self.merge_size ** 2

    def process(self, image) -> ImageInput:
        """A PIL image, or an image file's path (as SGLang's offline API takes them) -> an ImageInput (resized
        uint8 RGB pixels, grid, token count, content hash) that engine.multimodal.inputs.expand_placeholders
        places in the prompt."""
        from PIL import Image
        if isinstance(image, (str, os.PathLike)):
            try:
                with Image.open(image) as opened:
                    image = opened.convert("RGB")
            except OSError as e:  # a missing file, or one PIL cannot decode (UnidentifiedImageError)
                raise InvalidRequestError(f"image file {str(image)!r} could not be read: {e}",
                                          param="multi_modal_data") from e
        image = image.convert("RGB")
        h, w = self.target_size(image.height, image.width)
        if (h, w) != (image.height, image.width):
            image = image.resize((w, h), Image.Resampling.BICUBIC)
        pixels = np.asarray(image, dtype=np.uint8)
        grid = (1, h // self.patch_size, w // self.patch_size)
        return ImageInput(content_hash=content_hash(pixels, grid), offset=0, num_tokens=self.num_tokens(grid),
                          grid_thw=grid, height=h, width=w, pixels=pixels.tobytes())


def place_images(token_ids: list[int], images: list, cfg: ImageProcessorConfig, image_token_id: int
                 ) -> tuple[list[int], list]:
    """A tokenised prompt with one placeholder token per image (PIL images, in prompt order) -> the prompt with
    each placeholder repeated to its image's token count, and the ImageInputs at their offsets."""
    from engine.multimodal.inputs import expand_placeholders
    return expand_placeholders(token_ids, image_token_id, [cfg.process(img) for img in images])
