"""A run folder's resumable state, written atomically.

::

    <output_dir>/config.yaml          the resolved config (a restart must match it)
    <output_dir>/state/blocks/        every finished task's block (sapt_dist.checkpoint.blocks)
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
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file

from sapt_dist.checkpoint.atomic import (
    NUMBER,
    SHA256,
    UnreadableFileError,
    atomic_dir,
    atomic_write_checked_json,
    atomic_write_json,
    atomic_write_text,
    checksum_files,
    read_checked_json,
    read_json,
    recover_dir,
    save_safetensors,
    verify_checksums,
    writing,
)
from sapt_dist.config import ConfigError, RunConfig, load_yaml, to_dict
from sapt_dist.distributed import is_main_process

__all__ = [
    "FINISHED",
    "LAYOUT",
    "PROGRESS",
    "STEP_META",
    "RunFolderBusyError",
    "RunState",
    "StateDamagedError",
    "StepState",
    "lock_run_folder",
    "read_progress",
    "unlock_run_folder",
]

log = logging.getLogger(__name__)

# the shapes of the state files, checked where they are read (atomic.check_shape): a file
# that parses but holds something else is damage naming the file, never a traceback
#: state/layout.json
LAYOUT = {"world_size": int, "micro_batch_size": int, "grad_accum": int, "global_batch": int}
_SCORE = (float, None)
#: state/blocks/progress.json (a run's progress as of its last finished task)
PROGRESS = {
    "completed": int,
    "tasks": [str],
    "matrix": [[_SCORE]],
    "routing": [{str: object}],
    "losses": {str: [NUMBER]},
    "pseudo_sha256?": {str: SHA256},
    "provenance?": [{"slot": int, "task": str}],
}
#: state/step/meta.json
STEP_META = {
    "task_index": int,
    "step": int,
    "losses": [NUMBER],
    "state": {"__dict__": [[object]]},  # flatten_state's skeleton
    "checksums?": str,
    "best?": {"score": (float, None), "step": int},
}
#: state/finished.json
FINISHED = {"finished": bool}


@dataclass
class StepState:
    """What a mid-task checkpoint restores: trainable tensors, optimizer, schedule, RNG.

    ``params`` are the full fp32 master values and ``optimizer`` the full AdamW moments
    per parameter name (``distributed.full_optimizer_state``): the same form under any ZeRO
    stage and process count, so a checkpoint written by N ranks resumes on M.
    """

    step: int
    params: dict[str, torch.Tensor]
    optimizer: dict
    scheduler: dict
    rng: torch.Tensor
    losses: list[float] = field(default_factory=list)


class RunFolderBusyError(ConfigError):
    """Another live ``sapt-train`` holds the run folder (exit 2)."""


class StateDamagedError(ConfigError):
    """A file of the run folder's ``state/`` is damaged or was edited; the message names
    it and says how to continue (exit 2, like a bad config: nothing is trained)."""


#: keys a restart may change: where the folder is, how the run is laid out, executed
#: (train.compile, how long a collective waits for a lost peer) and logged (tracking: e.g. offline first, online after a restart), not
#: what it computes
#: (eval.batch_size is not: it batches the sampling of pseudo-samples, which uses the RNG)
_MUTABLE_KEYS = {
    "output_dir",
    "train.checkpoint_every",
    "train.nonfinite_tolerance",
    "train.compile",
    "eval.routing_every",
    "distributed.deepspeed_config",
    "distributed.timeout_s",
    "tracking",
}
#: keys a restart may change as long as the global batch (micro x accumulation x ranks) stays
_LAYOUT_KEYS = {"train.micro_batch_size", "train.grad_accum"}
#: every key (or section) that may differ between two configs of the same run
RESTART_KEYS = frozenset(_MUTABLE_KEYS | _LAYOUT_KEYS)


def restart_may_change(key: str, keys: frozenset[str] | set[str] = RESTART_KEYS) -> bool:
    """Whether dotted ``key`` is one of ``keys`` or inside one of their sections."""
    return any(key == m or key.startswith(m + ".") for m in keys)


def flat_config(d: dict, prefix: str = "") -> dict[str, Any]:
    """A nested config dict as ``{dotted.key: value}``."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat_config(v, key + "."))
        else:
            out[key] = v
    return out


def lock_run_folder(root: str | Path) -> int | None:
    """Hold run folder ``root`` for this process's life (rank 0; other ranks get
    ``None``): an exclusive ``flock`` on ``<root>/run.lock``, released by the OS when the
    process ends however it ends (no stale lock). Take it before touching ``state/``.

    Raises:
        RunFolderBusyError: another live process holds the folder (named in the message).
    """
    import errno
    import fcntl
    import os
    import socket
    import time

    if not is_main_process():
        return None
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root / "run.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            # a file system without flock (Lustre mounted noflock, some NFS): run without
            # the guard rather than never
            log.warning("%s: cannot lock the run folder (%s); running without its lock", root, e)
            return fd
        holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise RunFolderBusyError(
            f"{root} is in use by another sapt-train ({holder}); wait for it to end, or "
            f"give this run another output_dir"
        ) from None
    previous = os.pread(fd, 4096, 0).decode(errors="replace").strip()
    if previous:  # written by a holder that ended without removing it (killed): take over
        log.info("%s: taking over run.lock from %s (that process has ended)", root, previous)
    os.ftruncate(fd, 0)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime())
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {stamp}\n".encode(), 0)
    return fd


def unlock_run_folder(fd: int | None) -> None:
    """Release the folder (its holder line is cleared: a later start sees a clean lock)."""
    import os

    if fd is not None:
        os.ftruncate(fd, 0)
        os.close(fd)  # closing the descriptor releases the flock


class RunState:
    def __init__(self, output_dir: str | Path) -> None:
        self.root = Path(output_dir)
        self.state = self.root / "state"
        self.blocks = self.state / "blocks"
        self.step_dir = self.state / "step"
        self.progress_path = self.blocks / "progress.json"
        self.finished_path = self.state / "finished.json"
        for d in (self.blocks, self.step_dir):
            recover_dir(d, clean_tmp=is_main_process())

    # ------------------------------------------------------------------ config
    def check_or_save_config(self, cfg: RunConfig, world_size: int = 1) -> None:
        """Save the resolved config; on a restart, refuse a config that differs.

        A restart may run on another number of processes (saved by 8 GPUs, resumed on 4):
        micro-batch and accumulation may change as long as the global batch stays the same,
        since the batch stream is a function of the global batch (see ``train.block.batch_positions``).
        """
        path = self.root / "config.yaml"
        layout_path = self.state / "layout.json"
        mine = to_dict(cfg)
        t = cfg.train
        layout = {
            "world_size": world_size,
            "micro_batch_size": t.micro_batch_size,
            "grad_accum": t.grad_accum,
            "global_batch": t.micro_batch_size * t.grad_accum * world_size,
        }
        if path.is_file() and self.state.is_dir():
            try:
                text = path.read_text(encoding="utf-8")
                saved = load_yaml(text, "its YAML") or {}  # bounded (depth, numbers)
                if not isinstance(saved, dict):
                    raise ValueError("not a mapping of config keys")
                if not text.endswith("\n"):  # yaml.safe_dump ends every file with one
                    raise ValueError("the file is cut short")
            except (UnicodeDecodeError, ValueError) as e:  # ConfigError is a ValueError
                raise StateDamagedError(
                    f"{path}: this run folder's saved config is damaged ({e}); it is what "
                    f"binds the folder to its run. Restore it (the blocks manifest holds a "
                    f"copy under 'run_config'), or start a new output_dir"
                ) from e
            a, b = flat_config(saved), flat_config(mine)
            # a key the saved config lacks was added by a later version of this tool: the
            # run behaved as its default
            defaults = flat_config(to_dict(RunConfig()))
            for k in set(b) - set(a):
                if k in defaults:
                    a[k] = defaults[k]
            mutable = set(_MUTABLE_KEYS)
            if layout_path.is_file():
                try:
                    before = read_checked_json(layout_path, schema=LAYOUT)
                except UnreadableFileError as e:
                    raise StateDamagedError(
                        f"{layout_path}: damaged ({e}); it records the run's process count "
                        f"and global batch. Restore it, or start a new output_dir"
                    ) from e
                if before["global_batch"] == layout["global_batch"]:
                    mutable |= _LAYOUT_KEYS
                    if before != layout:
                        log.info(
                            "%s: resuming on %d process(es) x micro-batch %d x accumulation %d "
                            "(the run started on %d x %d x %d; same global batch %d)",
                            self.root,
                            world_size,
                            t.micro_batch_size,
                            t.grad_accum,
                            before["world_size"],
                            before["micro_batch_size"],
                            before["grad_accum"],
                            layout["global_batch"],
                        )
                else:
                    raise ConfigError(
                        f"{self.root}: the run's global batch was {before['global_batch']} "
                        f"({before['world_size']} process(es) x train.micro_batch_size "
                        f"{before['micro_batch_size']} x train.grad_accum {before['grad_accum']}); "
                        f"on {world_size} process(es) this config gives {layout['global_batch']}. "
                        + (
                            f"A run keeps its global batch: set train.global_batch="
                            f"{before['global_batch']} (or start a new output_dir)."
                            if t.global_batch is not None
                            else f"Set train.grad_accum (or train.micro_batch_size) so the "
                            f"global batch stays {before['global_batch']} (or set "
                            f"train.global_batch={before['global_batch']})."
                        )
                    )
            diff = [
                k
                for k in sorted(set(a) | set(b))
                if a.get(k) != b.get(k) and not restart_may_change(k, mutable)
            ]
            if diff:
                shown = "; ".join(f"{k}: run has {a.get(k)!r}, now {b.get(k)!r}" for k in diff[:5])
                raise ConfigError(
                    f"{self.root} holds a run started with another config ({shown}). "
                    f"Resume with the same config, or choose a new output_dir."
                )
        if is_main_process():
            atomic_write_text(path, yaml.safe_dump(mine, sort_keys=False))
            self.state.mkdir(parents=True, exist_ok=True)
            atomic_write_checked_json(layout_path, layout)

    # ------------------------------------------------------------------ progress
    def load_progress(self) -> dict[str, Any]:
        """Progress as of the last finished task (``state/blocks/progress.json``, written
        in the same atomic swap as that task's blocks, so the two always agree)."""
        progress = {"completed": 0, "tasks": [], "matrix": [], "routing": [], "losses": {}}
        if self.progress_path.is_file():
            self._check_progress()
            progress = read_progress(self.progress_path)
        progress["finished"] = self.is_finished()
        return progress

    def is_finished(self) -> bool:
        """Whether ``state/finished.json`` says the whole run is done (checked)."""
        if not self.finished_path.is_file():
            return False
        try:
            if read_json(self.finished_path, schema=FINISHED)["finished"] is not True:
                raise UnreadableFileError(f"{self.finished_path}: damaged, 'finished' is false")
        except UnreadableFileError as e:
            raise StateDamagedError(
                f"{e}; it marks the run as finished. If every task is done, write "
                f'{{"finished": true}} into it; otherwise delete it to resume the run'
            ) from e
        return True

    def _check_progress(self) -> None:
        """``progress.json`` against its sha256 in the blocks manifest written with it."""
        from sapt_dist.checkpoint.blocks import read_manifest

        if not (self.blocks / "manifest.json").is_file():
            return
        manifest_path = self.blocks / "manifest.json"
        files = read_manifest(self.blocks).get("files") or {}
        if "progress.json" in files:
            verify_checksums(
                self.blocks,
                {"progress.json": files["progress.json"]},
                StateDamagedError,
                listed_in=manifest_path,
                advice="the accuracy matrix and task count it holds cannot be trusted. "
                "Restore it, or start a new output_dir",
            )

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
        final = self.step_dir  # a full disk names the file as the user finds it
        with atomic_dir(self.step_dir) as tmp:
            save_safetensors(
                {f"param.{k}": v for k, v in state.params.items()},
                tmp / "params.safetensors",
                final / "params.safetensors",
            )
            save_safetensors(tensors, tmp / "state.safetensors", final / "state.safetensors")
            meta = {
                "task_index": task_index,
                "step": state.step,
                "losses": state.losses,
                "state": skeleton,
                "checksums": "checksums.json",  # this checkpoint is verified against it
            }
            if best is not None:
                save_safetensors(
                    {f"param.{k}": v for k, v in best["params"].items()},
                    tmp / "best.safetensors",
                    final / "best.safetensors",
                )
                meta["best"] = {"score": best["score"], "step": best["step"]}
            with writing(final / "meta.json"):
                (tmp / "meta.json").write_text(json.dumps(meta))
            with writing(final / "checksums.json"):
                (tmp / "checksums.json").write_text(json.dumps(checksum_files(tmp), indent=1))

    def load_step(self, task_index: int) -> tuple[StepState, dict | None] | tuple[None, None]:
        """The mid-task checkpoint of task ``task_index`` and its best-so-far, if any."""
        meta_path = self.step_dir / "meta.json"
        if not self.step_dir.is_dir() or not any(self.step_dir.iterdir()):
            return None, None
        self._check_step()
        how = (
            f"delete {self.step_dir} to restart that task from its beginning (finished "
            f"tasks in {self.blocks} are kept)"
        )
        try:
            meta = read_json(meta_path, how, schema=STEP_META)
        except FileNotFoundError as e:
            raise StateDamagedError(f"{meta_path}: missing; {how}") from e
        except UnreadableFileError as e:
            raise StateDamagedError(str(e)) from e
        if meta["task_index"] != task_index:
            return None, None
        best = None
        if "best" in meta:
            best_params = _load_tensors(self.step_dir / "best.safetensors", how)
            best = {
                **meta["best"],
                "params": {k.removeprefix("param."): v for k, v in best_params.items()},
            }
        params = {
            k.removeprefix("param."): v
            for k, v in _load_tensors(self.step_dir / "params.safetensors", how).items()
        }
        try:
            rest = unflatten_state(
                meta["state"], _load_tensors(self.step_dir / "state.safetensors", how)
            )
            rest["optimizer"], rest["scheduler"], rest["rng"]  # noqa: B018
        except (KeyError, TypeError, ValueError) as e:
            raise StateDamagedError(
                f"{meta_path}: damaged, its 'state' does not describe the tensors of "
                f"state.safetensors ({e!r}); {how}"
            ) from e
        state = StepState(
            step=meta["step"],
            params=params,
            optimizer=rest["optimizer"],
            scheduler=rest["scheduler"],
            rng=rest["rng"],
            losses=meta["losses"],
        )
        return state, best

    def _check_step(self) -> None:
        """Every file of the mid-task checkpoint against ``checksums.json`` (written last,
        in the same atomic swap). Damage is an error naming the file and the way on."""
        how = (
            f"delete {self.step_dir} to restart that task from its beginning (finished "
            f"tasks in {self.blocks} are kept)"
        )
        sums_path = self.step_dir / "checksums.json"
        if not sums_path.is_file():
            meta = self.step_dir / "meta.json"
            legacy = meta.is_file() and '"checksums"' not in meta.read_text(errors="replace")
            if not legacy:
                raise StateDamagedError(f"{sums_path}: missing from the step checkpoint; {how}")
            log.warning(
                "%s has no checksums.json (written by an older version): unverified", self.step_dir
            )
            return
        try:
            sums = read_json(sums_path, how)
        except UnreadableFileError as e:
            raise StateDamagedError(str(e)) from e
        # every file the checkpoint holds must be listed: a list that leaves one out (or
        # is empty) would let a changed file through
        present = sorted(
            f.name for f in self.step_dir.iterdir() if f.is_file() and f.name != sums_path.name
        )
        verify_checksums(
            self.step_dir,
            sums,
            StateDamagedError,
            listed_in=sums_path,
            advice=how,
            required=present,
        )

    def clear_step(self) -> None:
        if is_main_process():
            shutil.rmtree(self.step_dir, ignore_errors=True)


def read_progress(path: str | Path) -> dict[str, Any]:
    """A run's ``progress.json``, its shape checked (:data:`PROGRESS`).

    Raises:
        StateDamagedError: naming the file.
    """
    how = "the run's progress is damaged. Start a new output_dir (its finished blocks are intact)"
    try:
        progress = read_json(path, how, schema=PROGRESS)
    except UnreadableFileError as e:
        raise StateDamagedError(str(e)) from e
    n, rows = len(progress["tasks"]), progress["matrix"]
    bad = [k for k, row in enumerate(rows) if len(row) != n]
    if bad or progress["completed"] > len(rows):
        what = (
            f"matrix row {bad[0]} has {len(rows[bad[0]])} score(s) for {n} task(s)"
            if bad
            else f"'completed' is {progress['completed']} but the matrix has {len(rows)} row(s)"
        )
        raise StateDamagedError(f"{path}: damaged, {what}; {how}")
    return progress


def _load_tensors(path: Path, how: str) -> dict[str, torch.Tensor]:
    """A safetensors file of the step checkpoint (checked against its sha256 already)."""
    from safetensors import SafetensorError

    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise StateDamagedError(f"{path}: cannot be read ({e}); {how}") from e


# --------------------------------------------------------------------------- state files
def flatten_state(obj, prefix: str = "s") -> tuple[object, dict[str, torch.Tensor]]:
    """Split a nested state (dicts, lists, tensors, JSON scalars) into a JSON skeleton and
    a flat dict of tensors, so optimizer / RNG state is stored with safetensors + JSON and
    read back without unpickling anything."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(o, key):
        if isinstance(o, torch.Tensor):
            tensors[key] = o.detach().cpu().contiguous()
            return {"__tensor__": key}
        if isinstance(o, dict):
            return {
                "__dict__": [
                    [walk(k, f"{key}.k{i}"), walk(v, f"{key}.{i}")]
                    for i, (k, v) in enumerate(o.items())
                ]
            }
        if isinstance(o, (list, tuple)):
            return {
                "__list__": [walk(v, f"{key}.{i}") for i, v in enumerate(o)],
                "tuple": isinstance(o, tuple),
            }
        if o is None or isinstance(o, (bool, int, float, str)):
            return o
        raise TypeError(f"cannot store {type(o).__name__} at {key} in a checkpoint")

    return walk(obj, prefix), tensors


def unflatten_state(skeleton, tensors: dict[str, torch.Tensor]):
    def walk(o):
        if isinstance(o, dict):
            if "__tensor__" in o:
                return tensors[o["__tensor__"]]
            if "__dict__" in o:
                return {walk(k): walk(v) for k, v in o["__dict__"]}
            if "__list__" in o:
                items = [walk(v) for v in o["__list__"]]
                return tuple(items) if o.get("tuple") else items
        return o

    return walk(skeleton)
