"""What each method does differently, in one table: the config, the continual run
(``train/run.py``), the outputs and the tools read these fields and never a method's name
(``tests/test_layout.py`` fails on a method-name test outside this file).

This module imports nothing of the package: every layer can read it.

==============  =====  =========  ======  =====  =======  ======  =========  =========
method          slots  routing    block   data   replay   router  evaluates  learned
==============  =====  =========  ======  =====  =======  ======  =========  =========
sapt            N      attention  fresh   task   ARM      trains  seen       own task
inc_lora        N      sum (=1)   fresh   task   -        -       seen       own task
olora           N      sum (=1)   fresh   task   -        -       seen       own task
inflora         N      sum (=1)   fresh   task   -        -       seen       own task
gainlora        N      gate       fresh   task   -        gates   seen       own task
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
  earlier block's A (``olora.lambda_1``) and an L2 term (``olora.lambda_2``), the row's
  ``penalty`` (``sapt_dist.method.penalties``: computed by the training step after the
  forward, from the parameters, never inside ``SAPTModel.forward``).
- InfLoRA (Liang & Li, CVPR 2024; the T5 code of liangyanshuo/gainlora) is IncLoRA whose
  new block's down-projection A is designed, before the task trains, from the task's
  inputs of each adapted layer projected off the earlier tasks' input subspace, and then
  frozen: only B trains, so ``B A`` cannot act on what earlier tasks fed the layer. After
  the task its inputs join the per-layer subspace memory (DualGPM). The row's
  ``input_subspace`` (``sapt_dist.method.subspace``; ``subspace.*`` config keys).
- GainLoRA (NeurIPS 2025; liangyanshuo/gainlora's flagship, GainLoRA on InfLoRA) is
  InfLoRA whose branches are summed with a gate per task and sequence instead of 1:
  ``|2 sigmoid(4 cos(g_t(u), k_t)) - 1|`` of the prompt's mean embedding ``u`` through
  the task's gate network ``g_t`` and its key ``k_t`` (``routing='gate'``,
  ``sapt_dist.method.gate``). The task's gate starts as the previous task's and trains
  with its key and B; after every optimizer step the change of the gate weights is
  projected off the old tasks' gate input / hidden / output subspaces (``gate.*`` config
  keys), so the new gate weighs ~0 on old inputs. Loss: cross-entropy only.
- IncLoRA, O-LoRA, InfLoRA and GainLoRA train with the exact gradient through the earlier blocks whatever
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
    #: how the slots' blocks are mixed: SAPT's shared attention, a plain sum, or
    #: GainLoRA's per-task gates (a gate network and key per slot, trained with the block;
    #: their subspace memories and post-step projection go with it)
    routing: Literal["attention", "sum", "gate"] = "attention"
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
    #: a loss term on the parameters added after the forward by the training step, by
    #: name in ``sapt_dist.method.penalties.PENALTIES`` (O-LoRA: ``olora``, the new block
    #: orthogonal to the earlier blocks' subspaces with an L2 term on it); None: none
    penalty: str | None = None
    #: the block kinds (``adapter.kind``) the method works with
    block_kinds: tuple[str, ...] = ("lora", "prompt")
    #: InfLoRA: a per-layer memory of the earlier tasks' input subspaces; each new block's
    #: A is designed from the task's inputs projected off it and frozen (only B trains);
    #: the task's inputs join the memory after it (``sapt_dist.method.subspace``)
    input_subspace: bool = False

    def __post_init__(self) -> None:
        # a row that sets only part of what a feature needs breaks a run: refuse it here
        if self.replay == "arm" and not (self.trains_router and self.per_task_slots):
            raise ValueError(
                f"method {self.name!r}: replay='arm' (attentive reflection) holds the shared "
                f"attention to attention targets: it needs trains_router and per_task_slots"
            )
        if self.trains_router and self.routing != "attention":
            raise ValueError(f"method {self.name!r}: trains_router needs routing='attention'")
        if self.routing == "gate" and not self.per_task_slots:
            raise ValueError(f"method {self.name!r}: routing='gate' needs per_task_slots")
        if self.input_subspace and not (self.per_task_slots and self.block_kinds == ("lora",)):
            raise ValueError(
                f"method {self.name!r}: input_subspace designs each task's LoRA A: it needs "
                f"per_task_slots and block_kinds=('lora',)"
            )
        if self.joint and self.per_task_slots:
            raise ValueError(f"method {self.name!r}: a joint method has one stage, one slot")

    @property
    def trains_routing(self) -> bool:
        """Routing parameters train with the blocks: SAPT's shared attention or the gates."""
        return self.trains_router or self.routing == "gate"

    @property
    def gated(self) -> bool:
        """GainLoRA's gates: their subspace memories, designed keys, post-step projection."""
        return self.routing == "gate"

    @property
    def reflects(self) -> bool:
        """SAPT's attentive reflection: attention targets a*, a generator (when
        ``replay.kind`` is generative) and pseudo-samples of each task, the ARM batches."""
        return self.replay == "arm"

    def generator_slot(self, replay_kind: str) -> bool:
        """Whether the model carries the pseudo-sample generator's extra slot."""
        return self.reflects and replay_kind == "generative"

    def n_slots(self, n_tasks: int, configured: int | None) -> int:
        """Task slots of the model: one per task (at least ``n_tasks``; ``configured`` is
        ``adapter.n_slots``) or one. Raises ValueError naming ``adapter.n_slots``."""
        if not self.per_task_slots:
            return 1
        n = configured or n_tasks
        if n < n_tasks:
            raise ValueError(
                f"config key 'adapter.n_slots' is {n} but the sequence has {n_tasks} tasks; "
                f"raise it to at least {n_tasks} (or leave it null)"
            )
        return n

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
        Method(
            "olora",
            per_task_slots=True,
            routing="sum",
            gradient="exact",
            penalty="olora",
            block_kinds=("lora",),
        ),
        Method(
            "inflora",
            per_task_slots=True,
            routing="sum",
            gradient="exact",
            block_kinds=("lora",),
            input_subspace=True,
        ),
        Method(
            "gainlora",
            per_task_slots=True,
            routing="gate",
            gradient="exact",
            block_kinds=("lora",),
            input_subspace=True,
        ),
        Method("seq_lora", per_task_slots=False, keeps_block=True, learned="seen"),
        Method("replay", per_task_slots=False, keeps_block=True, replay="real", learned="seen"),
        Method("mtl", per_task_slots=False, joint=True, evaluates="all", learned="all"),
        Method("single_task", per_task_slots=False, evaluates="own"),
    ]
}
