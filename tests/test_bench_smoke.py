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


def test_bench_real_model_plans_and_tables_finished_runs(tmp_path: Path) -> None:
    """bench_real_model.py: --preset's runs and their commands (the variants' settings, the
    single-task run FWT reads, per-method default seeds), and the table from finished run
    folders: ours and the released scorer's BWT / FWT, the a* off-diagonal mass."""
    import json

    import torch
    from safetensors.torch import save_file

    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import bench_real_model as b
    finally:
        sys.path.pop(0)
    assert b.method_seeds("sapt", None) == [42, 1] and b.method_seeds("mtl", None) == [42]
    assert b.method_seeds("mtl", [3, 4]) == [3, 4]
    assert b.default_out("smollm2_long5").name == "real_smollm2_long5"
    cmd = b.command(tmp_path, "sapt_onehot", 1, [], "smollm2_long5", [42])
    assert cmd[cmd.index("--preset") + 1] == "smollm2_long5"
    assert "method=sapt" in cmd and "adapter.learning_mixture=new_block" in cmd
    # seed 1 has no single-task run of its own: FWT from seed 42's
    assert f"single_task_run={tmp_path / 'single_task_s42'}" in cmd
    assert "method=olora" in b.command(tmp_path, "olora", 42, [], "smollm2_long5", [42])

    def fake(name: str, method: str, matrix: list, targets: list | None = None, **res) -> None:
        folder = tmp_path / name
        (folder / "metrics").mkdir(parents=True)
        (folder / "state").mkdir()
        (folder / "state/finished.json").write_text("{}")
        (folder / "metrics/results.json").write_text(
            json.dumps({"method": method, "tasks": ["t1", "t2", "t3"], "matrix": matrix, **res})
        )
        if targets is not None:
            (folder / "blocks").mkdir()
            save_file({"targets": torch.tensor(targets)}, str(folder / "blocks/router.safetensors"))

    m = [[80.0, None, None], [70.0, 60.0, None], [50.0, 55.0, 90.0]]
    a_star = [[1.0, 0.0, 0.0], [0.2, 0.8, 0.0], [0.1, 0.3, 0.6]]
    fake("sapt_s42", "sapt", m, a_star, metrics={})
    diag = [[70.0, None, None], [None, 60.0, None], [None, None, 80.0]]
    fake(
        "single_task_s42",
        "single_task",
        diag,
        metrics={"AP": 70.0},
        single_task_scores={"t1": 70.0, "t2": 60.0, "t3": 80.0},
    )
    records = tmp_path / "records"
    text = b.table(tmp_path, ["sapt", "single_task"], [42], None, "smollm2_long5", records)
    row = next(line for line in text.splitlines() if line.startswith("| sapt |"))
    cells = [c.strip() for c in row.split("|")[1:-1]]
    # AP 65, F.Ra 17.5, FWT ((80-70)+(60-60)+(90-80))/3, BWT -17.5; released: FWT 230/3 -
    # 50.94, BWT -35/3; a* off-diagonal over tasks 2, 3: (0.2 + 0.4) / 2
    assert cells[1:8] == ["1/1", "65.0", "17.5", "6.7", "-17.5", "25.7", "-11.7"]
    assert cells[10] == "0.30"
    # each finished run left a record; without the folders the table is the same
    assert sorted(p.name for p in (records / "smollm2_long5").iterdir()) == [
        "sapt_s42.json",
        "single_task_s42.json",
    ]
    import shutil

    shutil.rmtree(tmp_path / "sapt_s42")
    shutil.rmtree(tmp_path / "single_task_s42")
    again = b.table(tmp_path, ["sapt", "single_task"], [42], None, "smollm2_long5", records)
    assert again == text and "Transcribed" not in text
    # a record written by hand says so under the table
    rec = json.loads((records / "smollm2_long5/sapt_s42.json").read_text())
    rec["source"] = "transcribed from docs"
    (records / "smollm2_long5/sapt_s42.json").write_text(json.dumps(rec))
    marked = b.table(tmp_path, ["sapt", "single_task"], [42], None, "smollm2_long5", records)
    note = next(line for line in marked.splitlines() if line.startswith("Transcribed records"))
    assert note.endswith(": sapt seed 42")
