"""`slipstream bench attention`: the decode attention kernels alone, at the throughput benchmark's shapes
(Qwen3-0.6B: 16 query heads, 8 KV heads, head_dim 128, 16-token pages scattered over a 28-layer pool),
bf16 and FP8 pages, batch 1..256. Each kernel is timed as CUDA-graph replays (no launch overhead):
FlashInfer's CUDA-core decode against the Triton GQA kernel (kernels/triton/decode_attention.py) and,
for FP8 pages on Hopper, FlashInfer's XQA (kernels/attention/xqa_decode.py), with achieved GB/s (KV bytes
read / time) against the device's measured copy bandwidth, and each kernel's error against an fp32
reference over the same (dequantised) pages."""
from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

SHAPES = [(256, 100, 1200), (128, 300, 1500), (64, 500, 1800), (32, 500, 2000), (16, 500, 2000), (4, 500, 2000),
          (1, 258, 258), (1, 2000, 2000)]  # (batch, min, max context)


def graph_time_us(fn, n: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(n):
            fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / (2 * n) * 1e3


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="slipstream bench attention", description=__doc__)
    ap.add_argument("--layers", type=int, default=28, help="layers of the pool the pages are scattered over")
    ap.add_argument("--num-blocks", type=int, default=12000)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench attention needs a CUDA GPU", file=sys.stderr)
        return 2
    import flashinfer
    from engine.bench.throughput import copy_bandwidth_gbs
    from kernels.attention.metadata import AttentionMetadata
    from kernels.attention.torch_ref import paged_attention
    from kernels.attention.xqa_decode import XqaDecode, xqa_fp8_supported
    from kernels.triton.decode_attention import decode_attention
    H, KVH, D, BS = 16, 8, 128, 16
    bandwidth = copy_bandwidth_gbs()
    dev = torch.device("cuda")
    workspace = torch.zeros(256 << 20, dtype=torch.uint8, device=dev)
    rows = []
    for kv_dtype in (torch.bfloat16, torch.float8_e4m3fn):
        torch.manual_seed(0)
        pool = (torch.randn(args.num_blocks, args.layers, 2, BS, KVH, D, device=dev, dtype=torch.bfloat16) * 0.5
                ).to(kv_dtype)
        cache = pool[:, args.layers // 2]
        rng = np.random.default_rng(0)
        for B, lo, hi in SHAPES:
            lens = rng.integers(lo, hi + 1, B).astype(np.int32)
            pages = (lens + BS - 1) // BS
            indices = rng.permutation(args.num_blocks)[:pages.sum()].astype(np.int32)
            indptr = np.zeros(B + 1, np.int32)
            np.cumsum(pages, out=indptr[1:])
            tables = np.zeros((B, int(pages.max())), np.int32)
            tables[np.arange(tables.shape[1])[None] < pages[:, None]] = indices
            q = torch.randn(B, H, D, device=dev, dtype=torch.bfloat16)
            i32 = dict(dtype=torch.int32, device=dev)
            wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
                workspace, "NHD", use_cuda_graph=True, use_tensor_cores=False,
                paged_kv_indptr_buffer=torch.zeros(B + 1, **i32),
                paged_kv_indices_buffer=torch.zeros(len(indices), **i32),
                paged_kv_last_page_len_buffer=torch.zeros(B, **i32))
            t = torch.from_numpy
            wrapper.plan(t(indptr), t(indices), t((lens - (pages - 1) * BS).astype(np.int32)), H, KVH, D, BS,
                         sm_scale=D ** -0.5, q_data_type=torch.bfloat16, kv_data_type=kv_dtype)
            seq_lens, block_tables = t(lens).to(dev), t(tables).to(dev)
            meta = AttentionMetadata(slot_mapping=torch.empty(0, dtype=torch.int64, device=dev),
                                     cu_seqlens_q=torch.arange(B + 1, dtype=torch.int32, device=dev),
                                     seq_lens=seq_lens, block_tables=block_tables, max_seqlen_q=1,
                                     max_seqlen_k=int(lens.max()), block_size=BS, is_decode=True)
            ref = paged_attention(q.float(), cache, meta, D ** -0.5)  # fp32 over the (dequantised) pages
            kernels = {"FlashInfer": lambda: wrapper.run(q, cache),
                       "Triton": lambda: decode_attention(q, cache, seq_lens, block_tables, D ** -0.5)}
            if xqa_fp8_supported(dev, q.dtype, kv_dtype, BS, D):
                xqa, out = XqaDecode(dev, KVH, D, BS), torch.empty_like(q)
                kernels["XQA"] = lambda: xqa(q, cache, seq_lens, block_tables, out, D ** -0.5)
            kv_bytes = int(lens.sum()) * KVH * D * 2 * pool.element_size()
            cells = {}
            for name, fn in kernels.items():
                err = float((fn().float() - ref).norm() / ref.norm())
                us = graph_time_us(fn)
                cells[name] = f"{us:.1f} ({kv_bytes / us / 1e3:.0f}, {kv_bytes / us / 1e3 / bandwidth:.0%}; {err:.0e})"
            rows.append((str(kv_dtype).removeprefix("torch."), B, int(lens.sum()), cells))
            print(f"[{rows[-1][0]} B={B}] {cells}", file=sys.stderr, flush=True)
        # frees this dtype's pool before the next (rebound, not deleted: the kernels above close over cache)
        pool = cache = None
        torch.cuda.empty_cache()
    print(f"\ndevice: {torch.cuda.get_device_name()}; copy bandwidth {bandwidth:.0f} GB/s; one layer, "
          f"{H} q heads / {KVH} KV heads / head_dim {D}, {BS}-token pages scattered over a {args.layers}-layer pool")
    print("cells: us per layer (GB/s, % of copy bandwidth; relative error against the fp32 reference)")
    names = ["FlashInfer", "Triton", "XQA"]
    print("\n| KV | batch | KV tokens | " + " | ".join(names) + " |")
    print("|---|---|---|" + "---|" * len(names))
    for kv, B, n, cells in rows:
        print(f"| {kv} | {B} | {n} | " + " | ".join(cells.get(k, "") for k in names) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
