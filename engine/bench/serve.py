"""`slipstream bench serve`: an online load generator against a running OpenAI-compatible server.

Sends `--num-prompts` streaming completions of exactly `--input-len` random prompt tokens and
`--output-len` output tokens (ignore_eos), arriving as a Poisson process at `--rate` requests/s
(inf: all at once), at most `--max-concurrency` in flight. Prints the conditions and a table of
TTFT / ITL / E2E (mean, p50, p90, p99) and request / token throughput; `--json` saves it all.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import statistics
import sys
import time
from dataclasses import dataclass, field

import aiohttp


@dataclass
class Result:
    ok: bool = False
    error: str = ""
    ttft: float = 0.0
    e2e: float = 0.0
    itls: list[float] = field(default_factory=list)
    output_tokens: int = 0


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


async def one_request(session: aiohttp.ClientSession, url: str, body: dict, headers: dict) -> Result:
    res = Result()
    t0 = time.perf_counter()
    last = None
    try:
        async with session.post(url, json=body, headers=headers) as resp:
            if resp.status != 200:
                res.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                return res
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    res.error = chunk["error"].get("message", "error")
                    return res
                if chunk.get("usage"):
                    res.output_tokens = chunk["usage"]["completion_tokens"]
                choice = chunk["choices"][0] if chunk.get("choices") else {}
                if choice.get("text") or (choice.get("delta") or {}).get("content"):  # completions or chat
                    now = time.perf_counter()
                    if last is None:
                        res.ttft = now - t0
                    else:
                        res.itls.append(now - last)
                    last = now
        res.e2e = time.perf_counter() - t0
        res.ok = last is not None
        if not res.ok:
            res.error = "no tokens"
    except (aiohttp.ClientError, asyncio.TimeoutError) as e:
        res.error = f"{type(e).__name__}: {e}"
    return res


async def discover(session: aiohttp.ClientSession, base: str, headers: dict) -> tuple[str, int | None]:
    async with session.get(base + "/v1/models", headers=headers) as resp:
        model = (await resp.json())["data"][0]["id"]
    vocab = None
    try:  # a Slipstream server tells its vocabulary size; others get the default
        async with session.get(base + "/engine_info") as resp:
            if resp.status == 200:
                vocab = (await resp.json()).get("vocab_size")
    except aiohttp.ClientError:
        pass
    return model, vocab


async def run(args) -> dict:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    base = args.url.rstrip("/")
    rng = random.Random(args.seed)
    timeout = aiohttp.ClientTimeout(total=args.timeout)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:
        model, vocab = await discover(session, base, headers)
        model = args.model or model
        vocab = args.vocab_size or vocab or 1000
        low = min(10, vocab - 1)
        bodies = [{"model": model, "prompt": [rng.randrange(low, vocab) for _ in range(args.input_len)],
                   "max_tokens": args.output_len, "ignore_eos": True, "temperature": args.temperature,
                   "stream": True, "stream_options": {"include_usage": True}} for _ in range(args.num_prompts)]
        gaps = [0.0 if math.isinf(args.rate) else rng.expovariate(args.rate) for _ in bodies]
        limit = asyncio.Semaphore(args.max_concurrency or len(bodies))

        async def limited(body):
            async with limit:
                return await one_request(session, base + "/v1/completions", body, headers)

        t0 = time.perf_counter()
        tasks = []
        for body, gap in zip(bodies, gaps):
            await asyncio.sleep(gap)  # Poisson arrivals
            tasks.append(asyncio.create_task(limited(body)))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - t0
    return summarize(args, model, results, duration)


def summarize(args, model: str, results: list[Result], duration: float) -> dict:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    stats = {}
    for name, values in (("ttft_ms", [r.ttft * 1e3 for r in ok]),
                         ("itl_ms", [x * 1e3 for r in ok for x in r.itls]),
                         ("e2e_ms", [r.e2e * 1e3 for r in ok])):
        stats[name] = {"mean": statistics.fmean(values) if values else float("nan"),
                       **{f"p{q}": percentile(values, q) for q in (50, 90, 99)}}
    return {
        "conditions": {"url": args.url, "model": model, "rate_rps": args.rate, "num_prompts": args.num_prompts,
                       "input_len": args.input_len, "output_len": args.output_len,
                       "max_concurrency": args.max_concurrency, "temperature": args.temperature, "seed": args.seed},
        "completed": len(ok), "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
        "duration_s": duration,
        "request_throughput_rps": len(ok) / duration if duration else 0.0,
        "output_throughput_tok_s": out_tokens / duration if duration else 0.0,
        "total_throughput_tok_s": (out_tokens + len(ok) * args.input_len) / duration if duration else 0.0,
        **stats,
    }


def print_table(s: dict) -> None:
    c = s["conditions"]
    print(f"slipstream bench serve: {c['url']} model={c['model']}")
    print(f"  rate={c['rate_rps']} req/s  prompts={c['num_prompts']}  input={c['input_len']} tok  "
          f"output={c['output_len']} tok (ignore_eos)  max_concurrency={c['max_concurrency'] or 'unbounded'}  "
          f"temperature={c['temperature']}  seed={c['seed']}")
    print(f"  completed={s['completed']} failed={s['failed']} duration={s['duration_s']:.2f}s")
    for err in s["errors"]:
        print(f"  error: {err}")
    print(f"  throughput: {s['request_throughput_rps']:.2f} req/s, {s['output_throughput_tok_s']:.1f} output tok/s, "
          f"{s['total_throughput_tok_s']:.1f} total tok/s")
    print(f"  {'metric':<10}{'mean':>10}{'p50':>10}{'p90':>10}{'p99':>10}")
    for name in ("ttft_ms", "itl_ms", "e2e_ms"):
        row = s[name]
        print(f"  {name:<10}" + "".join(f"{row[k]:>10.2f}" for k in ("mean", "p50", "p90", "p99")))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="slipstream bench serve", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL")
    ap.add_argument("--model", default="", help="model name (default: the server's first /v1/models entry)")
    ap.add_argument("--rate", type=float, default=math.inf, help="requests/s, Poisson arrivals (default inf)")
    ap.add_argument("--num-prompts", type=int, default=100)
    ap.add_argument("--input-len", type=int, default=128, help="prompt tokens per request")
    ap.add_argument("--output-len", type=int, default=128, help="output tokens per request")
    ap.add_argument("--max-concurrency", type=int, default=0, help="requests in flight at most (0: unbounded)")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=0, help="seeds the prompts and the arrival times")
    ap.add_argument("--vocab-size", type=int, default=0, help="prompt token ids are drawn below this "
                    "(default: the server's /engine_info, else 1000)")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    ap.add_argument("--json", default=None, help="also write the results to this file")
    args = ap.parse_args(argv)
    if args.rate <= 0 or args.num_prompts < 1 or args.input_len < 1 or args.output_len < 1:
        ap.error("--rate, --num-prompts, --input-len and --output-len must be positive")
    summary = asyncio.run(run(args))
    print_table(summary)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    return 0 if summary["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
