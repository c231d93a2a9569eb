"""`slipstream bench pd`: TTFT / ITL of one prefill + one decode engine behind the PD router versus
one hybrid engine, at a few request rates, on this machine (engines share its CPU or GPU).

It starts the servers itself (`slipstream serve`, `slipstream router`, engines added through the
router's /nodes/add, so no control plane is needed), runs `bench serve` against each setup and
prints one table with its conditions.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from engine.bench import serve as bench_serve


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 2.0) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


class Proc:
    """A child `slipstream` process on a free port, logged to a file, stopped by PID."""

    def __init__(self, argv: list[str], log_dir: Path, name: str):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log_dir / f"{name}.log"
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "engine.cli.main", *argv, "--port", str(self.port)],
                                         stdout=out, stderr=subprocess.STDOUT)

    def wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if _get(self.url + "/health").get("status") == "ok":
                    return
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.log.name} did not start:\n{self.log.read_text()[-2000:]}")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def random_checkpoint(folder: Path) -> Path:
    """Qwen3-0.6B's shape with random weights, and a synthetic word-level tokenizer over its whole
    vocabulary (the servers need one to detokenise; the text itself is meaningless)."""
    from engine.bench.throughput import QWEN3_0_6B, write_random_checkpoint, write_word_level_tokenizer
    write_random_checkpoint(folder, QWEN3_0_6B)
    write_word_level_tokenizer(folder, QWEN3_0_6B["vocab_size"], QWEN3_0_6B["eos_token_id"])
    return folder


def _bench(url: str, rate: float, args, model: str, vocab: int) -> dict:
    ns = argparse.Namespace(url=url, model=model, rate=rate, num_prompts=args.num_prompts, input_len=args.input_len,
                            output_len=args.output_len, max_concurrency=0, temperature=0.0, seed=args.seed,
                            vocab_size=vocab, api_key=None, timeout=600.0)
    return asyncio.run(bench_serve.run(ns))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="slipstream bench pd", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default="",
                    help="HF checkpoint folder (or .gguf); default: Qwen3-0.6B's shape with random weights")
    ap.add_argument("--rates", default="1,2,4", help="comma-separated request rates (req/s); 'inf' allowed")
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--input-len", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--engine-args", default="", help="extra engine flags for every server, e.g. "
                    "\"--dtype bfloat16 --gpu-memory-utilization 0.3\"")
    ap.add_argument("--kv-transports", default="auto",
                    help="comma-separated --kv-transport values: one 1P1D pair per value (auto, ipc, tcp, rdma)")
    ap.add_argument("--start-timeout", type=float, default=900.0)
    args = ap.parse_args(argv)
    rates = [float(r) for r in args.rates.split(",")]
    extra = shlex.split(args.engine_args)
    log_dir = Path(tempfile.mkdtemp(prefix="slipstream-bench-pd-"))
    if not args.model:
        args.model = str(random_checkpoint(log_dir / "qwen3-0.6b-random"))
    transports = args.kv_transports.split(",")
    procs: list[Proc] = []
    rows = []
    try:
        hybrid = Proc(["serve", args.model, *extra], log_dir, "hybrid")
        pairs = []  # (transport, router): one prefill + decode pair per transport
        for t in transports:
            flags = [*extra, "--kv-transport", t]
            prefill = Proc(["serve", args.model, "--role", "prefill", *flags], log_dir, f"prefill-{t}")
            decode = Proc(["serve", args.model, "--role", "decode", *flags], log_dir, f"decode-{t}")
            router = Proc(["router"], log_dir, f"router-{t}")
            procs += [prefill, decode, router]
            pairs.append((t, router, prefill, decode))
        procs.append(hybrid)
        for p in procs:
            p.wait_healthy(args.start_timeout)
        for _, router, prefill, decode in pairs:
            _post(router.url + "/nodes/add", {"url": prefill.url, "status": {"role": 2}})
            _post(router.url + "/nodes/add", {"url": decode.url, "status": {"role": 3}})
        vocab = _get(hybrid.url + "/engine_info")["vocab_size"]
        model = _get(hybrid.url + "/v1/models")["data"][0]["id"]
        setups = [("hybrid", hybrid.url)] + [(f"1P1D {t}", router.url) for t, router, _, _ in pairs]
        for _, url in setups:  # warm-up: first-use compilation and graph capture are not measured
            _bench(url, float("inf"), argparse.Namespace(**{**vars(args), "num_prompts": 4}), model, vocab)
        for rate in rates:
            for name, url in setups:
                s = _bench(url, rate, args, model, vocab)
                rows.append((rate, name, s))
                print(f"  done: rate={rate} {name} completed={s['completed']} failed={s['failed']}", file=sys.stderr)
        for t, _, _, decode in pairs:
            info = _get(decode.url + "/engine_info")["stats"]
            gb, ms = info.get("kv_transfer_bytes", 0), info.get("kv_transfer_ms", 0.0)
            print(f"  KV over {t}: {info.get('kv_transfers', 0)} pulls, {gb / 1e9:.2f} GB, "
                  f"{gb / ms / 1e6 if ms else 0:.1f} GB/s (per-pull wall time, polling included)", file=sys.stderr)
    finally:
        for p in procs:
            p.stop()
    print(f"slipstream bench pd: model={args.model} prompts={args.num_prompts} input={args.input_len} "
          f"output={args.output_len} (ignore_eos, greedy) engine_args={args.engine_args!r} "
          f"cpus={os.cpu_count()} (all engines on this machine; logs in {log_dir})")
    print(f"{'rate':>6} {'setup':>10} {'ok':>4} {'TTFT p50':>9} {'p90':>8} {'p99':>8} {'ITL p50':>8} {'p90':>8} "
          f"{'p99':>8} {'out tok/s':>10}")
    for rate, name, s in rows:
        t, i = s["ttft_ms"], s["itl_ms"]
        print(f"{rate:>6} {name:>10} {s['completed']:>4} {t['p50']:>9.1f} {t['p90']:>8.1f} {t['p99']:>8.1f} "
              f"{i['p50']:>8.1f} {i['p90']:>8.1f} {i['p99']:>8.1f} {s['output_throughput_tok_s']:>10.1f}")
    print("(milliseconds)")
    return 0 if all(s["failed"] == 0 for _, _, s in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
