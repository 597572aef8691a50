"""Smoke run of the CPU benchmark: tiny shapes, no timing assertions."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import subprocess_env

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
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


@pytest.mark.slow
def test_bench_zero3_tiny_runs() -> None:
    """1 process vs 2 ZeRO-3 ranks: the table comes out and each rank holds half."""
    env = subprocess_env()
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench_zero3.py"), "--tiny"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [line.split("|") for line in proc.stdout.splitlines() if line.startswith("| 2p-zero3")]
    assert len(rows) == 2 and all(r[-2].strip() == "0.50" for r in rows), proc.stdout
