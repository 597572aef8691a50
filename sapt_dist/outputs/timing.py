"""Where a run's wall time goes: ``metrics/timing.json`` and the table ``sapt-train``
prints at the end.

Per task, the seconds of each phase: ``train`` (the block's optimizer steps, with
its model selection and routing trajectory), ``pseudo_samples`` (SAPT's reflection: the
attention target, the generator block's training and sampling), ``evaluate`` (generation
and scoring on the test splits), ``checkpoint`` (step checkpoints, the task's blocks and
progress); ``start_up`` (tasks, backbone, model, tokenisation) and ``finish`` (the final
blocks and report) once per start. Phases nest: a step checkpoint inside training counts
as ``checkpoint``, not twice. A resumed run adds its time to what the folder already
holds, so the file covers every start of the run (``starts`` counts them).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path

from sapt_dist import distributed
from sapt_dist.checkpoint.atomic import atomic_write_json

__all__ = ["PHASES", "RunTiming"]

#: the phases of a task, in the table's order
PHASES = ("train", "pseudo_samples", "evaluate", "checkpoint")


class RunTiming:
    """Phase clocks of one run folder (rank 0 writes ``metrics/timing.json``)."""

    def __init__(self, out: Path) -> None:
        self.path = Path(out) / "metrics" / "timing.json"
        data: dict = {}
        if self.path.is_file():
            with contextlib.suppress(OSError, ValueError):
                data = json.loads(self.path.read_text())
        ok = isinstance(data, dict) and isinstance(data.get("tasks"), dict)
        self.data = data if ok else {"tasks": {}, "start_up": 0.0, "finish": 0.0, "starts": 0}
        self.data["starts"] = int(self.data.get("starts", 0)) + 1
        self._stack: list[list[float]] = []  # [start, time of nested phases] per open phase

    @contextlib.contextmanager
    def phase(self, name: str, task: str | None = None) -> Iterator[None]:
        """Time ``name`` (of ``task``; None: ``start_up`` / ``finish``), minus the phases
        timed inside it."""
        self._stack.append([time.perf_counter(), 0.0])
        try:
            yield
        finally:
            start, nested = self._stack.pop()
            total = time.perf_counter() - start
            if self._stack:
                self._stack[-1][1] += total
            self._add(name, task, total - nested)

    def _add(self, name: str, task: str | None, seconds: float) -> None:
        if task is None:
            self.data[name] = round(float(self.data.get(name, 0.0)) + seconds, 3)
            return
        row = self.data["tasks"].setdefault(task, {})
        row[name] = round(float(row.get(name, 0.0)) + seconds, 3)

    def write(self) -> None:
        if distributed.is_main_process():
            atomic_write_json(self.path, self.data)

    def totals(self) -> dict[str, float]:
        """Seconds per phase over every task, ``start_up``, ``finish`` and ``total``."""
        out = {p: round(sum(r.get(p, 0.0) for r in self.data["tasks"].values()), 3) for p in PHASES}
        out["start_up"] = float(self.data.get("start_up", 0.0))
        out["finish"] = float(self.data.get("finish", 0.0))
        out["total"] = round(sum(out.values()), 3)
        return out

    def table(self) -> str:
        """The markdown table: one row per task, then the run's totals and shares."""
        head = "| task | " + " | ".join(PHASES) + " | total |"
        rows = [head, "|" + "---|" * (len(PHASES) + 2)]
        for task, r in self.data["tasks"].items():
            cells = [f"{r.get(p, 0.0):.1f}" for p in PHASES]
            rows.append(f"| {task} | " + " | ".join(cells) + f" | {sum(r.values()):.1f} |")
        t = self.totals()
        share = [f"{t[p]:.1f} ({100 * t[p] / max(t['total'], 1e-9):.0f}%)" for p in PHASES]
        rows.append("| all tasks | " + " | ".join(share) + f" | {t['total']:.1f} |")
        starts = int(self.data.get("starts", 1))
        return (
            "wall time (s) per phase"
            + (f", over {starts} starts of the run" if starts > 1 else "")
            + f"; start-up {t['start_up']:.1f}, finish {t['finish']:.1f}\n\n"
            + "\n".join(rows)
            + "\n"
        )
