"""Block-FP8 checkpoints as DeepSeek-V3 ships them, made from a tiny model: E4M3 weights with one float32 scale
per block (`weight_scale_inv`), and the same weights dequantised into a plain checkpoint for the oracle."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch


def quantize_block_fp8(w: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The checkpoint's scheme: per block, scale = amax / 448 (edge blocks of uneven shapes are partial)."""
    n, k = w.shape
    pn, pk = -(-n // block) * block, -(-k // block) * block
    padded = torch.nn.functional.pad(w.float(), (0, pk - k, 0, pn - n))
    blocks = padded.reshape(pn // block, block, pk // block, block)
    scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / 448.0
    q = (blocks / scale[:, None, :, None]).reshape(pn, pk)[:n, :k].to(torch.float8_e4m3fn)
    return q, scale


def write_block_fp8_copy(src: Path, root: Path, block: int) -> tuple[Path, Path]:
    """(FP8 copy, dequantised copy) of `src`: every projection (`*_proj.weight`, `*_proj_with_mqa.weight`) in
    block x block FP8 blocks."""
    from safetensors.torch import load_file, save_file
    from engine.models.fp8_checkpoint import dequantize_block_fp8
    fp8_dir, ref_dir = root / "fp8", root / "dequantized"
    for d in (fp8_dir, ref_dir):
        shutil.copytree(src, d)
    tensors = load_file(str(src / "model.safetensors"))
    fp8, ref = {}, {}
    for name, w in tensors.items():
        if name.endswith("_proj.weight") or name.endswith("_proj_with_mqa.weight"):
            q, scale = quantize_block_fp8(w, block)
            fp8[name], fp8[name + "_scale_inv"] = q, scale
            ref[name] = dequantize_block_fp8(q, scale, (block, block)).to(w.dtype)
        else:
            fp8[name] = ref[name] = w
    save_file(fp8, str(fp8_dir / "model.safetensors"))
    save_file(ref, str(ref_dir / "model.safetensors"))
    config = json.loads((fp8_dir / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": [block, block]}
    (fp8_dir / "config.json").write_text(json.dumps(config))
    return fp8_dir, ref_dir


def fused_experts_fp8_ref(x: torch.Tensor, w13: torch.Tensor, w13_scale: torch.Tensor, w2: torch.Tensor,
                          w2_scale: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, block_k: int,
                          quantize_activations: bool = True) -> torch.Tensor:
    """What the FP8 fused MoE computes, in torch: the weights dequantised, the activations quantised per row and
    block_k columns (by the kernels' own quantiser) before each GEMM or (W8A16) rounded to fp16 as the kernel
    multiplies them; float32 products."""
    import torch.nn.functional as F
    from kernels.linear import dequantize_block_fp8_rows as dq
    from kernels.triton.fp8_gemm import quantize_per_token_group
    qdq = ((lambda t: dq(*quantize_per_token_group(t, block_k), block_k)) if quantize_activations
           else lambda t: t.half().float())
    xq, out = qdq(x), torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for t, j in torch.cartesian_prod(torch.arange(ids.shape[0]), torch.arange(ids.shape[1])).tolist():
        e = int(ids[t, j])
        gate, up = (xq[t] @ dq(w13[e], w13_scale[e], block_k).t()).to(x.dtype).float().chunk(2)
        act = qdq((F.silu(gate) * up).to(x.dtype)[None])[0]
        out[t] += (act @ dq(w2[e], w2_scale[e], block_k).t()) * weights[t, j]
    return out.to(x.dtype)


def check_triton_kernels(device: str = "cpu") -> float:
    """The block-FP8 GEMM, the skinny GEMM on E4M3 weights and the FP8 fused MoE (W8A8 and W8A16) against torch
    computing the same (activations quantised by the kernels' quantiser, whose FP8 cast Triton's interpreter
    does not round as the hardware does: the GPU tests check it), small float32 shapes with 32-column blocks;
    runs on the CPU under TRITON_INTERPRET=1 in a fresh process. Returns the largest relative error."""
    from kernels.linear import dequantize_block_fp8_rows as dq
    from kernels.triton.fp8_gemm import block_fp8_matmul, quantize_per_token_group
    from kernels.triton.fused_moe import fused_experts
    from kernels.triton.skinny_gemm import skinny_gemm
    g = torch.Generator().manual_seed(0)
    rel = lambda a, b: float((a - b).norm() / b.norm())
    x, w = torch.randn(9, 96, generator=g), torch.randn(40, 96, generator=g)
    (xq, xs), (wq, ws) = quantize_per_token_group(x, 32), quantize_per_token_group(w, 32)
    got = block_fp8_matmul(xq.to(device), xs.to(device), wq.to(device), ws.to(device), torch.float32, 32).cpu()
    worst = rel(got, dq(xq, xs, 32) @ dq(wq, ws, 32).t())
    # decode rows on E4M3 weights: 16-column K steps inside the 32-column blocks, K split 3 ways (the fix-up)
    got = skinny_gemm(x[:3].to(device), wq.to(device), None, 3, BN=8, BK=16, BM=16, num_stages=1,
                      scale=ws.to(device), block_k=32).cpu()
    worst = max(worst, rel(got, x[:3].half().float() @ dq(wq, ws, 32).t()))  # the kernel multiplies in fp16
    # past 16 rows (32-row tiles, the last one partial), split and not
    xs_ = torch.randn(40, 96, generator=g)
    bias = torch.randn(40, generator=torch.Generator().manual_seed(1))  # g's draws below stay as they were
    for split in (1, 3):
        got = skinny_gemm(xs_.to(device), wq.to(device), bias.to(device), split, BN=8, BK=32, BM=32, num_stages=1,
                          scale=ws.to(device), block_k=32).cpu()
        worst = max(worst, rel(got, xs_.half().float() @ dq(wq, ws, 32).t() + bias))
    # 4 experts, hidden 64, intermediate 32; 5 tokens, top 2
    w13, w2 = torch.randn(4, 64, 64, generator=g) * 0.2, torch.randn(4, 64, 32, generator=g) * 0.2
    (w13q, w13s), (w2q, w2s) = [quantize_per_token_group(t.flatten(0, 1), 32) for t in (w13, w2)]
    w13q, w13s, w2q, w2s = w13q.view(4, 64, 64), w13s.view(4, 64, 2), w2q.view(4, 64, 32), w2s.view(4, 64, 1)
    cfg = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=1, num_warps=4, num_stages=1)
    for T in (5, 12):  # 10 pairs take the direct path, 24 the sorted one (kernels/triton/fused_moe.py)
        h = torch.randn(T, 64, generator=g)
        ids = torch.stack([torch.randperm(4, generator=g)[:2] for _ in range(T)]).to(torch.int32)
        weights = torch.rand(T, 2, generator=g)
        for quant in (True, False):
            got = fused_experts(h, w13q, w2q, weights, ids, None, configs=(cfg, cfg), fp8_scales=(w13s, w2s, 32),
                                quantize_activations=quant)
            want = fused_experts_fp8_ref(h, w13q, w13s, w2q, w2s, weights, ids, 32, quant)
            worst = max(worst, rel(got, want))
    return worst
