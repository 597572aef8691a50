"""Training one block (a task's, or the pseudo-sample generator's) on a DeepSpeed engine.

Every micro-step is one forward (task loss + ARM loss in one graph, plus the method's
penalty on the parameters when it has one), one ``engine.backward`` and one
``engine.step``; DeepSpeed scales the losses for gradient accumulation alike and steps
the optimizer on the accumulation boundaries. :class:`BlockTraining` yields after every
optimizer step, so the run does its per-step work between steps without callbacks.

The batch order is a pure function of (seed, micro-step): micro-step ``k`` reads positions
``k*mbs .. k*mbs+mbs-1`` of an endless stream of seeded per-epoch permutations. A resumed
run therefore sees exactly the batches the uninterrupted run saw.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch
from tqdm.auto import tqdm

from sapt_dist import distributed
from sapt_dist.checkpoint.run_state import StepState
from sapt_dist.data.tasks import EncodedExample, collate_train
from sapt_dist.distributed import preemption
from sapt_dist.train.compile import (
    bucket_length,
    compiled_forward,
    pad_left,
    pad_right,
    replay_length,
)

__all__ = [
    "BlockJob",
    "BlockTraining",
    "MicroBatches",
    "StepDone",
    "TrainingDiverged",
    "batch_positions",
    "num_steps",
    "train_block",
]

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """More optimizer steps than ``train.nonfinite_tolerance`` gave a NaN / infinite loss or
    weights; ``last_good`` is the state of the last good step (the run saves it)."""

    def __init__(self, message: str, last_good: StepState | None = None) -> None:
        super().__init__(message)
        self.last_good = last_good


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
    #: loss terms on the parameters added after every forward (``method.penalties``)
    penalty: Callable[[], tuple[torch.Tensor, ...]] | None = None
    #: a constraint on every optimizer step's change (GainLoRA's gate projection,
    #: ``train.subspace.GateProjection``): ``kept = before()`` ahead of the step,
    #: ``after(kept)`` once it is taken, both on the device
    constraint: Any = None


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
            cache[epoch] = torch.randperm(n, generator=g).tolist()  # host ints, read once
        out.append(cache[epoch][offset])
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


@dataclass
class StepDone:
    """One good optimizer step, handed to the caller of :meth:`BlockTraining.steps`.

    ``snapshot()`` gives the :class:`StepState` to save (collective under ZeRO-3: every
    rank calls it or none does), with the RNG as it is when called (after any evaluation
    the caller ran). ``stats`` are the tracker's record of the step (losses, learning rate,
    throughput, memory; :func:`_step_stats`), when the training was asked for them."""

    step: int
    stats: dict[str, float] | None
    snapshot: Callable[[], StepState]
    #: a stop signal reached a rank (agreed by every rank in the step's one reduction)
    stop: bool = False


@dataclass
class _StepResult:
    good: bool
    task: float
    arm: float
    tokens: int
    stop: bool


class BlockTraining:
    """Training one block for ``job.steps`` optimizer steps on a DeepSpeed engine.

    ``steps()`` is a generator: it yields a :class:`StepDone` after every good optimizer
    step, so the caller does its own work between steps (checkpoints, model selection,
    the routing trajectory, tracking, a stop request) with no callbacks; the per-step mean
    losses are in ``losses`` (``None`` for a step skipped as non-finite). :func:`train_block`
    runs it to the end.

    Non-finite steps (:func:`check_finite`): a step whose loss, weights or moments are NaN
    / infinite is undone (the last good state is put back; its batch is dropped, the
    schedule moves on) up to ``train_cfg.nonfinite_tolerance`` times; one more raises
    :class:`TrainingDiverged` carrying the last good state (``last_good``), which the
    caller saves when ``checkpointed`` (the message says which).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        job: BlockJob,
        train_cfg,
        dtype: str,
        pad_id: int,
        ds_config: dict | None = None,
        resume: StepState | None = None,
        stats: bool = False,
        checkpointed: bool = False,
    ) -> None:
        if not job.examples:
            raise ValueError(f"{job.name}: no training examples")
        self.model, self.job, self.cfg = model, job, train_cfg
        self.dtype, self.pad_id, self.ds_config = dtype, pad_id, ds_config
        self.resume, self.stats, self.checkpointed = resume, stats, checkpointed
        self.losses: list[float | None] = []
        self.mode = getattr(train_cfg, "compile", "off")
        # an encoder-decoder (T5) reads the prompt in its encoder, the target in its decoder
        self.seq2seq = bool(getattr(model, "is_encoder_decoder", False))
        if self.seq2seq and self.mode != "off":
            raise ValueError(
                f"train.compile={self.mode}: graph mode pads decoder-only batches to fixed "
                f"lengths; an encoder-decoder backbone trains with train.compile=off"
            )

    # ------------------------------------------------------------------ set-up
    def _engine(self):
        job, t = self.job, self.cfg
        groups: list = list(job.params.values())
        if job.router_lr is not None:
            router = [p for n, p in job.params.items() if n.startswith("router.")]
            rest = [p for n, p in job.params.items() if not n.startswith("router.")]
            groups = [{"params": rest, "lr": job.lr}, {"params": router, "lr": job.router_lr}]
            groups = [g for g in groups if g["params"]]
        return distributed.build_engine(
            self.model,
            groups,
            lr=job.lr,
            weight_decay=t.weight_decay,
            micro_batch_size=t.micro_batch_size,
            grad_accum=t.grad_accum,
            max_grad_norm=t.max_grad_norm,
            lr_lambda=lr_factor(t.lr_schedule, t.warmup_steps, job.steps),
            dtype=self.dtype,
            ds_config=self.ds_config,
        )

    def _start(self, optimizer, scheduler) -> int:
        """The first step to run: the resumed one (state restored) or 0 (RNG seeded)."""
        job, resume = self.job, self.resume
        if resume is None:
            torch.manual_seed(job.seed)
            return 0
        distributed.load_full_optimizer_state(
            optimizer, job.params, resume.params, resume.optimizer
        )
        scheduler.load_state_dict(resume.scheduler)
        torch.set_rng_state(resume.rng)
        self.losses = list(resume.losses)
        log.info("%s: resumed at step %d/%d", job.name, resume.step, job.steps)
        return resume.step

    def _snapshot(self, optimizer, scheduler, step: int) -> StepState:
        """The state after ``step`` (collective under ZeRO-3: every rank calls it)."""
        masters, opt_state = distributed.full_optimizer_state(optimizer, self.job.params)
        return StepState(
            step=step,
            params=masters,
            optimizer=opt_state,
            scheduler=copy.deepcopy(scheduler.state_dict()),
            rng=torch.get_rng_state(),
            losses=list(self.losses),
        )

    # ------------------------------------------------------------------ the loop
    def steps(self) -> Iterator[StepDone]:
        """Run the block's steps, yielding after each good one (see the class)."""
        job, t = self.job, self.cfg
        engine, optimizer, scheduler = self._engine()
        self.scheduler = scheduler
        start = self._start(optimizer, scheduler)
        skipped = 0
        model = self.model
        model.train()
        bar = tqdm(
            total=job.steps,
            initial=start,
            desc=job.name,
            disable=not distributed.is_main_process(),
            dynamic_ncols=True,
            mininterval=1.0,
        )
        batches = MicroBatches(job, t, self.pad_id, self.seq2seq, self.mode, self.stats)
        with compiled_forward(model, self.mode):
            for step in range(start, job.steps):
                t_step = time.perf_counter()
                # what a checkpoint of the last good step holds, should this step diverge
                rng, sched = torch.get_rng_state(), copy.deepcopy(scheduler.state_dict())
                r = self._step(engine, batches, step)
                if not r.good:
                    skipped += 1
                    if skipped > t.nonfinite_tolerance:
                        bar.close()
                        last_good = replace(
                            self._snapshot(optimizer, scheduler, step), rng=rng, scheduler=sched
                        )
                        distributed.release_engine(engine)
                        raise self._diverged(r.task, r.arm, step, skipped, last_good)
                    self._skipped(step, skipped, r)
                    bar.update(1)
                    continue
                self.losses.append(r.task + job.kl_ratio * r.arm)
                postfix = {"loss": f"{r.task:.3f}"}
                if job.replay is not None:
                    postfix["arm"] = f"{r.arm:.4f}"
                bar.set_postfix(postfix, refresh=False)
                bar.update(1)
                stats = None
                if self.stats:
                    arm = r.arm if job.replay is not None else None
                    seconds = time.perf_counter() - t_step
                    world = distributed.world_size()
                    stats = _step_stats(
                        self.losses[-1], r.task, arm, scheduler, r.tokens * world, seconds
                    )
                # collective under ZeRO-3 and taken only when the caller checkpoints; the
                # RNG as it is then (after any evaluation the caller ran)
                yield StepDone(
                    step + 1,
                    stats,
                    lambda n=step + 1: self._snapshot(optimizer, scheduler, n),
                    stop=r.stop,
                )
                model.train()  # the caller may have evaluated
        bar.close()
        distributed.release_engine(engine)
        model.eval()
        self._log_end()

    def _step(self, engine, batches: MicroBatches, step: int) -> _StepResult:
        """One optimizer step of ``grad_accum`` micro-steps.

        The losses accumulate on the device (no host read per micro-step). Before the
        optimizer step, one reduction over the ranks carries the step's task / ARM loss
        sums, a flag for non-finite gradients (where they sit in ``p.grad``: ZeRO-0 fp32;
        DeepSpeed's ZeRO and bf16 optimizers check their own and skip such a step) and the
        stop request; it is read once: the step's one host sync of this loop. A bad step
        changes nothing: its gradients are dropped before ``engine.step()`` (or DeepSpeed
        skips it), so weights, moments and the optimizer's step count stay those of the
        step before, and only the LR schedule moves on."""
        ga, job = self.cfg.grad_accum, self.job
        penalty = job.penalty
        acc = None
        tokens = 0
        for micro in range(step * ga, (step + 1) * ga):
            kwargs, n_tokens = batches(micro)
            tokens += n_tokens
            if self.mode != "off":
                # a new step for the CUDA-graph trees: the last replay's outputs (read
                # above) may be overwritten now
                torch.compiler.cudagraph_mark_step_begin()
            out = engine(**kwargs)
            loss, task_loss = out.loss, out.task_loss
            if penalty is not None:  # the method's loss terms on the parameters (O-LoRA)
                for term in penalty():
                    loss, task_loss = loss + term, task_loss + term
            engine.backward(loss)
            arm = out.arm_loss if out.arm_loss is not None else task_loss.new_zeros(())
            # float64 on the device: the same sums a host float would make
            part = torch.stack([task_loss.detach().double(), arm.detach().double()]) / ga
            acc = part if acc is None else acc + part
            kept = None
            if micro == (step + 1) * ga - 1:
                summary = self._summary(acc)
                if summary[2] > 0 or not all(map(math.isfinite, summary[:2])):
                    self._drop_gradients()
                if job.constraint is not None:
                    kept = job.constraint.before()
            engine.step()
            if kept is not None:  # the step's change, constrained (a skipped step: none)
                job.constraint.after(kept)
        world = distributed.world_size()
        task, arm, bad, stop = summary[0] / world, summary[1] / world, summary[2], summary[3]
        good = bad == 0 and math.isfinite(task) and math.isfinite(arm)
        if good and not engine.was_step_applied():
            good = False  # DeepSpeed found the gradients non-finite and skipped the step
        if not good and not engine.was_step_applied():
            self.scheduler.step()  # a skipped step's position in the schedule is used up
        return _StepResult(good, task, arm, tokens, stop > 0)

    def _summary(self, acc: torch.Tensor) -> list[float]:
        """[task sum, ARM sum, ranks with non-finite gradients, ranks asked to stop] over
        the ranks, read once."""
        grads = [p.grad for p in self.job.params.values() if p.grad is not None]
        bad = acc.new_zeros(())
        if grads:  # ZeRO-0 fp32: the reduced gradients are in p.grad
            bad = (~torch.isfinite(torch.stack(torch._foreach_norm(grads)).sum())).double()
        stop = acc.new_tensor(1.0 if preemption.requested_locally() else 0.0)
        return distributed.sum_over_ranks(torch.cat([acc, bad.view(1), stop.view(1)]))

    def _drop_gradients(self) -> None:
        """A non-finite step: no gradient reaches the optimizer (ZeRO-0; under ZeRO and
        bf16 DeepSpeed's own check finds them non-finite and skips the step)."""
        for p in self.job.params.values():
            p.grad = None

    # ------------------------------------------------------------------ non-finite steps
    def _skipped(self, step: int, skipped: int, r: _StepResult) -> None:
        job = self.job
        log.warning(
            "%s: %s at optimizer step %d/%d: step skipped, its batch dropped (%d of %d tolerated)",
            job.name,
            _what_went_wrong(r.task, r.arm),
            step + 1,
            job.steps,
            skipped,
            self.cfg.nonfinite_tolerance,
        )
        self.losses.append(None)

    def _diverged(self, task, arm, step, skipped, good: StepState) -> TrainingDiverged:
        job, tolerance = self.job, self.cfg.nonfinite_tolerance
        kept = (
            f"The state of step {good.step} (the last good one) is checkpointed. To go on, run "
            f"the same command with train.nonfinite_tolerance={skipped} (the bad batch is "
            f"then skipped); if"
            if self.checkpointed
            else "Nothing of this block is saved. If"
        )
        return TrainingDiverged(
            f"{job.name}: {_what_went_wrong(task, arm)} at optimizer step {step + 1}/"
            f"{job.steps} (lr {job.lr:g}; {skipped} non-finite step(s), "
            f"train.nonfinite_tolerance={tolerance}). {kept} every step diverges, start a new "
            f"output_dir with a lower train.lr (replay.gen_lr for the generator) or "
            f"train.max_grad_norm set.",
            last_good=good,
        )

    def _log_end(self) -> None:
        kept = [v for v in self.losses if v is not None]
        if kept:
            log.info(
                "%s: %d steps, first loss %.4f, last loss %.4f%s",
                self.job.name,
                self.job.steps,
                kept[0],
                kept[-1],
                f" ({len(self.losses) - len(kept)} non-finite step(s) skipped)"
                if len(kept) < len(self.losses)
                else "",
            )


def train_block(
    model: torch.nn.Module,
    job: BlockJob,
    train_cfg,
    dtype: str,
    pad_id: int,
    ds_config: dict | None = None,
    resume: StepState | None = None,
) -> list[float | None]:
    """Train ``job`` to its end with nothing done between steps (the pseudo-sample
    generator, tests, benchmarks); the per-step mean losses."""
    training = BlockTraining(model, job, train_cfg, dtype, pad_id, ds_config, resume)
    for _ in training.steps():
        pass
    return training.losses


class MicroBatches:
    """Micro-step -> the forward's keyword arguments on this rank, and its token count.

    Rank r of W reads global micro-batch ``micro * W + r`` of the seeded stream
    (:func:`batch_positions`), collated (right padding, labels -100 on prompt and
    padding); graph mode pads it to a length bucket; the generator's fixed weights and
    the ARM batch (same global numbering) are added."""

    def __init__(
        self, job: BlockJob, train_cfg, pad_id: int, seq2seq: bool, mode: str, count_tokens: bool
    ) -> None:
        self.job, self.pad_id, self.seq2seq, self.mode = job, pad_id, seq2seq, mode
        self.mbs = train_cfg.micro_batch_size
        self.count_tokens = count_tokens
        self.rank, self.world = distributed.rank(), distributed.world_size()
        self.device = next(iter(job.params.values())).device
        self.longest = max(len(e.input_ids) for e in job.examples)

    def __call__(self, micro: int) -> tuple[dict, int]:
        job, device, pad_id = self.job, self.device, self.pad_id
        global_micro = micro * self.world + self.rank
        idx = batch_positions(len(job.examples), self.mbs, global_micro, job.seed)
        batch = collate_train([job.examples[i] for i in idx], pad_id, self.seq2seq)
        if self.mode != "off":  # static shapes: one of a few padded lengths
            width = bucket_length(batch["input_ids"].shape[1], self.longest)
            batch = pad_right(batch, width, pad_id)
        if job.weights is not None:
            batch["weights"] = job.weights(len(idx))
        if job.replay is not None:  # the ARM batch follows the same global numbering
            replay = job.replay(global_micro)
            if self.mode != "off":  # every ARM batch of the task: one length
                have = replay["replay_input_ids"].shape[1]
                width = replay_length(have, getattr(job.replay, "longest", None))
                replay = pad_left(replay, width, pad_id)
            batch.update(replay)
        tokens = 0
        if self.count_tokens:  # this rank's prompts + targets + ARM, no pads: counted on the
            # host batch with numpy (these tensors never were on a device)
            masks = [v for k, v in batch.items() if k.endswith("attention_mask")]
            tokens = int(sum(m.numpy().sum() for m in masks))
            if self.seq2seq:  # the decoder's targets (+ EOS), outside the encoder's mask
                tokens += int((batch["labels"].numpy() != -100).sum())
        kwargs = {k: v.to(device) for k, v in batch.items()}
        if job.replay is not None:
            kwargs["kl_ratio"] = job.kl_ratio
        return kwargs, tokens


def _what_went_wrong(task: float, arm: float) -> str:
    bad = task if not math.isfinite(task) else arm
    if math.isfinite(bad):
        return "the weights or optimizer moments became non-finite"
    return f"the loss became {bad}"


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
