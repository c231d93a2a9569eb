"""KV pull throughput between two processes: GB/s for whole-block pulls of a few request sizes,
contiguous vs scattered blocks, over one transport: CUDA IPC (GPU pools on one host), DLSlime TCP
(CPU pools, or GPU pools staged through pinned host memory) or RDMA.
Run: slipstream bench transfer [--transport ipc|tcp|rdma] [--device cpu|cuda]"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import statistics

import torch

from engine.pd.transfer import KVTransferAgent, TransferState


def _make_pool(num_blocks: int, args, fill: bool = True) -> torch.Tensor:
    shape = (num_blocks, args.layers, 2, args.block_size, args.kv_heads, args.head_dim)
    pool = torch.zeros(shape, dtype=getattr(torch, args.dtype), device=args.device)
    if fill:  # each block's bytes hold its block id, so landed data can be checked cheaply
        pool.view(num_blocks, -1).view(torch.uint8)[:] = (
            torch.arange(num_blocks, dtype=torch.int64, device=args.device) % 251).to(torch.uint8)[:, None]
    return pool


def _landed(dst: torch.Tensor, remote, local) -> bool:
    """First and last byte of every pulled block carry the source block id."""
    rows = dst.view(dst.shape[0], -1).view(torch.uint8)[torch.tensor(local, device=dst.device)].cpu()
    want = (torch.tensor(remote) % 251).to(torch.uint8)
    return torch.equal(rows[:, 0], want) and torch.equal(rows[:, -1], want)


def _agent(pool: torch.Tensor, args) -> KVTransferAgent:
    # a GPU pool served over TCP is staged through pinned host memory: room for the whole pool
    staging = pool.shape[0] if pool.is_cuda and args.transport != "ipc" else 0
    return KVTransferAgent(pool, host=args.host, transport=args.transport, staging_blocks=staging,
                           max_range_bytes=args.max_range_mb << 20)


def _serve(conn, num_blocks: int, args) -> None:
    agent = _agent(_make_pool(num_blocks, args), args)
    # what a prefill engine does when it parks a request: staged ids (identity when not staged)
    staged = agent.stage_out(list(range(num_blocks)))
    conn.send((agent.endpoint_info(), list(staged.remote_ids)))
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
        f"({args.host}, two processes, {_pools(args)})",
        f"block = {shape} {args.dtype} = {block_bytes / 1e6:.3f} MB; "
        f"<= 32 assignments/call, <= 64 in flight, ranges <= {args.max_range_mb} MB; "
        f"median of {args.repeats}",
    ])


def _pools(args) -> str:
    if args.device == "cpu":
        return "CPU pools in pageable memory"
    gpu = torch.cuda.get_device_name(0)
    if args.transport == "ipc":
        return f"GPU pools on one {gpu}, device-to-device copies"
    return f"GPU pools on one {gpu}, staged through pinned host memory (stage-out not timed)"


def _pull(agent, info, staged, remote, local, timeout_s=120.0):
    t = agent.start_pull(info, remote, local, timeout_s=timeout_s,
                         staged_block_ids=[staged[r] for r in remote])
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
    p.add_argument("--transport", default="tcp", choices=["ipc", "tcp", "rdma"])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="where both pools live (auto: cuda when available; ipc needs cuda)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--max-range-mb", type=int, default=64)
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.transport == "ipc" and args.device != "cuda":
        p.error("--transport ipc moves GPU pools: it needs --device cuda")

    sizes = [int(x) for x in args.tokens.split(",")]
    max_blocks = max(-(-n // args.block_size) for n in sizes)
    num_blocks = 2 * max_blocks            # room for every-other-block (scattered) layouts
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_serve, args=(child, num_blocks, args), daemon=True)
    proc.start()
    try:
        if not parent.poll(300):
            raise SystemExit("the source process did not start")
        info, staged = parent.recv()
        dst = _make_pool(num_blocks, args, fill=False)
        with _agent(dst, args) as agent:
            print(_conditions(args, agent.block_bytes))
            # connect + identity probe (and a first scattered copy: kernel compile), outside the timings
            _pull(agent, info, staged, [0, 2], [1, 3])
            base = agent.metrics()
            print(f"{'tokens':>7} {'blocks':>6} {'MB':>8} {'layout':>10} {'ranges':>6} "
                  f"{'calls':>5} {'ms':>8} {'GB/s':>6}")
            for tokens in sizes:
                n = -(-tokens // args.block_size)
                layouts = {"contiguous": (list(range(n)), list(range(n))),
                           # every other block on both sides: nothing coalesces
                           "scattered": (list(range(0, 2 * n, 2)), list(range(1, 2 * n, 2)))}
                for name, (remote, local) in layouts.items():
                    runs = [_pull(agent, info, staged, remote, local) for _ in range(args.repeats)]
                    ok = _landed(dst, remote, local)
                    ms = statistics.median(t.elapsed_ms for t in runs)
                    t = runs[0]
                    print(f"{tokens:>7} {n:>6} {t.bytes / 1e6:>8.1f} {name:>10} {t.num_ranges:>6} "
                          f"{t.num_calls:>5} {ms:>8.1f} {t.bytes / ms / 1e6:>6.2f}"
                          + ("" if ok else "  DATA MISMATCH"))
            m = agent.metrics()
            n, nbytes, ms = m.transfers - base.transfers, m.bytes - base.bytes, m.ms - base.ms
            print(f"total (warm-up left out): {n} pulls, {nbytes / 1e9:.2f} GB, "
                  f"{nbytes / ms / 1e6 if ms else 0:.2f} GB/s, "
                  f"peak {m.peak_inflight} assignments in flight")
    finally:
        parent.send("stop")
        proc.join(10)
        if proc.is_alive():
            proc.kill()


if __name__ == "__main__":
    main()
