"""`slipstream bench throughput`: nano-vllm's offline workload (a model shape with random weights: Qwen3-0.6B,
or with --model-shape Qwen3-30B-A3B or Moonlight-16B-A3B (DeepSeek-V3's architecture); 256 requests, input/output lengths uniform in 100..1024
drawn with seed 0 before the engine exists, ignore_eos, one warm-up batch), run through the engine in one or more configurations (bf16 / fp8 KV, CUDA
graphs on / off), beside Hugging Face transformers on the same requests as a floor and batch-1 TPOT.
Prints one table with its conditions, and achieved bytes/s per decode step against the device's
measured copy bandwidth (weights + KV read per step)."""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

QWEN3_0_6B = dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", hidden_size=1024, num_hidden_layers=28,
                  num_attention_heads=16, num_key_value_heads=8, head_dim=128, intermediate_size=3072,
                  vocab_size=151936, tie_word_embeddings=True, rope_theta=1000000.0, max_position_embeddings=40960,
                  rms_norm_eps=1e-6, hidden_act="silu", attention_bias=False, torch_dtype="bfloat16",
                  bos_token_id=151643, eos_token_id=151645)

# Qwen3-30B-A3B: 48 layers, 128 experts of intermediate 768, top 8 (3.3B of 30.5B parameters active per token)
QWEN3_30B_A3B = dict(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", hidden_size=2048,
                     num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                     intermediate_size=6144, moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
                     norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], vocab_size=151936,
                     tie_word_embeddings=False, rope_theta=1000000.0, max_position_embeddings=40960,
                     rms_norm_eps=1e-6, hidden_act="silu", attention_bias=False, torch_dtype="bfloat16",
                     bos_token_id=151643, eos_token_id=151645)
# Moonlight-16B-A3B, the small DeepSeek-V3 (the shape): 27 layers, MLA with 512 + 64 latents and no q
# low-rank, 64 routed experts of intermediate 1408 (top 6) plus 2 shared, the first layer dense; Qwen's vocab
MOONLIGHT_16B_A3B = dict(architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3", hidden_size=2048,
                         num_hidden_layers=27, num_attention_heads=16, num_key_value_heads=16, q_lora_rank=None,
                         kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                         intermediate_size=11264, moe_intermediate_size=1408, n_routed_experts=64,
                         num_experts_per_tok=6, n_shared_experts=2, n_group=1, topk_group=1, topk_method="noaux_tc",
                         first_k_dense_replace=1, routed_scaling_factor=2.446, norm_topk_prob=True,
                         scoring_func="sigmoid", rope_interleave=True, vocab_size=151936, tie_word_embeddings=False,
                         rope_theta=50000.0, max_position_embeddings=8192, rms_norm_eps=1e-5, hidden_act="silu",
                         attention_bias=False, torch_dtype="bfloat16", bos_token_id=151643, eos_token_id=151645)
# `--weights fp8`: the shape as an FP8 checkpoint ships it (DeepSeek-V3, Kimi-K2, Qwen3-*-FP8): E4M3 weights with a
# float32 scale per 128 x 128 block in every attention and MLP / expert projection
BLOCK_FP8 = dict(quant_method="fp8", fmt="e4m3", activation_scheme="dynamic", weight_block_size=[128, 128])
MODEL_SHAPES = {"qwen3-0.6b": QWEN3_0_6B, "qwen3-30b-a3b": QWEN3_30B_A3B, "moonlight-16b-a3b": MOONLIGHT_16B_A3B}

RUNS = {"bf16": dict(kv_cache_dtype="auto", enforce_eager=False), "fp8": dict(kv_cache_dtype="fp8", enforce_eager=False),
        "bf16-eager": dict(kv_cache_dtype="auto", enforce_eager=True),
        "fp8-eager": dict(kv_cache_dtype="fp8", enforce_eager=True),
        # FP8 pages with the exact-q kernels (Triton decode, FA2 prefill) instead of FP8 math (Hopper's default)
        "fp8-exact": dict(kv_cache_dtype="fp8", enforce_eager=False, fp8_attention="exact"),
        # DeepSeek's MTP module drafting one token a step (the random checkpoint gets an MTP layer; random
        # weights draft at random, so the speed-up with real weights follows from the verify step's time)
        "bf16-mtp": dict(kv_cache_dtype="auto", enforce_eager=False,
                         speculative_config='{"method": "mtp", "num_speculative_tokens": 1}')}


def draw_workload(n: int, lo: int, hi_in: int, hi_out: int, seed: int = 0) -> list[tuple[list[int], int]]:
    """nano-vllm's bench.py draws, in its order: all prompts, then all output lengths."""
    rng = random.Random(seed)
    prompts = [[rng.randint(0, 10000) for _ in range(rng.randint(lo, hi_in))] for _ in range(n)]
    return list(zip(prompts, [rng.randint(lo, hi_out) for _ in range(n)]))


def write_random_checkpoint(folder: Path, config: dict) -> Path:
    from engine.models.weights import RANDOM_WEIGHTS_MARKER
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    (folder / RANDOM_WEIGHTS_MARKER).write_text("random weights: shape-only checkpoint for benchmarks\n")
    return folder


def write_word_level_tokenizer(folder: Path, vocab_size: int, eos_id: int, special_ids: dict[str, int] | None = None,
                               chat_template: str | None = None, pad_id: int | None = None) -> None:
    """A synthetic word-level tokenizer over a random-weights model's whole vocabulary ("t0", "t1", ..., and the
    named special tokens at their ids): the servers need one to detokenise; the text itself is meaningless."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    names = {i: n for n, i in (special_ids or {}).items()}
    tok = Tokenizer(models.WordLevel({names.get(i, f"t{i}"): i for i in range(vocab_size)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    eos = names.get(eos_id, f"t{eos_id}")
    extra = {} if pad_id is None else {"pad_token": names.get(pad_id, f"t{pad_id}")}
    if names:
        extra["additional_special_tokens"] = [n for n in names.values() if n not in (eos, extra.get("pad_token"))]
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, **extra)
    if chat_template:
        fast.chat_template = chat_template
    fast.save_pretrained(str(folder))


def copy_bandwidth_gbs() -> float:
    """Device-to-device copy of 1 GiB, bytes read + written, median of 10 (the HBM ceiling we compare to)."""
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    times = []
    for i in range(13):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        b.copy_(a)
        e.record()
        e.synchronize()
        if i >= 3:
            times.append(s.elapsed_time(e) / 1e3)
    del a, b
    return 2 * (1 << 30) / statistics.median(times) / 1e9


def stream_event() -> torch.cuda.Event:
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


def weight_split(model) -> tuple[int, int, tuple[int, int] | None]:
    """(bytes of the weights every step reads, bytes of the routed experts, (experts, top-k) or None). Shared
    experts stacked with the routed ones are read every step: they count with the dense weights."""
    from engine.layers.fused_moe import FusedMoE
    moe = [m for m in model.modules() if isinstance(m, FusedMoE)]
    routed = lambda m: (len(m.local) - m.num_shared) / len(m.local)
    expert = round(sum(p.numel() * p.element_size() * routed(m) for m in moe for p in m.parameters()))
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    return total - expert, expert, ((moe[0].num_experts, moe[0].top_k) if moe else None)


def step_weight_bytes(dense: int, expert: int, experts: tuple[int, int] | None, num_tokens: int) -> int:
    """Weights a decode step of `num_tokens` must read: the dense ones, and the routed experts its tokens hit,
    taken as the expected share under uniform routing, 1 - (1 - k/E)^tokens (random weights route close to
    uniformly)."""
    if experts is None:
        return dense
    E, k = experts
    return dense + round(expert * (1 - (1 - k / E) ** num_tokens))


def run_engine(path: Path, workload, options: dict, tpot_tokens: int) -> dict:
    from engine.config import EngineConfig
    from engine.core import EngineCore
    from engine.sampling_params import SamplingParams
    from engine.wire import EngineCoreRequest
    t0 = time.perf_counter()
    core = EngineCore(EngineConfig(model=str(path), **options))
    startup = time.perf_counter() - t0
    runner = core.runner
    weights, expert_weights, experts = weight_split(runner.model)
    kv_token_bytes = runner.kv_spec.bytes_per_token

    draft_k = json.loads(options.get("speculative_config") or "{}").get("num_speculative_tokens", 0)

    def generate(reqs, temperature=0.6, record=None, timeline=None, per_seq=None):
        for i, (ids, n) in enumerate(reqs):
            core.add_request(EngineCoreRequest(request_id=f"r{i}", prompt_token_ids=ids, params=SamplingParams(
                max_tokens=n, temperature=temperature, ignore_eos=True)))
        tokens = 0
        while core.has_unfinished():
            s = time.perf_counter()
            start = stream_event() if timeline is not None else None
            outs = core.step()
            if start is not None:  # the step's device work sits between the two events
                timeline.append((start, stream_event()))
            dt = time.perf_counter() - s
            new = sum(len(o.new_token_ids) for o in outs)
            tokens += new
            st = runner.last_step
            if record is not None and st.is_decode:
                record.append((dt, st.num_seqs, step_weight_bytes(weights, expert_weights, experts, st.num_seqs)
                               + st.kv_tokens * kv_token_bytes))
            if per_seq is not None and st.num_tokens <= st.num_seqs * (1 + draft_k):  # decode or verify steps
                per_seq.append((dt, new, st.graph))
        return tokens

    # warm-up: one small batch of odd and even lengths (first-use kernel compiles stay out of the timing)
    generate([([1] * 64, 16), ([2] * 37, 9), ([3] * 101, 5)])
    steps: list[tuple[float, int, int]] = []
    timeline: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
    torch.cuda.synchronize()
    t = time.perf_counter()
    out_tokens = generate(workload, record=steps, timeline=timeline)
    wall = time.perf_counter() - t
    torch.cuda.synchronize()
    # time the GPU waited for the host: gaps between a step's last queued work and the next step's first
    idle_ms = sum(max(0.0, end.elapsed_time(start)) for (_, end), (start, _) in zip(timeline, timeline[1:]))
    in_tokens = sum(len(p) for p, _ in workload)
    dec_time = sum(s[0] for s in steps)
    tpot_steps: list[tuple[float, int, bool]] = []  # batch 1: (seconds, tokens out, replayed a graph)
    generate([([7] * 128, tpot_tokens)], per_seq=tpot_steps)
    tpot_steps = tpot_steps[1:] or tpot_steps  # (the first decode step aside, where there are more)
    assert tpot_steps, "the batch-1 run made no decode step: raise --tpot-tokens"
    step_s = statistics.median(s[0] for s in tpot_steps)
    tokens_per_step = sum(s[1] for s in tpot_steps) / len(tpot_steps)
    return dict(startup_s=startup, graph_capture_s=runner.graphs.capture_seconds if runner.graphs else 0.0,
                backend=runner.backend.name, wall_s=wall, output_tokens=out_tokens, out_tps=out_tokens / wall,
                total_tps=(out_tokens + in_tokens) / wall, decode_steps=len(steps),
                decode_share=dec_time / wall, mean_decode_ms=1e3 * dec_time / max(len(steps), 1),
                mean_decode_batch=statistics.fmean(s[1] for s in steps) if steps else 0,
                decode_gbs=sum(s[2] for s in steps) / max(dec_time, 1e-9) / 1e9,
                decode_bytes=sum(s[2] for s in steps), gpu_idle_s=idle_ms / 1e3,
                tpot_ms=1e3 * step_s / tokens_per_step, tpot_step_ms=1e3 * step_s, tpot_tokens_per_step=tokens_per_step,
                tpot_graph_share=sum(s[2] for s in tpot_steps) / len(tpot_steps),
                kv_blocks=core.block_manager.num_blocks, preemptions=core.scheduler.num_preemptions)


def run_transformers(config: dict, workload) -> dict:
    """Batched greedy generate of Hugging Face transformers (sdpa) on the same requests, one batch,
    left-padded, every row generating the batch's longest output; counts each request's own tokens."""
    import transformers
    cfg = transformers.Qwen3Config(**{k: v for k, v in config.items() if k not in ("architectures", "model_type")})
    cfg.eos_token_id = None
    with torch.device("cuda"):
        model = transformers.Qwen3ForCausalLM(cfg).to(torch.bfloat16).eval()
    width = max(len(p) for p, _ in workload)
    ids = torch.tensor([[0] * (width - len(p)) + p for p, _ in workload], device="cuda")
    mask = (torch.arange(width, device="cuda")[None] >= torch.tensor([width - len(p) for p, _ in workload],
                                                                       device="cuda")[:, None]).long()
    longest = max(n for _, n in workload)
    model.generate(ids[:, :32], attention_mask=mask[:, :32], max_new_tokens=4, do_sample=False, pad_token_id=0)
    torch.cuda.synchronize()
    t = time.perf_counter()
    model.generate(ids, attention_mask=mask, max_new_tokens=longest, min_new_tokens=longest, do_sample=False,
                   pad_token_id=0)
    torch.cuda.synchronize()
    wall = time.perf_counter() - t
    useful = sum(n for _, n in workload)
    return dict(wall_s=wall, output_tokens=useful, out_tps=useful / wall,
                total_tps=(useful + sum(len(p) for p, _ in workload)) / wall, requests=len(workload))


def in_fresh_process(fn, *args):
    """fn(*args) in a new (spawned) Python process; returns its result. Each run gets a fresh CUDA
    context and allocator, as a served engine would: in one process, an FP8 run after a bf16 run
    measured 30.4k-37.2k output tok/s on an H200 where FP8 runs alone measured 37.8k every time.
    A child that dies (a kernel library's segfault) raises BrokenProcessPool here instead of hanging."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="slipstream bench throughput", description=__doc__)
    ap.add_argument("--runs", default="bf16,fp8", help=f"comma list of {', '.join(RUNS)}")
    ap.add_argument("--num-requests", type=int, default=256)
    ap.add_argument("--min-len", type=int, default=100)
    ap.add_argument("--max-input-len", type=int, default=1024)
    ap.add_argument("--max-output-len", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default="", help="HF checkpoint folder (real weights); default: --model-shape, random")
    ap.add_argument("--model-shape", default="qwen3-0.6b", choices=sorted(MODEL_SHAPES),
                    help="the random-weights model to run when no --model is given")
    ap.add_argument("--weights", default="bf16", choices=("bf16", "fp8"),
                    help="random weights in bf16, or as a block-FP8 checkpoint (E4M3, 128 x 128 block scales)")
    ap.add_argument("--override", default="{}", help='JSON overrides of the model config, e.g. {"num_hidden_layers": 4}')
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=16384,
                    help="step token budget (16384: nano-vllm's default and vLLM's offline default on H100)")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    ap.add_argument("--attention-backend", default="auto")
    ap.add_argument("--block-size", type=int, default=16, help="KV block size (FlashMLA reads 64-token pages)")
    ap.add_argument("--tpot-tokens", type=int, default=256, help="output tokens of the batch-1 TPOT run")
    ap.add_argument("--hf-requests", type=int, default=32, help="requests given to transformers (0: skip)")
    args = ap.parse_args(argv)
    if args.model and args.weights != "bf16":
        ap.error("--weights applies to --model-shape's random weights; a --model checkpoint keeps its own")
    if not torch.cuda.is_available():
        print("bench throughput needs a CUDA GPU", file=sys.stderr)
        return 2

    # the workload is drawn before any engine exists, so start-up cannot shift the random sequence
    workload = draw_workload(args.num_requests, args.min_len, args.max_input_len, args.max_output_len, args.seed)
    config = {**MODEL_SHAPES[args.model_shape], **json.loads(args.override)}
    if args.weights == "fp8":
        config["quantization_config"] = BLOCK_FP8
    if any("speculative_config" in RUNS[n] for n in args.runs.split(",")) and not args.model:
        config.setdefault("num_nextn_predict_layers", 1)  # an MTP module to draft with (unused by the other runs)
    tmp = tempfile.TemporaryDirectory()
    path = Path(args.model) if args.model else write_random_checkpoint(Path(tmp.name) / "model", config)
    if args.model:
        config = json.loads((path / "config.json").read_text())
    bandwidth = copy_bandwidth_gbs()
    import importlib.metadata as md
    versions = {n: md.version(n) for n in ("torch", "triton", "flashinfer-python", "transformers")
                if _installed(n)}
    max_len = args.max_input_len + args.max_output_len
    common = dict(dtype="bfloat16", max_model_len=max(max_len, 128 + args.tpot_tokens + 1),
                  max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                  gpu_memory_utilization=args.gpu_memory_utilization, attention_backend=args.attention_backend,
                  enable_prefix_caching=True, block_size=args.block_size)
    results = {}
    for name in args.runs.split(","):
        print(f"[{name}] running {len(workload)} requests in a fresh process ...", file=sys.stderr, flush=True)
        results[name] = in_fresh_process(run_engine, path, workload, {**common, **RUNS[name]}, args.tpot_tokens)
        print(f"[{name}] {json.dumps(results[name])}", flush=True)
    # transformers' MoE runs its experts one by one in Python: a floor for the dense shape only
    dense = config.get("model_type") == "qwen3"
    hf = (in_fresh_process(run_transformers, config, workload[:args.hf_requests])
          if args.hf_requests and dense else None)

    print("\n## conditions")
    print(f"device: {torch.cuda.get_device_name()} ; measured D2D copy bandwidth {bandwidth:.0f} GB/s (read+write)")
    print(f"software: {versions}")
    print(f"model: {'random weights, ' if not args.model else ''}"
          f"{'block-FP8 (E4M3, 128 x 128 scales), ' if 'quantization_config' in config else ''}{ {k: config.get(k) for k in ('hidden_size', 'num_hidden_layers', 'num_attention_heads', 'num_key_value_heads', 'head_dim', 'intermediate_size', 'num_experts', 'n_routed_experts', 'num_experts_per_tok', 'moe_intermediate_size', 'kv_lora_rank', 'vocab_size') if k in config} }")
    print(f"workload: {len(workload)} requests, input {sum(len(p) for p, _ in workload)} tokens, output "
          f"{sum(n for _, n in workload)} tokens (lengths uniform {args.min_len}..{args.max_input_len}/"
          f"{args.max_output_len}, seed {args.seed}), temperature 0.6, ignore_eos, one warm-up batch of 3 small requests")
    print(f"engine: {common}")
    print("roofline: output tokens / (bytes the decode steps must read: weights + KV attended over, at the "
          "copy bandwidth; MoE: the dense weights and the expected share of experts a step's tokens hit); "
          "GPU idle: time the GPU waited for the host between steps")
    print("\n| run | backend | output tok/s | roofline tok/s (% reached) | total tok/s | wall s (GPU idle s) | "
          "decode steps | mean decode step ms (mean batch) | decode GB/s (% of copy bw) | batch-1 TPOT ms | "
          "start-up s (graph capture s) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        roof = r['output_tokens'] / (r['decode_bytes'] / (bandwidth * 1e9))
        print(f"| {name} | {r['backend']} | {r['out_tps']:.0f} | {roof:.0f} ({100 * r['out_tps'] / roof:.1f}%) | "
              f"{r['total_tps']:.0f} | {r['wall_s']:.2f} ({r['gpu_idle_s']:.2f}) | "
              f"{r['decode_steps']} | {r['mean_decode_ms']:.2f} ({r['mean_decode_batch']:.0f}) | "
              f"{r['decode_gbs']:.0f} ({100 * r['decode_gbs'] / bandwidth:.0f}%) | {r['tpot_ms']:.2f} | "
              f"{r['startup_s']:.1f} ({r['graph_capture_s']:.1f}) |")
    if hf:
        print(f"| transformers {versions.get('transformers', '')} (first {hf['requests']} requests, one batch, "
              f"greedy) | sdpa | {hf['out_tps']:.0f} | | {hf['total_tps']:.0f} | {hf['wall_s']:.1f} | | | | | |")
    for name, r in results.items():
        if r["tpot_tokens_per_step"] != 1.0 or "speculative_config" in RUNS[name]:
            print(f"\n{name}, batch 1: {r['tpot_step_ms']:.2f} ms a step, {r['tpot_tokens_per_step']:.2f} tokens a step "
                  f"(drafts accepted: {r['tpot_tokens_per_step'] - 1:.2f} a step), "
                  f"{100 * r['tpot_graph_share']:.0f}% of the steps replayed a CUDA graph")
    return 0


def _installed(name: str) -> bool:
    import importlib.metadata as md
    try:
        md.version(name)
        return True
    except md.PackageNotFoundError:
        return False


if __name__ == "__main__":
    sys.exit(main())
