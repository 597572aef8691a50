"""The outputs a reader looks at, written from a run's progress.

::

    metrics/accuracy_matrix.json  a[i][j], task names, metric per task
    metrics/accuracy_matrix.md    the same as a markdown table, with AP / F.Ra / FWT / BWT
    metrics/accuracy_matrix.png   heatmap
    metrics/routing.json          metrics.routing_summary of the last evaluation: mean weight
                                  per slot and routing accuracy per test task, chance
    metrics/routing.png           heatmap of the mean weights (SAPT only)
    metrics/results.json          the summary (and, for single_task, the b_j scores)
    metrics/routing_trajectory.*  SAPT: mean dev weights during training (written by
                                  outputs.trajectory; drawn here by plot_trajectory)
"""

from __future__ import annotations

import logging
from pathlib import Path

from sapt_dist import distributed
from sapt_dist.checkpoint.atomic import (
    UnreadableFileError,
    atomic_file,
    atomic_write_json,
    atomic_write_text,
    read_json,
)
from sapt_dist.config import RunConfig
from sapt_dist.methods import METHODS
from sapt_dist.outputs.metrics import (
    RELEASED_FWT_CONSTANT,
    cl_metrics,
    matrix_markdown,
    released_metrics,
    save_heatmap,
    wrap_label,
)

__all__ = ["load_single_task_scores", "plot_trajectory", "write_report"]

log = logging.getLogger(__name__)


def load_single_task_scores(folder: str | Path, tasks: list[str]) -> tuple[list[float] | None, str]:
    """``b_j`` for ``tasks`` from a single_task run folder, or (None, why)."""
    path = Path(folder) / "metrics" / "results.json"
    if not path.is_file():
        return None, f"no {path}"
    try:
        res = read_json(path, schema={"single_task_scores?": {str: float}})
    except UnreadableFileError as e:
        return None, str(e)
    scores = res.get("single_task_scores") or {}
    missing = [t for t in tasks if t not in scores]
    if missing:
        return None, f"{path} has no single-task score for {missing}"
    return [float(scores[t]) for t in tasks], str(path)


#: what the ``*_released`` metrics are (results.json's ``released_convention``)
RELEASED_NOTE = (
    "the released SAPT score.py's convention: BWT divided by N (the last task's zero term "
    f"counted), FWT = mean a[j][j] - {RELEASED_FWT_CONSTANT} (its hard-coded constant, "
    "whatever the benchmark; not a transfer measure elsewhere)"
)


def _fmt(v: float | None) -> str:
    return "missing" if v is None else f"{v:.2f}"


def write_report(out: Path, cfg: RunConfig, progress: dict) -> dict:
    """Write every output file (rank 0) and return the results summary."""
    tasks: list[str] = progress["tasks"]
    matrix = progress["matrix"]
    n = len(tasks)
    results: dict = {"method": cfg.method, "tasks": tasks, "matrix": matrix}
    method = METHODS[cfg.method]
    if method.evaluates == "own":
        results["single_task_scores"] = {t: matrix[j][j] for j, t in enumerate(tasks)}
        results["metrics"] = {"AP": sum(matrix[j][j] for j in range(n)) / n}
    elif method.joint:
        results["metrics"] = {"AP": sum(matrix[0]) / n}
    else:
        single, why = (None, "no single_task_run in the config")
        if cfg.single_task_run:
            single, why = load_single_task_scores(cfg.single_task_run, tasks)
        # ours, then the released scorer's convention beside them (to compare with the paper)
        results["metrics"] = {**cl_metrics(matrix, single), **released_metrics(matrix)}
        results["fwt_source"] = why
        results["released_convention"] = RELEASED_NOTE
    last_routing = progress["routing"][-1] if progress.get("routing") else {}
    if method.trains_router and last_routing:
        # mean over tasks of each task's share (every task weighs the same)
        accs = list(last_routing["routing_accuracy"].values())
        results["routing_accuracy"] = sum(accs) / len(accs)
        results["routing_chance"] = last_routing["chance"]
    if not distributed.is_main_process():
        return results
    mdir = out / "metrics"
    mdir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(mdir / "results.json", results)
    atomic_write_json(mdir / "accuracy_matrix.json", {"tasks": tasks, "matrix": matrix})
    if method.joint:
        label = f"after {cfg.method}"
        table = matrix_markdown(matrix, tasks, row_labels=[label])
        save_heatmap(matrix, [label], tasks, mdir / "accuracy_matrix.png", f"{cfg.method}: score")
    else:
        table = matrix_markdown(matrix, tasks)
        save_heatmap(
            matrix,
            [f"after {t}" for t in tasks],
            tasks,
            mdir / "accuracy_matrix.png",
            f"{cfg.method}: score after each task",
        )
    summary = "  ".join(f"{k} {_fmt(v)}" for k, v in results["metrics"].items())
    text = f"# {cfg.method} on {n} tasks\n\n{table}\n\n{summary}\n"
    if "released_convention" in results:
        text += f"\n*_released: {RELEASED_NOTE}\n"
    if "routing_accuracy" in results:
        text += (
            f"\nrouting accuracy {100 * results['routing_accuracy']:.1f}% (chance {100 / n:.1f}%)\n"
        )
    atomic_write_text(mdir / "accuracy_matrix.md", text)
    if method.trains_router and last_routing:
        atomic_write_json(mdir / "routing.json", last_routing)
        mean = last_routing["mean_weights"]
        save_heatmap(
            mean,
            [f"test {tasks[j]}" for j in last_routing["tasks"]],
            slot_labels(tasks, len(mean[0])),
            mdir / "routing.png",
            "mean routing weight per block (rows: each task's test inputs)",
            fmt=".2f",
            vmin=0.0,
            vmax=1.0,
        )
    results["report"] = text
    return results


def slot_labels(tasks: list[str], n: int) -> list[str]:
    """A routing plot's column labels: block k and the task it was trained on."""
    return [f"block {k + 1}: {tasks[k]}" if k < len(tasks) else f"slot {k}" for k in range(n)]


def plot_trajectory(data: dict, tasks: list[str], path: Path) -> None:
    """One panel per seen task's dev inputs: the mean weight on every block against the
    global optimizer step, across the whole run (``metrics/routing_trajectory.png``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seen = [
        t for t in tasks if any(t in p["mean"] for rows in data.values() for p in rows.values())
    ]
    if not seen:
        return
    fig, axes = plt.subplots(
        1, len(seen), figsize=(4.6 * len(seen), 3.6), squeeze=False, sharey=True
    )
    for ax, dev_task in zip(axes[0], seen, strict=True):
        series: dict[int, list[tuple[int, float]]] = {}
        for rows in data.values():
            for point in rows.values():
                mean = point["mean"].get(dev_task)
                if mean is None:
                    continue
                for slot, w in enumerate(mean):
                    series.setdefault(slot, []).append((point["global_step"], w))
        for slot, pts in sorted(series.items()):
            pts.sort()
            own = tasks[slot] == dev_task
            ax.plot(
                [p[0] for p in pts],
                [p[1] for p in pts],
                lw=2.2 if own else 1.0,
                label=slot_labels(tasks, slot + 1)[slot] + (" (own)" if own else ""),
            )
        ax.set_title(wrap_label(f"dev inputs of {dev_task}", 40), fontsize=8)
        ax.set_xlabel("optimizer step")
        ax.set_ylim(-0.02, 1.02)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("mean routing weight")
    fig.tight_layout()
    try:
        with atomic_file(path, "wb") as f:
            fig.savefig(f, format="png", dpi=90)
    finally:
        plt.close(fig)
