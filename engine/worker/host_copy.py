"""Host -> device copies of per-step arrays: several flat arrays of one dtype in one pinned, asynchronous copy."""
from __future__ import annotations

import numpy as np
import torch


def to_device(arrays: list[np.ndarray], dtype, device: torch.device) -> list[torch.Tensor]:
    """One host->device copy (pinned, asynchronous on CUDA) for several flat arrays of one dtype. Each
    array starts 16-byte aligned in the flat buffer: Triton specialises kernels on pointer alignment,
    and an odd-length neighbour must not trigger a recompile in the middle of serving."""
    step = 16 // np.dtype(dtype).itemsize
    sizes = [a.size for a in arrays]
    starts = np.cumsum([0] + [-(-n // step) * step for n in sizes])
    flat = np.zeros(int(starts[-1]), dtype)
    for a, start, n in zip(arrays, starts, sizes):
        flat[start:start + n] = a.reshape(-1)
    flat = torch.from_numpy(flat)
    if device.type == "cuda":
        flat = flat.pin_memory().to(device, non_blocking=True)
    return [flat[start:start + a.size].view(a.shape) for a, start in zip(arrays, starts.tolist())]
