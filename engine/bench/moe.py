"""`python -m engine.bench.moe`: the fused MoE layer (router top-k + experts) on one GPU at decode and prefill
token counts, for a model's expert shape (default Qwen3-30B-A3B: 128 experts, hidden 2048, expert
intermediate 768, top 8). Prints µs per call and the weight bytes the call must read (the experts its tokens
hit) per second against the device's copy bandwidth. `--tune` sweeps block configs per token count and prints
the rows of kernels/triton/fused_moe_configs.py's table. `--weights fp8`: block-FP8 experts (E4M3, 128 x 128
block scales; the TUNED_FP8 table)."""
from __future__ import annotations

import argparse
import itertools
import sys

import torch

TOKENS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192]


def time_us(fn, iters: int = 20, graph: bool = True) -> float:
    """Median of CUDA-graph replays (what decode steps run), or of eager calls (DeepGEMM sizes its layout on
    the host, as prefill runs it)."""
    fn()
    torch.cuda.synchronize()
    run = fn
    if graph:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        run = g.replay
    times = []
    for _ in range(iters):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        run()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) * 1e3)
    return sorted(times)[len(times) // 2]


def candidates(fp8: bool = False):
    # FP8 experts step K by the scale block's 128 columns
    for bm, bn, bk, gm, warps, stages in itertools.product((16, 32, 64), (32, 64, 128, 256) if fp8 else (32, 64, 128),
                                                           (128,) if fp8 else (64, 128, 256), (1, 8), (4, 8),
                                                           (3, 4, 5) if fp8 else (3, 4)):
        if (bm * bk * 2 + bk * bn * (1 if fp8 else 2)) * stages > 160 * 1024:
            continue  # over the shared memory budget (bf16 activation and weight tiles, one per stage)
        if (bn == 32 or bk == 256) and (bm > 16 or warps > 4):
            continue  # narrow tiles and long K steps: for a few tokens (many programs, each a long weight stream)
        yield {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": gm, "num_warps": warps, "num_stages": stages}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m engine.bench.moe", description=__doc__)
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=768)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--shared", type=int, default=0,
                    help="shared experts stacked after the routed ones (every token's, weight 1: DeepSeek's)")
    ap.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    ap.add_argument("--tune", action="store_true")
    ap.add_argument("--block-m", default="16,32,64", help="the row tiles --tune tries (16 alone for a few tokens)")
    ap.add_argument("--weights", choices=("bf16", "fp8"), default="bf16",
                    help="fp8: E4M3 experts with 128 x 128 block scales")
    ap.add_argument("--backend", choices=("triton", "deep_gemm"), default="triton",
                    help="deep_gemm: DeepGEMM's grouped GEMM, timed eagerly (needs `deep_gemm`)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench moe needs a CUDA GPU", file=sys.stderr)
        return 2
    from engine.bench.skinny import time_calls
    from engine.bench.throughput import copy_bandwidth_gbs
    from kernels.moe import select_experts
    from kernels.triton import fused_moe
    E, H, I, k, S = args.experts, args.hidden, args.intermediate, args.top_k, args.shared
    # a decode step's layers each have their own shared experts: one set per rotation (below), so that they
    # come from HBM too; the kernel's table is keyed by E + S, the stack a layer has
    R = 16 if S else 1
    g = torch.Generator(device="cuda").manual_seed(0)
    fp8 = args.weights == "fp8"
    w13 = torch.randn(E + S * R, 2 * I, H, generator=g, device="cuda")
    w2 = torch.randn(E + S * R, H, I, generator=g, device="cuda")
    if fp8:  # standard normal E4M3 values and one scale per block, the bf16 draws' magnitude once dequantised
        scales = (torch.full((*w13.shape[:2], H // 128), H ** -0.5, device="cuda"),
                  torch.full((*w2.shape[:2], I // 128), I ** -0.5, device="cuda"), 128)
        w13, w2 = w13.to(torch.float8_e4m3fn), w2.to(torch.float8_e4m3fn)
    else:
        scales, w13, w2 = None, (w13 * H ** -0.5).bfloat16(), (w2 * I ** -0.5).bfloat16()
    expert_bytes = 3 * H * I * w13.element_size()
    bw = copy_bandwidth_gbs()
    print(f"device: {torch.cuda.get_device_name()}, copy bandwidth {bw:.0f} GB/s; experts {E}"
          f"{f' + {S} shared' if S else ''}, hidden {H}, intermediate {I}, top-{k}, {args.weights} experts, bf16 "
          f"activations, CUDA-graph replays")
    print("| tokens | experts hit | µs | weight GB/s (% of copy bw) | config (gate-up / down) |")
    print("|---|---|---|---|---|")
    tuned = []
    for T in map(int, args.tokens.split(",")):
        x = torch.randn(T, H, generator=g, device="cuda").bfloat16()
        logits = torch.randn(T, E, generator=g, device="cuda").bfloat16()
        shared = lambda r: torch.arange(E + r * S, E + (r + 1) * S, dtype=torch.int32, device="cuda").expand(T, S)

        def route():  # the router's top k, then the shared experts' slots (weight 1)
            w, i = select_experts(logits, k, True)
            return (torch.cat([w, torch.ones(T, S, device="cuda")], 1), torch.cat([i, shared(0)], 1)) if S else (w, i)

        weights, ids = route()
        hit = int(torch.unique(ids).numel())
        # a few tokens' experts fit in the L2 (8 of Qwen3's are 38 MB), and a decode step's layers never find
        # theirs there: the tuner times a rotation of disjoint expert sets, as many as the experts allow
        rotations = [torch.cat([(ids[:, :k] + r * k) % E, shared(r)], 1)
                     for r in range(max(1, min(16, E // max(hit, 1))))]
        rotated = lambda c, reps=20: time_calls([lambda r=r: fused_moe.fused_experts(x, w13, w2, weights, r, configs=c,
                                                                                   fp8_scales=scales)
                                                 for r in rotations], reps)  # µs per call
        if args.tune:
            # gate-up and down are tuned one after the other with a shared BLOCK_M
            results = []
            for bm in map(int, args.block_m.split(",")):
                # without the sort (a few pairs) the row tiles are the pairs: GROUP_M changes nothing
                ups = [c for c in candidates(fp8) if c["BLOCK_M"] == bm
                       and (T * (k + S) > fused_moe.DIRECT_MAX_PAIRS or c["GROUP_M"] == 1)]
                base = ups[0]
                up_best = min(ups, key=lambda c: rotated((c, base), 5))
                down_best = min(ups, key=lambda c: rotated((up_best, c), 5))
                results.append((rotated((up_best, down_best)), up_best, down_best))
            us, up, down = min(results, key=lambda r: r[0])
            tuned.append((T * (k + S), up, down))
            cfg = f"{up} / {down}"
        elif args.backend == "deep_gemm":
            from kernels.moe import deep_gemm_moe
            assert not fp8, "the DeepGEMM timing here is bf16's"
            us = time_us(lambda: deep_gemm_moe.fused_experts(x, w13, w2, *route()), graph=False)
            cfg = "DeepGEMM m_grouped_bf16_gemm_nt_contiguous"
        else:
            up, down = fused_moe.moe_configs(E + S, H, I, T * (k + S), fp8)  # the stack a layer has (w13: R sets)
            us = time_us(lambda: fused_moe.fused_experts(x, w13, w2, *route(), configs=(up, down), fp8_scales=scales))
            cfg = f"BLOCK_M {up['BLOCK_M']}, BLOCK_N {up['BLOCK_N']}/{down['BLOCK_N']}"
        gbs = hit * expert_bytes / (us * 1e-6) / 1e9
        print(f"| {T} | {hit} | {us:.1f} | {gbs:.0f} ({100 * gbs / bw:.0f}%) | {cfg} |", flush=True)
    if tuned:
        print(f"\n# {'TUNED_FP8' if fp8 else 'TUNED'}[({E + S}, {H}, {I})] = [")
        for pairs, up, down in tuned:
            print(f"    ({pairs}, {up}, {down}),")
        print("]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
