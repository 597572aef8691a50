"""The project's own sbatch scripts on a real SLURM cluster (slurmctld + slurmd on this
machine, started by ``slurm/local_cluster.sh``), against references run without SLURM.

Skipped, with the reason, where SLURM is not installed or cannot be started (no root);
CI installs it and sets SAPT_REQUIRE_SLURM=1, which turns that skip into a failure.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from .conftest import LAUNCHER
from .test_run import ROOT, TINY

#: CPU ranks: 2 tasks of one core on the one node, no GPU
CPU_OPTS = ["--ntasks-per-node=2", "--gpus-per-task=0", "--cpus-per-task=1"]
#: 2 tasks of 36 steps each with 2 ranks (96 examples x 6 epochs / (8 x 2)); a periodic
#: checkpoint every 10 steps tells the test that training is under way; ZeRO-3 (sharding
#: even this tiny model), so srun-launched ranks really partition the backbone
RUN_ARGS = [
    *TINY,
    "data.max_train=96",
    "train.epochs=6",
    "train.checkpoint_every=10",
    f"distributed.deepspeed_config={ROOT / 'tests/data/ds_zero3_tiny.json'}",
]


def _fail_or_skip(why: str):
    if os.environ.get("SAPT_REQUIRE_SLURM") == "1":
        pytest.fail(f"SAPT_REQUIRE_SLURM=1 but {why}")
    pytest.skip(why)


@pytest.fixture(scope="module")
def slurm_env(tmp_path_factory):
    """The environment jobs are submitted with, against a running local cluster."""
    if shutil.which("sbatch") is None or shutil.which("slurmctld") is None:
        _fail_or_skip(
            "SLURM is not installed (bash slurm/local_cluster.sh install, as root, adds it)"
        )
    state = Path(os.environ.get("SAPT_SLURM_DIR", "/tmp/sapt-slurm"))
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER}
    env.update(
        SAPT_SLURM_DIR=str(state),
        SLURM_CONF=str(state / "slurm.conf"),
        PYTHONPATH=str(ROOT),
        SAPT_PYTHON=sys.executable,
        DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS="1",
    )
    script = str(ROOT / "slurm/local_cluster.sh")
    up = subprocess.run(["bash", script, "status"], env=env, capture_output=True, text=True)
    started = False
    if up.returncode != 0:
        if os.geteuid() != 0:
            _fail_or_skip("no SLURM cluster is up and starting one needs root")
        res = subprocess.run(["bash", script, "start"], env=env, capture_output=True, text=True)
        if res.returncode != 0:
            _fail_or_skip(f"could not start the local SLURM cluster: {res.stderr.strip()[-500:]}")
        started = True
    yield env
    if started:
        subprocess.run(["bash", script, "stop"], env=env, capture_output=True)


def _job(env, job: str) -> dict[str, str]:
    out = subprocess.run(
        ["scontrol", "show", "job", "-o", job], env=env, capture_output=True, text=True
    ).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def _log_tail(path: Path) -> str:
    return path.read_text(errors="replace")[-4000:] if path.is_file() else f"(no {path})"


def _wait(env, job: str, states: set[str], log: Path, timeout: float = 900) -> dict:
    deadline = time.time() + timeout
    while True:
        info = _job(env, job)
        state = info.get("JobState")
        if not info:
            pytest.fail(f"job {job} is unknown to slurmctld (purged?):\n{_log_tail(log)}")
        if state in states:
            return info
        if state in {"FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}:
            pytest.fail(f"job {job} {state} ({info.get('Reason')}):\n{_log_tail(log)}")
        if time.time() > deadline:
            pytest.fail(f"job {job} still {state} after {timeout}s:\n{_log_tail(log)}")
        time.sleep(1)


def _release(env, job: str, log: Path) -> None:
    """A requeued job waits ~120 s (BeginTime); start it now. Right after it turns pending
    the update can fail the job ("credential revoked"), so give it a moment first."""
    _wait(env, job, {"PENDING"}, log)
    time.sleep(3)
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=env, check=True)


def _submit(env, log: Path, *args: str, opts=CPU_OPTS, script="slurm/train.sbatch") -> str:
    cmd = ["sbatch", "--parsable", *opts, f"--output={log}", script, *args]
    res = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip().split(";")[0]


def _args(out: Path) -> list[str]:
    return [str(ROOT / "sapt_dist/presets/demo.yaml"), f"output_dir={out}", *RUN_ARGS]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The same 2-process run, uninterrupted, started by torchrun (no SLURM)."""
    out = tmp_path_factory.mktemp("slurm_ref") / "ref"
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER}
    env.update(PYTHONPATH=str(ROOT), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    cmd += ["--master_port", "29517", str(ROOT / "launch/train.py"), "--config", *_args(out)]
    res = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-4000:]
    return out


def _same_run(ref: Path, out: Path) -> None:
    a = json.loads((ref / "state/blocks/progress.json").read_text())
    b = json.loads((out / "state/blocks/progress.json").read_text())
    assert a["tasks"] == b["tasks"] and len(a["tasks"]) == 2
    for t in a["tasks"]:  # every step's loss, in order: none lost, none repeated
        assert b["losses"][t] == a["losses"][t], t
    assert b["matrix"] == a["matrix"]
    ma = json.loads((ref / "metrics/accuracy_matrix.json").read_text())
    assert json.loads((out / "metrics/accuracy_matrix.json").read_text()) == ma
    from safetensors.torch import load_file

    for f in ("block_00.safetensors", "block_01.safetensors"):
        x, y = load_file(str(ref / "blocks" / f)), load_file(str(out / "blocks" / f))
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), f


@pytest.mark.slow
def test_sbatch_two_ranks_equals_torchrun(slurm_env, reference, tmp_path):
    """train.sbatch, srun, 2 CPU ranks: the same losses, matrix and blocks as torchrun."""
    out, log = tmp_path / "run", tmp_path / "job.out"
    job = _submit(slurm_env, log, *_args(out))
    _wait(slurm_env, job, {"COMPLETED"}, log)
    text = log.read_text()
    assert "2 ranks" in text and "training step exited with 0" in text
    assert (out / "state/finished.json").is_file()
    _same_run(reference, out)


@pytest.mark.slow
def test_time_limit_warning_and_requeue_resume_exactly(slurm_env, reference, tmp_path):
    """Two interruptions of one job: the time-limit warning (SIGUSR1 to the batch shell,
    as ``--signal=B:USR1@...`` sends it) during task 1, and ``scontrol requeue`` (SIGTERM)
    during task 2. Each time the ranks stop at a step boundary with a checkpoint, the job
    is requeued (by itself, then by SLURM), and the next start resumes at that very step.
    The result equals the uninterrupted run."""
    out, log = tmp_path / "run", tmp_path / "job.out"
    job = _submit(slurm_env, log, *_args(out))
    meta = out / "state" / "step" / "meta.json"

    def wait_checkpoint(task_index: int) -> None:
        deadline = time.time() + 600
        while not (meta.is_file() and json.loads(meta.read_text())["task_index"] == task_index):
            assert _job(slurm_env, job).get("JobState") in {"RUNNING", "PENDING", "CONFIGURING"}
            assert time.time() < deadline, _log_tail(log)
            time.sleep(0.1)

    wait_checkpoint(0)
    env = slurm_env
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=env, check=True)
    _release(env, job, log)
    _wait(env, job, {"RUNNING"}, log)
    wait_checkpoint(1)
    subprocess.run(["scontrol", "requeue", job], env=env, check=True)
    _release(env, job, log)
    info = _wait(env, job, {"COMPLETED"}, log)
    assert info["Restarts"] == "2"

    text = (out / "run.log").read_text()
    stops = re.findall(
        r"stopping at step (\d+)/(\d+) of task (\d)/2 \S+ on (SIGUSR1|SIGTERM)", text
    )
    assert [(t, s) for _, _, t, s in stops] == [("1", "SIGUSR1"), ("2", "SIGTERM")], text[-3000:]
    for step, total, task, _ in stops:
        assert 0 < int(step) < int(total)
        assert re.search(rf"task {task}/2 \S+: resumed at step {step}/{total}\n", text), text[
            -3000:
        ]
    job_log = log.read_text()
    assert "requeueing job" in job_log  # the USR1 stop requeued itself; SLURM did the other
    _same_run(reference, out)


def sweep_and_report(slurm_env: dict, tmp_path: Path) -> list[str]:
    """sapt-sweep: 2 tiny model sizes x 2 methods -> one job array on the cluster;
    sapt-report: the table and plots, checked against each run's own results and the
    backbones' parameter counts. Returns the array tasks' job logs (run on the 2-node
    cluster by tests/test_slurm_multinode.py, where the tasks land on both nodes)."""
    from sapt_dist.backbone.load import load_backbone
    from sapt_dist.config import load_config
    from sapt_dist.outputs import study

    spec = yaml.safe_load((ROOT / "slurm/examples/tiny_scaling.yaml").read_text())
    spec["output_root"] = str(tmp_path / "sweeps")
    spec["base"] = str(ROOT / spec["base"])
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(spec))

    # as a user's shell runs it (the environment sbatch hands to the array tasks)
    cmd = [sys.executable, "-m", "sapt_dist.cluster.sweep", str(path), "--submit"]
    res = subprocess.run(cmd, env=slurm_env, cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    folder = tmp_path / "sweeps" / "tiny_scaling"
    job = json.loads((folder / "job.json").read_text())["job_id"]
    runs = json.loads((folder / "runs.json").read_text())["runs"]
    assert len(runs) == 4
    logs = []
    for r in runs:
        log = folder / "logs" / f"{job}_{r['index']}.out"
        _wait(slurm_env, f"{job}_{r['index']}", {"COMPLETED"}, log)
        logs.append(log.read_text())

    assert study.main([str(folder)]) == 0
    report = folder / "report"
    rows = list(csv.DictReader((report / "summary.csv").open()))
    assert len(rows) == 4 and all(r["status"] == "finished" for r in rows)
    for row, r in zip(rows, runs, strict=True):
        res = json.loads((Path(r["output_dir"]) / "metrics/results.json").read_text())
        m = res["matrix"]
        assert row["method"] == r["method"] and row["model"] == r["model"]
        assert float(row["AP"]) == pytest.approx(sum(m[-1]) / len(m[-1]), abs=0.005)
    # the parameter count is the loaded backbone's
    for name in spec["models"]:
        cfg = load_config(None, [f"{k}={v}" for k, v in spec["models"][name].items()])
        model, _ = load_backbone(cfg.model)
        n = sum(p.numel() for p in model.parameters())
        assert {int(r["params"]) for r in rows if r["model"] == name} == {n}
    sizes = sorted({int(r["params"]) for r in rows})
    assert len(sizes) == 2
    for f in ("summary.md", "metrics_vs_size.png", "accuracy_matrices.png"):
        assert (report / f).stat().st_size > 0, f
    return logs


NODE_LISTS = [
    "node[01-03,07],gpu5,a[8-10]",
    "rack[1-2]-node[01-02]",
    "a[1,3]b[2-3],c9",
    "gpu-[098-101],login-[1-2]",
    "solo",
]


def test_node_list_expansion_equals_scontrol(slurm_env):
    """slurm_hostnames (used by every srun-started rank to find the master) against
    SLURM's own ``scontrol show hostnames`` on the forms real clusters write."""
    from sapt_dist.distributed import slurm_hostnames

    for nodelist in NODE_LISTS:
        res = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist],
            env=slurm_env,
            capture_output=True,
            text=True,
        )
        assert res.returncode == 0, res.stderr
        assert slurm_hostnames(nodelist) == res.stdout.split(), nodelist
