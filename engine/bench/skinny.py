"""`python -m engine.bench.skinny`: the skinny split-K GEMM (kernels/triton/skinny_gemm.py) on the decode
projections of the MoE models' shapes, at 1 and 16 rows: µs per call and the weight bytes read per second
against the device's copy bandwidth, beside cuBLAS. Each call reads a different copy of the weights (enough
copies to pass the L2), as a decode step's layers do, and the calls replay in one CUDA graph.

`--tune` sweeps the configs (column tile, K step, K split, warps, stages) and prints, per shape, the best one
for up to 4 rows and for up to 16; `--write` puts them into kernels/triton/skinny_configs.py's table.
`--weights fp8`: block-FP8 weights (E4M3, 128 x 128 block scales, as FP8 checkpoints ship them) and their
table, TUNED_FP8."""
from __future__ import annotations

import argparse
import itertools
import re
import sys
from pathlib import Path

import torch

# (N, K) of the decode projections: Qwen3-30B-A3B (qkv, o_proj, router), Moonlight-16B-A3B (MLA's query and
# latent projections in one, o_proj, shared experts' gate-up and down, the dense first layer's gate-up and down)
SHAPES = [(5120, 2048), (2048, 4096), (128, 2048), (3648, 2048), (2048, 2048), (5632, 2048), (2048, 2816),
          (22528, 2048), (2048, 11264)]
ROWS = (1, 16)
TABLE = lambda name: re.compile(rf"^{name}: dict.*?^}}\n", re.S | re.M)


def time_calls(fns, reps: int = 7) -> float:
    """µs per call: the median of `reps` replays of one CUDA graph holding all the calls."""
    for fn in fns:
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in fns:
            fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / len(fns))
    return sorted(times)[reps // 2]


def candidates(n: int, k: int, fp8: bool = False):
    from kernels.triton.skinny_configs import ROW_TILE, SkinnyConfig, fits_workspace
    for bn, bk, warps, stages, split in itertools.product((16, 32, 64, 128), (64, 128) if fp8 else (128, 256),
                                                          (4, 8), (3, 4, 6) if fp8 else (3, 4), (1, 2, 4, 8, 16)):
        if (warps == 8 and bn < 128) or n % bn or k % (split * bk) or not fits_workspace(n // bn, split, bn):
            continue
        if (bn * bk + bk * ROW_TILE) * 2 * stages > 200 * 1024:
            continue  # the shared memory budget (bf16 tiles, one per stage)
        yield SkinnyConfig(bn, bk, split, warps, stages)


def run(shapes, tune: bool, bandwidth: float, fp8: bool = False) -> dict:
    from kernels.linear import dequantize_block_fp8_rows, skinny_config
    from kernels.triton.skinny_gemm import skinny_gemm
    best: dict = {}
    print("| N x K | rows | cuBLAS µs | skinny µs (GB/s, % of copy bw) | config (BN, BK, S, warps, stages) |")
    print("|---|---|---|---|---|")
    for n, k in shapes:
        nbytes = n * k * (1 if fp8 else 2)
        copies = max(4, -(-300_000_000 // nbytes))
        if fp8:  # standard normal E4M3 values, scales of 0.02 (as `bench throughput --weights fp8` draws them)
            weights = [torch.randn(n, k, device="cuda").to(torch.float8_e4m3fn) for _ in range(copies)]
            scale = torch.full((n, k // 128), 0.02, device="cuda")
            dense = dequantize_block_fp8_rows(weights[0], scale, 128).bfloat16()
        else:
            weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
            scale, dense = None, weights[0]
        for m in ROWS:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            want = (x.float() @ dense.float().t())
            # cuBLAS has no block-FP8 GEMM: its column is bf16's
            cublas = "-" if fp8 else f"{time_calls([lambda w=w: torch.nn.functional.linear(x, w) for w in weights]):.2f}"
            configs = list(candidates(n, k, fp8)) if tune else [skinny_config(m, n, k, torch.bfloat16, fp8)]
            timed = []
            for cfg in configs:
                call = lambda w, cfg=cfg: skinny_gemm(x, w, None, cfg.S, BN=cfg.BN, BK=cfg.BK, BM=16,
                                                      num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                                                      scale=scale, block_k=128 if fp8 else 0)
                err = float((call(weights[0]).float() - want).abs().max() / want.abs().max())
                assert err < 2e-2, f"{n}x{k} {cfg}: relative error {err}"
                timed.append((time_calls([lambda w=w: call(w) for w in weights]), cfg))
            us, cfg = min(timed)
            best[(n, k, m)] = cfg
            gbs = nbytes / us / 1e3
            print(f"| {n} x {k} | {m} | {cublas} | {us:.2f} ({gbs:,.0f}, {100 * gbs / bandwidth:.0f} %) | "
                  f"{tuple(cfg)} |", flush=True)
        del weights
    return best


def table_source(best: dict, name: str) -> str:
    rows = {}
    for (n, k, m), cfg in sorted(best.items()):
        rows.setdefault((n, k), []).append((4 if m < 16 else 16, cfg))
    lines = [f"{name}: dict[tuple[int, int], tuple[tuple[int, SkinnyConfig], ...]] = {{"]
    for (n, k), entries in rows.items():
        body = ", ".join(f"({r}, SkinnyConfig({c.BN}, {c.BK}, {c.S}, {c.num_warps}, {c.num_stages}))"
                         for r, c in entries)
        lines.append(f"    ({n}, {k}): ({body}),")
    return "\n".join(lines) + "\n}\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m engine.bench.skinny", description=__doc__)
    ap.add_argument("--shapes", default=",".join(f"{n}x{k}" for n, k in SHAPES), help="NxK,... (bf16 weights)")
    ap.add_argument("--tune", action="store_true")
    ap.add_argument("--write", action="store_true", help="with --tune: update kernels/triton/skinny_configs.py")
    ap.add_argument("--weights", choices=("bf16", "fp8"), default="bf16",
                    help="fp8: E4M3 weights with 128 x 128 block scales (the TUNED_FP8 table)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("the skinny GEMM benchmark needs a GPU", file=sys.stderr)
        return 2
    from engine.bench.throughput import copy_bandwidth_gbs
    bandwidth = copy_bandwidth_gbs()
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    fp8 = args.weights == "fp8"
    print(f"device: {torch.cuda.get_device_name()}; copy bandwidth {bandwidth:,.0f} GB/s; {args.weights} weights "
          f"rotated past the L2; "
          f"{'best of the sweep' if args.tune else 'the configs the engine picks'}\n")
    best = run(shapes, args.tune, bandwidth, fp8)
    name = "TUNED_FP8" if fp8 else "TUNED"
    if args.tune:
        source = table_source(best, name)
        print("\n" + source)
        if args.write:
            path = Path(__file__).resolve().parents[2] / "kernels" / "triton" / "skinny_configs.py"
            text = path.read_text()
            assert TABLE(name).search(text), f"the {name} table was not found"
            path.write_text(TABLE(name).sub(lambda _: source, text, count=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
