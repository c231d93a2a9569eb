"""The device half of image preprocessing: uint8 RGB -> rescaled, normalised float patches
[grid_t * grid_h * grid_w, 3 * temporal_patch_size * patch_size**2] in the order the vision tower reads them
(patches of one merge window adjacent), the still image repeated over the temporal patch, as the reference
processor lays them out."""
from __future__ import annotations

import torch

from engine.multimodal.inputs import ImageInput
from engine.multimodal.processor import ImageProcessorConfig


def image_patches(image: ImageInput, cfg: ImageProcessorConfig, device: torch.device) -> torch.Tensor:
    x = torch.frombuffer(bytearray(image.pixels), dtype=torch.uint8).to(device)
    x = x.view(image.height, image.width, 3).permute(2, 0, 1).float()
    mean = torch.tensor(cfg.image_mean, dtype=torch.float32, device=device)[:, None, None]
    std = torch.tensor(cfg.image_std, dtype=torch.float32, device=device)[:, None, None]
    x = (x * (1 / 255) - mean) / std
    p, m, tp = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
    gh, gw = image.height // p, image.width // p
    x = x.reshape(3, gh // m, m, p, gw // m, m, p).permute(1, 4, 2, 5, 0, 3, 6)
    x = x.unsqueeze(5).expand(*x.shape[:5], tp, p, p)
    return x.reshape(gh * gw, 3 * tp * p * p)
