"""The vision tower alone: built from the checkpoint's vision config and filled with its `model.visual.*`
weights (the decoder's are never read), plus the device half of preprocessing."""
from __future__ import annotations

from pathlib import Path

import torch

from engine.errors import UnsupportedModelError
from engine.models.config import load_model_config
from engine.multimodal.inputs import ImageInput
from engine.multimodal.patches import image_patches
from engine.multimodal.processor import ImageProcessorConfig
from engine.multimodal.step import join_rows

PREFIX = "model.visual."


class VisionEncoder:
    def __init__(self, path: Path, device: torch.device, dtype: torch.dtype, progress: bool = False):
        from engine.models.qwen3_vl import Qwen3VLVisionModel
        from engine.models.weights import fill_random, is_random_weights, iter_checkpoint, load_weights
        cfg = load_model_config(path)
        if cfg.vision is None or "Qwen3VLForConditionalGeneration" not in cfg.architectures:
            raise UnsupportedModelError(f"{path} has no vision tower the encoder supports (Qwen3-VL)", param="model")
        self.config, self.device, self.dtype = cfg, device, dtype
        self.processor = ImageProcessorConfig.from_model(cfg.vision, path)
        with torch.device("meta"):
            tower = Qwen3VLVisionModel(cfg.vision)
        tower = tower.to_empty(device=device).to(dtype)
        if is_random_weights(path):  # a shape-only checkpoint (benchmarks)
            fill_random(tower, 0, device)
        else:
            weights = ((name[len(PREFIX):], t) for name, t in iter_checkpoint(path, progress)
                       if name.startswith(PREFIX))
            with torch.no_grad():
                load_weights(tower, weights)
        self.tower = tower.eval()
        self.row_width = cfg.hidden_size * (1 + len(cfg.vision.deepstack_visual_indexes))

    @torch.inference_mode()
    def encode(self, images: list[ImageInput]) -> list[torch.Tensor]:
        """Each image's rows [num_tokens, row_width] (embedding, then deepstack features), on the host."""
        patches = torch.cat([image_patches(img, self.processor, self.device) for img in images])
        embeds, deepstack = self.tower(patches, [tuple(img.grid_thw) for img in images])
        rows = join_rows(embeds, deepstack).to("cpu")
        return list(rows.split([img.num_tokens for img in images]))
