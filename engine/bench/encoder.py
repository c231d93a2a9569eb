"""`slipstream bench encoder`: the Qwen3-VL vision tower alone (what the encoder role and a hybrid engine's
prefill run per image), random weights at a real model's vision shape (default Qwen3-VL-8B: 27 blocks, width
1152, 16 heads, 2x2 merge into 4096), on one GPU. Per image size and batch: images/s, vision tokens/s (after
the merge), and the achieved TFLOP/s of the tower's matmuls and attention against the device's bf16 peak.
The device half of preprocessing (normalise, patchify) is inside the timing; decoding and resizing (the
front's half) are not."""
from __future__ import annotations

import argparse
import sys
import time
from types import SimpleNamespace

import numpy as np
import torch

SHAPES = {
    "qwen3-vl-8b": dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, patch_size=16,
                        spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=4096, in_channels=3,
                        num_position_embeddings=2304, deepstack_visual_indexes=[8, 16, 24],
                        hidden_act="gelu_pytorch_tanh"),
    "qwen3-vl-2b": dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, patch_size=16,
                        spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=2048, in_channels=3,
                        num_position_embeddings=2304, deepstack_visual_indexes=[5, 11, 17],
                        hidden_act="gelu_pytorch_tanh"),
}
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0}


def tower_flops(v, patches: int, lengths: list[int]) -> float:
    h, i, m = v.hidden_size, v.intermediate_size, v.spatial_merge_size ** 2
    per_block = 2 * patches * (4 * h * h + 2 * h * i) + sum(4 * n * n * h for n in lengths)
    merged = patches // m
    mergers = (1 + len(v.deepstack_visual_indexes)) * 2 * merged * (h * m * h * m + h * m * v.out_hidden_size)
    embed = 2 * patches * h * 3 * v.temporal_patch_size * v.patch_size ** 2
    return v.depth * per_block + mergers + embed


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="slipstream bench encoder", description=__doc__)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="qwen3-vl-8b")
    ap.add_argument("--sizes", default="448,1024", help="square image sides, pixels")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--iters", type=int, default=5)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench encoder needs a CUDA GPU", file=sys.stderr)
        return 2
    from engine.models.qwen3_vl import Qwen3VLVisionModel
    from engine.multimodal.inputs import ImageInput
    from engine.multimodal.patches import image_patches
    from engine.multimodal.processor import ImageProcessorConfig
    v = SimpleNamespace(**SHAPES[args.shape])
    dev = torch.device("cuda")
    torch.manual_seed(0)
    with torch.device(dev):
        tower = Qwen3VLVisionModel(v).to(torch.bfloat16).eval()
    cfg = ImageProcessorConfig(v.patch_size, v.temporal_patch_size, v.spatial_merge_size, 65536, 16777216,
                               (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    name = torch.cuda.get_device_name()
    peak = next((p for k, p in BF16_PEAK_TFLOPS.items() if k in name), None)
    print(f"# {args.shape} vision tower, bf16, random weights, {name}, torch {torch.__version__}")
    print(f"# images/s include normalise + patchify on the device; peak bf16 = {peak} TFLOP/s (dense)")
    print("| image | vision tokens/image | batch | ms/batch | images/s | vision tokens/s | TFLOP/s | % of peak |")
    print("|---|---|---|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    for side in map(int, args.sizes.split(",")):
        h, w = cfg.target_size(side, side)
        grid = (1, h // v.patch_size, w // v.patch_size)
        for batch in map(int, args.batches.split(",")):
            images = [ImageInput(content_hash=str(k), offset=0, num_tokens=cfg.num_tokens(grid), grid_thw=grid,
                                 height=h, width=w, pixels=rng.integers(0, 256, (h, w, 3), np.uint8).tobytes())
                      for k in range(batch)]

            def run():
                patches = torch.cat([image_patches(img, cfg, dev) for img in images])
                return tower(patches, [grid] * batch)

            with torch.inference_mode():
                run()
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                for _ in range(args.iters):
                    run()
                torch.cuda.synchronize()
            ms = (time.perf_counter() - t0) / args.iters * 1e3
            patches = batch * grid[1] * grid[2]
            tflops = tower_flops(v, patches, [grid[1] * grid[2]] * batch) / (ms / 1e3) / 1e12
            pct = f"{100 * tflops / peak:.0f}%" if peak else "-"
            print(f"| {side}x{side} (as {w}x{h}) | {cfg.num_tokens(grid)} | {batch} | {ms:.1f} | "
                  f"{batch / ms * 1e3:.1f} | {batch * cfg.num_tokens(grid) / ms * 1e3:,.0f} | {tflops:.0f} | {pct} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
