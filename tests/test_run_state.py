"""Run-folder state: step checkpoints round-trip exactly; progress and blocks swap together."""

from __future__ import annotations

import pytest
import torch

from sapt_dist.checkpoint.run_state import RunState, StepState
from sapt_dist.config import ConfigError, load_config


def _state(step: int) -> StepState:
    p = torch.nn.Parameter(torch.randn(3, 4))
    opt = torch.optim.AdamW([p], lr=1e-3)
    p.grad = torch.randn_like(p)
    opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return StepState(
        step,
        {"w": p.detach().clone()},
        opt.state_dict(),
        sched.state_dict(),
        torch.get_rng_state(),
        [1.0, 0.5],
    )


def test_step_checkpoint_roundtrip_with_best(tmp_path):
    rs = RunState(tmp_path)
    st = _state(4)
    best = {"score": 61.5, "step": 2, "params": {"w": torch.ones(3, 4)}}
    rs.save_step(1, st, best)
    got, got_best = rs.load_step(1)
    assert got.step == 4 and got.losses == [1.0, 0.5]
    assert torch.equal(got.params["w"], st.params["w"]) and torch.equal(got.rng, st.rng)
    a, b = got.optimizer["state"][0], st.optimizer["state"][0]
    assert all(torch.equal(a[k], b[k]) for k in b)
    assert got.optimizer["param_groups"] == st.optimizer["param_groups"]
    assert got_best["score"] == 61.5 and got_best["step"] == 2
    assert torch.equal(got_best["params"]["w"], torch.ones(3, 4))
    # a checkpoint of another task is not offered
    assert rs.load_step(2) == (None, None)


def test_restart_with_another_config_is_refused(tmp_path):
    cfg = load_config(None, ["model.builder=demo", f"output_dir={tmp_path}"])
    rs = RunState(tmp_path)
    rs.check_or_save_config(cfg)
    rs.save_step(0, _state(2))  # a run in progress (mid-task 1, no finished task yet)
    other = load_config(None, ["model.builder=demo", f"output_dir={tmp_path}", "train.lr=1e-3"])
    with pytest.raises(ConfigError, match="train.lr: run has 5e-05, now 0.001"):
        RunState(tmp_path).check_or_save_config(other)
    # the mutable key may change
    ok = load_config(
        None, ["model.builder=demo", f"output_dir={tmp_path}", "train.checkpoint_every=7"]
    )
    RunState(tmp_path).check_or_save_config(ok)


@pytest.mark.parametrize("victim", ["params.safetensors", "state.safetensors", "meta.json"])
@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_damaged_step_checkpoint_is_named(tmp_path, victim, damage):
    """One flipped byte, a truncated file or a missing one: exit-2 error naming the file
    and the way on, instead of a silent resume or a traceback."""
    from sapt_dist.checkpoint.run_state import StateDamagedError

    rs = RunState(tmp_path)
    rs.save_step(0, _state(3))
    path = tmp_path / "state" / "step" / victim
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))
    elif damage == "truncate":
        path.write_bytes(bytes(data[: len(data) // 2]))
    else:
        path.unlink()
    with pytest.raises(StateDamagedError, match=rf"{victim}.*delete .*state/step"):
        rs.load_step(0)


def test_edited_progress_is_refused(tmp_path):
    """progress.json is checksummed in the blocks manifest written with it."""
    import json

    from sapt_dist.checkpoint.blocks import save_blocks
    from sapt_dist.checkpoint.run_state import StateDamagedError
    from sapt_dist.config import AdapterConfig
    from sapt_dist.method.model import SAPTModel

    from .conftest import tiny_llama

    rs = RunState(tmp_path)
    model = SAPTModel(tiny_llama(), AdapterConfig(rank=2, alpha=4), n_slots=2)
    progress = rs.load_progress()
    progress.update(completed=1, tasks=["a", "b"], matrix=[[37.5, None]])
    save_blocks(model, rs.blocks, ["a"], extra_files=rs.progress_file(progress))
    assert rs.load_progress()["matrix"] == [[37.5, None]]
    edited = json.loads(rs.progress_path.read_text())
    edited["matrix"] = [[90.0, None]]
    rs.progress_path.write_text(json.dumps(edited, indent=1) + "\n")
    with pytest.raises(StateDamagedError, match=r"progress\.json does not match its sha256"):
        rs.load_progress()
    rs.progress_path.write_text('{"completed": 1, "tasks": [')
    with pytest.raises(StateDamagedError, match=r"progress\.json"):
        rs.load_progress()


def test_one_process_per_run_folder(tmp_path):
    """A second sapt-train on a folder in use is refused naming the holder; the lock goes
    with its process, however it ends (no stale lock after a kill)."""
    import subprocess
    import sys
    import time

    from sapt_dist.checkpoint.run_state import (
        RunFolderBusyError,
        lock_run_folder,
        unlock_run_folder,
    )

    from .conftest import ROOT, subprocess_env

    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from sapt_dist.checkpoint.run_state import lock_run_folder; "
            f"lock_run_folder({str(tmp_path)!r}); print('held', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
        env=subprocess_env(),
        cwd=ROOT,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(
            RunFolderBusyError, match=rf"in use by another sapt-train \(pid {holder.pid} on"
        ):
            lock_run_folder(tmp_path)
    finally:
        holder.kill()
        holder.wait()
    time.sleep(0.1)
    fd = lock_run_folder(tmp_path)  # the killed holder's lock is gone with it
    unlock_run_folder(fd)


def test_damaged_state_files_are_named(tmp_path):
    """Truncated layout.json / config.yaml, a non-UTF-8 config: errors naming the file
    (exit 2), never a traceback or 'another config'; a killed writer's temporary folders
    are cleaned at the next start."""
    from sapt_dist.checkpoint.run_state import StateDamagedError

    cfg = load_config(None, ["model.builder=demo", f"output_dir={tmp_path}"])
    RunState(tmp_path).check_or_save_config(cfg)
    layout = tmp_path / "state" / "layout.json"
    good_layout = layout.read_text()
    layout.write_text(good_layout[:7])
    with pytest.raises(StateDamagedError, match=r"layout\.json: damaged"):
        RunState(tmp_path).check_or_save_config(cfg)
    # an edit that keeps it valid JSON (the global batch a resume is checked against)
    layout.write_text(good_layout.replace('"global_batch": 8', '"global_batch": 16'))
    assert layout.read_text() != good_layout
    with pytest.raises(StateDamagedError, match=r"layout\.json: damaged .*sha256"):
        RunState(tmp_path).check_or_save_config(cfg)
    layout.write_text(good_layout)
    saved = tmp_path / "config.yaml"
    saved.write_bytes(saved.read_bytes()[:40])
    with pytest.raises(StateDamagedError, match=r"config\.yaml: this run folder's saved config"):
        RunState(tmp_path).check_or_save_config(cfg)
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("method: sapt\n# caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1\.yaml: not UTF-8"):
        load_config(bad)
    left = tmp_path / "state" / ".step.abc123.tmp"
    left.mkdir(parents=True)
    RunState(tmp_path)
    assert not left.exists()


def test_resume_of_a_run_saved_before_new_keys(tmp_path):
    """A config.yaml written by an older version lacks keys added since; the run behaved
    as their defaults, so it resumes (and a non-default value is still refused)."""
    import yaml

    cfg = load_config(None, ["model.builder=demo", f"output_dir={tmp_path}"])
    rs = RunState(tmp_path)
    rs.check_or_save_config(cfg)
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    del saved["adapter"]["router_center"], saved["eval"]["routing_every"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    RunState(tmp_path).check_or_save_config(cfg)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    other = load_config(
        None, ["model.builder=demo", f"output_dir={tmp_path}", "adapter.router_center=tasks"]
    )
    with pytest.raises(ConfigError, match="adapter.router_center: run has 'none', now 'tasks'"):
        RunState(tmp_path).check_or_save_config(other)


def test_damaged_tracking_and_pseudo_files_are_named(tmp_path):
    """state/tracking.json and pseudo-sample JSONL: damage names the file (exit 2 class)."""
    from sapt_dist.checkpoint.atomic import (
        UnreadableFileError,
        atomic_write_checked_json,
        read_checked_json,
    )
    from sapt_dist.config import ConfigError
    from sapt_dist.outputs.tracking import WandbTracker, final_pending, state_path
    from sapt_dist.train.replay import load_jsonl

    cfg = load_config(None, ["model.builder=demo", f"output_dir={tmp_path}"])
    path = state_path(tmp_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('{"run_id": "abc')
    with pytest.raises(ConfigError, match=r"tracking\.json: damaged.*W&B run id"):
        WandbTracker(cfg, "offline")
    # valid JSON, edited: another run's id would send this run's charts into it
    atomic_write_checked_json(path, {"run_id": "abc123", "final_logged": False})
    assert read_checked_json(path) == {"run_id": "abc123", "final_logged": False}
    path.write_text(path.read_text().replace("abc123", "zzz999"))
    with pytest.raises(ConfigError, match=r"tracking\.json: damaged, does not match the sha256"):
        WandbTracker(cfg, "offline")
    tracked = load_config(
        None, ["model.builder=demo", f"output_dir={tmp_path}", "tracking.backend=wandb"]
    )
    with pytest.raises(ConfigError, match=r"tracking\.json: damaged, does not match"):
        final_pending(tracked)
    pseudo = tmp_path / "pseudo" / "00_t.jsonl"
    pseudo.parent.mkdir()
    pseudo.write_text('{"definition": "d", "input": "x"}\n{"definition": "d", "inp')
    with pytest.raises(UnreadableFileError, match=r"00_t\.jsonl:2: not valid JSON"):
        load_jsonl(pseudo)


def test_global_batch_run_resumes_on_another_process_count(tmp_path):
    """Started on 2 processes with train.global_batch=8 (accumulation 2), the same command
    on 1 process derives accumulation 4 and is accepted; another global batch is not."""
    from sapt_dist.config import resolve_batch

    def cfg(world: int, *extra: str):
        c = load_config(
            None, ["model.builder=demo", f"output_dir={tmp_path}", "train.global_batch=8", *extra]
        )
        resolve_batch(c, world)
        return c

    RunState(tmp_path).check_or_save_config(cfg(2), 2)
    one = cfg(1)
    assert one.train.grad_accum == 4
    RunState(tmp_path).check_or_save_config(one, 1)
    with pytest.raises(
        ConfigError,
        match=r"was 8 .* gives 16\. A run keeps its global batch: set train\.global_batch=8",
    ):
        RunState(tmp_path).check_or_save_config(cfg(1, "train.global_batch=16"), 1)
