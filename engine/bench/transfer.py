"""KV pull throughput between two processes over DLSlime: GB/s for whole-block pulls of a few
request sizes, contiguous vs scattered blocks. Run: slipstream bench transfer"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import statistics

import torch

from engine.pd.transfer import KVTransferAgent, TransferState


def _make_pool(num_blocks: int, args) -> torch.Tensor:
    shape = (num_blocks, args.layers, 2, args.block_size, args.kv_heads, args.head_dim)
    pool = torch.empty(shape, dtype=getattr(torch, args.dtype))
    # Each block's bytes hold its block id, so landed data can be checked cheaply.
    pool.view(num_blocks, -1).view(torch.uint8)[:] = (
        torch.arange(num_blocks, dtype=torch.int64) % 251).to(torch.uint8)[:, None]
    return pool


def _landed(dst: torch.Tensor, remote, local) -> bool:
    """First and last byte of every pulled block carry the source block id."""
    rows = dst.view(dst.shape[0], -1).view(torch.uint8)[local]
    want = (torch.tensor(remote) % 251).to(torch.uint8)
    return torch.equal(rows[:, 0], want) and torch.equal(rows[:, -1], want)


def _serve(conn, num_blocks: int, args) -> None:
    agent = KVTransferAgent(_make_pool(num_blocks, args), host=args.host, transport=args.transport)
    conn.send(agent.endpoint_info())
    conn.recv()
    agent.close()


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _conditions(args, block_bytes: int) -> str:
    from importlib.metadata import version
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",)
    shape = (f"{args.layers} layers x 2 x {args.block_size} tok x {args.kv_heads} heads"
             f" x {args.head_dim}")
    return "\n".join([
        f"host {platform.node()}  cpu {_cpu_model()}  cores {os.cpu_count()}  "
        f"load {' '.join(f'{x:.1f}' for x in load)}",
        f"torch {torch.__version__}  dlslime {version('dlslime')}  transport {args.transport} "
        f"({args.host}, two processes, CPU pools in pageable memory)",
        f"block = {shape} {args.dtype} = {block_bytes / 1e6:.3f} MB; "
        f"<= 32 assignments/call, <= 64 in flight, ranges <= {args.max_range_mb} MB; "
        f"median of {args.repeats}",
    ])


def _pull(agent, info, remote, local, timeout_s=120.0):
    t = agent.start_pull(info, remote, local, timeout_s=timeout_s)
    if t.wait() is not TransferState.DONE:
        raise SystemExit(f"pull {t.state.value}: {t.error}")
    return t


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--layers", type=int, default=28)      # Qwen3-0.6B
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--tokens", default="128,1024,4096", help="request sizes, comma-separated")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--transport", default="tcp", choices=["tcp", "rdma"])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--max-range-mb", type=int, default=64)
    args = p.parse_args(argv)

    sizes = [int(x) for x in args.tokens.split(",")]
    max_blocks = max(-(-n // args.block_size) for n in sizes)
    num_blocks = 2 * max_blocks            # room for every-other-block (scattered) layouts
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_serve, args=(child, num_blocks, args), daemon=True)
    proc.start()
    try:
        info = parent.recv()
        dst = torch.zeros_like(_make_pool(num_blocks, args))
        with KVTransferAgent(dst, host=args.host, transport=args.transport,
                             max_range_bytes=args.max_range_mb << 20) as agent:
            print(_conditions(args, agent.block_bytes))
            _pull(agent, info, [0], [0])   # connect + identity probe, outside the timings
            print(f"{'tokens':>7} {'blocks':>6} {'MB':>8} {'layout':>10} {'ranges':>6} "
                  f"{'calls':>5} {'ms':>8} {'GB/s':>6}")
            for tokens in sizes:
                n = -(-tokens // args.block_size)
                layouts = {"contiguous": (list(range(n)), list(range(n))),
                           # every other block on both sides: nothing coalesces
                           "scattered": (list(range(0, 2 * n, 2)), list(range(1, 2 * n, 2)))}
                for name, (remote, local) in layouts.items():
                    runs = [_pull(agent, info, remote, local) for _ in range(args.repeats)]
                    ok = _landed(dst, remote, local)
                    ms = statistics.median(t.elapsed_ms for t in runs)
                    t = runs[0]
                    print(f"{tokens:>7} {n:>6} {t.bytes / 1e6:>8.1f} {name:>10} {t.num_ranges:>6} "
                          f"{t.num_calls:>5} {ms:>8.1f} {t.bytes / ms / 1e6:>6.2f}"
                          + ("" if ok else "  DATA MISMATCH"))
            m = agent.metrics()
            print(f"total: {m.transfers} pulls, {m.bytes / 1e9:.2f} GB, {m.gbps:.2f} GB/s, "
                  f"peak {m.peak_inflight} assignments in flight")
    finally:
        parent.send("stop")
        proc.join(10)
        if proc.is_alive():
            proc.kill()


if __name__ == "__main__":
    main()
