"""``sapt-report``: a scaling study's finished runs -> one table and its plots.

::

    sapt-report runs/sweeps/tiny_scaling          # a sapt-sweep folder (reads runs.json)
    sapt-report runs/a runs/b --out reports/ab    # or any run folders

Writes into ``<sweep>/report/`` (or ``--out``):

- ``summary.md`` / ``summary.csv``: one row per run (model, backbone parameters, method,
  order, seed, AP, F.Ra, FWT, BWT, routing accuracy, status), then the mean over seeds and
  orders per model x method;
- ``metrics_vs_size.png``: AP and F.Ra against the backbone's parameter count, one line per
  method (mean over seeds / orders, min-max bars when there are several);
- ``accuracy_matrices.png``: every finished run's accuracy matrix, side by side.

A run that has not finished is listed with its status (``running: 1/2 tasks``, ``not
started``) and left out of the means and plots. The parameter count is the frozen
backbone's, from its ``config.json`` (instantiated on the meta device: nothing is loaded).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from sapt_dist.checkpoint.atomic import (
    UnreadableFileError,
    atomic_file,
    atomic_write_text,
    read_json,
)

__all__ = ["StudyRun", "backbone_params", "gather", "main", "write_study"]

#: what sapt-report reads of a run's metrics/results.json (a damaged one makes its row
#: "damaged", naming the key, instead of ending the report)
RESULTS_SHAPE = {
    "metrics?": {str: (float, None)},
    "routing_accuracy?": (float, None),
    "tasks?": [str],
    "matrix?": [[(float, None)]],
}

log = logging.getLogger(__name__)

#: ours, then BWT / FWT in the released scorer's convention (``metrics.released_metrics``)
METRICS = ("AP", "F.Ra", "FWT", "BWT", "BWT_released", "FWT_released")


@dataclass
class StudyRun:
    name: str
    folder: Path
    model: str
    method: str
    order: str
    seed: int | None
    params: int | None
    status: str
    metrics: dict[str, float | None] = field(default_factory=dict)
    routing_accuracy: float | None = None
    tasks: list[str] = field(default_factory=list)
    matrix: list[list[float | None]] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.status == "finished"


_PARAMS_CACHE: dict[str, int] = {}


def backbone_params(model_cfg: dict) -> int | None:
    """Parameter count of the run's frozen backbone, from its HF ``config.json``."""
    import torch
    from transformers import AutoConfig

    from sapt_dist.backbone.load import model_class

    if model_cfg.get("builder") == "demo":
        from sapt_dist.backbone.load import build_demo_backbone, demo_spec

        spec = demo_spec(
            model_cfg.get("demo_hidden_size"),
            model_cfg.get("demo_layers"),
            model_cfg.get("demo_arch") or "llama",
        )
        folder = build_demo_backbone(spec=spec)
    else:
        folder = Path(model_cfg.get("path") or "")
    if not (folder / "config.json").is_file():
        log.warning("no config.json in %s: parameter count unknown", folder)
        return None
    key = str(folder)
    if key not in _PARAMS_CACHE:
        hf = AutoConfig.from_pretrained(
            folder, trust_remote_code=bool(model_cfg.get("trust_remote_code"))
        )
        with torch.device("meta"):
            model = model_class(hf).from_config(hf)
        _PARAMS_CACHE[key] = sum(p.numel() for p in model.parameters())
    return _PARAMS_CACHE[key]


def _status(folder: Path) -> str:
    if (folder / "metrics" / "results.json").is_file() and (
        folder / "state" / "finished.json"
    ).is_file():
        return "finished"
    progress = folder / "state" / "blocks" / "progress.json"
    if progress.is_file():
        from sapt_dist.checkpoint.run_state import StateDamagedError, read_progress

        try:
            p = read_progress(progress)
        except StateDamagedError as e:
            return f"damaged ({e})"
        return f"running: {p['completed']}/{len(p['tasks']) or '?'} tasks"
    if (folder / "config.yaml").is_file():
        return "started"
    return "not started"


def _load_run(folder: Path, meta: dict) -> StudyRun:
    cfg_path = folder / "config.yaml"
    cfg = yaml.safe_load(cfg_path.read_text()) if cfg_path.is_file() else None
    if cfg is None and meta.get("config_file") and Path(meta["config_file"]).is_file():
        cfg = yaml.safe_load(Path(meta["config_file"]).read_text())
    cfg = cfg or {}
    model_cfg = cfg.get("model") or {}
    run = StudyRun(
        name=meta.get("name") or folder.name,
        folder=folder,
        model=meta.get("model") or str(model_cfg.get("path") or model_cfg.get("builder") or "?"),
        method=(meta.get("method") or cfg.get("method", "?"))
        # prompt blocks are another PET: their runs are their own rows and curves
        + ("+prompt" if (cfg.get("adapter") or {}).get("kind") == "prompt" else ""),
        order=meta.get("order") or (cfg.get("data") or {}).get("order", "?"),
        seed=meta.get("seed", (cfg.get("train") or {}).get("seed")),
        params=backbone_params(model_cfg) if model_cfg else None,
        status=_status(folder),
    )
    if run.finished:
        try:
            res = read_json(folder / "metrics" / "results.json", schema=RESULTS_SHAPE)
        except UnreadableFileError as e:
            run.status = f"damaged ({e})"
            return run
        run.metrics = {k: res.get("metrics", {}).get(k) for k in METRICS}
        run.routing_accuracy = res.get("routing_accuracy")
        run.tasks = res.get("tasks", [])
        run.matrix = res.get("matrix", [])
    return run


def gather(paths: list[str | Path]) -> list[StudyRun]:
    """The runs of a sweep folder (its ``runs.json``) or of the given run folders."""
    runs = []
    for p in map(Path, paths):
        index = p / "runs.json"
        if index.is_file():
            for meta in json.loads(index.read_text())["runs"]:
                runs.append(_load_run(Path(meta["output_dir"]), meta))
        elif (p / "config.yaml").is_file():
            runs.append(_load_run(p, {}))
        else:
            raise FileNotFoundError(
                f"{p}: neither a sapt-sweep folder (runs.json) nor a run folder"
            )
    return runs


def _fmt(v: float | int | None, digits: int = 2) -> str:
    if v is None:
        return ""
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _grouped(runs: list[StudyRun]) -> list[dict]:
    """Mean over seeds / orders per (model, method) of the finished runs."""
    groups: dict[tuple[str, str], list[StudyRun]] = {}
    for r in runs:
        if r.finished:
            groups.setdefault((r.model, r.method), []).append(r)
    out = []
    for (model, method), rs in groups.items():
        row = {"model": model, "params": rs[0].params, "method": method, "runs": len(rs)}
        for k in ("AP", "F.Ra"):
            vals = [r.metrics[k] for r in rs if r.metrics.get(k) is not None]
            row[k] = _mean(vals)
            row[k + "_min"] = min(vals) if vals else None
            row[k + "_max"] = max(vals) if vals else None
        out.append(row)
    return out


def _table(runs: list[StudyRun]) -> tuple[str, str]:
    cols = ["run", "model", "params", "method", "order", "seed", *METRICS, "routing", "status"]
    rows = [
        [
            r.name,
            r.model,
            _fmt(r.params),
            r.method,
            r.order,
            _fmt(r.seed),
            *(_fmt(r.metrics.get(k)) for k in METRICS),
            _fmt(None if r.routing_accuracy is None else 100 * r.routing_accuracy, 1),
            r.status,
        ]
        for r in runs
    ]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    w.writerows(rows)
    md = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    md += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(md), buf.getvalue()


def _plot_vs_size(groups: list[dict], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4))
    FigureCanvasAgg(fig)
    for ax, key in zip(fig.subplots(1, 2), ("AP", "F.Ra")):
        for method in sorted({g["method"] for g in groups}):
            pts = sorted(
                (g for g in groups if g["method"] == method and g["params"] and g[key] is not None),
                key=lambda g: g["params"],
            )
            if not pts:
                continue
            x = [g["params"] for g in pts]
            y = [g[key] for g in pts]
            err = [[g[key] - g[key + "_min"] for g in pts], [g[key + "_max"] - g[key] for g in pts]]
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=method)
        ax.set_xscale("log")
        ax.set_xlabel("backbone parameters")
        ax.set_ylabel(key + (" (lower is better)" if key == "F.Ra" else ""))
        ax.set_title(f"{key} vs model size")
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    with atomic_file(path, "wb") as f:
        fig.savefig(f, format="png", dpi=120)


def _plot_matrices(runs: list[StudyRun], path: Path) -> None:
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    done = [r for r in runs if r.finished and r.matrix]
    cols = min(4, len(done))
    rows = math.ceil(len(done) / cols)
    fig = Figure(figsize=(4.2 * cols, 3.6 * rows))
    FigureCanvasAgg(fig)
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    for ax, r in zip(axes, done):
        data = np.array([[np.nan if v is None else v for v in row] for row in r.matrix], float)
        ax.imshow(data, vmin=0, vmax=100, cmap="viridis")
        for i in range(data.shape[0]):
            for j in range(data.shape[1]):
                if np.isfinite(data[i, j]):
                    ax.text(j, i, f"{data[i, j]:.0f}", ha="center", va="center", color="w")
        ax.set_title(r.name, fontsize=8)
        ax.set_xticks(range(data.shape[1]), [f"T{j + 1}" for j in range(data.shape[1])])
        ylabels = (
            ["all"] if data.shape[0] == 1 else [f"after T{i + 1}" for i in range(data.shape[0])]
        )
        ax.set_yticks(range(data.shape[0]), ylabels)
    for ax in axes[len(done) :]:
        ax.axis("off")
    fig.suptitle("accuracy matrix a[i][j]: score on task j after training task i")
    fig.tight_layout()
    with atomic_file(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)


def write_study(runs: list[StudyRun], out: str | Path) -> dict[str, Path]:
    """Write the table (markdown, CSV) and the plots; return their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    md, csv_text = _table(runs)
    groups = _grouped(runs)
    gmd = ["| model | params | method | runs | AP | F.Ra |", "|---|---|---|---|---|---|"]
    gmd += [
        f"| {g['model']} | {_fmt(g['params'])} | {g['method']} | {g['runs']} | "
        f"{_fmt(g['AP'])} | {_fmt(g['F.Ra'])} |"
        for g in sorted(groups, key=lambda g: (g["method"], g["params"] or 0))
    ]
    n_done = sum(r.finished for r in runs)
    text = (
        f"# Scaling study: {n_done} of {len(runs)} run(s) finished\n\n{md}\n\n"
        f"## Mean over seeds and orders\n\n" + "\n".join(gmd) + "\n"
    )
    paths = {"md": out / "summary.md", "csv": out / "summary.csv"}
    atomic_write_text(paths["md"], text)
    atomic_write_text(paths["csv"], csv_text)
    if groups:
        paths["size"] = out / "metrics_vs_size.png"
        _plot_vs_size(groups, paths["size"])
        paths["matrices"] = out / "accuracy_matrices.png"
        _plot_matrices(runs, paths["matrices"])
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="sapt-report",
        description="Gather finished runs (a sapt-sweep folder or run folders) into a table and plots.",
    )
    parser.add_argument("paths", nargs="+", help="a sapt-sweep folder, or run folders")
    parser.add_argument("--out", help="output folder (default: <first path>/report)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        runs = gather(args.paths)
    except FileNotFoundError as e:
        print(f"sapt-report: {e}", file=sys.stderr)
        return 2
    out = Path(args.out or Path(args.paths[0]) / "report")
    paths = write_study(runs, out)
    print(paths["md"].read_text())
    for k, p in paths.items():
        print(f"{k}: {p}")
    unfinished = [r for r in runs if not r.finished]
    if unfinished:
        print(f"{len(unfinished)} run(s) not finished: {', '.join(r.name for r in unfinished)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
