"""The batch scripts without a job: ``--help`` prints their documentation, ``--dry-run``
prints the launch line resolved from the SLURM variables given (or this host) and loads
the config as sapt-train would, so a bad key fails before the job queues."""

from __future__ import annotations

import subprocess
import sys

import pytest

from .conftest import ROOT, subprocess_env

SCRIPTS = ["slurm/train.sbatch", "slurm/train_multinode.sbatch"]


def _bash(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", *args],
        cwd=ROOT,
        env=subprocess_env(SAPT_PYTHON=sys.executable, **env),
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_prints_the_scripts_documentation(script):
    res = _bash(script, "--help")
    assert res.returncode == 0, res.stderr
    assert f"sbatch {script}" in res.stdout
    assert not any(line.startswith("#SBATCH") for line in res.stdout.splitlines())
    assert "--signal=B:USR1@300" in res.stdout  # the knobs are explained


def test_dry_run_prints_the_multinode_launch_line_from_slurm_variables():
    res = _bash(
        "slurm/train_multinode.sbatch",
        "--dry-run",
        "sapt_dist/presets/demo.yaml",
        "train.lr=1e-3",
        SLURM_NNODES="2",
        SLURM_JOB_ID="7",
        SLURM_GPUS_ON_NODE="8",
    )
    assert res.returncode == 0, res.stderr
    line = next(x for x in res.stdout.splitlines() if "would run:" in x)
    assert "--nnodes 2 --nproc_per_node 8" in line and "--master_port 20007" in line
    assert line.endswith("launch/train.py --config sapt_dist/presets/demo.yaml train.lr=1e-3")
    assert "the config loads" in res.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_dry_run_refuses_a_bad_key_before_any_job(script):
    res = _bash(script, "--dry-run", "sapt_dist/presets/demo.yaml", "data.max_tran=3")
    assert res.returncode == 2
    assert "command line override 'data.max_tran=3'" in res.stderr
    assert "would run" not in res.stdout + res.stderr


def test_no_config_is_the_usage():
    res = _bash("slurm/train.sbatch")
    assert res.returncode == 2 and "usage: sbatch slurm/train.sbatch [--dry-run]" in res.stderr
