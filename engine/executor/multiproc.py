"""`mp`: ranks 1..N-1 as child processes of the engine core on this node (`python -m
engine.executor.worker_main`: a fresh interpreter, as CUDA needs, that re-runs none of the caller's script),
rank r on CUDA device r. Children die with the core (PR_SET_PDEATHSIG); the core polls them, and one that
exits is reported within MONITOR_POLL_S."""
from __future__ import annotations

import dataclasses
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from engine.cli.args import config_argv
from engine.config import EngineConfig
from engine.executor.distributed import SHUTDOWN_TIMEOUT_S, DistributedExecutor
from engine.processes import private_ipc_address, remove_ipc_file, stop_process

log = logging.getLogger(__name__)
MONITOR_POLL_S = 0.1


def exit_reason(rank: int, pid: int, code: int) -> str:
    how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
    return f"worker rank {rank} (pid {pid}) {how}; the engine cannot continue without it"


class MultiprocExecutor(DistributedExecutor):
    def driver_host(self) -> str:
        return "127.0.0.1"

    def channel_address(self, host: str) -> str:
        return private_ipc_address("workers")

    def start_workers(self, rendezvous: str, channel_address: str) -> None:
        env = dict(os.environ)
        # the child imports this very package, installed or not
        root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
        level = logging.getLevelName(logging.getLogger().getEffectiveLevel())
        self.procs: list[subprocess.Popen] = []
        for rank in range(1, self.world_size):
            argv = [sys.executable, "-m", "engine.executor.worker_main", "--rank", str(rank),
                    "--world-size", str(self.world_size), "--rendezvous", rendezvous, "--channel", channel_address,
                    "--model-path", str(self._model_path), "--device-index", str(rank),
                    "--parent-pid", str(os.getpid()), "--log-level", str(level),
                    *config_argv(EngineConfig, dataclasses.replace(self.config, max_model_len=self._max_model_len))]
            self.procs.append(subprocess.Popen(argv, env=env))

    def wait_for_worker_exit(self) -> str | None:
        while not self._stopping:
            for rank, p in enumerate(self.procs, start=1):
                if p.poll() is not None:
                    return exit_reason(rank, p.pid, p.returncode)
            time.sleep(MONITOR_POLL_S)
        return None

    def stop_workers(self) -> None:
        for p in getattr(self, "procs", []):  # they were told to shut down: wait, then kill
            stop_process(p, SHUTDOWN_TIMEOUT_S)
        remove_ipc_file(self.channel.address)
