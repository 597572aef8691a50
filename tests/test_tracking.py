"""Experiment tracking: the offline W&B run is read back from its own ``.wandb`` files and
compared with what the run folder says (progress losses, accuracy matrix, results,
pseudo-samples); a killed and resumed run continues the same W&B run and step sequence.
No test goes online (conftest sets WANDB_MODE=offline; these tests also say offline)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sapt_dist.checkpoint.atomic import atomic_write_checked_json, read_checked_json
from sapt_dist.config import ConfigError, load_config
from sapt_dist.outputs.tracking import (
    STEP_KEY,
    Tracker,
    open_tracker,
    read_offline_run,
    read_wandb_file,
    redact,
    resolve_mode,
    state_path,
)

from .conftest import cli_cmd, subprocess_env, wait_for_step_checkpoint
from .test_run import TINY

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "sapt_dist/presets/demo.yaml"
FAKE_KEY = "fakeWandbKey0123456789abcdefSECRETxyz0123"
TASKS = ["task363_sst2_polarity_classification", "task875_emotion_classification"]


# ---------------------------------------------------------------------------- config, mode
def test_tracking_config_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"unknown config key 'tracking\.api_key'"):
        load_config(DEMO, ["tracking.api_key=abc"])
    with pytest.raises(ConfigError, match=r"'tracking\.mode'.*'sometimes'"):
        load_config(DEMO, ["tracking.mode=sometimes"])
    with pytest.raises(ConfigError, match=r"'tracking\.log_every' must be >= 1"):
        load_config(DEMO, ["tracking.log_every=0"])
    cfg = load_config(DEMO, ["tracking.group=sweep1", "tracking.tags=[a, b]"])
    assert cfg.tracking.group == "sweep1" and cfg.tracking.tags == ["a", "b"]
    assert cfg.tracking.mode == "offline"  # the demo's default
    assert load_config(None, ["model.builder=demo"]).tracking.mode == "auto"


def test_resolve_mode(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_BASE_URL", raising=False)
    empty = tmp_path / "netrc"
    empty.write_text("")
    monkeypatch.setenv("NETRC", str(empty))
    assert resolve_mode("auto") == "offline"
    assert resolve_mode("offline") == "offline"
    with pytest.raises(ConfigError, match=r"'tracking\.mode' is 'online' but no W&B API key"):
        resolve_mode("online")
    # what `wandb login` writes: a netrc entry for the W&B host
    (tmp_path / "netrc2").write_text("machine api.wandb.ai\n  login user\n  password notreal\n")
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc2"))
    assert resolve_mode("auto") == "online"
    monkeypatch.setenv("NETRC", str(empty))
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    assert resolve_mode("auto") == "online" and resolve_mode("online") == "online"
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert resolve_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_mode("auto") == "disabled"


def test_redact_drops_secret_looking_keys_only():
    tree = {
        "api_key": "x",
        "hf_token": "x",
        "max_new_tokens": 3,
        "model": {"password": "x", "path": "/m", "tokenizer": "t"},
        "items": [{"secret": "x", "keep": 1}],
    }
    assert redact(tree) == {
        "max_new_tokens": 3,
        "model": {"path": "/m", "tokenizer": "t"},
        "items": [{"keep": 1}],
    }


def test_no_tracker_off_rank0_or_when_off(monkeypatch, tmp_path):
    from sapt_dist.distributed import launch

    cfg = load_config(DEMO, [f"output_dir={tmp_path}/run"])
    # an earlier in-process run may have a process group of one: rank() says 0 then
    # (patched where is_main_process looks it up)
    monkeypatch.setattr(launch, "rank", lambda: 1)
    tr = open_tracker(cfg)
    assert type(tr) is Tracker and not tr.enabled
    monkeypatch.setattr(launch, "rank", lambda: 0)
    for ov in ("tracking.backend=none", "tracking.mode=disabled"):
        tr = open_tracker(load_config(DEMO, [f"output_dir={tmp_path}/run", ov]))
        assert type(tr) is Tracker
    assert not (tmp_path / "run").exists()  # nothing written, wandb never started


# ---------------------------------------------------------------------------- the reader
def test_reader_against_wandbs_writer(tmp_path):
    """Rows logged with wandb come back from the .wandb file; corruption is detected."""
    import wandb

    run = wandb.init(mode="offline", dir=str(tmp_path), project="p", config={"a": {"b": 2}})
    for i in range(1, 4):
        run.log({"x": i / 10, "s": f"row{i}"}, step=i)
    run.summary["final"] = 7.5
    run.finish()
    back = _finished(tmp_path, 1)
    assert back.run_ids == [run.id] and back.config["a"] == {"b": 2}
    assert [(r["_step"], r["x"], r["s"]) for r in back.history] == [
        (1, 0.1, "row1"),
        (2, 0.2, "row2"),
        (3, 0.3, "row3"),
    ]
    assert back.summary["final"] == 7.5 and back.exit_codes == [0]
    (path,) = back.files
    data = bytearray(path.read_bytes())
    n = len(read_wandb_file(path))
    # a kill mid-write: the whole records before the cut are read
    cut = tmp_path / "cut.wandb"
    cut.write_bytes(bytes(data[: len(data) - 40]))
    assert 0 < len(read_wandb_file(cut)) < n
    data[len(data) // 2] ^= 0xFF
    bad = tmp_path / "bad.wandb"
    bad.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="bad checksum"):
        read_wandb_file(bad)
    junk = tmp_path / "x.wandb"
    junk.write_bytes(b"hello world")
    with pytest.raises(ValueError, match="not a .wandb file"):
        read_wandb_file(junk)


# ---------------------------------------------------------------------------- end to end
def _steps(rows: list[dict]) -> list[int]:
    return [r[STEP_KEY] for r in rows if "train/loss" in r]


def _losses(out: Path) -> list[float]:
    progress = json.loads((out / "state/blocks/progress.json").read_text())
    return [x for t in progress["tasks"] for x in progress["losses"][t]]


def _finished(out: Path, starts: int, killed: int = 0):
    """The run's W&B files once ``starts`` of them (less ``killed``) hold their exit
    record: wandb's service writes the ``.wandb`` file in its own process, a moment after
    ``run.finish()``."""
    deadline = time.time() + 120
    while True:
        run = read_offline_run(out)
        done = sum(c is not None for c in run.exit_codes)
        if len(run.files) == starts and done == starts - killed:
            return run
        if time.time() > deadline:
            pytest.fail(f"{out}: {len(run.files)} W&B start(s), exit codes {run.exit_codes}")
        time.sleep(0.2)


def _media(run, key_row: dict) -> Path:
    """The file a logged image / table was written to, under the run's files/ folder."""
    (f,) = [f for f in run.files if (f.parent / "files" / key_row["path"]).is_file()]
    return f.parent / "files" / key_row["path"]


@pytest.mark.slow
def test_tracked_run_reads_back_complete(tmp_path, monkeypatch):
    """A 2-task SAPT run tracked offline: per-step metrics equal the run's losses,
    per-task rows equal the accuracy matrix, images / tables exist, the summary (FWT
    included) equals results.json; a W&B key in the environment is written nowhere."""
    from sapt_dist.train.run import run

    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    out = tmp_path / "run"
    # b_j of FWT, as a single_task run folder holds them
    single = {TASKS[0]: 10.0, TASKS[1]: 20.0}
    (tmp_path / "single/metrics").mkdir(parents=True)
    (tmp_path / "single/metrics/results.json").write_text(
        json.dumps({"single_task_scores": single})
    )
    cfg = load_config(
        DEMO,
        [
            f"output_dir={out}",
            *TINY,
            "train.checkpoint_every=0",
            f"single_task_run={tmp_path / 'single'}",
            "tracking.mode=offline",
            "tracking.group=sweep-a",
            "tracking.tags=[ci]",
        ],
    )
    results = run(cfg)
    saved = read_checked_json(state_path(out))
    wb = _finished(out, 1)
    assert wb.run_ids == [saved["run_id"]] and saved["final_logged"] is True
    assert (wb.project, wb.group, wb.job_type) == ("sapt-dist", "sweep-a", "sapt")
    assert wb.config["method"] == "sapt" and wb.config["train"]["lr"] == cfg.train.lr
    assert wb.config["world_size"] == 1 and wb.config["task_names"] == TASKS
    assert wb.exit_codes == [0]

    # per step: the run's own per-step losses, one row per optimizer step, in order
    losses = _losses(out)
    train = [r for r in wb.history if "train/loss" in r]
    assert _steps(wb.history) == list(range(1, len(losses) + 1))
    assert [r["train/loss"] for r in train] == pytest.approx(losses, rel=1e-12)
    n1 = len(json.loads((out / "state/blocks/progress.json").read_text())["losses"][TASKS[0]])
    for r in train:
        assert r["train/lr"] == pytest.approx(cfg.train.lr)
        assert r["train/router_lr"] == pytest.approx(cfg.train.router_lr)
        assert r["train/tokens_per_s"] > 0 and r["train/rss_gb"] > 0
        assert r["train/task"] == (1 if r[STEP_KEY] <= n1 else 2)
        # the ARM loss exists from task 2 on; loss = task loss + kl_ratio * ARM loss
        assert ("train/arm_loss" in r) == (r["train/task"] == 2)
        arm = r.get("train/arm_loss", 0.0)
        assert r["train/loss"] == pytest.approx(r["train/task_loss"] + arm, rel=1e-9)

    # the routing trajectory on the dashboard: train/routing_own/<task> is the run folder's
    # metrics/routing_trajectory.json (each seen task's weight on its own block)
    traj = json.loads((out / "metrics/routing_trajectory.json").read_text())
    expected = {
        (p["global_step"], name): p["mean"][name][j]
        for points in traj.values()
        for p in points.values()
        for j, name in enumerate(TASKS)
        if name in p["mean"]
    }
    prefix = "train/routing_own/"
    got = {
        (r[STEP_KEY], k[len(prefix) :]): v
        for r in train
        for k, v in r.items()
        if k.startswith(prefix)
    }
    assert len(got) >= 4 and {t for _, t in got} == set(TASKS)
    assert got == pytest.approx(expected)

    # per task: the new matrix row, routing heatmap + table, pseudo-sample table
    matrix = json.loads((out / "metrics/accuracy_matrix.json").read_text())["matrix"]
    task_rows = [r for r in wb.history if "task/completed" in r]
    assert [r["task/completed"] for r in task_rows] == [1, 2]
    assert [r[STEP_KEY] for r in task_rows] == [n1, len(losses)]
    for i, r in enumerate(task_rows):
        for j, name in enumerate(TASKS):
            assert r.get(f"eval/{name}") == matrix[i][j]  # None above the diagonal: absent
        assert r["routing/heatmap"]["_type"] == "image-file"
        png = _media(wb, r["routing/heatmap"])
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        table = json.loads(_media(wb, r["routing/weights"]).read_text())
        assert [row[0] for row in table["data"]] == TASKS[: i + 1]
        assert len(table["columns"]) == 1 + (i + 1) + 2
        mtable = json.loads(_media(wb, r["task/accuracy_matrix"]).read_text())
        assert [row[1:] for row in mtable["data"]] == matrix[: i + 1]
    pseudo = [
        json.loads(x)
        for x in (out / f"pseudo/00_{TASKS[0]}.jsonl").read_text().splitlines()
        if x.strip()
    ]
    ptable = json.loads(_media(wb, task_rows[0]["pseudo/samples"]).read_text())
    assert [row[3] for row in ptable["data"]] == [p["input"] for p in pseudo]
    assert task_rows[0]["pseudo/count"] == len(pseudo) and "pseudo/samples" not in task_rows[1]

    # at the end: the summary equals results.json; the matrix heatmap is an image
    res = json.loads((out / "metrics/results.json").read_text())
    s = wb.summary
    assert s["final/AP"] == pytest.approx(res["metrics"]["AP"]) == results["metrics"]["AP"]
    assert s["final/F_Ra"] == pytest.approx(res["metrics"]["F.Ra"])
    assert s["final/BWT"] == pytest.approx(res["metrics"]["BWT"])
    fwt = sum(matrix[j][j] - single[t] for j, t in enumerate(TASKS)) / 2
    assert s["final/FWT"] == pytest.approx(res["metrics"]["FWT"]) == pytest.approx(fwt)
    assert s["final/fwt_source"].endswith("single/metrics/results.json")
    # the released scorer's convention beside ours: BWT over N, FWT against its 50.94
    assert s["final/BWT_released"] == pytest.approx(res["metrics"]["BWT"] / 2)
    diag = sum(matrix[j][j] for j in range(2)) / 2
    assert s["final/FWT_released"] == pytest.approx(diag - 50.94)
    assert "50.94" in s["final/released_convention"]
    assert s["final/routing_accuracy"] == pytest.approx(res["routing_accuracy"])
    heat = _media(wb, s["final/accuracy_matrix_heatmap"])
    assert heat.read_bytes() == (out / "metrics/accuracy_matrix.png").read_bytes()

    # the key in the environment is in no file of the run folder (wandb's included)
    leaks = [p for p in out.rglob("*") if p.is_file() and FAKE_KEY.encode() in p.read_bytes()]
    assert not leaks, leaks

    # a second start of the finished run opens no new W&B start; a lost summary is redone
    run(cfg)
    assert len(read_offline_run(out).files) == 1
    # killed between the finished marker and the summary (as the run writes the file)
    atomic_write_checked_json(state_path(out), {**saved, "final_logged": False})
    run(cfg)
    again = _finished(out, 2)
    assert again.run_ids == [saved["run_id"]]
    assert again.history_per_file[1][0]["final/AP"] == pytest.approx(res["metrics"]["AP"])


@pytest.mark.slow
def test_killed_run_resumes_the_same_wandb_run(tmp_path):
    """SIGKILL mid task 2, restart: the same W&B run id, the step sequence continues from
    the step checkpoint, the re-run steps log the same losses, and the union of both
    starts' steps is every step once."""
    env = subprocess_env()
    out = tmp_path / "run"
    cmd = cli_cmd(
        out, *TINY, "data.max_train=96", "train.checkpoint_every=2", "tracking.mode=offline"
    )
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wandb_dir = out / "wandb"

    def task1_on_file() -> bool:  # the .wandb file is flushed every FLUSH_SECONDS
        try:
            rows = read_offline_run(wandb_dir).history
        except FileNotFoundError:
            return False
        return any(r.get("task/completed") == 1 for r in rows)

    wait_for_step_checkpoint(proc, out, 1, also=task1_on_file)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ckpt = json.loads((out / "state/step/meta.json").read_text())[
        "step"
    ]  # task 2's step the restart resumes at
    first_id = json.loads(state_path(out).read_text())["run_id"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]

    wb = _finished(out, 2, killed=1)
    assert wb.run_ids == [first_id] and wb.exit_codes == [None, 0]
    a, b = (_steps(rows) for rows in wb.history_per_file)
    progress = json.loads((out / "state/blocks/progress.json").read_text())
    n1, total = len(progress["losses"][TASKS[0]]), len(_losses(out))
    # the killed start: every step of task 1 in order (task 2's last ~FLUSH_SECONDS may
    # be lost with the process); the restart: from task 2's checkpoint on, never from 0
    assert a == list(range(1, len(a) + 1)) and len(a) >= n1
    assert b == list(range(n1 + ckpt + 1, total + 1))
    assert [r["task/completed"] for r in wb.history if "task/completed" in r] == [1, 2]
    # a deterministic resume: steps logged by both starts carry the same loss
    la = {r[STEP_KEY]: r["train/loss"] for r in wb.history_per_file[0] if "train/loss" in r}
    lb = {r[STEP_KEY]: r["train/loss"] for r in wb.history_per_file[1] if "train/loss" in r}
    for step in set(la) & set(lb):
        assert la[step] == pytest.approx(lb[step], rel=1e-12), step
    losses = _losses(out)  # the run's own record, the killed start's steps included
    for step, loss in {**la, **lb}.items():
        assert loss == pytest.approx(losses[step - 1], rel=1e-12), step
    assert "final/AP" in wb.summary


@pytest.mark.slow
def test_two_ranks_one_wandb_run(tmp_path):
    """torchrun with 2 CPU ranks: rank 0 alone creates the W&B run (one start, one run
    id), and its history is the run's per-step losses; the config says world_size 2."""
    env = subprocess_env()
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "-m",
        "sapt_dist.cli.train",
        "--config",
        str(DEMO),
        f"output_dir={out}",
        *TINY,
        "train.checkpoint_every=0",
        "tracking.mode=offline",
    ]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    wb = _finished(out, 1)
    assert wb.config["world_size"] == 2
    assert len(list((out / "wandb").glob("offline-run-*"))) == 1
    losses = _losses(out)
    assert _steps(wb.history) == list(range(1, len(losses) + 1))
    assert [r["train/loss"] for r in wb.history if "train/loss" in r] == pytest.approx(
        losses, rel=1e-12
    )
    assert wb.summary["final/AP"] == pytest.approx(
        json.loads((out / "metrics/results.json").read_text())["metrics"]["AP"]
    )


def test_a_dead_wandb_service_never_stops_training(caplog):
    """SLURM's SIGTERM reaches W&B's service process too: every later W&B call fails.
    The tracker warns once and goes quiet instead of raising into the training loop."""
    from types import SimpleNamespace

    from sapt_dist.outputs.tracking import WandbTracker

    calls = []

    class DeadRun:
        summary: dict = {}

        def log(self, *a, **k):
            calls.append("log")
            raise ConnectionResetError("Connection lost")

        def finish(self, *a, **k):
            calls.append("finish")
            raise ConnectionResetError("Connection lost")

    tracker = object.__new__(WandbTracker)
    tracker.run, tracker.t, tracker._finished = DeadRun(), SimpleNamespace(log_every=1), False
    with caplog.at_level("WARNING", logger="sapt_dist.outputs.tracking"):
        tracker.log_step(1, {"loss": 1.0})
        tracker.log_step(2, {"loss": 0.5})
        tracker.finish(exit_code=1)
    assert calls == ["log"]  # after the first failure nothing more is tried
    assert sum("tracking off until restart" in r.message for r in caplog.records) == 1


# ---------------------------------------------------------------------------- restarts
_KILL_AT_TASK_END = """
import os, signal, sys
from sapt_dist.outputs import tracking

def log_task(self, global_step, index, *args, **kwargs):
    # the moment that lost a dashboard row: task 1's end checkpoint is saved (state/blocks
    # swapped in), its W&B task-end row not yet logged
    if index == 0:
        os.kill(os.getpid(), signal.SIGKILL)
    return ORIGINAL(self, global_step, index, *args, **kwargs)

ORIGINAL = tracking.WandbTracker.log_task
tracking.WandbTracker.log_task = log_task
from sapt_dist.cli.train import main
sys.exit(main(sys.argv[1:]))
"""

_TASK_PREFIXES = ("task/", "eval/", "routing/", "pseudo/")


def _task_rows(run) -> list[dict]:
    """The task-end rows of a W&B history: their task / eval / routing / pseudo keys, each
    logged image or table replaced by its type and file content."""
    out = []
    for r in run.history:
        if "task/completed" not in r:
            continue
        row: dict = {STEP_KEY: r[STEP_KEY]}
        for k, v in r.items():
            if not k.startswith(_TASK_PREFIXES):
                continue
            if isinstance(v, dict) and "path" in v:
                data = _media(run, v).read_bytes()
                v = (v["_type"], json.loads(data) if v["_type"] == "table-file" else len(data))
            row[k] = v
        out.append(row)
    return out


@pytest.mark.slow
def test_restart_logs_the_task_end_a_kill_lost(tmp_path):
    """SIGKILL right after task 1's end checkpoint, before its W&B row (what lost step 30
    of a real run): the restart logs that task end, once, from the run folder; the task
    rows of the resumed W&B run equal an uninterrupted run's (matrix rows, routing
    heatmap + table, pseudo-sample table); a start of the finished run adds nothing."""
    env = subprocess_env()
    over = [*TINY, "train.checkpoint_every=0", "tracking.mode=offline"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    res = subprocess.run(cli_cmd(whole, *over), env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    cmd = cli_cmd(killed, *over)
    first = subprocess.run(
        [sys.executable, "-c", _KILL_AT_TASK_END, *cmd[3:]], env=env, capture_output=True
    )
    assert first.returncode == -signal.SIGKILL, first.stderr[-3000:]
    progress = json.loads((killed / "state/blocks/progress.json").read_text())
    assert progress["completed"] == 1  # task 1's end checkpoint is on disk
    lost = read_offline_run(killed)
    assert not any("task/completed" in r for r in lost.history)  # and not on the dashboard
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "which the W&B run lacks" in (killed / "run.log").read_text()

    a, b = _finished(whole, 1), _finished(killed, 2, killed=1)
    assert b.run_ids == lost.run_ids
    rows_a, rows_b = _task_rows(a), _task_rows(b)
    assert [r["task/completed"] for r in rows_b] == [1, 2]  # once each
    assert rows_b == rows_a
    assert read_checked_json(state_path(killed))["tasks_logged"] == [0, 1]
    # the finished run started again: no W&B start, nothing logged twice
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert res.returncode == 0 and len(read_offline_run(killed).files) == 2


def test_catch_up_logs_only_what_the_wandb_run_lacks(tmp_path):
    """Online (no files to read): the task ends kept in state/tracking.json are skipped,
    the others logged once, at W&B's next free step when it is past theirs; a folder
    from before the list was kept logs nothing (it cannot tell)."""
    from types import SimpleNamespace

    from sapt_dist.outputs.tracking import TaskRecord, WandbTracker

    logged = []

    class FakeRun:
        step = 9  # a resumed online run continues after its last step

        def log(self, data, step):
            logged.append((step, data[STEP_KEY], data["task/completed"]))

    tracker = object.__new__(WandbTracker)
    tracker.run, tracker.t = FakeRun(), SimpleNamespace(log_every=1, pseudo_examples=4)
    tracker.cfg = load_config(DEMO, [f"output_dir={tmp_path}"])
    tracker.state_file = tmp_path / "state/tracking.json"
    tracker._state, tracker.final_logged = {"run_id": "abc"}, False
    tracker._wandb = SimpleNamespace(Table=lambda **k: k)
    names = ["a", "b", "c"]
    matrix = [[1.0, None, None], [2.0, 3.0, None], [4.0, 5.0, 6.0]]
    recs = [TaskRecord(4 * (i + 1), i, names, matrix[: i + 1]) for i in range(3)]
    tracker.tasks_logged = {0}
    assert tracker.catch_up(recs) == [1, 2]
    assert logged == [(9, 8, 2), (12, 12, 3)]
    assert read_checked_json(tracker.state_file)["tasks_logged"] == [0, 1, 2]
    assert tracker.catch_up(recs) == [] and len(logged) == 2  # once
    tracker.tasks_logged = None
    assert tracker.catch_up(recs) == [] and len(logged) == 2


def test_a_tracking_state_of_another_shape_is_named(tmp_path):
    """state/tracking.json whose run id is a list: named (file and key) before W&B sees it."""
    from sapt_dist.outputs.tracking import final_pending

    cfg = load_config(DEMO, [f"output_dir={tmp_path}", "tracking.backend=wandb"])
    atomic_write_checked_json(state_path(tmp_path), {"run_id": ["abc"], "final_logged": False})
    with pytest.raises(ConfigError, match=r"tracking\.json: damaged, 'run_id' must be a string"):
        final_pending(cfg)
    atomic_write_checked_json(state_path(tmp_path), {"run_id": "abc", "final_logged": False})
    assert final_pending(cfg)
