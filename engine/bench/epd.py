"""`slipstream bench epd`: image requests on one hybrid engine (it runs the vision tower in-process) versus
encoder + prefill + decode behind the router (EPD), at a few request rates. Each request is a chat with one
image of fresh pixels (no cache hits) and a short question, streamed; the table gives TTFT, ITL and E2E.

It starts every server itself (engines added through the router's /nodes/add, so no control plane is
needed); all of them share this machine's GPU (or CPU). Without --model it runs a Qwen3-VL shape with random
weights and a synthetic word-level tokenizer over the whole vocabulary (the text is meaningless; the work
is real)."""
from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import random
import shlex
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import numpy as np

from engine.bench.pd import Proc, _get, _post
from engine.bench.serve import one_request, percentile

# Qwen3-VL's chat template, reduced to what the bench sends: text and image parts
VL_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] in ('image', 'image_url') %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIAL_IDS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<|vision_start|>": 151652,
               "<|vision_end|>": 151653, "<|image_pad|>": 151655, "<|video_pad|>": 151656}
SHAPES = {
    "qwen3-vl-2b": dict(
        text=dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                  num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=32768,
                  rms_norm_eps=1e-6, tie_word_embeddings=True, dtype="bfloat16",
                  rope_parameters={"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [24, 20, 20],
                                   "mrope_interleaved": True}),
        vision=dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, patch_size=16,
                    spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=2048, num_position_embeddings=2304,
                    deepstack_visual_indexes=[5, 11, 17], hidden_act="gelu_pytorch_tanh")),
    "tiny": dict(  # CPU smoke runs
        text=dict(vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=4096, rms_norm_eps=1e-6,
                  tie_word_embeddings=True, dtype="float32",
                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3],
                                   "mrope_interleaved": True}),
        vision=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=16, spatial_merge_size=2,
                    temporal_patch_size=2, out_hidden_size=64, num_position_embeddings=16,
                    deepstack_visual_indexes=[0], hidden_act="gelu_pytorch_tanh")),
}


def random_vl_checkpoint(folder: Path, shape: str) -> Path:
    """A Qwen3-VL shape with random weights: config.json, preprocessor_config.json and a word-level tokenizer
    whose special tokens sit at Qwen's ids."""
    import transformers

    from engine.bench.throughput import write_random_checkpoint, write_word_level_tokenizer
    s = SHAPES[shape]
    config = transformers.Qwen3VLConfig(text_config=s["text"], vision_config=s["vision"],
                                        image_token_id=SPECIAL_IDS["<|image_pad|>"],
                                        video_token_id=SPECIAL_IDS["<|video_pad|>"],
                                        vision_start_token_id=SPECIAL_IDS["<|vision_start|>"],
                                        vision_end_token_id=SPECIAL_IDS["<|vision_end|>"],
                                        tie_word_embeddings=True, eos_token_id=SPECIAL_IDS["<|im_end|>"])
    config.architectures = ["Qwen3VLForConditionalGeneration"]
    write_random_checkpoint(folder, config.to_dict())
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "patch_size": s["vision"]["patch_size"], "temporal_patch_size": 2, "merge_size": 2,
        "image_mean": [0.5] * 3, "image_std": [0.5] * 3, "size": {"shortest_edge": 65536, "longest_edge": 16777216}}))
    write_word_level_tokenizer(folder, s["text"]["vocab_size"], SPECIAL_IDS["<|im_end|>"], SPECIAL_IDS,
                               VL_CHAT_TEMPLATE, pad_id=SPECIAL_IDS["<|endoftext|>"])
    return folder


def image_url(side: int, rng: np.random.Generator) -> str:
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (side, side, 3), np.uint8)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


async def run_rate(url: str, model: str, rate: float, num: int, side: int, output_len: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    gaps = random.Random(seed)
    urls = [image_url(side, rng) for _ in range(num)]  # made before the clock starts
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:
        tasks = []
        t0 = time.perf_counter()
        for u in urls:
            body = {"model": model, "stream": True, "max_tokens": output_len, "ignore_eos": True, "temperature": 0,
                    "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": u}},
                                                              {"type": "text", "text": "describe the image"}]}]}
            tasks.append(asyncio.ensure_future(one_request(session, url + "/v1/chat/completions", body, {})))
            if rate != float("inf"):
                await asyncio.sleep(gaps.expovariate(rate))
        results = await asyncio.gather(*tasks)
        wall = time.perf_counter() - t0
    ok = [r for r in results if r.ok]
    ms = lambda xs: {q: percentile([x * 1e3 for x in xs], q) for q in (50, 90, 99)}
    return {"ok": len(ok), "failed": len(results) - len(ok), "errors": sorted({r.error for r in results if r.error}),
            "ttft": ms([r.ttft for r in ok]), "itl": ms([i for r in ok for i in r.itls]),
            "e2e": ms([r.e2e for r in ok]), "images_per_s": len(ok) / wall}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="slipstream bench epd", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default="", help="a Qwen3-VL checkpoint folder; default: --shape, random")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="qwen3-vl-2b")
    ap.add_argument("--rates", default="1,4", help="comma-separated request rates (req/s); 'inf' allowed")
    ap.add_argument("--num-requests", type=int, default=32)
    ap.add_argument("--image-sizes", default="448,1024", help="square image sides, pixels")
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--engine-args", default="", help='extra flags for every engine, e.g. "--gpu-memory-utilization 0.2"')
    ap.add_argument("--encoder-args", default="", help="extra flags for the encoder")
    ap.add_argument("--start-timeout", type=float, default=900.0)
    args = ap.parse_args(argv)
    log_dir = Path(tempfile.mkdtemp(prefix="slipstream-bench-epd-"))
    model = args.model or str(random_vl_checkpoint(log_dir / f"{args.shape}-random", args.shape))
    extra, enc_extra = shlex.split(args.engine_args), shlex.split(args.encoder_args)
    procs: list[Proc] = []
    rows = []
    try:
        hybrid = Proc(["serve", model, *extra], log_dir, "hybrid")
        encoder = Proc(["encoder", model, *enc_extra], log_dir, "encoder")
        prefill = Proc(["serve", model, "--role", "prefill", *extra], log_dir, "prefill")
        decode = Proc(["serve", model, "--role", "decode", *extra], log_dir, "decode")
        router = Proc(["router"], log_dir, "router")
        procs = [hybrid, encoder, prefill, decode, router]
        for p in procs:
            p.wait_healthy(args.start_timeout)
        for node, role in ((encoder, 4), (prefill, 2), (decode, 3)):
            _post(router.url + "/nodes/add", {"url": node.url, "status": {"role": role}})
        served = _get(hybrid.url + "/v1/models")["data"][0]["id"]
        setups = [("hybrid", hybrid.url), ("EPD", router.url)]
        sides = [int(s) for s in args.image_sizes.split(",")]
        for side in sides:
            for _, url in setups:  # warm-up: first-use compilation is not measured
                asyncio.run(run_rate(url, served, float("inf"), 2, side, 4, args.seed + 99))
            for rate in (float(r) for r in args.rates.split(",")):
                for name, url in setups:
                    s = asyncio.run(run_rate(url, served, rate, args.num_requests, side, args.output_len, args.seed))
                    rows.append((side, rate, name, s))
                    print(f"  done: {side}px rate={rate} {name} ok={s['ok']} failed={s['failed']} {s['errors'][:2]}",
                          file=sys.stderr)
        enc = _get(encoder.url + "/encoder_info")
    finally:
        for p in procs:
            p.stop()
    print(f"slipstream bench epd: model={args.model or args.shape + ' (random weights)'} requests={args.num_requests} "
          f"per row, one image each (fresh pixels), output={args.output_len} tokens (ignore_eos, greedy), "
          f"engine_args={args.engine_args!r}, cpus={os.cpu_count()}; every server on this machine; logs in {log_dir}")
    print(f"encoder: {enc['encoded_images']} images encoded in all")
    print("| image | rate (req/s) | setup | ok | TTFT p50 | p90 | ITL p50 | E2E p50 | images/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for side, rate, name, s in rows:
        print(f"| {side}x{side} | {rate:g} | {name} | {s['ok']} | {s['ttft'][50]:.1f} | {s['ttft'][90]:.1f} | "
              f"{s['itl'][50]:.1f} | {s['e2e'][50]:.1f} | {s['images_per_s']:.2f} |")
    print("(milliseconds)")
    return 0 if all(s["failed"] == 0 for *_, s in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
