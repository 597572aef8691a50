"""Preemption without SLURM: a signal stops the run at a step boundary with a checkpoint,
exit code 75, and the restarted run equals the uninterrupted one (reference)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from sapt_dist import distributed
from sapt_dist.distributed import preemption

from .conftest import run_progress, subprocess_env
from .test_run import ROOT, TINY

#: 2 tasks of 36 steps each (96 examples, 3 epochs, batch 8), a periodic checkpoint every
#: 10 steps: the signal is sent once the first one exists, so the stop lands mid-task
ARGS = [*TINY, "data.max_train=96", "train.epochs=3", "train.checkpoint_every=10"]


def _env() -> dict[str, str]:
    env = subprocess_env()
    env.pop(preemption.MARKER_ENV, None)
    return env


def _cmd(out) -> list[str]:
    cfg = str(ROOT / "sapt_dist/presets/demo.yaml")
    return [
        sys.executable,
        "-m",
        "sapt_dist.cli.train",
        "--config",
        cfg,
        f"output_dir={out}",
        *ARGS,
    ]


_AGREE = """
import json, sys, torch.distributed as td
td.init_process_group("gloo")
from sapt_dist import distributed
r = distributed.rank()
seen = [distributed.any_rank(r == 1), distributed.any_rank(False), distributed.any_rank(r == 0)]
out = [None, None]
td.all_gather_object(out, seen)
if r == 0:
    json.dump(out, open(sys.argv[1], "w"))
td.destroy_process_group()
"""


@pytest.mark.slow
def test_a_stop_seen_by_one_rank_is_agreed_by_all(tmp_path):
    """Two gloo processes: a signal that reached only one rank (rank 1, then rank 0) is a
    stop on both; none is a stop on neither (the all-reduce behind stop_requested)."""
    script = tmp_path / "agree.py"
    script.write_text(_AGREE)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    cmd += ["--master_port", str(distributed.launch._free_port()), str(script)]
    cmd.append(str(tmp_path / "seen.json"))
    res = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    seen = json.loads((tmp_path / "seen.json").read_text())
    assert seen == [[True, False, True], [True, False, True]]


def test_signal_sets_the_flag_only():
    preemption.reset()
    old = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGTERM)}
    try:
        assert preemption.install_handlers()
        assert not preemption.stop_requested() and preemption.requested_locally() is None
        os.kill(os.getpid(), signal.SIGUSR1)
        deadline = time.time() + 5
        while not preemption.stop_requested() and time.time() < deadline:
            time.sleep(0.01)
        assert preemption.stop_requested() and preemption.requested_locally() == "SIGUSR1"
        os.kill(os.getpid(), signal.SIGTERM)  # a second signal: still a stop request, no exit
        time.sleep(0.05)
        assert preemption.requested_locally() == "SIGUSR1"
    finally:
        preemption.reset()
        for s, h in old.items():
            signal.signal(s, h)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run."""
    out = tmp_path_factory.mktemp("preempt") / "ref"
    ref = subprocess.run(_cmd(out), env=_env(), capture_output=True, text=True, timeout=900)
    assert ref.returncode == 0, ref.stderr[-3000:]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM], ids=["SIGUSR1", "SIGTERM"])
def test_signal_mid_task_stops_cleanly_and_resumes_exactly(tmp_path, reference, sig):
    env = _env()

    out = tmp_path / "sig"
    marker = tmp_path / "marker.json"
    proc = subprocess.Popen(
        _cmd(out),
        env={**env, preemption.MARKER_ENV: str(marker)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    meta = out / "state" / "step" / "meta.json"
    deadline = time.time() + 600
    while not meta.is_file():  # the first periodic checkpoint of task 1: mid-training
        assert proc.poll() is None, "run ended before the signal"
        assert time.time() < deadline, "no step checkpoint appeared"
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == preemption.EXIT_PREEMPTED, err[-3000:]
    m = re.search(r"stopping at step (\d+)/(\d+) of task 1/2", err)
    assert m, err[-3000:]
    stop, total = int(m.group(1)), int(m.group(2))
    assert 10 <= stop < total
    # the checkpoint is at the step it stopped at, whether or not a periodic one was due
    saved = json.loads(meta.read_text())
    assert saved["task_index"] == 0 and saved["step"] == stop and len(saved["losses"]) == stop
    assert json.loads(marker.read_text())["signal"] == sig.name
    assert not (out / "state/finished.json").exists()

    res = subprocess.run(_cmd(out), env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    # resumed exactly there: no step lost, none trained twice
    assert f"resumed at step {stop}/{total}" in res.stderr
    a, b = run_progress(reference), run_progress(out)
    assert a["losses"] == b["losses"] and a["matrix"] == b["matrix"]
    from safetensors.torch import load_file

    for f in ("block_00.safetensors", "block_01.safetensors"):
        x, y = load_file(str(reference / "blocks" / f)), load_file(str(out / "blocks" / f))
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), f
