"""Soak: 1P1D + router on loopback, SLIPSTREAM_SOAK_REQUESTS requests (1,000 by default; the README's row was
run with 2,000) at concurrency 32 (streamed and not): zero failures, every process's RSS grows by less than
RSS_BOUND_MB after warm-up, and every KV pool is full at the end."""
from __future__ import annotations

import os

import pytest

from tests.reliability.load import Load
from tests.reliability.test_router_faults import model_of

pytest.importorskip("dlslime", reason="dlslime (and libibverbs1) is needed for KV transfer")
REQUESTS, WARMUP, CONCURRENCY = int(os.environ.get("SLIPSTREAM_SOAK_REQUESTS", "1000")), 300, 32
RSS_BOUND_MB = 64  # per process, after warm-up (Python's allocator and the caches settle in the first hundreds)


def rss_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


def test_soak_at_concurrency_32(cluster):
    prefill, decode = cluster.engines_of("prefill", "decode")
    router = cluster.start_router()
    router.wait_engines(2)
    pids = {"router": router.proc.pid, "prefill front": prefill.proc.pid, "prefill core": prefill.core_pid,
            "decode front": decode.proc.pid, "decode core": decode.core_pid}
    load = Load(router.url, model_of(prefill), concurrency=CONCURRENCY, max_tokens=(2, 16)).start()
    load.wait_for(WARMUP, timeout=300)
    after_warmup = {name: rss_mb(pid) for name, pid in pids.items()}
    load.wait_for(REQUESTS, timeout=900)
    results = load.stop()
    growth = {name: rss_mb(pid) - after_warmup[name] for name, pid in pids.items()}
    print(f"\nsoak: {len(results)} requests, RSS growth after warm-up (MB): "
          + ", ".join(f"{k} {v:+.1f}" for k, v in growth.items()))
    assert len(results) >= REQUESTS and not [r.error for r in results if not r.ok]
    assert all(g < RSS_BOUND_MB for g in growth.values()), growth
    for e in (prefill, decode):
        e.wait_kv_free(timeout=20)
