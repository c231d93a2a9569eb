"""`slipstream bench epd` runs end to end on the CPU (a tiny random Qwen3-VL shape, five real processes) and
prints its table with both setups."""
from __future__ import annotations

import subprocess
import sys

import pytest

from tests.support.server import REPO

pytest.importorskip("dlslime", reason="dlslime (and the system library libibverbs1) is needed for EPD transfers")


def test_bench_epd_runs_on_cpu():
    out = subprocess.run([sys.executable, "-m", "engine.cli.main", "bench", "epd", "--shape", "tiny", "--rates", "inf",
                          "--num-requests", "2", "--image-sizes", "64", "--output-len", "3",
                          "--engine-args", "--device cpu --num-kv-blocks 256", "--encoder-args", "--device cpu"],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    rows = [line for line in out.stdout.splitlines() if line.startswith("| 64x64")]
    assert [r.split("|")[3].strip() for r in rows] == ["hybrid", "EPD"]
    assert all(r.split("|")[4].strip() == "2" for r in rows)
