"""The run's side of InfLoRA's input-subspace memory (a method row's ``input_subspace``).

Around each task of such a method the run calls:

- :func:`design_task_blocks` after ``start_task``: one no-grad pass over the task's
  training examples reads every adapted layer's input covariance
  (:class:`~sapt_dist.method.subspace.InputStatistic`), and each layer's new block gets
  its A from it, projected off the memory (:func:`~sapt_dist.method.subspace.design_down`);
  A is then frozen (``requires_grad`` off: the block job trains B alone).
- :func:`remember_task` after the block is filed: the same pass with the trained model,
  and the memory takes in the task (:meth:`SubspaceMemory.update`).

GainLoRA's gates (a method row's ``routing='gate'``) have three such memories, over the
gate inputs (the prompts' mean embeddings), the gates' hidden activations and their
outputs (:func:`new_gate_memory`); the passes read the embeddings and the current gate
only, no backbone layer (:func:`gate_covariances`):

- :func:`design_gate_key` after ``start_task``: the new key is the top direction of the
  task's gate outputs off the output memory, at the norm of its uniform initialisation;
- :class:`GateProjection` around every optimizer step: the step's change of the gate
  weights and key, projected off the memories, row norms kept (on the device);
- :func:`remember_gates` after the block is filed: the memories take in the task.

Batches are shared out over the ranks (rank r reads batches r, r + W, ...; every rank runs
the same number of forwards, which ZeRO-3's gathers need: a rank short of a batch runs
its first one again uncounted), and each layer's sum and row count are then summed over
the ranks on the device: W ranks give the one-process statistic (up to the order of the
sums).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import torch

from sapt_dist import distributed
from sapt_dist.config import RunConfig
from sapt_dist.data.tasks import EncodedExample, collate_train
from sapt_dist.method.gate import GATE_PARTS, project_change
from sapt_dist.method.lora import MixtureLoRALinear
from sapt_dist.method.subspace import (
    InputStatistic,
    SubspaceMemory,
    design_down,
    task_threshold,
    top_directions,
)

__all__ = [
    "GATE_MEMORY_FILE",
    "GateProjection",
    "design_gate_key",
    "design_task_blocks",
    "gate_covariances",
    "input_covariances",
    "new_gate_memory",
    "new_memory",
    "remember_gates",
    "remember_task",
]

log = logging.getLogger(__name__)


def _lora_layers(model) -> dict[str, MixtureLoRALinear]:
    return {n: m for n, m in model.layers.items() if isinstance(m, MixtureLoRALinear)}


def new_memory(model) -> SubspaceMemory:
    """An empty memory over the model's adapted LoRA layers."""
    return SubspaceMemory(sorted(_lora_layers(model)))


def _rank_batches(
    examples: list[EncodedExample], batch_size: int, max_batches: int | None
) -> Iterator[tuple[list[EncodedExample], bool]]:
    """This rank's share of the statistics pass, as (batch, counted): ``examples`` in order,
    ``batch_size`` a batch, the first ``max_batches``, dealt out over the ranks; a rank short
    of a batch gets an uncounted one so that every rank runs the same number of forwards
    (ZeRO-3's gathers are collectives)."""
    batches = [examples[i : i + batch_size] for i in range(0, len(examples), batch_size)]
    if max_batches is not None:
        batches = batches[:max_batches]
    world, rank = distributed.world_size(), distributed.rank()
    mine = batches[rank::world]
    for k in range(-(-len(batches) // world)):
        yield (mine[k], True) if k < len(mine) else ((mine or batches)[0], False)


def _pass_args(cfg: RunConfig) -> tuple[int, int | None]:
    """The statistics passes' batch size and batch cap (``subspace.*``)."""
    return cfg.subspace.batch_size or cfg.train.micro_batch_size, cfg.subspace.max_batches


@torch.no_grad()
def input_covariances(
    model,
    examples: list[EncodedExample],
    pad_id: int,
    batch_size: int,
    max_batches: int | None,
) -> dict[str, torch.Tensor]:
    """Layer name -> (d_in, d_in) mean ``x x^T`` over every token row the layer saw while
    the model ran on ``examples`` (in order, ``batch_size`` a batch, the first
    ``max_batches``), over every rank."""
    layers = _lora_layers(model)
    seq2seq = bool(getattr(model, "is_encoder_decoder", False))
    device = model.layer_current.device
    distributed.ready_for_inference(model)
    was_training = model.training
    model.eval()
    stat = InputStatistic(layers)
    with stat:
        for part, stat.counting in _rank_batches(examples, batch_size, max_batches):
            batch = collate_train(part, pad_id, seq2seq)
            model(**{n: v.to(device) for n, v in batch.items()})
    model.train(was_training)
    covs = {}
    for name, layer in layers.items():
        total = stat.sums.get(name)
        if total is None:  # this rank saw no batch
            total = torch.zeros(layer.in_features, layer.in_features, device=device)
        rows = torch.tensor([float(stat.rows[name])], device=total.device, dtype=torch.float64)
        total, rows = (
            distributed.sum_tensor_over_ranks(total),
            distributed.sum_tensor_over_ranks(rows),
        )
        covs[name] = total / rows.clamp_min(1.0).to(total.dtype)
    return covs


@torch.no_grad()
def design_task_blocks(
    model, memory: SubspaceMemory, examples: list[EncodedExample], pad_id: int, cfg: RunConfig
) -> None:
    """Before the current task trains: each layer's A from the task's inputs, projected off
    the memory, then frozen."""
    covs = input_covariances(model, examples, pad_id, *_pass_args(cfg))
    for name, layer in _lora_layers(model).items():
        a = design_down(covs[name], memory.basis(name, covs[name].device), layer.rank)
        with distributed.gathered([layer.lora_A], modify=True):
            layer.lora_A.copy_(a.to(layer.lora_A))
        layer.lora_A.requires_grad_(False)


@torch.no_grad()
def remember_task(
    model,
    memory: SubspaceMemory,
    examples: list[EncodedExample],
    pad_id: int,
    cfg: RunConfig,
    task: int,
    n_tasks: int,
) -> None:
    """After task ``task`` (from 0) is filed: the memory takes in its inputs."""
    covs = input_covariances(model, examples, pad_id, *_pass_args(cfg))
    threshold = task_threshold(cfg.subspace.threshold, task, cfg.subspace.total_tasks or n_tasks)
    for name, cov in covs.items():
        memory.update(name, cov, threshold)
    dims = memory.dims()
    log.info(
        "input subspace after task %d (threshold %.4f): %d-%d of %d dimensions per layer",
        task + 1,
        threshold,
        min(dims.values()),
        max(dims.values()),
        max(m.in_features for m in _lora_layers(model).values()),
    )


# ---------------------------------------------------------------------- GainLoRA's gates
#: the gate memories' file in a blocks folder (``input.basis``, ``hidden.basis``, ...)
GATE_MEMORY_FILE = "gate_subspace.safetensors"


def new_gate_memory() -> SubspaceMemory:
    """An empty memory of the gates' input, hidden and output subspaces."""
    return SubspaceMemory(list(GATE_PARTS))


def _prompt_mask(batch: dict[str, torch.Tensor], seq2seq: bool) -> torch.Tensor:
    mask = batch["attention_mask"].bool()
    if not seq2seq:  # causal LM: prompt + target in one sequence; the target is not routed on
        mask = mask & (batch["labels"] == -100)
    return mask


@torch.no_grad()
def gate_covariances(
    model,
    examples: list[EncodedExample],
    pad_id: int,
    batch_size: int,
    max_batches: int | None,
) -> dict[str, torch.Tensor]:
    """``input`` / ``hidden`` / ``output`` -> the mean ``x x^T`` over the sequences of
    ``examples`` of the current gate's input ``u``, hidden activation and output, over
    every rank (batches shared out as :func:`input_covariances` does)."""
    seq2seq = bool(getattr(model, "is_encoder_decoder", False))
    device = model.layer_current.device
    distributed.ready_for_inference(model)
    d, h = model.router.d, model.router.gates.hidden
    sums = {
        "input": torch.zeros(d, d, device=device),
        "hidden": torch.zeros(h, h, device=device),
        "output": torch.zeros(d, d, device=device),
    }
    rows = 0
    for part, counting in _rank_batches(examples, batch_size, max_batches):
        batch = {n: v.to(device) for n, v in collate_train(part, pad_id, seq2seq).items()}
        u = model.router.pool(model.embed(batch["input_ids"]), _prompt_mask(batch, seq2seq))
        hidden, out = model.router(u, output="gate_features")
        if not counting:  # a rank short of a batch: the same forwards, nothing counted
            continue
        for name, x in zip(GATE_PARTS, (u, hidden, out)):
            x = x.float()
            sums[name].addmm_(x.t(), x)
        rows += u.shape[0]
    n = distributed.sum_tensor_over_ranks(
        torch.tensor([float(rows)], device=device, dtype=torch.float64)
    )
    return {
        name: distributed.sum_tensor_over_ranks(t) / n.clamp_min(1.0).to(t.dtype)
        for name, t in sums.items()
    }


@torch.no_grad()
def design_gate_key(
    model, memory: SubspaceMemory, examples: list[EncodedExample], pad_id: int, cfg: RunConfig
) -> None:
    """Before the current task trains: its key := the top left singular vector of its gate
    outputs' covariance projected off the output memory, at the norm of the key as
    initialised (the released ``get_reg_matrix``), its sign fixed (largest component > 0)."""
    cov = gate_covariances(model, examples, pad_id, *_pass_args(cfg))["output"]
    # the sign fixed (the gate is even in it), so that runs on any rank count agree
    top = top_directions(cov, memory.basis("output", cov.device), 1)[:, 0]
    key = model.router.key
    with distributed.gathered([key], modify=True):
        key.copy_((top * key.detach().float().norm()).to(key))


@torch.no_grad()
def remember_gates(
    model,
    memory: SubspaceMemory,
    examples: list[EncodedExample],
    pad_id: int,
    cfg: RunConfig,
    task: int,
    n_tasks: int,
) -> None:
    """After task ``task`` (from 0) is filed: the gate memories take in its gate inputs,
    hidden activations and outputs (the trained gate's)."""
    covs = gate_covariances(model, examples, pad_id, *_pass_args(cfg))
    threshold = task_threshold(cfg.gate.threshold, task, cfg.subspace.total_tasks or n_tasks)
    for name, cov in covs.items():
        memory.update(name, cov, threshold)
    log.info(
        "gate subspaces after task %d (threshold %.4f): %s",
        task + 1,
        threshold,
        ", ".join(f"{n} {k}" for n, k in memory.dims().items()),
    )


class GateProjection:
    """Around every optimizer step of a task after the first: :meth:`before` keeps the
    gate's weights and key (full fp32, on the device), :meth:`after` replaces each with the
    step's change projected off its memory (the first layer's rows off the gate inputs,
    the second's off the hidden activations, the key off the gate outputs), every row at
    its norm after the step (the released trainer). Nothing is read to the host; under
    ZeRO-3 the reads and writes are collective (every rank runs them alike)."""

    def __init__(self, model, memory: SubspaceMemory) -> None:
        gates = model.router.gates
        device = model.layer_current.device
        self.pairs = [
            (p, memory.basis(part, device))
            for p, part in ((gates.w1, "input"), (gates.w2, "hidden"), (model.router.key, "output"))
        ]
        self.pairs = [(p, b) for p, b in self.pairs if b is not None and b.shape[1] > 0]

    def before(self) -> list[torch.Tensor]:
        return [distributed.full_master(p) for p, _ in self.pairs]

    @torch.no_grad()
    def after(self, old: list[torch.Tensor]) -> None:
        for (p, basis), o in zip(self.pairs, old):
            distributed.set_full_master(p, project_change(distributed.full_master(p), o, basis))
