"""Smoke run of the CPU benchmark: tiny shapes, no timing assertions."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_mixture_tiny_runs() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    # one thread: on a busy 2-core machine two OpenMP threads stall on each other
    args = ["--quick", "--tiny", "--curve", "1,2,15", "--threads", "1"]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench_mixture.py"), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for name in ("fused_vs_loop_15", "fused_vs_loop_fwd_15", "sapt15_vs_lora", "sapt1_vs_lora"):
        assert f"RESULT {name}=" in proc.stdout, proc.stdout
