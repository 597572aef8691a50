"""The run's side of InfLoRA's input-subspace memory (a method row's ``input_subspace``).

Around each task of such a method the run calls:

- :func:`design_task_blocks` after ``start_task``: one no-grad pass over the task's
  training examples reads every adapted layer's input covariance
  (:class:`~sapt_dist.method.subspace.InputStatistic`), and each layer's new block gets
  its A from it, projected off the memory (:func:`~sapt_dist.method.subspace.design_down`);
  A is then frozen (``requires_grad`` off: the block job trains B alone).
- :func:`remember_task` after the block is filed: the same pass with the trained model,
  and the memory takes in the task (:meth:`SubspaceMemory.update`).

Batches are shared out over the ranks (rank r reads batches r, r + W, ...; every rank runs
the same number of forwards, which ZeRO-3's gathers need: a rank short of a batch runs
its first one again uncounted), and each layer's sum and row count are then summed over
the ranks on the device: W ranks give the one-process statistic (up to the order of the
sums).
"""

from __future__ import annotations

import logging

import torch

from sapt_dist import distributed
from sapt_dist.config import RunConfig
from sapt_dist.data.tasks import EncodedExample, collate_train
from sapt_dist.method.lora import MixtureLoRALinear
from sapt_dist.method.subspace import InputStatistic, SubspaceMemory, design_down, task_threshold

__all__ = ["design_task_blocks", "input_covariances", "new_memory", "remember_task"]

log = logging.getLogger(__name__)


def _lora_layers(model) -> dict[str, MixtureLoRALinear]:
    return {n: m for n, m in model.layers.items() if isinstance(m, MixtureLoRALinear)}


def new_memory(model) -> SubspaceMemory:
    """An empty memory over the model's adapted LoRA layers."""
    return SubspaceMemory(sorted(_lora_layers(model)))


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
    batches = [examples[i : i + batch_size] for i in range(0, len(examples), batch_size)]
    if max_batches is not None:
        batches = batches[:max_batches]
    world, rank = distributed.world_size(), distributed.rank()
    mine = batches[rank::world]
    rounds = -(-len(batches) // world)
    seq2seq = bool(getattr(model, "is_encoder_decoder", False))
    device = model.layer_current.device
    distributed.ready_for_inference(model)
    was_training = model.training
    model.eval()
    stat = InputStatistic(layers)
    with stat:
        for k in range(rounds):
            stat.counting = k < len(mine)
            part = mine[k] if stat.counting else (mine or batches)[0]
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


def _covariances(model, examples, pad_id: int, cfg: RunConfig) -> dict[str, torch.Tensor]:
    s = cfg.subspace
    return input_covariances(
        model, examples, pad_id, s.batch_size or cfg.train.micro_batch_size, s.max_batches
    )


@torch.no_grad()
def design_task_blocks(
    model, memory: SubspaceMemory, examples: list[EncodedExample], pad_id: int, cfg: RunConfig
) -> None:
    """Before the current task trains: each layer's A from the task's inputs, projected off
    the memory, then frozen."""
    covs = _covariances(model, examples, pad_id, cfg)
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
    covs = _covariances(model, examples, pad_id, cfg)
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
