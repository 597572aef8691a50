"""Scores, continual-learning metrics, and the tables / heatmaps that show them.

Definitions: ``../shared/SAPT.md``, "Metrics over a run of N tasks". ``matrix[i][j]`` is
the score (0-100) on task j's test split after training task i; ``None`` above the
diagonal (task j not yet seen).
"""

from __future__ import annotations

import math
import random
import re
import string
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "RELEASED_FWT_CONSTANT",
    "cl_metrics",
    "exact_match",
    "matrix_markdown",
    "normalize_answer",
    "released_metrics",
    "rouge_l",
    "routing_summary",
    "save_heatmap",
    "score_predictions",
]

_SCORER: Any = None


def _rouge_scorer() -> Any:
    # built once, on first use: importing rouge_score (nltk) at import time is slow
    global _SCORER
    if _SCORER is None:
        from rouge_score import rouge_scorer

        # use_stemmer=True as in Super-NaturalInstructions' own evaluation script
        _SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return _SCORER


# ---------------------------------------------------------------------------- per example
def normalize_answer(s: str) -> str:
    """Normalise an answer for exact match, in this order:

    1. lower-case;
    2. replace every run of whitespace (spaces, tabs, newlines) with one space;
    3. strip whitespace and ASCII punctuation (``string.punctuation``) from both ends,
       repeatedly, until neither remains.

    Inner punctuation and articles are kept: ``" 'Sports.' "`` -> ``"sports"``,
    ``"Science & Mathematics"`` stays ``"science & mathematics"``.
    """
    s = re.sub(r"\s+", " ", s.lower())
    return s.strip(string.punctuation + " ")


def normalize_answer_released(s: str) -> str:
    """The released SAPT code's exact-match normalisation (SQuAD's, articles kept):
    lower-case, remove every ASCII punctuation mark, collapse whitespace."""
    s = "".join(ch for ch in s.lower() if ch not in string.punctuation)
    return " ".join(s.split())


def exact_match(pred: str, refs: list[str]) -> float:
    """100.0 if the normalised prediction equals any normalised reference, else 0.0."""
    if not refs:
        raise ValueError("exact_match: no references")
    p = normalize_answer(pred)
    return 100.0 if any(p == normalize_answer(r) for r in refs) else 0.0


def rouge_l(pred: str, refs: list[str]) -> float:
    """ROUGE-L F-measure x100, the best over ``refs``.

    ``rouge_score``'s default tokenizer lower-cases, replaces every non-alphanumeric
    character with a space and Porter-stems the words, so punctuation never counts and a
    prediction or reference without any letter or digit scores 0.
    """
    if not refs:
        raise ValueError("rouge_l: no references")
    scorer = _rouge_scorer()
    return 100.0 * max(scorer.score(r, pred)["rougeL"].fmeasure for r in refs)


def released_reference(refs: list[str], index: int) -> str:
    """The one reference the ``released`` scoring uses for example ``index``: a seeded
    pick, the same at every evaluation."""
    return refs[random.Random(index).randrange(len(refs))]


def _exact_match_released(pred: str, refs: list[str]) -> float:
    p = normalize_answer_released(pred)
    return 100.0 if any(p == normalize_answer_released(r) for r in refs) else 0.0


def score_predictions(
    preds: list[str], refs: list[list[str]], metric: str, scoring: str = "best"
) -> float:
    """Mean score over examples, 0-100: ``rouge`` (ROUGE-L) or ``exact`` (exact match).

    Args:
        preds: one generated text per example.
        refs: the acceptable answers of each example (same length as ``preds``).
        scoring: ``best`` of the references, or ``released`` (one seeded pick per example
            and the released code's exact-match normalisation; see ``eval.scoring``).
    """
    if scoring not in ("best", "released"):
        raise ValueError(f"unknown scoring {scoring!r} (known: best, released)")
    if scoring == "released":
        refs = [[released_reference(r, i)] if r else r for i, r in enumerate(refs)]
    fns = {"rouge": rouge_l, "exact": exact_match if scoring == "best" else _exact_match_released}
    if metric not in fns:
        raise ValueError(f"unknown metric {metric!r} (known: {sorted(fns)})")
    if len(preds) != len(refs):
        raise ValueError(f"score_predictions: {len(preds)} predictions for {len(refs)} references")
    if not preds:
        raise ValueError("score_predictions: no predictions to score")
    fn = fns[metric]
    return sum(fn(p, r) for p, r in zip(preds, refs, strict=True)) / len(preds)


# ---------------------------------------------------------------------------- over a run
def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_square(matrix: list[list[float | None]]) -> int:
    """N of an N x N matrix whose lower triangle (with the diagonal) holds finite numbers."""
    n = len(matrix)
    if n == 0:
        raise ValueError("accuracy matrix is empty")
    for i, row in enumerate(matrix):
        if len(row) != n:
            raise ValueError(
                f"accuracy matrix must be square: row {i} has {len(row)} entries, expected {n}"
            )
        for j in range(i + 1):
            if not _is_number(row[j]):
                raise ValueError(
                    f"accuracy matrix a[{i}][{j}] is {row[j]!r}: the lower triangle (score on "
                    f"task j after training task i >= j) must hold finite numbers"
                )
    return n


def cl_metrics(
    matrix: list[list[float | None]], single_task: list[float] | None = None
) -> dict[str, float | None]:
    """AP, F.Ra, FWT and BWT of an N x N score matrix (SAPT.md; here 0-indexed).

    With ``a = matrix`` and the last row ``a[N-1]``:

    - ``AP``   = mean over j of ``a[N-1][j]``
    - ``F.Ra`` = sum over j < N-1 of (max over i in j..N-2 of ``a[i][j]`` - ``a[N-1][j]``),
      divided by N-1
    - ``FWT``  = mean over j of (``a[j][j]`` - ``single_task[j]``)
    - ``BWT``  = sum over j < N-1 of (``a[N-1][j]`` - ``a[j][j]``), divided by N-1

    Entries above the diagonal are ignored. ``F.Ra`` and ``BWT`` are ``None`` for N == 1;
    ``FWT`` is ``None`` without ``single_task`` (never against a made-up baseline).

    Raises:
        ValueError: a non-square matrix, a missing / non-finite lower-triangle entry, or
            ``single_task`` of the wrong length.
    """
    n = _check_square(matrix)
    a: list[list[float]] = [[float(v) if _is_number(v) else math.nan for v in r] for r in matrix]
    last = a[n - 1]
    ap = sum(last) / n
    fra = bwt = None
    if n > 1:
        fra = sum(max(a[i][j] for i in range(j, n - 1)) - last[j] for j in range(n - 1)) / (n - 1)
        bwt = sum(last[j] - a[j][j] for j in range(n - 1)) / (n - 1)
    fwt = None
    if single_task is not None:
        if len(single_task) != n:
            raise ValueError(f"{len(single_task)} single-task scores for {n} tasks")
        bad = [j for j, b in enumerate(single_task) if not _is_number(b)]
        if bad:
            raise ValueError(f"single-task scores at {bad} are not finite numbers")
        fwt = sum(a[j][j] - float(single_task[j]) for j in range(n)) / n
    return {"AP": ap, "F.Ra": fra, "FWT": fwt, "BWT": bwt}


#: the constant the released SAPT scorer (circle-hit/SAPT ``score.py``) subtracts from the
#: mean diagonal score for FWT, whatever the benchmark, model or order it scores
RELEASED_FWT_CONSTANT = 50.94


def released_metrics(matrix: list[list[float | None]]) -> dict[str, float | None]:
    """BWT and FWT as the released SAPT scorer computes them (``score.py``,
    ``cal_continue_learning_metrics``), to compare with the paper's tables:

    - ``BWT_released`` = sum over j < N-1 of (``a[N-1][j]`` - ``a[j][j]``), divided by N
      (its sum runs over every task, the last one's zero term included): ``BWT x (N-1)/N``
    - ``FWT_released`` = mean over j of ``a[j][j]`` - :data:`RELEASED_FWT_CONSTANT` (50.94,
      hard-coded there: it reads the single-task scores but does not use them; on any
      other benchmark than the one that constant came from this is not a transfer
      measure, only the released number's formula)

    Its AP and F.Ra equal ours (:func:`cl_metrics`). ``BWT_released`` is ``None`` for
    N == 1, as ours (no earlier task).

    Raises:
        ValueError: as :func:`cl_metrics`, for a bad matrix.
    """
    n = _check_square(matrix)
    a = [[float(v) if _is_number(v) else math.nan for v in r] for r in matrix]
    bwt = sum(a[n - 1][j] - a[j][j] for j in range(n - 1)) / n if n > 1 else None
    fwt = sum(a[j][j] for j in range(n)) / n - RELEASED_FWT_CONSTANT
    return {"BWT_released": bwt, "FWT_released": fwt}


def matrix_markdown(
    matrix: list[list[float | None]],
    task_names: list[str],
    metric_names: list[str] | None = None,
    row_labels: list[str] | None = None,
) -> str:
    """The score matrix as a markdown table.

    One column per task (header ``task`` or ``task (metric)`` when ``metric_names`` gives
    each task's metric), one row per training stage, labelled ``after <task>`` (or
    ``row_labels``). Scores have one decimal; ``None`` cells are blank. The matrix may
    have fewer rows than tasks (a run in progress).
    """
    n = len(task_names)
    if metric_names is not None and len(metric_names) != n:
        raise ValueError(f"{len(metric_names)} metric names for {n} tasks")
    if len(matrix) > n and row_labels is None:
        raise ValueError(f"{len(matrix)} matrix rows for {n} tasks (pass row_labels)")
    rows = row_labels if row_labels is not None else [f"after {t}" for t in task_names]
    if len(rows) < len(matrix):
        raise ValueError(f"{len(rows)} row labels for {len(matrix)} matrix rows")
    for i, row in enumerate(matrix):
        if len(row) != n:
            raise ValueError(f"matrix row {i} has {len(row)} entries for {n} tasks")
    heads = (
        [f"{t} ({m})" for t, m in zip(task_names, metric_names, strict=True)]
        if metric_names is not None
        else list(task_names)
    )
    lines = ["| | " + " | ".join(heads) + " |", "|---" * (n + 1) + "|"]
    for label, row in zip(rows, matrix, strict=False):
        cells = ["" if v is None else f"{v:.1f}" for v in row]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def wrap_label(text: str, width: int = 24) -> str:
    """``text`` on lines of about ``width`` characters, broken after spaces, ``_`` or
    ``-`` (task names have no spaces), never cut: a plot's label or title in full."""
    import re

    lines, line = [], ""
    for piece in re.findall(r"[^ _-]*[ _-]?", text):
        if line and len(line) + len(piece.rstrip()) > width:
            lines.append(line.rstrip())
            line = ""
        line += piece
    if line.strip():
        lines.append(line.rstrip())
    return "\n".join(lines) or text


def save_heatmap(
    matrix: list[list[float | None]],
    row_labels: list[str],
    col_labels: list[str],
    path: str | Path,
    title: str,
    fmt: str = ".1f",
    vmin: float | None = None,
    vmax: float | None = None,
) -> None:
    """Write an annotated heatmap PNG of ``matrix`` (rows x cols) to ``path``.

    ``None`` cells are left blank. Uses a bare ``matplotlib.figure.Figure`` on the Agg
    canvas, so neither pyplot's global figure registry nor the global backend is touched.
    The file is written to a temporary sibling and renamed (never half-written).
    """
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if len(matrix) != len(row_labels):
        raise ValueError(f"{len(matrix)} rows for {len(row_labels)} row labels")
    for i, row in enumerate(matrix):
        if len(row) != len(col_labels):
            raise ValueError(f"row {i} has {len(row)} cells for {len(col_labels)} column labels")
    data = np.array(
        [[np.nan if v is None else float(v) for v in row] for row in matrix], dtype=float
    ).reshape(len(row_labels), len(col_labels))
    if not np.isfinite(data).any():
        # nothing to scale the colours by; keep imshow from warning on an empty range
        vmin = 0.0 if vmin is None else vmin
        vmax = 1.0 if vmax is None else vmax
    cols = [wrap_label(c, 22) for c in col_labels]
    rows = [wrap_label(r, 34) for r in row_labels]
    tall = max((r.count("\n") + 1 for r in rows), default=1)
    fig = Figure(
        figsize=(3.0 + 1.2 * len(col_labels), 2.2 + (0.35 + 0.15 * tall) * len(row_labels))
    )
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(np.ma.masked_invalid(data), cmap="viridis", vmin=vmin, vmax=vmax, aspect="auto")
    ax.set_xticks(range(len(col_labels)))
    ax.set_xticklabels(cols, rotation=35, ha="right", fontsize=7)
    ax.set_yticks(range(len(row_labels)))
    ax.set_yticklabels(rows, fontsize=7)
    for i in range(data.shape[0]):
        for j in range(data.shape[1]):
            if np.isfinite(data[i, j]):
                # dark text on the bright end of viridis, white on the dark end
                color = "black" if im.norm(data[i, j]) > 0.6 else "white"
                ax.text(
                    j, i, format(data[i, j], fmt), ha="center", va="center", fontsize=7, color=color
                )
    ax.set_title(wrap_label(title, 60), fontsize=9)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    from sapt_dist.checkpoint.atomic import atomic_file

    try:
        with atomic_file(path, "wb") as f:
            fig.savefig(f, format="png", dpi=110)
    finally:
        fig.clear()


def routing_summary(weights_per_task: dict[int, torch.Tensor]) -> dict[str, Any]:
    """How the router spreads test inputs over the task slots.

    Args:
        weights_per_task: eval task index j -> (n_j, n_active) routing weights of its
            test inputs over the active slots (slot k holds task k's block).

    Returns:
        ``tasks``: the sorted task indices; ``mean_weights``: one row per task (in
        ``tasks`` order), the mean weight per slot; ``routing_accuracy``: task j -> share
        of its inputs whose largest weight is on slot j (ties go to the lower slot);
        ``overall_routing_accuracy``: the share over all inputs pooled; ``chance``:
        1 / n_active; ``n_active``; ``n_inputs``: task j -> n_j. Shares are in [0, 1].
    """
    if not weights_per_task:
        raise ValueError("routing_summary: no tasks")
    n_active: int | None = None
    tasks = sorted(weights_per_task)
    mean: list[list[float]] = []
    acc: dict[int, float] = {}
    n_inputs: dict[int, int] = {}
    hits = total = 0
    for j in tasks:
        w = weights_per_task[j]
        if w.dim() != 2 or w.shape[0] == 0 or w.shape[1] == 0:
            raise ValueError(
                f"routing_summary: task {j}: expected (n_inputs, n_active) weights with "
                f"n_inputs, n_active >= 1, got shape {tuple(w.shape)}"
            )
        if n_active is None:
            n_active = w.shape[1]
        elif w.shape[1] != n_active:
            raise ValueError(
                f"routing_summary: task {j} has {w.shape[1]} slots, the others {n_active}"
            )
        if not 0 <= j < n_active:
            raise ValueError(f"routing_summary: task {j} has no slot among {n_active} active")
        w = w.detach().float().cpu()
        mean.append(w.mean(0).tolist())
        h = int((w.argmax(-1) == j).sum())
        acc[j] = h / w.shape[0]
        n_inputs[j] = w.shape[0]
        hits, total = hits + h, total + w.shape[0]
    assert n_active is not None
    return {
        "tasks": tasks,
        "mean_weights": mean,
        "routing_accuracy": acc,
        "overall_routing_accuracy": hits / total,
        "chance": 1.0 / n_active,
        "n_active": n_active,
        "n_inputs": n_inputs,
    }
