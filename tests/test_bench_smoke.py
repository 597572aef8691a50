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


@pytest.mark.slow
def test_gpu_bench_dry_runs_every_part() -> None:
    """bench/gpu_bench.sh --dry: every part of the prepared GPU bench runs on the CPU with
    tiny shapes (graph mode as trace), one table comes out, graph mode's losses equal
    eager's; no verdict on times (they mean nothing there)."""
    env = subprocess_env(PYTHON=sys.executable)
    proc = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_bench.sh"), "--dry"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in proc.stdout.splitlines() if line.startswith("| ")]
    parts = {r[0].strip() for r in rows[1:]}
    assert parts == {"op", "step", "gen", "graph", "zero3"}, proc.stdout
    assert "every part ran" in proc.stdout
    losses = [r for r in rows if "losses of" in r[1]]
    assert len(losses) == 1 and losses[0][7].strip() == "PASS", proc.stdout
    assert all(r[7].strip() in ("-", "PASS") for r in rows[1:]), proc.stdout


@pytest.mark.slow
def test_bench_op_count_tiny_runs() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench_op_count.py"), "--tiny"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "RESULT sapt15_ops_vs_lora=" in proc.stdout, proc.stdout
