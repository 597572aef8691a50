"""The continual-learning run: one process group, one backbone, the whole task sequence.

For each task t (in order)::

    start  ─► train block t (+ key, g) with task loss + ARM over tasks < t
        ─► file block t ─► reflect: a_t* on t's dev split, pseudo-samples of t
        ─► evaluate on the test splits of tasks 0..t ─► row t of the accuracy matrix
        ─► checkpoint (blocks + progress, one atomic swap)

The backbone is loaded once. Baselines run on the same machinery; what each method does
differently is one row of the table in :mod:`sapt_dist.methods`, whose fields this
module reads (never a method's name). The parts a run uses live below it: the tasks
(``train.setup``), the model (``checkpoint.run_model``), one block's steps
(``train.block``), pseudo-samples (``train.replay``), evaluation
(``outputs.evaluation``), the routing trajectory and sharding report (``outputs``),
provenance (``checkpoint.blocks``).
"""

from __future__ import annotations

import itertools
import logging
from pathlib import Path

import torch

from sapt_dist import distributed
from sapt_dist.backbone.load import check_model_files
from sapt_dist.checkpoint.blocks import block_provenance, load_extra_tensors, save_blocks
from sapt_dist.checkpoint.run_model import build_run_model
from sapt_dist.checkpoint.run_state import RunState, lock_run_folder, unlock_run_folder
from sapt_dist.config import ConfigError, RunConfig, resolve_batch, to_dict
from sapt_dist.distributed import preemption
from sapt_dist.method.generation import attention_target, generate_texts, mean_pooled_prompt
from sapt_dist.method.penalties import build_penalty
from sapt_dist.methods import METHODS, Method
from sapt_dist.outputs.evaluation import evaluate_tasks
from sapt_dist.outputs.metrics import routing_summary, score_predictions
from sapt_dist.outputs.report import write_report
from sapt_dist.outputs.sharding import write_sharding
from sapt_dist.outputs.timing import RunTiming
from sapt_dist.outputs.tracking import (
    TaskRecord,
    Tracker,
    final_pending,
    open_tracker,
    resolve_mode,
)
from sapt_dist.outputs.trajectory import RoutingTrajectory
from sapt_dist.train.block import BlockJob, BlockTraining, TrainingDiverged, num_steps
from sapt_dist.train.compile import check_device
from sapt_dist.train.replay import PseudoSamples
from sapt_dist.train.setup import EncodedTask, encode_tasks, load_run_tasks
from sapt_dist.train.subspace import (
    GATE_MEMORY_FILE,
    GateProjection,
    design_gate_key,
    design_task_blocks,
    new_gate_memory,
    new_memory,
    remember_gates,
    remember_task,
)

__all__ = ["ContinualRun", "run"]

log = logging.getLogger(__name__)


class ContinualRun:
    """A whole run; ``run()`` resumes from the run folder's state when there is one."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.method: Method = METHODS[cfg.method]  # what this method does differently
        self.out = Path(cfg.output_dir)
        self.state = RunState(self.out)
        self.tracker = Tracker()  # the no-op one until run() opens the real one (rank 0)
        self._sharding_written = False
        #: where the time goes: read from the folder (a resumed run adds to it) once the run
        #: starts, after the folder and config were checked
        self.timing: RunTiming

    # ------------------------------------------------------------------ the run
    def run(self) -> dict:
        try:
            return self._run()
        except preemption.Preempted:
            self.tracker.finish(exit_code=preemption.EXIT_PREEMPTED)  # resumed, not failed
            raise
        except BaseException:
            self.tracker.finish(exit_code=1)
            raise
        finally:
            self.tracker.finish()

    def _run(self) -> dict:
        cfg = self.cfg
        # every task file validated before the folder is bound to this config (a start
        # that fails on its data leaves nothing that refuses the corrected command) and
        # before any model loads
        tasks = load_run_tasks(cfg)
        resolve_batch(cfg, distributed.world_size())  # train.global_batch -> grad_accum
        self._check_before_binding(len(tasks))  # so is every other key that needs no model
        self.state.check_or_save_config(cfg, distributed.world_size())
        progress = self.state.load_progress()
        names = [t.name for t in tasks]
        if progress["tasks"] and progress["tasks"] != names:
            raise ConfigError(
                f"{self.out}: run was started on tasks {progress['tasks']}, now {names}"
            )
        if progress.get("finished"):
            return self._already_finished(progress, tasks)
        self.timing = RunTiming(self.out)
        with self.timing.phase("start_up"):
            self._set_up(tasks, progress)
        stages = 1 if self.method.joint else len(tasks)
        for i in range(progress["completed"], stages):
            self._stage(i, progress)
            # a signal that came during evaluation / pseudo-samples: stop before the next task
            if i + 1 < stages and preemption.stop_requested():
                self._stop(f"after task {i + 1}/{stages} (its checkpoint is saved)")
        return self._finish(stages, progress)

    def _already_finished(self, progress: dict, tasks: list) -> dict:
        log.info(
            "%s: run already finished; nothing to train (delete the folder to rerun)", self.out
        )
        results = write_report(self.out, self.cfg, progress)
        if final_pending(self.cfg):  # killed between the finished marker and the W&B summary
            self.tracker = open_tracker(self.cfg)
            self.tracker.catch_up(task_records(self.cfg, self.out, self.method, progress, tasks))
            self.tracker.log_final(_global_step(progress), results, self.out / "metrics")
        return results

    def _check_before_binding(self, n_tasks: int) -> None:
        """The checks that need no model, before the folder is bound to this config (a
        start that fails here leaves nothing that refuses the corrected command): the
        slots, the model files (weights unread), graph mode's device, the DeepSpeed config,
        the tracking mode."""
        cfg = self.cfg
        try:
            self.n_slots = self.method.n_slots(n_tasks, cfg.adapter.n_slots)
        except ValueError as e:
            raise ConfigError(str(e)) from e
        check_model_files(cfg.model)
        # graph mode's CUDA graphs need a GPU: say so before any model loads
        check_device(
            cfg.train.compile, torch.device("cuda" if torch.cuda.is_available() else "cpu")
        )
        # read (and checked) once, before the model loads
        self.ds_config = distributed.run_engine_config(cfg)
        if cfg.tracking.backend != "none":
            resolve_mode(cfg.tracking.mode)  # tracking.mode=online without a W&B key

    def _set_up(self, tasks: list, progress: dict) -> None:
        """Everything before the first task trains: the tracker, the process group and
        DeepSpeed config, the model (from the run folder's blocks on a resume), the
        method's penalty, the encoded tasks."""
        cfg = self.cfg
        n_slots = self.n_slots
        # before the process group: a tracking config error stops every rank alike
        self.tracker = open_tracker(
            cfg, {"world_size": distributed.world_size(), "task_names": [t.name for t in tasks]}
        )
        distributed.init(timeout_s=cfg.distributed.timeout_s)
        distributed.configure(self.ds_config)  # ZeRO-3: the backbone loads partitioned
        resuming = progress["completed"] > 0
        if resuming:
            log.info("resuming after %d finished task(s)", progress["completed"])
        # a resumed run's model is the finished tasks' blocks, as sapt-predict loads them
        self.model, self.tokenizer = build_run_model(
            cfg, n_slots, blocks=self.state.blocks if resuming else None
        )
        if self.method.penalty is not None:
            build_penalty(self.method.penalty, self.model, cfg)
        self.memory = None  # InfLoRA's input subspaces, filed with the blocks
        if self.method.input_subspace:
            self.memory = new_memory(self.model)
            saved = load_extra_tensors(self.state.blocks, self.memory.FILE) if resuming else None
            if saved is not None:
                self.memory.load_tensors(saved, str(self.state.blocks / self.memory.FILE))
        self.gate_memory = None  # GainLoRA's gate subspaces, filed with the blocks
        if self.method.gated:
            self.gate_memory = new_gate_memory()
            where = self.state.blocks / GATE_MEMORY_FILE
            saved = load_extra_tensors(self.state.blocks, GATE_MEMORY_FILE) if resuming else None
            if saved is not None:
                self.gate_memory.load_tensors(saved, str(where))
        if cfg.model.gradient_checkpointing:
            self.model.gradient_checkpointing_enable()
        self.enc: list[EncodedTask] = encode_tasks(self.tokenizer, tasks, cfg.data)
        self.pseudo = PseudoSamples(cfg, self.out, tasks, self.tokenizer)
        self.trajectory = RoutingTrajectory(
            self.out,
            [e.data.name for e in self.enc],
            [e.dev_prompts for e in self.enc],
            cfg.eval.batch_size,
        )
        progress["tasks"] = [t.name for t in tasks]
        if resuming:  # task ends a killed start saved but never showed on the dashboard
            self.tracker.catch_up(task_records(self.cfg, self.out, self.method, progress, tasks))

    def _finish(self, stages: int, progress: dict) -> dict:
        """The final blocks folder, the finished marker, the report, where the time went
        and the W&B summary."""
        with self.timing.phase("finish"):
            # every rank: the gathers inside save_blocks are collective under ZeRO-3
            save_blocks(
                self.model,
                self.out / "blocks",
                self._block_names(stages - 1),
                provenance=progress.get("provenance"),
                run_config=to_dict(self.cfg),
                extra_tensors=self._extra_tensors(),
            )
            distributed.finish()
            self.state.mark_finished()
            progress["finished"] = True
            results = write_report(self.out, self.cfg, progress)
        self.timing.write()
        results["timing"] = self.timing.totals()
        results["report"] = results.get("report", "") + "\n" + self.timing.table()
        self.tracker.log_final(_global_step(progress), results, self.out / "metrics")
        return results

    def _extra_tensors(self) -> dict | None:
        """What the method files beside its blocks: InfLoRA's subspace memory, GainLoRA's
        gate subspaces."""
        out = {}
        if self.memory is not None:
            out[self.memory.FILE] = self.memory.tensors()
        if self.gate_memory is not None:
            out[GATE_MEMORY_FILE] = self.gate_memory.tensors()
        return out or None

    def _block_names(self, i: int) -> list[str]:
        names = [e.data.name for e in self.enc]
        if self.method.joint:
            return [f"{self.method.name}:" + "+".join(names)]
        if self.model.n_slots == 1:
            return [names[i]]
        return names[: i + 1]

    # ------------------------------------------------------------------ one task
    def _stage(self, i: int, progress: dict) -> None:
        """Task ``i``, top to bottom (for a joint method: the one stage on every task)."""
        name = self._block_names(0)[0] if self.method.joint else self.enc[i].data.name
        clock = self.timing.phase
        with clock("train", name):
            slot = self._start_task(i)
            job = self._block_job(i, progress)
            losses = self._train_with_checkpoints(i, job, progress)
            self.model.file_current()  # block (and key) -> slot of the banks
            if self.memory is not None:  # the task's inputs join the subspace memory
                pad = self.tokenizer.pad_token_id
                remember_task(
                    self.model, self.memory, self.enc[i].train, pad, self.cfg, i, len(self.enc)
                )
            if self.gate_memory is not None:  # the task's gate features join their memories
                pad = self.tokenizer.pad_token_id
                remember_gates(
                    self.model,
                    self.gate_memory,
                    self.enc[i].train,
                    pad,
                    self.cfg,
                    i,
                    len(self.enc),
                )
        progress["losses"][self.enc[i].data.name] = losses
        if self.method.reflects:
            with clock("pseudo_samples", name):
                self._attention_target(i, slot)
                self._pseudo_samples(i, slot, progress)
        with clock("evaluate", name):
            row, routing = self._evaluate(i)
        with clock("checkpoint", name):
            self._file_task(i, slot, progress, row, routing, losses)
        self.timing.write()

    def _start_task(self, i: int) -> int:
        """Make task i's slot current: a fresh block (seeded by task) or the kept one; SAPT
        with a centered router input adds the task's mean pooled prompt to the center."""
        cfg, model = self.cfg, self.model
        slot = 0 if model.n_slots == 1 else i
        # a fresh block's initialisation is a function of (seed, task), whatever ran before
        torch.manual_seed(cfg.train.seed + 1000 * i)
        model.start_task(slot, fresh=not (self.method.keeps_block and i > 0))
        if self.memory is not None:  # InfLoRA: A from the task's inputs, off the memory
            pad = self.tokenizer.pad_token_id
            design_task_blocks(model, self.memory, self.enc[i].train, pad, cfg)
        if self.gate_memory is not None:  # GainLoRA: the key off the old gate outputs
            pad = self.tokenizer.pad_token_id
            design_gate_key(model, self.gate_memory, self.enc[i].train, pad, cfg)
        if self.method.trains_router and cfg.adapter.router_center != "none":
            # the router's input center takes in this task (recomputed the same on resume)
            task = self.enc[i]
            mean = mean_pooled_prompt(
                model,
                [ex.input_ids[: ex.prompt_len] for ex in task.train],
                self.tokenizer.pad_token_id,
                cfg.eval.batch_size,
            )
            model.router.set_task_mean(slot, mean)
        return slot

    def _block_job(self, i: int, progress: dict) -> BlockJob:
        """What trains at task i: its data (the union for a joint method, plus real samples
        of earlier tasks for ``replay``), the ARM batches (SAPT, from task 2 on), the
        trainable tensors (the block; for SAPT also its key and the query network) and
        the method's penalty."""
        cfg, method, t = self.cfg, self.method, self.cfg.train
        name = self.enc[i].data.name
        label = f"task {i + 1}/{len(self.enc)} {name}"
        examples = list(self.enc[i].train)
        task = cfg.for_task(name)
        if task.overridden:
            log.info(
                "%s: per-task settings: %s",
                name,
                ", ".join(f"{k}={v}" for k, v in task.overridden.items()),
            )
        replay = None
        if method.joint:
            examples = [ex for e in self.enc for ex in e.train]
            label = f"{method.name} ({len(self.enc)} tasks)"
        elif method.replay == "real" and i > 0:
            examples += self.pseudo.real_examples(i)
        elif method.reflects and i > 0 and cfg.replay.kl_ratio > 0 and task.reflection:
            sums = progress.get("pseudo_sha256") or {}
            replay = self.pseudo.replay_batches(i, sums, self.state.progress_path)
        if method.reflects and i > 0:  # said per task: the released recipe varies it
            if replay is not None:
                log.info("%s: attentive reflection on, over %d earlier task(s)", label, i)
            else:
                why = (
                    "replay.kl_ratio=0" if task.reflection else f"per_task.{name}.reflection=false"
                )
                log.info("%s: attentive reflection off (%s)", label, why)
        # a frozen part of the block (InfLoRA's designed A) is not trained
        params = {n: p for n, p in self.model.named_adapter_params().items() if p.requires_grad}
        if not method.trains_routing:
            params = {n: p for n, p in params.items() if not n.startswith("router.")}
        steps = num_steps(
            len(examples),
            task.epochs,
            t.micro_batch_size,
            t.grad_accum,
            task.max_steps,
            distributed.world_size(),
        )
        penalty = self.model.penalties[method.penalty] if method.penalty else None
        set_task = getattr(penalty, "set_task", None)
        if set_task is not None:  # the penalty's weights for this task (O-LoRA's per_task)
            set_task(task)
        constraint = None  # GainLoRA: each step's gate change off the old tasks' subspaces
        if self.gate_memory is not None and cfg.gate.project and i > 0:
            constraint = GateProjection(self.model, self.gate_memory)
        return BlockJob(
            name=label,
            examples=examples,
            params=params,
            steps=steps,
            seed=t.seed + 1000 * i,
            lr=task.lr,
            replay=replay,
            kl_ratio=cfg.replay.kl_ratio,
            router_lr=t.router_lr,
            penalty=penalty,
            constraint=constraint,
        )

    def _train_with_checkpoints(self, i: int, job: BlockJob, progress: dict) -> list:
        """Train task i's block from its step checkpoint if there is one; after each step:
        the routing trajectory and the tracker's record, the best dev block
        (``train.select_best``), a step checkpoint every ``train.checkpoint_every`` steps
        and at a stop request; a diverged run keeps its last good step."""
        cfg, t = self.cfg, self.cfg.train
        resume, best = self.state.load_step(i)
        offset = _global_step(progress)
        per_epoch = num_steps(
            len(job.examples), 1, t.micro_batch_size, t.grad_accum, None, distributed.world_size()
        )
        select_every = per_epoch * t.eval_every_epochs if t.select_best else 0
        every_r = cfg.eval.routing_every if self.method.trains_router else 0
        training = BlockTraining(
            self.model,
            job,
            t,
            cfg.model.dtype,
            self.tokenizer.pad_token_id,
            ds_config=self.ds_config,
            resume=resume,
            stats=self.tracker.enabled or bool(every_r),
            checkpointed=True,
        )
        try:
            for done in training.steps():
                step = done.step
                # every rank, at the same point (the trajectory's passes are collective)
                if every_r and (step % every_r == 0 or step == job.steps):
                    point = self.trajectory.point(self.model, i, self.tokenizer.pad_token_id)
                    final = step == job.steps
                    self.trajectory.write(i, offset + step, point, step, final)
                    extra = self.trajectory.own_weights(i, point)
                else:
                    extra = {}
                if self.tracker.enabled:
                    self.tracker.log_step(offset + step, {**done.stats, **extra, "task": i + 1})
                if select_every and (step % select_every == 0 or step == job.steps):
                    best = self._keep_if_best(self.enc[i], step, job.params, best)
                saved = bool(t.checkpoint_every and step % t.checkpoint_every == 0)
                if (saved and step < job.steps) or done.stop:
                    with self.timing.phase("checkpoint", self.enc[i].data.name):
                        self.state.save_step(i, done.snapshot(), best)
                if done.stop:  # agreed by every rank in the step's one reduction
                    self.timing.write()
                    self._stop(f"at step {step}/{job.steps} of {job.name}")
        except TrainingDiverged as e:  # exit 3, resumable from the last good step
            if e.last_good is not None:
                self.state.save_step(i, e.last_good, best)
            raise
        if not self._sharding_written:
            self._sharding_written = True
            write_sharding(self.model, self.out)
        if best is not None and best["step"] != job.steps:
            self._restore_best(i, job, best)
        return training.losses

    def _keep_if_best(
        self, task: EncodedTask, step: int, params: dict, best: dict | None
    ) -> dict | None:
        """Model selection: score the current block on the task's dev split."""
        preds = generate_texts(
            self.model,
            self.tokenizer,
            task.dev_prompts,
            self.cfg.eval.batch_size,
            self.cfg.eval.max_new_tokens,
            desc=f"dev {task.data.name}",
        )
        score = score_predictions(preds, task.dev_refs, task.data.metric, self.cfg.eval.scoring)
        log.info("%s: step %d dev %s = %.2f", task.data.name, step, task.data.metric, score)
        if best is not None and score <= best["score"]:
            return best
        with distributed.gathered(list(params.values())):
            tensors = {n: p.detach().cpu().clone() for n, p in params.items()}
        return {"score": score, "step": step, "params": tensors}

    def _restore_best(self, i: int, job: BlockJob, best: dict) -> None:
        log.info(
            "%s: keeping the block of step %d (dev %.2f)",
            self.enc[i].data.name,
            best["step"],
            best["score"],
        )
        params = job.params
        with torch.no_grad(), distributed.gathered(list(params.values()), modify=True):
            for name, p in params.items():
                p.copy_(best["params"][name].to(p))

    # ------------------------------------------------------------------ reflect
    def _attention_target(self, i: int, slot: int) -> None:
        """SAPT: a_i*, the mean routing weights of task i's dev prompts, is what the ARM
        holds the attention to on task i's pseudo-samples later."""
        task = self.enc[i]
        target = attention_target(
            self.model,
            task.dev_prompts,
            self.tokenizer.pad_token_id,
            self.cfg.eval.batch_size,
            slot,
        )
        self.model.set_target(slot, target)
        log.info(
            "%s: attention target a* = %s", task.data.name, [round(float(x), 4) for x in target]
        )

    def _pseudo_samples(self, i: int, slot: int, progress: dict) -> None:
        """SAPT: the generator block learns task i and writes its pseudo-samples (not after
        the last task); their sha256 goes into progress.json."""
        if i == len(self.enc) - 1:
            return
        digest = self.pseudo.make(i, self.model, self.ds_config)
        if digest is not None:  # rank 0: progress.json (checksummed) keeps it
            progress.setdefault("pseudo_sha256", {})[self.enc[i].data.name] = digest
        self.model.start_task(slot, fresh=False)  # the generator took the trainable block

    # ------------------------------------------------------------------ evaluate, file
    def _evaluate(self, i: int) -> tuple[list[float | None], dict]:
        """Scores on the test splits the method scores after stage i (row i of the
        matrix) and, for a method that trains the router, the routing summary."""
        cfg, method = self.cfg, self.method
        n = len(self.enc)
        after = method.name if method.joint else f"{i:02d}_{self.enc[i].data.name}"
        scores = evaluate_tasks(
            self.model,
            self.tokenizer,
            [self.enc[j].test_split(j) for j in method.tasks_scored(i, n)],
            batch_size=cfg.eval.batch_size,
            max_new_tokens=cfg.eval.max_new_tokens,
            scoring=cfg.eval.scoring,
            predictions_dir=self.out / "predictions" / f"after_{after}",
            with_weights=method.trains_router,
            n_weights=i + 1,
        )
        row: list[float | None] = [None] * n
        routing_w: dict[int, torch.Tensor] = {}
        for s in scores:
            row[s.task.index] = s.score
            if s.weights is not None:
                routing_w[s.task.index] = s.weights[:, : i + 1]
            log.info("after %s: %s %s = %.2f", after, s.task.name, s.task.metric, s.score)
        return row, (routing_summary(routing_w) if routing_w else {})

    def _file_task(
        self, i: int, slot: int, progress: dict, row: list, routing: dict, losses: list
    ) -> None:
        """Row i of the matrix, the block's provenance, then blocks + progress in one atomic
        swap of state/blocks (the task boundary a later start resumes from)."""
        cfg, model, task = self.cfg, self.model, self.enc[i]
        offset = _global_step(progress) - len(losses)
        progress["matrix"].append(row)
        progress["routing"].append(routing)
        progress["completed"] = i + 1
        names = [e.data.name for e in self.enc]
        record = block_provenance(
            slot=slot,
            block=self._block_names(i)[slot],
            stage=i,
            method=self.method.name,
            steps=len(losses),
            learned=[self.enc[j].data for j in self.method.tasks_learned(i, len(self.enc))],
            scores_after=dict(zip(names, row, strict=True)),
            metric={e.data.name: e.data.metric for e in self.enc},
            config=to_dict(cfg),
        )
        prov = list(progress.get("provenance") or [])
        prov[slot:] = [record]  # a single-slot method's one block: its latest record
        progress["provenance"] = prov
        save_blocks(
            model,
            self.state.blocks,
            self._block_names(i),
            extra_files=self.state.progress_file(progress),
            provenance=prov,
            run_config=to_dict(cfg),
            extra_tensors=self._extra_tensors(),
        )
        if model.n_slots == 1 and not self.method.joint:
            save_blocks(
                model,
                self.out / "blocks_per_task" / f"{i:02d}_{task.data.name}",
                [task.data.name],
                provenance=[record],
                run_config=to_dict(cfg),
            )
        self.state.clear_step()
        # rank 0 wrote the pseudo-samples, blocks and progress and removed state/step:
        # nobody reads them for the next task before that is done
        distributed.barrier()
        last = i == len(self.enc) - 1
        pseudo = self.pseudo.path(i) if self.method.reflects and not last else None
        self.tracker.log_task(offset + len(losses), i, names, progress["matrix"], routing, pseudo)

    def _stop(self, where: str) -> None:
        """Every rank stopped at the same boundary with its state saved: leave cleanly."""
        why = preemption.requested_locally() or "another rank's signal"
        log.warning(
            "%s: stopping %s on %s; the same command resumes from here", self.out, where, why
        )
        preemption.write_marker(where, self.out)
        # no rank leaves before rank 0 has written the checkpoint (srun --kill-on-bad-exit
        # would kill it mid-write when another rank exits first)
        distributed.barrier()
        raise preemption.Preempted(where)


def task_records(
    cfg: RunConfig, out: Path, method: Method, progress: dict, tasks: list
) -> list[TaskRecord]:
    """Every finished task's record as the run folder holds it (what ``_file_task``
    gave the tracker): the W&B rows a restart logs when the W&B run lacks them."""
    names = [t.name for t in tasks]
    ends = list(itertools.accumulate(len(v) for v in progress["losses"].values()))
    pseudo = PseudoSamples(cfg, out, tasks, None)
    records = []
    for i in range(progress["completed"]):
        last = i == len(tasks) - 1
        records.append(
            TaskRecord(
                global_step=ends[i],
                index=i,
                tasks=names,
                matrix=progress["matrix"][: i + 1],
                routing=progress["routing"][i] or None,
                pseudo_path=pseudo.path(i) if method.reflects and not last else None,
            )
        )
    return records


def _global_step(progress: dict) -> int:
    """Optimizer steps of the finished tasks' blocks: the tracker's x axis continues from
    here (derived from saved progress, so a resumed run continues it)."""
    return sum(len(v) for v in progress["losses"].values())


def environment(cfg: RunConfig | None = None) -> dict:
    """What a run's numbers depend on besides its config: Python and library versions,
    torch's CPU threads (``train.threads``, else OMP_NUM_THREADS or the cores), the CPU
    and GPU. Two runs of one config agree exactly only where all of it agrees
    (docs/BENCHMARKS.md measures the spread over thread counts)."""
    import importlib.metadata as md
    import os
    import platform
    import sys

    def version(name: str) -> str | None:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None

    env = {
        "python": sys.version.split()[0],
        "versions": {
            n: version(n)
            for n in ("torch", "transformers", "peft", "deepspeed", "tokenizers", "wandb")
        },
        "threads": torch.get_num_threads(),
        "threads_from": (
            "train.threads"
            if cfg is not None and cfg.train.threads is not None
            else ("OMP_NUM_THREADS" if os.environ.get("OMP_NUM_THREADS") else "torch default")
        ),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "platform": platform.platform(),
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "world_size": distributed.world_size(),
    }
    return env


def record_environment(cfg: RunConfig) -> dict:
    """Log the environment (run.log) and append it to ``<output_dir>/environment.json``
    beside ``config.yaml``: one entry per start, so a resumed run on another machine says
    so."""
    import contextlib
    import datetime
    import json

    from sapt_dist.checkpoint.atomic import atomic_write_json

    env = environment(cfg)
    v = env["versions"]
    log.info(
        "environment: python %s, torch %s, transformers %s, peft %s, deepspeed %s; "
        "%d CPU thread(s) (%s) of %s cores%s",
        env["python"],
        v["torch"],
        v["transformers"],
        v["peft"],
        v["deepspeed"],
        env["threads"],
        env["threads_from"],
        env["cpu_count"],
        f"; GPU {env['gpu']}" if env["gpu"] else "",
    )
    path = Path(cfg.output_dir) / "environment.json"
    starts: list = []
    # none yet, or unreadable: this record starts the list again
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        starts = list(json.loads(path.read_text())["starts"])
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    starts.append({"time": now, **env})
    atomic_write_json(path, {"starts": starts})
    return env


def run(cfg: RunConfig) -> dict:
    """Run (or resume) the continual-learning run described by ``cfg``.

    Rank 0 appends this package's log records to ``<output_dir>/run.log``.
    """
    pkg = logging.getLogger("sapt_dist")
    handler = None
    # one sapt-train per run folder (rank 0 holds its lock until the process ends),
    # taken before anything reads or repairs the folder's state
    lock = lock_run_folder(cfg.output_dir)
    if distributed.is_main_process():
        out = Path(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(out / "run.log")
        handler.setFormatter(
            logging.Formatter("%(asctime)s [rank0] %(levelname)s %(name)s: %(message)s")
        )
        pkg.addHandler(handler)
        if pkg.getEffectiveLevel() > logging.INFO:
            pkg.setLevel(logging.INFO)
    if cfg.train.threads is not None:
        torch.set_num_threads(cfg.train.threads)
    if distributed.is_main_process():
        record_environment(cfg)
    try:
        return ContinualRun(cfg).run()
    finally:
        unlock_run_folder(lock)
        if handler is not None:
            pkg.removeHandler(handler)
            handler.close()
