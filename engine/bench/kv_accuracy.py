"""FP8 KV-cache accuracy against bf16 KV: the same greedy requests run with both pools; reports
greedy-token agreement over a long generation (share of identical tokens, first divergence) and the
error of the chosen tokens' log-probabilities while both runs still agree (a logit-error measure).
Each FP8 attention choice is one row: auto (FP8 math on Hopper: q and probabilities rounded to E4M3)
and exact (q in the model dtype). `python3 -m engine.bench.kv_accuracy [--model FOLDER]` (default:
Qwen3-0.6B shape, random weights)."""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch


def greedy_runs(path: Path, prompts, n: int, kv: str,
                fp8_attention: str = "auto") -> tuple[str, list[tuple[list[int], list[float]]]]:
    """(the attention backend's name, each prompt's greedy tokens and their logprobs)."""
    from engine.config import EngineConfig
    from engine.core import EngineCore
    from engine.sampling_params import SamplingParams
    from engine.wire import EngineCoreRequest
    core = EngineCore(EngineConfig(model=str(path), dtype="bfloat16", kv_cache_dtype=kv, max_model_len=4096,
                                   gpu_memory_utilization=0.5, fp8_attention=fp8_attention))
    kernel = core.runner.backend.name
    for i, p in enumerate(prompts):
        core.add_request(EngineCoreRequest(request_id=str(i), prompt_token_ids=p, params=SamplingParams(
            max_tokens=n, temperature=0, ignore_eos=True, logprobs=0)))
    runs = {str(i): ([], []) for i in range(len(prompts))}
    while core.has_unfinished():
        for o in core.step():
            runs[o.request_id][0].extend(o.new_token_ids)
            runs[o.request_id][1].extend(lp.logprob for lp in o.new_logprobs or [])
    del core
    gc.collect()
    torch.cuda.empty_cache()
    return kernel, [runs[str(i)] for i in range(len(prompts))]


def main(argv: list[str] | None = None) -> int:
    from engine.bench.throughput import QWEN3_0_6B, draw_workload, write_random_checkpoint
    ap = argparse.ArgumentParser(prog="kv_accuracy", description=__doc__)
    ap.add_argument("--model", default="")
    ap.add_argument("--num-prompts", type=int, default=16)
    ap.add_argument("--output-len", type=int, default=1024)
    ap.add_argument("--fp8-attention", default="auto,exact", help="FP8 runs: comma list of auto, fp8, exact")
    args = ap.parse_args(argv)
    tmp = tempfile.TemporaryDirectory()
    path = Path(args.model) if args.model else write_random_checkpoint(Path(tmp.name) / "m", QWEN3_0_6B)
    prompts = [p for p, _ in draw_workload(args.num_prompts, 100, 1024, 1024, seed=1)]
    _, ref = greedy_runs(path, prompts, args.output_len, "auto")
    for choice in args.fp8_attention.split(","):
        kernel, fp8 = greedy_runs(path, prompts, args.output_len, "fp8", choice)
        print(json.dumps(dict(model=args.model or "Qwen3-0.6B shape, random weights", attention=kernel,
                              prompts=len(prompts), output_len=args.output_len, **compare(ref, fp8, args.output_len))))
    return 0


def compare(ref, fp8, output_len: int) -> dict:
    """Greedy agreement of the FP8 run with the bf16 run, and the chosen-token logprob error up to the
    first divergence of each request."""
    same, first, lp_err, spread = 0, [], [], []
    for (t1, l1), (t2, l2) in zip(ref, fp8):
        same += sum(a == b for a, b in zip(t1, t2))
        div = next((i for i, (a, b) in enumerate(zip(t1, t2)) if a != b), len(t1))
        first.append(div)
        lp_err += [abs(a - b) for a, b in zip(l1[:div], l2[:div])]
        spread += l1
    return dict(token_agreement=same / sum(len(t) for t, _ in ref), mean_first_divergence=statistics.fmean(first),
                min_first_divergence=min(first), identical_sequences=sum(f == output_len for f in first),
                logprob_abs_err_mean=statistics.fmean(lp_err) if lp_err else None,
                logprob_abs_err_max=max(lp_err) if lp_err else None, chosen_logprob_mean_bf16=statistics.fmean(spread))


if __name__ == "__main__":
    sys.exit(main())
