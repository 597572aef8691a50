"""Experiment tracking: one W&B run per continual-learning run, logged by rank 0.

A reviewer reads what happened from the dashboard alone (``docs/TRACKING.md`` lists every
key). The run (``train.run``) calls four methods::

    log_step(global_step, stats)   after every optimizer step of a task's block:
                                   task loss, ARM loss, learning rate, tokens/s, memory
    log_task(global_step, ...)     after each task: the new accuracy-matrix row, routing
                                   heatmap (image + table), pseudo-sample table
    log_final(global_step, ...)    after the report: AP / F.Ra / FWT / BWT in the summary,
                                   the accuracy-matrix heatmap and table
    finish(exit_code)

``global_step`` counts the optimizer steps of every task's block so far (the generator's
are not counted); it is derived from the saved progress, so a resumed run continues it
and never logs going backwards. It is both W&B's ``step`` and the x axis
(``train/global_step``) of every chart.

The W&B run id is stored in ``<output_dir>/state/tracking.json`` the first time; a
restart (``sapt-train`` again, a requeued SLURM job) reuses it with ``resume="allow"``, so
the whole run, however often restarted, is one W&B run. Offline, every start writes its
own ``<dir>/wandb/offline-run-*-<id>`` folder; ``wandb sync`` of all of them uploads one run.

Secrets: the API key is only ever read by wandb itself (``WANDB_API_KEY`` or
``wandb login``); the logged config is the resolved config tree with any key that looks
like a secret removed, and no environment variable is logged.

wandb is imported only when a run is actually tracked (importing it is slow).

:func:`read_offline_run` reads the ``.wandb`` files back (wandb 0.31 no longer ships a
Python reader; the records are wandb's own protobuf ``Record`` messages in a LevelDB-style
log, checked with their CRCs); tests use it, and ``python -m sapt_dist.outputs.tracking <folder>``
prints what a run folder's W&B files hold, offline.
"""

from __future__ import annotations

import json
import logging
import math
import netrc
import os
import re
import struct
import sys
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from sapt_dist import distributed
from sapt_dist.checkpoint.atomic import (
    UnreadableFileError,
    atomic_write_checked_json,
    read_checked_json,
)
from sapt_dist.config import ConfigError, RunConfig, to_dict
from sapt_dist.methods import METHODS

__all__ = [
    "OfflineRun",
    "TaskRecord",
    "Tracker",
    "WandbTracker",
    "open_tracker",
    "process_memory_gb",
    "read_offline_run",
    "read_wandb_file",
    "redact",
    "resolve_mode",
    "state_path",
]

log = logging.getLogger(__name__)

STEP_KEY = "train/global_step"
#: seconds between flushes of the run's ``.wandb`` file (what a SIGKILL can lose)
FLUSH_SECONDS = 2.0
#: every key the tracker logs starts with one of these; each is charted against STEP_KEY
PREFIXES = ("train", "eval", "task", "routing", "pseudo", "final")
#: the pseudo-sample table's ``output`` of a generated sample: the generator writes a
#: definition and an input, no answer (the ARM holds the routing of the prompt only)
NO_OUTPUT = "(none: a generated pseudo-sample is a prompt; the ARM replays its routing)"
#: config keys never logged, whatever section they are in (api_key, hf_token, password...)
_SECRET_KEY = re.compile(r"(^|_)(api_?key|token|password|passwd|secret|credentials?)$", re.I)


#: state/tracking.json: the W&B run id, whether the final summary was logged, the tasks
#: whose rows were logged (a damaged file is named, not passed on to W&B)
STATE_SHAPE = {
    "run_id?": (str, None),
    "final_logged?": bool,
    "tasks_logged?": [int],
    "project?": (str, None),
    "entity?": (str, None),
}


def state_path(output_dir: str | Path) -> Path:
    """Where the W&B run id of a run folder is kept."""
    return Path(output_dir) / "state" / "tracking.json"


def redact(tree: Any) -> Any:
    """``tree`` without any mapping key that looks like a secret (recursively)."""
    if isinstance(tree, dict):
        return {k: redact(v) for k, v in tree.items() if not _SECRET_KEY.search(str(k))}
    if isinstance(tree, list):
        return [redact(v) for v in tree]
    return tree


def _key_configured() -> bool:
    """Whether wandb would find an API key: ``WANDB_API_KEY`` or a netrc entry for the
    W&B host (what ``wandb login`` writes). Only presence is checked; the key is not read
    into anything this package keeps."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host or "") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def resolve_mode(mode: str) -> str:
    """``offline``, ``online`` or ``disabled`` for a ``tracking.mode``.

    ``auto``: ``WANDB_MODE`` when it is set, else online exactly when an API key is
    configured. An explicit ``online`` without a key is a config error (raised here, before
    any model loads), not an interactive login prompt in a batch job.
    """
    if mode == "auto":
        env = os.environ.get("WANDB_MODE", "").strip().lower()
        if env in ("offline", "dryrun"):
            return "offline"
        if env == "disabled":
            return "disabled"
        if env in ("online", "run"):
            mode = "online"
        else:
            return "online" if _key_configured() else "offline"
    if mode == "online" and not _key_configured():
        raise ConfigError(
            "config key 'tracking.mode' is 'online' but no W&B API key is configured: set "
            "WANDB_API_KEY or run `wandb login` (or use tracking.mode=offline / auto)"
        )
    return mode


def process_memory_gb() -> dict[str, float]:
    """Memory of this process: resident set (``rss_gb``; the peak when psutil is absent)
    and, on a GPU, the peak CUDA allocation (``gpu_max_allocated_gb``)."""
    import torch

    out: dict[str, float] = {}
    try:
        import psutil

        out["rss_gb"] = psutil.Process().memory_info().rss / 2**30
    except ImportError:
        import resource

        out["rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["gpu_max_allocated_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return out


# ---------------------------------------------------------------------------- trackers
@dataclass
class TaskRecord:
    """What the run folder holds of one finished task, as :meth:`Tracker.log_task` logs it:
    the global step at its end, its index, every task's name, the matrix rows up to it,
    its routing summary and its pseudo-samples' file (``None``: none)."""

    global_step: int
    index: int
    tasks: list[str]
    matrix: list[list[float | None]]
    routing: dict | None = None
    pseudo_path: Path | None = None


class Tracker:
    """The no-op tracker: ``tracking.backend=none``, mode ``disabled``, ranks other than 0."""

    enabled = False
    run_id: str | None = None

    def log_step(self, global_step: int, stats: dict[str, float]) -> None:
        """One optimizer step's stats (keys as train.block.BlockTraining reports them)."""

    def log_task(
        self,
        global_step: int,
        index: int,
        tasks: list[str],
        matrix: list[list[float | None]],
        routing: dict | None = None,
        pseudo_path: Path | None = None,
    ) -> None:
        """After task ``index``: row ``matrix[-1]``, the routing summary, pseudo-samples."""

    def log_final(self, global_step: int, results: dict, metrics_dir: Path) -> None:
        """After the report: the summary metrics and the accuracy-matrix heatmap."""

    def catch_up(self, records: list[TaskRecord]) -> list[int]:
        """On a restart: log every finished task's record that the W&B run lacks, once;
        returns the indices logged now."""
        return []

    def finish(self, exit_code: int = 0) -> None:
        """Close the run (idempotent)."""


def _settings(wandb: Any) -> Any:
    """wandb's brief console output (the run's own log goes to run.log), no code saving,
    and the ``.wandb`` file flushed every ``FLUSH_SECONDS``: wandb's default (15 s) loses
    everything since the last flush when a job is killed or preempted."""
    try:
        return wandb.Settings(
            quiet=True, save_code=False, x_transaction_log_flush_interval=FLUSH_SECONDS
        )
    except (TypeError, ValueError):  # a wandb without that (private) setting
        return wandb.Settings(quiet=True, save_code=False)


def _own_wandb_service() -> None:
    """Start this process's own wandb service rather than a parent process's.

    wandb hands its service to child processes (``WANDB_SERVICE``, "<v>-<pid>-..."). A
    training process killed by SIGKILL or preemption would leave its run registered in
    that long-lived service, and the restart would be refused ("run ID ... is in use").
    A service this process starts dies with it.
    """
    token = os.environ.get("WANDB_SERVICE", "")
    m = re.match(r"\d+-(\d+)-", token)
    if token and (m is None or int(m.group(1)) != os.getpid()):
        del os.environ["WANDB_SERVICE"]


def _table_value(v: Any) -> Any:
    return None if isinstance(v, float) and not math.isfinite(v) else v


class WandbTracker(Tracker):
    """Rank 0's W&B run. Construct with :func:`open_tracker`."""

    _broken = False  # set by _guard after a failed W&B call

    enabled = True

    def __init__(self, cfg: RunConfig, mode: str, extra_config: dict | None = None) -> None:
        _own_wandb_service()
        import wandb

        self.cfg = cfg
        self.t = t = cfg.tracking
        self.out = Path(cfg.output_dir)
        self.state_file = state_path(self.out)
        saved = {}
        if self.state_file.is_file():
            try:
                saved = read_checked_json(self.state_file, schema=STATE_SHAPE)
            except UnreadableFileError as e:
                raise ConfigError(
                    f"{e}; it keeps this run's W&B run id. Delete it to start a new W&B run "
                    f"for the rest of this run"
                ) from None
        self.final_logged = bool(saved.get("final_logged"))
        run_id = saved.get("run_id")  # None the first time: wandb makes one, kept below
        wandb_dir = Path(t.dir) if t.dir else self.out
        wandb_dir.mkdir(parents=True, exist_ok=True)
        # task ends the W&B run holds (0-based): the offline files say so themselves (read
        # before this start's file exists); online, the list this folder kept (None: a run
        # folder from before the list was kept, whose task ends are taken as logged)
        kept = saved.get("tasks_logged")
        self.tasks_logged: set[int] | None = None if kept is None else set(kept)
        if run_id and mode == "offline":
            on_file = _task_ends_on_file(wandb_dir / "wandb", run_id)
            if on_file is not None:
                self.tasks_logged = on_file
        elif run_id is None:
            self.tasks_logged = set()
        config = redact({**to_dict(cfg), **(extra_config or {})})
        kwargs = dict(
            project=t.project,
            entity=t.entity,
            group=t.group,
            job_type=t.job_type or cfg.method,
            name=t.name or self.out.resolve().name,
            tags=list(t.tags) or None,
            dir=str(wandb_dir),
            config=config,
            id=run_id,
            resume="allow",
            settings=_settings(wandb),
        )
        try:
            self.run = wandb.init(mode=mode, **kwargs)
        except Exception as e:  # any failure to reach W&B: keep the files offline
            if mode != "online":
                raise
            log.warning("W&B online start failed (%s); tracking offline instead", e)
            mode = "offline"
            self.run = wandb.init(mode=mode, **kwargs)
        self.mode = mode
        self.run_id = self.run.id
        self._wandb = wandb
        self._finished = False
        self._state = {"run_id": self.run_id, "project": t.project, "entity": t.entity}
        self._write_state()
        self.run.define_metric(STEP_KEY)
        for p in PREFIXES:
            self.run.define_metric(f"{p}/*", step_metric=STEP_KEY)
        where = getattr(self.run, "dir", None) or wandb_dir
        if mode == "offline":
            log.info(
                "W&B run %s (offline) -> %s; upload later with: wandb sync %s",
                self.run_id,
                Path(where).parent,
                wandb_dir / "wandb",
            )
        else:
            log.info("W&B run %s (%s): %s", self.run_id, mode, getattr(self.run, "url", ""))

    def _write_state(self) -> None:
        state = {**self._state, "final_logged": self.final_logged}
        if self.tasks_logged is not None:
            state["tasks_logged"] = sorted(self.tasks_logged)
        atomic_write_checked_json(self.state_file, state)

    def _guard(self, what: str, fn, *args, **kwargs) -> bool:
        """Run a W&B call; tracking never takes training down. The first failure (e.g. the
        W&B service killed by the job's SIGTERM along with the training processes) turns
        tracking off for the rest of this start, with one warning; the run id stays in the
        run folder, so the restart continues the same W&B run."""
        if self._broken:
            return False
        try:
            fn(*args, **kwargs)
            return True
        except Exception as e:  # noqa: BLE001 - any W&B failure, see above
            self._broken = True
            log.warning(
                "W&B %s failed (%s: %s); tracking off until restart", what, type(e).__name__, e
            )
            return False

    def _log(self, global_step: int, data: dict, wandb_step: int | None = None) -> bool:
        step = global_step if wandb_step is None else wandb_step
        return self._guard("log", self.run.log, {STEP_KEY: global_step, **data}, step=step)

    # ---------------------------------------------------------------- per step
    def log_step(self, global_step: int, stats: dict[str, float]) -> None:
        if global_step % self.t.log_every:
            return
        self._log(global_step, {f"train/{k}": v for k, v in stats.items()})

    # ---------------------------------------------------------------- per task
    def log_task(
        self,
        global_step: int,
        index: int,
        tasks: list[str],
        matrix: list[list[float | None]],
        routing: dict | None = None,
        pseudo_path: Path | None = None,
        wandb_step: int | None = None,
    ) -> None:
        row = matrix[-1]
        seen = [v for v in row if v is not None]
        data: dict[str, Any] = {
            "task/completed": index + 1,
            "eval/mean_seen": sum(seen) / len(seen) if seen else None,
            **{f"eval/{name}": v for name, v in zip(tasks, row, strict=True) if v is not None},
            "task/accuracy_matrix": self._matrix_table(tasks, matrix),
        }
        with tempfile.TemporaryDirectory() as tmp:
            if routing:
                data.update(self._routing(tasks, routing, Path(tmp) / "routing.png", index))
            if pseudo_path is not None and Path(pseudo_path).is_file():
                data.update(self._pseudo(tasks[index], Path(pseudo_path)))
            logged = self._log(
                global_step, {k: v for k, v in data.items() if v is not None}, wandb_step
            )
        if logged and self.tasks_logged is not None:
            self.tasks_logged.add(index)
            self._write_state()

    def catch_up(self, records: list[TaskRecord]) -> list[int]:
        """Log the task ends the W&B run lacks (a start killed between a task's end
        checkpoint and its W&B row, or within ``FLUSH_SECONDS`` after it), once each, in
        task order, with their own global step as the x axis. W&B's own step never goes
        back: online, a resumed run continues after its last step, so a late row takes the
        next free step (its ``train/global_step`` still says where it belongs)."""
        if self.tasks_logged is None:  # an old folder: no record of what was logged
            return []
        done = []
        for rec in records:
            if rec.index in self.tasks_logged:
                continue
            step = max(rec.global_step, int(getattr(self.run, "step", 0) or 0))
            log.info(
                "W&B: logging task %d's end (%s, global step %d), which the W&B run lacks",
                rec.index + 1,
                rec.tasks[rec.index],
                rec.global_step,
            )
            self.log_task(
                rec.global_step,
                rec.index,
                rec.tasks,
                rec.matrix,
                rec.routing,
                rec.pseudo_path,
                wandb_step=step,
            )
            if rec.index in self.tasks_logged:
                done.append(rec.index)
        return done

    def _matrix_table(self, tasks: list[str], matrix: list[list[float | None]]) -> Any:
        joint = METHODS[self.cfg.method].joint
        labels = [f"after {self.cfg.method}"] if joint else [f"after {t}" for t in tasks]
        return self._wandb.Table(
            columns=["after", *tasks],
            data=[[labels[i], *map(_table_value, r)] for i, r in enumerate(matrix)],
        )

    def _routing(self, tasks: list[str], routing: dict, png: Path, index: int) -> dict:
        from sapt_dist.outputs.metrics import save_heatmap

        wandb = self._wandb
        rows = [int(j) for j in routing["tasks"]]
        mean = routing["mean_weights"]
        slots = [f"block {k + 1}: {tasks[k]}" for k in range(len(mean[0]))]
        save_heatmap(
            mean,
            [f"test {tasks[j]}" for j in rows],
            slots,
            png,
            f"mean routing weight per slot after task {index + 1} ({tasks[index]})",
            fmt=".2f",
            vmin=0.0,
            vmax=1.0,
        )
        # task-keyed dicts have int keys fresh, str keys after a JSON round trip
        acc = {str(k): v for k, v in routing["routing_accuracy"].items()}
        n_in = {str(k): v for k, v in routing["n_inputs"].items()}
        table = wandb.Table(
            columns=["test task", *slots, "routing accuracy", "inputs"],
            data=[
                [tasks[j], *m, acc[str(j)], n_in[str(j)]] for j, m in zip(rows, mean, strict=True)
            ],
        )
        return {
            "routing/heatmap": wandb.Image(str(png)),
            "routing/weights": table,
            "routing/accuracy": routing["overall_routing_accuracy"],
            "routing/chance": routing["chance"],
        }

    def _pseudo(self, task: str, path: Path) -> dict:
        rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
        if not rows:
            return {}
        shown = rows[: self.t.pseudo_examples]
        table = self._wandb.Table(
            columns=["task", "well formed", "definition", "input", "output"],
            data=[
                [
                    task,
                    bool(r.get("well_formed", r.get("real", False))),
                    str(r.get("definition", ""))[:300],
                    str(r.get("input", "")),
                    str(r["output"]) if "output" in r else NO_OUTPUT,
                ]
                for r in shown
            ],
        )
        well = sum(bool(r.get("well_formed", r.get("real", False))) for r in rows)
        return {
            "pseudo/samples": table,
            "pseudo/count": len(rows),
            "pseudo/well_formed_share": well / len(rows),
        }

    # ---------------------------------------------------------------- at the end
    def log_final(self, global_step: int, results: dict, metrics_dir: Path) -> None:
        wandb = self._wandb
        summary: dict[str, Any] = {}
        for k, v in (results.get("metrics") or {}).items():
            # F.Ra as F_Ra: W&B reads a dot in a key as nesting
            summary[f"final/{k.replace('.', '_')}"] = v
        for k in ("fwt_source", "released_convention"):
            if k in results:
                summary[f"final/{k}"] = results[k]
        for k in ("routing_accuracy", "routing_chance"):
            if k in results:
                summary[f"final/{k}"] = results[k]
        for k, v in (results.get("timing") or {}).items():  # where the wall time went
            summary[f"time/{k}_s"] = v
        data: dict[str, Any] = {
            "final/accuracy_matrix": self._matrix_table(results["tasks"], results["matrix"]),
            **{k: v for k, v in summary.items() if isinstance(v, (int, float))},
        }
        for key, name in (
            ("final/accuracy_matrix_heatmap", "accuracy_matrix.png"),
            ("final/routing_heatmap", "routing.png"),
        ):
            if (metrics_dir / name).is_file():
                data[key] = wandb.Image(str(metrics_dir / name))
        self._log(global_step, data)

        def write_summary() -> None:
            for k, v in summary.items():  # None too: FWT "missing" is shown, not dropped
                self.run.summary[k] = v

        if self._guard("summary", write_summary):
            self.final_logged = True  # else the next start writes it (final_pending)
            self._write_state()

    def finish(self, exit_code: int = 0) -> None:
        if self._finished:
            return
        self._finished = True
        self._guard("finish", self.run.finish, exit_code=exit_code)


def _task_ends_on_file(folder: Path, run_id: str) -> set[int] | None:
    """Task ends (0-based) that the offline ``.wandb`` files of run ``run_id`` under
    ``folder`` hold; ``None`` when there are none to read or one cannot be read."""
    dirs = sorted(d for d in folder.glob(f"offline-run-*-{run_id}") if d.is_dir())
    if not dirs:
        return None
    found: set[int] = set()
    for d in dirs:
        try:
            rows = read_offline_run(d).history
        except FileNotFoundError:
            continue
        except ValueError as e:  # a damaged file: fall back to the kept list
            log.warning("W&B: cannot read %s (%s); trusting state/tracking.json", d, e)
            return None
        found |= {int(r["task/completed"]) - 1 for r in rows if "task/completed" in r}
    return found


def open_tracker(cfg: RunConfig, extra_config: dict | None = None) -> Tracker:
    """The run's tracker: a W&B run on rank 0 when tracking is on, else the no-op one."""
    t = cfg.tracking
    if t.backend == "none":
        return Tracker()
    mode = resolve_mode(t.mode)  # on every rank: a config error stops them all alike
    if mode == "disabled" or not distributed.is_main_process():
        return Tracker()
    return WandbTracker(cfg, mode, extra_config)


def final_pending(cfg: RunConfig) -> bool:
    """A finished run whose W&B summary was never written (killed in between)."""
    path = state_path(cfg.output_dir)
    if cfg.tracking.backend == "none" or not path.is_file():
        return False
    try:
        return not read_checked_json(path, schema=STATE_SHAPE).get("final_logged")
    except UnreadableFileError as e:
        raise ConfigError(
            f"{e}; it keeps this run's W&B run id. Delete it to start a new W&B run for the "
            f"rest of this run"
        ) from None


# ---------------------------------------------------------------------------- reading back
_HEADER = struct.Struct("<4sHB")  # ":W&B", magic 0xBEE1, version 0
_RECORD = struct.Struct("<IHB")  # crc32 over (type byte + data), length, type
_BLOCK = 32768
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def read_wandb_file(path: str | Path) -> list[Any]:
    """The ``wandb_internal_pb2.Record`` messages of a ``.wandb`` file, in order.

    The file is a LevelDB-style log: a 7-byte header, then 32 KiB blocks of chunks
    (crc32, length, type FULL / FIRST / MIDDLE / LAST). A chunk with a bad CRC raises; a
    truncated tail (a killed writer) ends the list where the last whole record ended.
    """
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    if len(data) < _HEADER.size:
        raise ValueError(f"{path}: not a .wandb file (too short)")
    ident, magic, version = _HEADER.unpack_from(data)
    if ident != b":W&B" or magic != 0xBEE1 or version != 0:
        raise ValueError(f"{path}: not a .wandb file (header {ident!r} {magic:#x} {version})")
    records, pending, pos = [], None, _HEADER.size
    while pos + _RECORD.size <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _RECORD.size:  # block trailer
            pos += left
            continue
        crc, length, kind = _RECORD.unpack_from(data, pos)
        if kind == 0 and length == 0:  # zero padding to the block end
            pos += left
            continue
        chunk = data[pos + _RECORD.size : pos + _RECORD.size + length]
        if len(chunk) < length:
            break  # truncated by a kill
        if zlib.crc32(chunk, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF != crc:
            raise ValueError(f"{path}: bad checksum at byte {pos}")
        pos += _RECORD.size + length
        if kind == _FULL:
            records.append(chunk)
        elif kind == _FIRST:
            pending = chunk
        elif kind in (_MIDDLE, _LAST) and pending is not None:
            pending += chunk
            if kind == _LAST:
                records.append(pending)
                pending = None
        else:
            raise ValueError(f"{path}: bad chunk type {kind} at byte {pos}")
    out = []
    for raw in records:
        rec = pb.Record()
        rec.ParseFromString(raw)
        out.append(rec)
    return out


def _items(items) -> dict[str, Any]:
    """``{key: value}`` of history / summary / config items; a logged media object comes
    back as one item per field (``nested_key`` = [key, field]) and is put together again."""
    out: dict[str, Any] = {}
    for i in items:
        value = json.loads(i.value_json)
        if i.key:
            out[i.key] = value
            continue
        *head, last = i.nested_key
        node = out
        for k in head:
            node = node.setdefault(k, {})
        node[last] = value
    return out


@dataclass
class OfflineRun:
    """What one or more ``.wandb`` files of one run hold (a resumed run: several files)."""

    run_ids: list[str] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    project: str = ""
    group: str = ""
    job_type: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    #: one dict per history row, files in start order
    history: list[dict[str, Any]] = field(default_factory=list)
    #: the history of each file separately (one per start of the run)
    history_per_file: list[list[dict[str, Any]]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    exit_codes: list[int | None] = field(default_factory=list)


def read_offline_run(folder: str | Path) -> OfflineRun:
    """Read every ``run-*.wandb`` under ``folder`` (a run folder, its ``wandb/`` dir or one
    ``offline-run-*`` dir), oldest start first, into one :class:`OfflineRun`."""
    folder = Path(folder)
    files = sorted(
        (p for p in folder.rglob("run-*.wandb") if "latest-run" not in p.parts),
        key=lambda p: p.parent.name,
    )
    if not files:
        raise FileNotFoundError(f"no run-*.wandb file under {folder}")
    run = OfflineRun(files=files)
    for f in files:
        rows: list[dict[str, Any]] = []
        exit_code = None
        for rec in read_wandb_file(f):
            kind = rec.WhichOneof("record_type")
            if kind == "run":
                r = rec.run
                if r.run_id not in run.run_ids:
                    run.run_ids.append(r.run_id)
                run.project, run.group, run.job_type = r.project, r.run_group, r.job_type
                run.config.update(_items(r.config.update))
            elif kind == "config":
                run.config.update(_items(rec.config.update))
            elif kind == "history":
                rows.append(_items(rec.history.item))
            elif kind == "summary":
                run.summary.update(_items(rec.summary.update))
                for i in rec.summary.remove:
                    run.summary.pop(i.key or i.nested_key[0], None)
            elif kind == "exit":
                exit_code = rec.exit.exit_code
        run.history_per_file.append(rows)
        run.history += rows
        run.exit_codes.append(exit_code)
    # config values are stored as {"value": v} (and wandb's own "_wandb" entry)
    run.config = {
        k: (v["value"] if isinstance(v, dict) and set(v) == {"value"} else v)
        for k, v in run.config.items()
    }
    return run


def main(argv: list[str] | None = None) -> int:
    """``python -m sapt_dist.outputs.tracking <run folder>``: what its W&B files hold, offline."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m sapt_dist.outputs.tracking",
        description="Read a run's offline W&B files (<run folder>/wandb/offline-run-*/"
        "run-*.wandb) without network or a W&B account: the run id(s), starts and their "
        "exit codes, the history's global steps and the final / eval summary.",
        epilog="Example: python -m sapt_dist.outputs.tracking runs/demo   "
        "(upload the same files with: wandb sync runs/demo/wandb)",
    )
    parser.add_argument(
        "folder", help="a run folder, its wandb/ folder or one offline-run-* folder"
    )
    args = parser.parse_args(argv)
    try:
        run = read_offline_run(args.folder)
    except (FileNotFoundError, ValueError) as e:
        print(f"sapt_dist.outputs.tracking: {e}", file=sys.stderr)
        return 2
    steps = [r[STEP_KEY] for r in run.history if STEP_KEY in r]
    print(
        f"run {', '.join(run.run_ids)}  project {run.project}  group {run.group or '-'}  "
        f"job type {run.job_type}"
    )
    print(f"{len(run.files)} start(s); exit codes {run.exit_codes}")
    if steps:
        print(f"{len(run.history)} history rows, global steps {min(steps)}..{max(steps)}")
    for k in sorted(run.summary):
        v = run.summary[k]
        if isinstance(v, dict) and "_type" in v:  # a logged image / table: its file
            v = f"<{v['_type']}> {v.get('path', '')}"
        if k.startswith(("final/", "eval/")):
            print(f"  {k} = {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
