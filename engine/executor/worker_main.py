"""The loop of a worker process (ranks > 0; `mp` starts it as a child process, `ray` inside an actor): connect
to rank 0's channel, load the rank's shard, then run every step and call rank 0 sends, in order. A failed step
ends the process (rank 0 sees it die and stops the engine); a failed call is answered with its error."""
from __future__ import annotations

import logging
import os
import traceback
from pathlib import Path

from engine.config import EngineConfig
from engine.executor.channel import WorkerChannel
from engine.wire import WorkerCall, WorkerReady, WorkerReply, WorkerStep

log = logging.getLogger(__name__)

IDLE_POLL_MS = 1000  # idle wake-ups: is the parent (rank 0's process) still there?


def run_worker(config: EngineConfig, model_path: str, max_model_len: int, rank: int, world_size: int,
               rendezvous: str, channel_address: str, device_index: int | None = None,
               parent_pid: int | None = None, channel_secret: str | None = None) -> int:
    """Serves one rank until rank 0 sends `shutdown` (returns 0) or goes away (returns 1)."""
    from engine.executor.base import call
    from engine.worker.worker import Worker
    channel = WorkerChannel(channel_address, rank, channel_secret)
    channel.send(WorkerReady(rank=rank, pid=os.getpid(), loaded=False))
    try:
        worker = Worker(config, Path(model_path), max_model_len, rank, world_size, rendezvous, device_index)
    except Exception as e:
        log.exception("event=worker_start_failed rank=%d", rank)
        channel.send(WorkerReply(call_id=-1, rank=rank, error=f"{type(e).__name__}: {e}"))
        channel.close()
        return 1
    channel.send(WorkerReady(rank=rank, pid=os.getpid(), loaded=True))
    log.info("event=worker_ready rank=%d pid=%d device=%s", rank, os.getpid(), worker.device)
    try:
        while True:
            msg = channel.recv(IDLE_POLL_MS)
            if msg is None:
                if parent_pid is not None and os.getppid() != parent_pid:
                    log.error("event=worker_orphaned rank=%d: the engine core is gone", rank)
                    return 1
                continue
            worker.drop_tables(msg.freed)
            if isinstance(msg, WorkerStep):
                worker.execute_step(msg)
            elif isinstance(msg, WorkerCall):
                if msg.method == "shutdown":
                    channel.send(WorkerReply(call_id=msg.call_id, rank=rank))
                    return 0
                try:
                    result = call(worker, msg.method, msg.args)
                    channel.send(WorkerReply(call_id=msg.call_id, rank=rank, result=result))
                except Exception as e:
                    log.warning("event=worker_call_failed rank=%d method=%s\n%s", rank, msg.method,
                                traceback.format_exc())
                    channel.send(WorkerReply(call_id=msg.call_id, rank=rank, error=f"{type(e).__name__}: {e}"))
    finally:
        worker.close()
        channel.close()


def main(argv: list[str] | None = None) -> int:
    """`python -m engine.executor.worker_main --rank R ... [engine flags]`: how `mp` starts a worker process."""
    import argparse
    import signal

    from engine.cli.args import add_config_args, config_from_args
    p = argparse.ArgumentParser(prog="slipstream-worker")
    for name, kind in (("rank", int), ("world-size", int), ("rendezvous", str), ("channel", str),
                       ("model-path", str), ("device-index", int), ("parent-pid", int)):
        p.add_argument(f"--{name}", type=kind, required=True)
    p.add_argument("--log-level", default="WARNING")
    add_config_args(p, EngineConfig)
    args = p.parse_args(argv)
    from engine.processes import die_with_parent
    die_with_parent(signal.SIGKILL)  # with the engine core, even when it is killed
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if os.getppid() != args.parent_pid:  # the core died before the death signal was armed
        return 1
    config = config_from_args(EngineConfig, args)  # its max_model_len is the core's, resolved
    return run_worker(config, args.model_path, config.max_model_len, args.rank,
                      args.world_size, args.rendezvous, args.channel, args.device_index, args.parent_pid)


if __name__ == "__main__":
    import sys
    sys.exit(main())
