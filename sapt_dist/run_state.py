"""A run folder's resumable state, written atomically.

::

    <output_dir>/config.yaml          the resolved config (a restart must match it)
    <output_dir>/state/blocks/        every finished task's block (sapt_dist.serialization)
                                      and progress.json: tasks done, matrix rows, routing
    <output_dir>/state/finished.json  the whole run is done
    <output_dir>/state/step/          mid-task checkpoint: trainable tensors, optimizer,
                                      schedule, RNG, step (safetensors + JSON, no pickle)

A task's end is one atomic swap of ``state/blocks`` (blocks + progress together), then the
step checkpoint is removed (a stale one names an earlier task and is ignored). A crash
anywhere leaves a state the next start reads correctly.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import yaml
from safetensors.torch import load_file, save_file

from sapt_dist.config import ConfigError, RunConfig, to_dict
from sapt_dist.distributed import flatten_state, is_main_process, unflatten_state
from sapt_dist.io_utils import atomic_dir, atomic_write_json, atomic_write_text, recover_dir
from sapt_dist.trainer import StepState

__all__ = ["RunState"]

#: keys that may change between a run and its restart (tracking: where and how the run
#: is logged, e.g. offline first, online after a restart; it changes no result)
#: (eval.batch_size is not: it batches the sampling of pseudo-samples, which uses the RNG)
_MUTABLE_KEYS = {"train.checkpoint_every", "tracking"}


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


class RunState:
    def __init__(self, output_dir: str | Path) -> None:
        self.root = Path(output_dir)
        self.state = self.root / "state"
        self.blocks = self.state / "blocks"
        self.step_dir = self.state / "step"
        self.progress_path = self.blocks / "progress.json"
        self.finished_path = self.state / "finished.json"
        for d in (self.blocks, self.step_dir):
            recover_dir(d)

    # ------------------------------------------------------------------ config
    def check_or_save_config(self, cfg: RunConfig) -> None:
        """Save the resolved config; on a restart, refuse a config that differs."""
        path = self.root / "config.yaml"
        mine = to_dict(cfg)
        if path.is_file() and self.state.is_dir():
            saved = yaml.safe_load(path.read_text()) or {}
            a, b = _flat(saved), _flat(mine)
            diff = [
                k
                for k in sorted(set(a) | set(b))
                if a.get(k) != b.get(k)
                and not any(k == m or k.startswith(m + ".") for m in _MUTABLE_KEYS)
            ]
            if diff:
                shown = "; ".join(f"{k}: run has {a.get(k)!r}, now {b.get(k)!r}" for k in diff[:5])
                raise ConfigError(
                    f"{self.root} holds a run started with another config ({shown}). "
                    f"Resume with the same config, or choose a new output_dir."
                )
        if is_main_process():
            atomic_write_text(path, yaml.safe_dump(mine, sort_keys=False))

    # ------------------------------------------------------------------ progress
    def load_progress(self) -> dict[str, Any]:
        """Progress as of the last finished task (``state/blocks/progress.json``, written
        in the same atomic swap as that task's blocks, so the two always agree)."""
        progress = {"completed": 0, "tasks": [], "matrix": [], "routing": [], "losses": {}}
        if self.progress_path.is_file():
            progress = json.loads(self.progress_path.read_text())
        progress["finished"] = self.finished_path.is_file()
        return progress

    def progress_file(self, progress: dict[str, Any]) -> dict[str, str]:
        """``extra_files`` for ``save_blocks``: the progress that goes with those blocks."""
        body = {k: v for k, v in progress.items() if k != "finished"}
        return {"progress.json": json.dumps(body, indent=1) + "\n"}

    def mark_finished(self) -> None:
        if is_main_process():
            atomic_write_json(self.finished_path, {"finished": True})

    # ------------------------------------------------------------------ mid-task
    def save_step(self, task_index: int, state: StepState, best: dict | None = None) -> None:
        """Write the mid-task checkpoint; ``best`` = {"score", "step", "params"} of the
        best block so far when the task keeps its best dev checkpoint."""
        if not is_main_process():
            return
        skeleton, tensors = flatten_state(
            {"optimizer": state.optimizer, "scheduler": state.scheduler, "rng": state.rng}
        )
        with atomic_dir(self.step_dir) as tmp:
            save_file(
                {f"param.{k}": v for k, v in state.params.items()}, str(tmp / "params.safetensors")
            )
            save_file(tensors, str(tmp / "state.safetensors"))
            meta = {
                "task_index": task_index,
                "step": state.step,
                "losses": state.losses,
                "state": skeleton,
            }
            if best is not None:
                save_file(
                    {f"param.{k}": v for k, v in best["params"].items()},
                    str(tmp / "best.safetensors"),
                )
                meta["best"] = {"score": best["score"], "step": best["step"]}
            (tmp / "meta.json").write_text(json.dumps(meta))

    def load_step(self, task_index: int) -> tuple[StepState, dict | None] | tuple[None, None]:
        """The mid-task checkpoint of task ``task_index`` and its best-so-far, if any."""
        meta_path = self.step_dir / "meta.json"
        if not meta_path.is_file():
            return None, None
        meta = json.loads(meta_path.read_text())
        if meta["task_index"] != task_index:
            return None, None
        best = None
        if "best" in meta:
            best_params = load_file(str(self.step_dir / "best.safetensors"))
            best = {
                **meta["best"],
                "params": {k.removeprefix("param."): v for k, v in best_params.items()},
            }
        params = {
            k.removeprefix("param."): v
            for k, v in load_file(str(self.step_dir / "params.safetensors")).items()
        }
        rest = unflatten_state(meta["state"], load_file(str(self.step_dir / "state.safetensors")))
        state = StepState(
            step=meta["step"],
            params=params,
            optimizer=rest["optimizer"],
            scheduler=rest["scheduler"],
            rng=rest["rng"],
            losses=meta["losses"],
        )
        return state, best

    def clear_step(self) -> None:
        if is_main_process():
            shutil.rmtree(self.step_dir, ignore_errors=True)
