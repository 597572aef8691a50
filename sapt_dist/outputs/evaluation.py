"""Scoring tasks' test splits: one path for the run's evaluation after each task and for
re-evaluating a finished run (``sapt-train --reevaluate``, ``sapt-blocks reevaluate``).

For each task: batched greedy generation (``method.generation.generate_texts``), the
task's metric, optionally every prompt's routing weights, and the predictions file
(``{"id", "prediction", "references"[, "weights"]}`` per line, rank 0 writes it).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sapt_dist import distributed
from sapt_dist.checkpoint.atomic import atomic_write_jsonl
from sapt_dist.method.generation import generate_texts, routing_weights
from sapt_dist.method.model import SAPTModel
from sapt_dist.outputs.metrics import score_predictions

__all__ = ["EvalTask", "TaskScore", "evaluate_tasks"]

log = logging.getLogger(__name__)


@dataclass
class EvalTask:
    """A task's test split, encoded: what :func:`evaluate_tasks` scores."""

    index: int  #: the task's position in the run's sequence (file names, matrix column)
    name: str
    metric: str
    prompts: list[list[int]]
    references: list[list[str]]
    ids: list[str]


@dataclass
class TaskScore:
    task: EvalTask
    score: float
    predictions: list[str]
    #: (n, slots) routing weights of every prompt, when asked for
    weights: torch.Tensor | None


def evaluate_tasks(
    model: SAPTModel,
    tokenizer: Any,
    tasks: list[EvalTask],
    *,
    batch_size: int,
    max_new_tokens: int,
    scoring: str,
    predictions_dir: Path,
    with_weights: bool,
    n_weights: int,
    desc: str = "eval",
) -> list[TaskScore]:
    """Generate, score and write the predictions of every task in ``tasks``.

    ``with_weights``: the routing weights of each prompt over slots ``0..n_weights-1`` go
    into the predictions (rounded to 5 digits) and the result. Every rank calls this
    (generation is shared out, and collective under ZeRO-3); rank 0 writes the files
    ``<predictions_dir>/<index>_<task>.jsonl``."""
    out = []
    for t in tasks:
        preds = generate_texts(
            model, tokenizer, t.prompts, batch_size, max_new_tokens, desc=f"{desc} {t.name}"
        )
        score = score_predictions(preds, t.references, t.metric, scoring)
        rows = [
            {"id": id_, "prediction": p, "references": refs}
            for id_, p, refs in zip(t.ids, preds, t.references, strict=True)
        ]
        w = None
        if with_weights:
            w = routing_weights(model, t.prompts, tokenizer.pad_token_id, batch_size)
            for row, wr in zip(rows, w.tolist(), strict=True):
                row["weights"] = [round(x, 5) for x in wr[:n_weights]]
        if distributed.is_main_process():
            atomic_write_jsonl(predictions_dir / f"{t.index:02d}_{t.name}.jsonl", rows)
        out.append(TaskScore(t, score, preds, w))
    return out
