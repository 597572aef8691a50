"""Training one block (a task's, or the pseudo-sample generator's) on a DeepSpeed engine.

Every micro-step is one forward (task loss + ARM loss in one graph), one
``engine.backward`` and one ``engine.step``; DeepSpeed scales both losses for gradient
accumulation alike and steps the optimizer on the accumulation boundaries.

The batch order is a pure function of (seed, micro-step): micro-step ``k`` reads positions
``k*mbs .. k*mbs+mbs-1`` of an endless stream of seeded per-epoch permutations. A resumed
run therefore sees exactly the batches the uninterrupted run saw.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from tqdm.auto import tqdm

from sapt_dist import distributed
from sapt_dist.data.tasks import EncodedExample, collate_train
from sapt_dist.train.compile import (
    bucket_length,
    compiled_forward,
    pad_left,
    pad_right,
    replay_length,
)

__all__ = [
    "BlockJob",
    "StepState",
    "TrainingDiverged",
    "batch_positions",
    "num_steps",
    "train_block",
]

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """More optimizer steps than ``train.nonfinite_tolerance`` gave a NaN / infinite loss or
    weights; the last good step was handed to ``on_diverge`` (the engine saves it)."""


def _finite(loss: float, arm: float, state: StepState) -> bool:
    """Whether a step's losses and the weights and moments it produced are all finite."""
    if not (math.isfinite(loss) and math.isfinite(arm)):
        return False
    tensors = list(state.params.values())
    tensors += [t for k in ("exp_avg", "exp_avg_sq") for t in state.optimizer[k].values()]
    return all(bool(torch.isfinite(t).all()) for t in tensors if t is not None)


@dataclass
class StepState:
    """What a mid-task checkpoint restores: trainable tensors, optimizer, schedule, RNG.

    ``params`` are the full fp32 master values and ``optimizer`` the full AdamW moments
    per parameter name (``distributed.full_optimizer_state``): the same form under any ZeRO
    stage and process count, so a checkpoint written by N ranks resumes on M.
    """

    step: int
    params: dict[str, torch.Tensor]
    optimizer: dict
    scheduler: dict
    rng: torch.Tensor
    losses: list[float] = field(default_factory=list)


@dataclass
class BlockJob:
    """One block to train.

    Attributes:
        name: shown in the progress bar and logs.
        examples: the encoded training examples.
        params: name -> trainable parameter (the block, and for SAPT tasks key + ``g``).
        steps: optimizer steps to run.
        seed: seeds the batch order and (at step 0) torch's RNG.
        replay: micro-step -> extra forward kwargs (the ARM batch), or None.
        weights: batch size -> fixed mixture weights (the generator), or None (routing).
        kl_ratio: weight of the ARM loss.
        lr: learning rate of this block.
    """

    name: str
    examples: list[EncodedExample]
    params: dict[str, torch.nn.Parameter]
    steps: int
    seed: int
    lr: float
    replay: Callable[[int], dict] | None = None
    weights: Callable[[int], torch.Tensor] | None = None
    kl_ratio: float = 1.0
    #: learning rate of parameters whose name starts with ``router.`` (None: ``lr``)
    router_lr: float | None = None


def num_steps(
    n_examples: int,
    epochs: int,
    micro_batch: int,
    grad_accum: int,
    max_steps: int | None,
    world: int = 1,
) -> int:
    """Optimizer steps for ``epochs`` passes over the data by ``world`` data-parallel
    ranks (rounded up), unless ``max_steps`` is set."""
    if max_steps is not None:
        return max_steps
    return max(1, math.ceil(epochs * n_examples / (micro_batch * grad_accum * world)))


def batch_positions(n: int, micro_batch: int, micro_step: int, seed: int) -> list[int]:
    """Example indices of micro-step ``micro_step`` in the seeded endless-epoch stream."""
    out, cache = [], {}
    for p in range(micro_step * micro_batch, (micro_step + 1) * micro_batch):
        epoch, offset = divmod(p, n)
        if epoch not in cache:
            g = torch.Generator().manual_seed(seed * 100_003 + epoch)
            cache[epoch] = torch.randperm(n, generator=g)
        out.append(int(cache[epoch][offset]))
    return out


def lr_factor(schedule: str, warmup: int, total: int) -> Callable[[int], float]:
    """The LR multiplier at optimizer step ``step``: linear warm-up over ``warmup`` steps,
    then constant, linear decay or cosine to 0 at ``total``."""

    def f(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


def train_block(
    model: torch.nn.Module,
    job: BlockJob,
    train_cfg,
    dtype: str,
    pad_id: int,
    ds_config: dict | None = None,
    resume: StepState | None = None,
    on_step: Callable[[int, Callable[[], StepState]], None] | None = None,
    log_step: Callable[[int, dict[str, float]], None] | None = None,
    on_diverge: Callable[[StepState], None] | None = None,
) -> list[float | None]:
    """Train ``job`` for ``job.steps`` optimizer steps; return the per-step mean losses
    (``None`` for a step skipped as non-finite).

    ``on_step(step, snapshot)`` is called after every good optimizer step; ``snapshot()``
    gives the :class:`StepState` to save (when the caller decides to checkpoint).
    ``log_step(step, stats)`` (experiment tracking) gets the step's losses, learning rate,
    throughput and memory (:func:`_step_stats`), before ``on_step``.

    Non-finite steps: after every step the state is snapshotted (full fp32 weights and
    AdamW moments of the trainable parameters, on the CPU; collective under ZeRO-3) and
    checked. A step whose loss, weights or moments are NaN / infinite is undone (the last
    good snapshot is put back; its batch is dropped, the schedule moves on) up to
    ``train_cfg.nonfinite_tolerance`` times; one more and ``on_diverge(last good state)``
    is called and :class:`TrainingDiverged` raised.
    """
    if not job.examples:
        raise ValueError(f"{job.name}: no training examples")
    mbs, ga = train_cfg.micro_batch_size, train_cfg.grad_accum
    params = list(job.params.values())
    groups: list = params
    if job.router_lr is not None:
        router = [p for n, p in job.params.items() if n.startswith("router.")]
        rest = [p for n, p in job.params.items() if not n.startswith("router.")]
        groups = [{"params": rest, "lr": job.lr}, {"params": router, "lr": job.router_lr}]
        groups = [g for g in groups if g["params"]]
    engine, optimizer, scheduler = distributed.build_engine(
        model,
        groups,
        lr=job.lr,
        weight_decay=train_cfg.weight_decay,
        micro_batch_size=mbs,
        grad_accum=ga,
        max_grad_norm=train_cfg.max_grad_norm,
        lr_lambda=lr_factor(train_cfg.lr_schedule, train_cfg.warmup_steps, job.steps),
        dtype=dtype,
        ds_config=ds_config,
    )
    start, losses = 0, []
    if resume is not None:
        distributed.load_full_optimizer_state(
            optimizer, job.params, resume.params, resume.optimizer
        )
        scheduler.load_state_dict(resume.scheduler)
        torch.set_rng_state(resume.rng)
        start, losses = resume.step, list(resume.losses)
        log.info("%s: resumed at step %d/%d", job.name, start, job.steps)
    else:
        torch.manual_seed(job.seed)

    def snapshot_at(step: int) -> Callable[[], StepState]:
        def snap() -> StepState:  # collective under ZeRO-3: every rank calls it
            masters, opt_state = distributed.full_optimizer_state(optimizer, job.params)
            return StepState(
                step=step,
                params=masters,
                optimizer=opt_state,
                scheduler=copy.deepcopy(scheduler.state_dict()),
                rng=torch.get_rng_state(),
                losses=list(losses),
            )

        return snap

    good = snapshot_at(start)()  # the state to go back to if the next step goes bad
    tolerance = train_cfg.nonfinite_tolerance
    skipped = 0
    device = next(iter(params)).device
    model.train()
    bar = tqdm(
        total=job.steps,
        initial=start,
        desc=job.name,
        disable=not distributed.is_main_process(),
        dynamic_ncols=True,
        mininterval=1.0,
    )
    n = len(job.examples)
    rank, world = distributed.rank(), distributed.world_size()
    mode = getattr(train_cfg, "compile", "off")
    # an encoder-decoder (T5) reads the prompt in its encoder, the target in its decoder
    seq2seq = bool(getattr(model, "is_encoder_decoder", False))
    if seq2seq and mode != "off":
        raise ValueError(
            f"train.compile={mode}: graph mode pads decoder-only batches to fixed lengths; "
            f"an encoder-decoder backbone trains with train.compile=off"
        )
    longest = max(len(e.input_ids) for e in job.examples)
    with compiled_forward(model, mode):
        for step in range(start, job.steps):
            acc_task, acc_arm = 0.0, 0.0
            t_step, tokens = time.perf_counter(), 0
            for micro in range(step * ga, (step + 1) * ga):
                # rank r of W reads global micro-batch micro * W + r of the stream
                idx = batch_positions(n, mbs, micro * world + rank, job.seed)
                batch = collate_train([job.examples[i] for i in idx], pad_id, seq2seq)
                if mode != "off":  # static shapes: one of a few padded lengths
                    width = bucket_length(batch["input_ids"].shape[1], longest)
                    batch = pad_right(batch, width, pad_id)
                kwargs = {k: v.to(device) for k, v in batch.items()}
                if job.weights is not None:
                    kwargs["weights"] = job.weights(len(idx)).to(device)
                if job.replay is not None:  # the ARM batch follows the same global numbering
                    replay = job.replay(micro * world + rank)
                    if mode != "off":  # every ARM batch of the task: one length
                        have = replay["replay_input_ids"].shape[1]
                        width = replay_length(have, getattr(job.replay, "longest", None))
                        replay = pad_left(replay, width, pad_id)
                    kwargs.update({k: v.to(device) for k, v in replay.items()})
                    kwargs["kl_ratio"] = job.kl_ratio
                if log_step is not None:  # tokens this rank reads: prompts + targets + ARM, no pads
                    tokens += sum(
                        int(v.sum()) for k, v in kwargs.items() if k.endswith("attention_mask")
                    )
                    if seq2seq:  # the decoder's targets (+ EOS), outside the encoder's mask
                        tokens += int((kwargs["labels"] != -100).sum())
                if mode != "off":
                    # a new step for the CUDA-graph trees: the last replay's outputs (read
                    # above) may be overwritten now
                    torch.compiler.cudagraph_mark_step_begin()
                out = engine(**kwargs)
                engine.backward(out.loss)
                engine.step()
                acc_task += float(out.task_loss.detach()) / ga
                if out.arm_loss is not None:
                    acc_arm += float(out.arm_loss.detach()) / ga
            # the step's loss over the global batch (the mean of the ranks' micro-batch means)
            acc_task, acc_arm = distributed.mean_over_ranks([acc_task, acc_arm])
            state = snapshot_at(step + 1)()  # collective under ZeRO-3: every rank, every step
            if not _finite(acc_task, acc_arm, state):
                bad = acc_task if not math.isfinite(acc_task) else acc_arm
                what = (
                    "the weights or optimizer moments became non-finite"
                    if math.isfinite(bad)
                    else f"the loss became {bad}"
                )
                skipped += 1
                if skipped > tolerance:
                    bar.close()
                    distributed.release_engine(engine)
                    if on_diverge is not None:
                        on_diverge(good)
                    kept = (
                        f"The state of step {good.step} (the last good one) is checkpointed. To go "
                        f"on, run the same command with train.nonfinite_tolerance={skipped} (the "
                        f"bad batch is then skipped); if"
                        if on_diverge is not None
                        else "Nothing of this block is saved. If"
                    )
                    raise TrainingDiverged(
                        f"{job.name}: {what} at optimizer step {step + 1}/{job.steps} (lr "
                        f"{job.lr:g}; {skipped} non-finite step(s), train.nonfinite_tolerance="
                        f"{tolerance}). {kept} every step diverges, start a new output_dir with a "
                        f"lower train.lr (replay.gen_lr for the generator) or train.max_grad_norm set."
                    )
                log.warning(
                    "%s: %s at optimizer step %d/%d: step undone, its batch skipped (%d of %d "
                    "tolerated)",
                    job.name,
                    what,
                    step + 1,
                    job.steps,
                    skipped,
                    tolerance,
                )
                distributed.load_full_optimizer_state(
                    optimizer, job.params, good.params, good.optimizer
                )
                losses.append(None)
                # the weights and moments of the last good step, at this step's position
                good = replace(
                    good,
                    step=step + 1,
                    scheduler=copy.deepcopy(scheduler.state_dict()),
                    rng=torch.get_rng_state(),
                    losses=list(losses),
                )
                bar.update(1)
                continue
            losses.append(acc_task + job.kl_ratio * acc_arm)
            state.losses = list(losses)
            good = state
            postfix = {"loss": f"{acc_task:.3f}"}
            if job.replay is not None:
                postfix["arm"] = f"{acc_arm:.4f}"
            bar.set_postfix(postfix, refresh=False)
            bar.update(1)
            if log_step is not None:
                arm = acc_arm if job.replay is not None else None
                seconds = time.perf_counter() - t_step
                log_step(
                    step + 1,
                    _step_stats(losses[-1], acc_task, arm, scheduler, tokens * world, seconds),
                )
            if on_step is not None:
                # the RNG as it is when the caller saves (after any evaluation it ran)
                on_step(step + 1, lambda state=state: replace(state, rng=torch.get_rng_state()))
                model.train()  # the callback may have evaluated
    bar.close()
    distributed.release_engine(engine)
    model.eval()
    kept = [v for v in losses if v is not None]
    if kept:
        log.info(
            "%s: %d steps, first loss %.4f, last loss %.4f%s",
            job.name,
            job.steps,
            kept[0],
            kept[-1],
            f" ({len(losses) - len(kept)} non-finite step(s) skipped)"
            if len(kept) < len(losses)
            else "",
        )
    return losses


def _step_stats(
    loss: float, task_loss: float, arm_loss: float | None, scheduler, tokens: int, seconds: float
) -> dict[str, float]:
    """One optimizer step for the tracker. ``tokens``: this rank's non-pad tokens times the
    world size (every rank reads equally sized micro-batches), over this rank's wall time."""
    from sapt_dist.outputs.tracking import process_memory_gb

    lrs = scheduler.get_last_lr()
    stats = {
        "loss": loss,
        "task_loss": task_loss,
        "lr": float(lrs[0]),
        "tokens_per_s": tokens / max(seconds, 1e-9),
        **process_memory_gb(),
    }
    if arm_loss is not None:
        stats["arm_loss"] = arm_loss
    if len(lrs) > 1:  # the router's group (BlockJob.router_lr)
        stats["router_lr"] = float(lrs[1])
    return stats
