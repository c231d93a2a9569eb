"""`slipstream bench KIND [options]`: benchmarks, one module each in engine.bench with
`main(argv) -> int` (`slipstream bench KIND --help` lists a benchmark's options)."""
from __future__ import annotations

import argparse
import importlib

# kind -> what it measures; the module is engine.bench.<kind>
BENCHMARKS = {
    "throughput": "offline engine throughput (nano-vllm's workload) beside transformers",
    "serve": "online load against a running server: TTFT / ITL / E2E percentiles and throughput",
    "pd": "1 prefill + 1 decode engine behind the PD router vs one hybrid engine: TTFT / ITL at a few rates",
    "transfer": "KV-block pull GB/s between two processes over CUDA IPC, TCP or RDMA (Qwen3-0.6B blocks)",
    "encoder": "the Qwen3-VL vision tower alone: images/s and TFLOP/s at batch 1, 8, 32 for 448 and 1024 px images",
    "epd": "image TTFT / ITL of one hybrid engine vs encoder + prefill + decode behind the router, at a few rates",
    "attention": "decode attention kernels alone (FlashInfer, Triton, XQA on FP8 pages), GB/s and error per batch size",
    "profile": "a decode step kernel by kernel (torch.profiler) at a few batch sizes: calls, µs and share per step",
}


def register(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks: " + ", ".join(BENCHMARKS),
                       description="\n".join(f"{k}: {v}" for k, v in BENCHMARKS.items()),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("kind", choices=list(BENCHMARKS), help="which benchmark")
    p.add_argument("args", nargs=argparse.REMAINDER, help="the benchmark's own options (see KIND --help)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    module = importlib.import_module(f"engine.bench.{args.kind}")
    return module.main(args.args)
