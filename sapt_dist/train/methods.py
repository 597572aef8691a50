"""What each method does differently, in one table: the continual run (``train/run.py``)
reads these fields and never a method's name.

==============  =====  =========  ======  =====  =======  ======  =========  =========
method          slots  routing    block   data   replay   router  evaluates  learned
==============  =====  =========  ======  =====  =======  ======  =========  =========
sapt            N      attention  fresh   task   ARM      trains  seen       own task
inc_lora        N      sum (=1)   fresh   task   -        -       seen       own task
olora           N      sum (=1)   fresh   task   -        -       seen       own task
seq_lora        1      -          kept    task   -        -       seen       seen
replay          1      -          kept    task   real     -       seen       seen
mtl             1      -          fresh   all    -        -       all        all
single_task     1      -          fresh   task   -        -       own        own task
==============  =====  =========  ======  =====  =======  ======  =========  =========

- *block*: a fresh block per task, or the one block kept training from task to task.
- *data*: the task's training split, or (one stage) the union of every task's.
- *replay*: SAPT's attentive reflection (ARM, a KL on pseudo-samples of earlier tasks;
  SAPT also trains a generator and files an attention target a* per task), or real
  samples of earlier tasks mixed into the training data.
- *evaluates*: the test splits scored after stage t (the tasks seen so far, the task's
  own, every task).
- *learned*: the data a block has learned from (its provenance record).
- O-LoRA is IncLoRA plus its two regularisers on the new block: orthogonality to every
  earlier block's A (``olora.lambda_1``) and an L2 term (``olora.lambda_2``).
- IncLoRA and O-LoRA train with the exact gradient through the earlier blocks whatever
  ``adapter.gradient`` says (SAPT's default cut is a quirk of its released code).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["METHODS", "Method"]


@dataclass(frozen=True)
class Method:
    """One row of the table above."""

    name: str
    #: one slot per task (mixed by ``routing``), or a single slot
    per_task_slots: bool
    #: how the slots' blocks are mixed: SAPT's shared attention, or a plain sum
    routing: Literal["attention", "sum"] = "attention"
    #: the single block continues from the previous task instead of starting fresh
    keeps_block: bool = False
    #: one stage on the union of every task's training data
    joint: bool = False
    replay: Literal["none", "arm", "real"] = "none"
    #: the shared attention (query network g, keys) trains with the blocks; SAPT's router
    #: input center, attention targets, pseudo-samples and routing diagnostics go with it
    trains_router: bool = False
    evaluates: Literal["seen", "own", "all"] = "seen"
    learned: Literal["own", "seen", "all"] = "own"
    #: gradient through the earlier blocks: ``config`` follows ``adapter.gradient`` (SAPT's
    #: released code cuts it, the default); ``exact`` always (IncLoRA is plain LoRA with
    #: every block added: the cut is a quirk of SAPT's code, not part of IncLoRA)
    gradient: Literal["config", "exact"] = "config"
    #: O-LoRA: the new block is trained orthogonal to the earlier blocks' subspaces
    #: (``olora.lambda_1``) with an L2 term on it (``olora.lambda_2``)
    orthogonal: bool = False

    @property
    def stages(self) -> Literal["per_task", "one"]:
        return "one" if self.joint else "per_task"

    def tasks_scored(self, stage: int, n_tasks: int) -> list[int]:
        """The tasks whose test splits are scored after ``stage``."""
        if self.evaluates == "all":
            return list(range(n_tasks))
        if self.evaluates == "own":
            return [stage]
        return list(range(stage + 1))

    def tasks_learned(self, stage: int, n_tasks: int) -> list[int]:
        """The tasks whose training data the block filed at ``stage`` has learned from."""
        if self.learned == "all":
            return list(range(n_tasks))
        if self.learned == "seen":
            return list(range(stage + 1))
        return [stage]


METHODS: dict[str, Method] = {
    m.name: m
    for m in [
        Method("sapt", per_task_slots=True, replay="arm", trains_router=True),
        Method("inc_lora", per_task_slots=True, routing="sum", gradient="exact"),
        Method("olora", per_task_slots=True, routing="sum", gradient="exact", orthogonal=True),
        Method("seq_lora", per_task_slots=False, keeps_block=True, learned="seen"),
        Method("replay", per_task_slots=False, keeps_block=True, replay="real", learned="seen"),
        Method("mtl", per_task_slots=False, joint=True, evaluates="all", learned="all"),
        Method("single_task", per_task_slots=False, evaluates="own"),
    ]
}
