"""A run's tasks, loaded and checked before any model loads, then encoded once.

``load_run_tasks``: every task of the configured order (or ``data.tasks``) from the data
folder, the instruction file and the ``per_task`` names checked, so a bad file or key
stops the run here, naming it. ``encode_tasks``: the training examples (prompt + target),
dev and test prompts of every task, with truncation counts logged per split.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from sapt_dist.config import ConfigError, DataConfig, RunConfig
from sapt_dist.data.instructions import read_instructions
from sapt_dist.data.tasks import (
    ORDERS,
    EncodedExample,
    TaskData,
    TruncationStats,
    encode_prompt,
    encode_train,
    format_prompt,
    load_task,
    log_truncation,
    resolve_data_root,
    resolve_order,
)
from sapt_dist.outputs.evaluation import EvalTask

__all__ = ["EncodedTask", "encode_tasks", "load_run_tasks"]

log = logging.getLogger(__name__)


@dataclass
class EncodedTask:
    data: TaskData
    train: list[EncodedExample]
    dev_prompts: list[list[int]]
    dev_refs: list[list[str]]
    test_prompts: list[list[int]]
    test_refs: list[list[str]]
    test_ids: list[str]

    def test_split(self, index: int) -> EvalTask:
        """The test split as ``outputs.evaluation`` scores it (``index``: its position)."""
        d = self.data
        return EvalTask(index, d.name, d.metric, self.test_prompts, self.test_refs, self.test_ids)


def load_run_tasks(cfg: RunConfig) -> list[TaskData]:
    """Every task of the run, validated (missing ones of a named order are skipped with a
    warning; ``per_task`` names outside the sequence are an error naming the key)."""
    root = resolve_data_root(cfg.data.root)
    names, missing = resolve_order(cfg.data, root)
    if missing:
        log.warning(
            "data folder %s lacks %d task(s) of order %r, skipped: %s",
            root,
            len(missing),
            cfg.data.order,
            ", ".join(missing),
        )
    # a name outside the order is a typo; one of its tasks that this run leaves out
    # (data.tasks, or missing from the data folder) keeps a preset's per_task usable
    sequence = list(cfg.data.tasks) if cfg.data.order == "custom" else ORDERS[cfg.data.order]
    unknown = sorted(set(cfg.per_task) - set(sequence))
    if unknown:
        raise ConfigError(
            f"config key 'per_task.{unknown[0]}': no such task in this run's sequence "
            f"({', '.join(sequence)})"
        )
    unused = sorted(set(cfg.per_task) - set(names))
    if unused:
        log.info("per_task settings not used (tasks not in this run): %s", ", ".join(unused))
    # read once; a bad file stops here, naming it, before any task or model loads
    instructions = read_instructions(cfg.data.instructions)
    tasks = [load_task(root, n, cfg.data, cfg.train.seed, instructions) for n in names]
    log.info("tasks (%d): %s", len(tasks), ", ".join(t.name for t in tasks))
    return tasks


def encode_tasks(tokenizer, tasks: list[TaskData], d: DataConfig) -> list[EncodedTask]:
    """Token ids of every task's training examples and dev / test prompts."""
    out = []
    for task in tasks:
        stats = {s: TruncationStats() for s in ("train", "dev", "test")}

        def prompt(ex, task=task):
            return format_prompt(d.template, task.definition, ex["input"], d.truncation)

        train = [
            encode_train(
                tokenizer,
                prompt(ex),
                ex["outputs"][0],
                d.max_source_length,
                d.max_target_length,
                stats["train"],
                d.target_eos,
            )
            for ex in task.splits["train"]
        ]
        dev = [
            encode_prompt(tokenizer, prompt(ex), d.max_source_length, stats["dev"])
            for ex in task.splits["dev"]
        ]
        test = task.splits["test"]
        test_prompts = [
            encode_prompt(tokenizer, prompt(ex), d.max_source_length, stats["test"]) for ex in test
        ]
        for split, st in stats.items():
            log_truncation(task.name, split, st)
        out.append(
            EncodedTask(
                task,
                train,
                dev,
                list(task.splits["dev"]["outputs"]),
                test_prompts,
                list(test["outputs"]),
                list(test["id"]),
            )
        )
    return out
