"""`slipstream bench profile`: where a decode step's time goes, kernel by kernel (torch.profiler), at a few batch
sizes. A model shape with random weights (as `bench throughput` builds it) or a checkpoint; the engine runs
eagerly so that every kernel shows (CUDA graphs replay the same kernels without the launch gaps). Prints, per
batch size, the kernels (CPU: the operators) by time per step: calls per step, µs per step and the share of the
step, and the step's totals: the launches a step makes and their time. This is how the MoE and DeepSeek decode
steps were taken apart (README)."""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch


def _device_time(evt, cuda: bool) -> float:
    """µs of an aggregated profiler event's own device time (the attribute's name changed across torch releases),
    or its own CPU time for a CPU run."""
    if not cuda:
        return evt.self_cpu_time_total
    for name in ("self_device_time_total", "self_cuda_time_total"):
        if hasattr(evt, name):
            return getattr(evt, name)
    return 0.0


def decode_budget(batch: int, prompt_len: int, steps: int, step_tokens: int) -> int:
    """Output tokens each profiled sequence may make: the profiled steps, plus the steps that the later prompts'
    prefill takes while the earlier sequences already decode (each such step decodes them once), so that every
    sequence is still running when the whole batch decodes together."""
    return steps + 2 + -(-batch * prompt_len // max(step_tokens - batch, 1)) + 2


def profile_decode(core, batch: int, prompt_len: int, steps: int,
                   cuda: bool) -> tuple[list[tuple[str, float, float]], int]:
    """Profiles `steps` decode steps of `batch` sequences (prefilled first, outside the profile): [(kernel, calls
    per step, µs per step)] by time, and the decode steps profiled. The sequences are aborted afterwards."""
    from torch.profiler import ProfilerActivity, profile
    from engine.sampling_params import SamplingParams
    from engine.wire import EngineCoreRequest
    vocab = core.model_config.vocab_size
    budget = decode_budget(batch, prompt_len, steps, core.config.max_num_batched_tokens)
    for i in range(batch):
        ids = [(7 * i + j) % (vocab - 1) + 1 for j in range(prompt_len)]
        core.add_request(EngineCoreRequest(request_id=f"p{batch}-{i}", prompt_token_ids=ids,
                                           params=SamplingParams(max_tokens=budget, ignore_eos=True)))
    last = lambda: core.runner.last_step
    while core.has_unfinished() and not (last().is_decode and last().num_seqs == batch):
        core.step()  # prefill (and first-use compiles) until a full-batch decode step has run
    activities = [ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    done = 0
    with profile(activities=activities) as prof:
        while done < steps and core.has_unfinished():
            core.step()
            done += core.runner.last_step.is_decode
        if cuda:
            torch.cuda.synchronize()
    core.abort([f"p{batch}-{i}" for i in range(batch)])  # their KV back to the pool for the next batch size
    rows = []
    for evt in prof.key_averages():
        us = _device_time(evt, cuda)
        if us > 0 and (cuda or not evt.key.startswith("ProfilerStep")):
            rows.append((evt.key, evt.count / max(done, 1), us / max(done, 1)))
    rows.sort(key=lambda r: -r[2])
    return rows, done


def main(argv: list[str] | None = None) -> int:
    from engine.bench.throughput import MODEL_SHAPES, write_random_checkpoint
    ap = argparse.ArgumentParser(prog="slipstream bench profile", description=__doc__)
    ap.add_argument("--model", default="", help="checkpoint folder (default: --model-shape with random weights)")
    ap.add_argument("--model-shape", default="qwen3-0.6b", choices=sorted(MODEL_SHAPES))
    ap.add_argument("--override", default="{}", help='JSON overrides of the shape, e.g. {"num_hidden_layers": 4}')
    ap.add_argument("--batch", default="1,128", help="comma list of decode batch sizes")
    ap.add_argument("--steps", type=int, default=16, help="decode steps profiled per batch size")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--top", type=int, default=25, help="kernels listed per batch size")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--attention-backend", default="auto")
    args = ap.parse_args(argv)
    from engine.config import EngineConfig
    from engine.core import EngineCore
    batches = [int(b) for b in args.batch.split(",")]
    if args.model:
        path = Path(args.model)
    else:
        config = {**MODEL_SHAPES[args.model_shape], **json.loads(args.override)}
        path = write_random_checkpoint(Path(tempfile.mkdtemp()) / args.model_shape, config)
    cuda = args.device.startswith("cuda")
    print(f"[profile] loading {path.name} on {args.device} ...", file=sys.stderr, flush=True)
    core = EngineCore(EngineConfig(model=str(path), device=args.device, dtype=args.dtype, enforce_eager=True,
                                   max_num_seqs=max(batches), block_size=args.block_size,
                                   max_model_len=args.prompt_len + decode_budget(max(batches), args.prompt_len, args.steps,
                                                                                EngineConfig.max_num_batched_tokens),
                                   attention_backend=args.attention_backend, enable_prefix_caching=False))
    try:
        device = torch.cuda.get_device_name() if cuda else "CPU"
        print(f"device: {device}; model: {path.name} ({'random weights' if not args.model else 'checkpoint'}, "
              f"{core.model_config.num_hidden_layers} layers); eager; prompts of {args.prompt_len} tokens; "
              f"{'kernel' if cuda else 'operator'} self time per decode step")
        for batch in batches:
            print(f"[profile] batch {batch} ...", file=sys.stderr, flush=True)
            rows, done = profile_decode(core, batch, args.prompt_len, args.steps, cuda)
            total_us, total_calls = sum(r[2] for r in rows), sum(r[1] for r in rows)
            print(f"\n### batch {batch}: {done} decode steps; per step {total_calls:.0f} "
                  f"{'kernels' if cuda else 'operators'}, {total_us / 1e3:.3f} ms\n")
            print(f"| {'kernel' if cuda else 'operator'} | calls / step | µs / step | share |")
            print("|---|---|---|---|")
            for name, calls, us in rows[:args.top]:
                name = name if len(name) <= 90 else name[:87] + "..."
                print(f"| `{name.replace('|', '/')}` | {calls:.1f} | {us:.1f} | {100 * us / total_us:.1f} % |")
    finally:
        core.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
