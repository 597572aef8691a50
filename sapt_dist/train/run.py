"""The continual-learning run: one process group, one backbone, the whole task sequence.

For each task t (in order)::

    start_task(t) ─► train block t (+ key, g) with task loss + ARM over tasks < t
        ─► file block t ─► a_t* on t's dev split ─► pseudo-samples of t
        ─► evaluate on the test splits of tasks 0..t ─► row t of the accuracy matrix
        ─► checkpoint (blocks, progress)

The backbone is loaded once. Baselines run on the same machinery; what each method does
differently is one row of the table in :mod:`sapt_dist.train.methods`, whose fields this
module reads (never a method's name).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from sapt_dist import distributed
from sapt_dist.backbone.load import load_backbone, torch_dtype
from sapt_dist.checkpoint.atomic import sha256_file
from sapt_dist.checkpoint.blocks import library_versions, load_blocks, save_blocks
from sapt_dist.checkpoint.run_state import (
    RunState,
    StateDamagedError,
    lock_run_folder,
    unlock_run_folder,
)
from sapt_dist.config import ConfigError, RunConfig, resolve_batch, to_dict
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
    split_sha256,
)
from sapt_dist.distributed import preemption
from sapt_dist.method.model import SAPTModel
from sapt_dist.outputs.metrics import routing_summary, score_predictions
from sapt_dist.outputs.report import write_report
from sapt_dist.outputs.tracking import Tracker, final_pending, open_tracker
from sapt_dist.train.block import BlockJob, num_steps, train_block
from sapt_dist.train.compile import check_device
from sapt_dist.train.evaluation import (
    attention_target,
    generate_texts,
    mean_pooled_prompt,
    pooled_prompts,
    routing_weights,
)
from sapt_dist.train.methods import METHODS, Method
from sapt_dist.train.replay import (
    GEN_PROMPT,
    ReplayBatches,
    choose_pseudo,
    generator_examples,
    load_jsonl,
    n_pseudo,
    real_samples,
    save_jsonl,
)

__all__ = ["ContinualRun", "run"]

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


class ContinualRun:
    """A whole run; ``run()`` resumes from the run folder's state when there is one."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.method: Method = METHODS[cfg.method]  # what this method does differently
        self.out = Path(cfg.output_dir)
        self.state = RunState(self.out)
        self.tracker = Tracker()  # the no-op one until run() opens the real one (rank 0)
        self._dev_pooled: dict[int, torch.Tensor] = {}

    # ------------------------------------------------------------------ set-up
    def _load_tasks(self) -> list[TaskData]:
        cfg = self.cfg
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

    def _n_slots(self, n_tasks: int) -> int:
        cfg = self.cfg
        if not self.method.per_task_slots:
            return 1
        n = cfg.adapter.n_slots or n_tasks
        if n < n_tasks:
            raise ConfigError(
                f"config key 'adapter.n_slots' is {n} but the sequence has {n_tasks} tasks; "
                f"raise it to at least {n_tasks} (or leave it null)"
            )
        return n

    def _encode(self, tokenizer, tasks: list[TaskData]) -> list[EncodedTask]:
        d = self.cfg.data
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
                encode_prompt(tokenizer, prompt(ex), d.max_source_length, stats["test"])
                for ex in test
            ]
            for split, st in stats.items():
                log_truncation(task.name, split, st)
            dev_refs = list(task.splits["dev"]["outputs"])
            out.append(
                EncodedTask(
                    task,
                    train,
                    dev,
                    dev_refs,
                    test_prompts,
                    list(test["outputs"]),
                    list(test["id"]),
                )
            )
        return out

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

    def _global_step(self, progress: dict) -> int:
        """Optimizer steps of the finished tasks' blocks: the tracker's x axis continues
        from here (derived from saved progress, so a resumed run continues it)."""
        return sum(len(v) for v in progress["losses"].values())

    def _run(self) -> dict:
        cfg = self.cfg
        # every task file validated before the folder is bound to this config (a start
        # that fails on its data leaves nothing that refuses the corrected command) and
        # before any model loads
        tasks = self._load_tasks()
        resolve_batch(cfg, distributed.world_size())  # train.global_batch -> grad_accum
        self.state.check_or_save_config(cfg, distributed.world_size())
        progress = self.state.load_progress()
        names = [t.name for t in tasks]
        if progress["tasks"] and progress["tasks"] != names:
            raise ConfigError(
                f"{self.out}: run was started on tasks {progress['tasks']}, now {names}"
            )
        if progress.get("finished"):
            log.info(
                "%s: run already finished; nothing to train (delete the folder to rerun)", self.out
            )
            results = write_report(self.out, cfg, progress)
            if final_pending(cfg):  # killed between the finished marker and the W&B summary
                self.tracker = open_tracker(cfg)
                self.tracker.log_final(self._global_step(progress), results, self.out / "metrics")
            return results
        n_slots = self._n_slots(len(tasks))
        # graph mode's CUDA graphs need a GPU: say so before any model loads
        check_device(
            cfg.train.compile, torch.device("cuda" if torch.cuda.is_available() else "cpu")
        )
        # read (and checked) once, before the model loads
        self.ds_config = distributed.run_engine_config(cfg)
        # before the process group: a tracking config error stops every rank alike
        self.tracker = open_tracker(
            cfg, {"world_size": distributed.world_size(), "task_names": names}
        )
        distributed.init()
        distributed.configure(self.ds_config)  # ZeRO-3: the backbone loads partitioned

        backbone, tokenizer = load_backbone(cfg.model)
        self.tokenizer = tokenizer
        # g's initialisation must not depend on what consumed the RNG before (resume)
        torch.manual_seed(cfg.train.seed)
        adapter = cfg.adapter
        if self.method.gradient == "exact":
            adapter = dataclasses.replace(adapter, gradient="exact")
        self.model = SAPTModel(
            backbone,
            adapter,
            n_slots=n_slots,
            routing=self.method.routing,
            dtype=torch_dtype(cfg.model.dtype),
            generator_slot=self.method.replay == "arm" and cfg.replay.kind == "generative",
        )
        if self.method.orthogonal:
            self.model.olora = (cfg.olora.lambda_1, cfg.olora.lambda_2)
        if cfg.model.gradient_checkpointing:
            self.model.gradient_checkpointing_enable()
        self.enc = self._encode(tokenizer, tasks)
        progress["tasks"] = names
        if progress["completed"] > 0:
            log.info("resuming after %d finished task(s)", progress["completed"])
            load_blocks(self.model, self.state.blocks)

        stages = 1 if self.method.joint else len(tasks)
        for i in range(progress["completed"], stages):
            self._stage(i, progress)
            # a signal that came during evaluation / pseudo-samples: stop before the next task
            if i + 1 < stages and preemption.stop_requested():
                self._stop(f"after task {i + 1}/{stages} (its checkpoint is saved)")
        # every rank: the gathers inside save_blocks are collective under ZeRO-3
        save_blocks(
            self.model,
            self.out / "blocks",
            self._block_names(stages - 1),
            provenance=progress.get("provenance"),
            run_config=to_dict(cfg),
        )
        distributed.finish()
        self.state.mark_finished()
        progress["finished"] = True
        results = write_report(self.out, cfg, progress)
        self.tracker.log_final(self._global_step(progress), results, self.out / "metrics")
        return results

    def _block_names(self, i: int) -> list[str]:
        names = [e.data.name for e in self.enc]
        if self.method.joint:
            return [f"{self.method.name}:" + "+".join(names)]
        if self.model.n_slots == 1:
            return [names[i]]
        return names[: i + 1]

    def _stage(self, i: int, progress: dict) -> None:
        """Task ``i``, top to bottom (for ``mtl``: the one stage on every task)."""
        slot = self._start_task(i)
        job = self._block_job(i, progress)
        losses = self._train_with_checkpoints(i, job, progress)
        self.model.file_current()  # block (and key) -> slot of the banks
        progress["losses"][self.enc[i].data.name] = losses
        if self.method.trains_router:
            self._attention_target(i, slot)
            self._pseudo_samples(i, slot, progress)
        row, routing = self._evaluate(i)
        self._file_task(i, slot, progress, row, routing, losses)

    # ------------------------------------------------------------------ one task's steps
    def _start_task(self, i: int) -> int:
        """Make task i's slot current: a fresh block (seeded by task) or the kept one; SAPT
        with a centered router input adds the task's mean pooled prompt to the center."""
        cfg, model = self.cfg, self.model
        slot = 0 if model.n_slots == 1 else i
        # a fresh block's initialisation is a function of (seed, task), whatever ran before
        torch.manual_seed(cfg.train.seed + 1000 * i)
        model.start_task(slot, fresh=not (self.method.keeps_block and i > 0))
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
        of earlier tasks for ``replay``), the ARM batches (SAPT, from task 2 on) and the
        trainable tensors (the block; for SAPT also its key and the query network)."""
        cfg, method = self.cfg, self.method
        name = self.enc[i].data.name
        label = f"task {i + 1}/{len(self.enc)} {name}"
        examples = list(self.enc[i].train)
        replay = None
        t = cfg.train
        epochs, max_steps, lr, reflection = t.epochs, t.max_steps, t.lr, True
        ov = cfg.per_task.get(name) if not method.joint else None
        if ov is not None:
            if ov.epochs is not None:
                epochs, max_steps = ov.epochs, None
            max_steps = ov.max_steps if ov.max_steps is not None else max_steps
            lr = ov.lr if ov.lr is not None else lr
            reflection = ov.reflection if ov.reflection is not None else True
            log.info(
                "%s: per-task settings: %s",
                name,
                ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(ov).items() if v is not None),
            )
        if method.joint:
            examples = [ex for e in self.enc for ex in e.train]
            label = f"{method.name} ({len(self.enc)} tasks)"
        elif method.replay == "real" and i > 0:
            examples += self._real_replay_examples(i)
        elif method.replay == "arm" and i > 0 and cfg.replay.kl_ratio > 0 and reflection:
            samples = {j: self._load_pseudo(j, progress) for j in range(i)}
            replay = ReplayBatches(
                self.tokenizer,
                samples,
                cfg.data.template,
                cfg.data.max_source_length,
                cfg.train.micro_batch_size,
                cfg.train.seed,
                cfg.data.truncation,
            )
        if method.replay == "arm" and i > 0:  # said per task: the released recipe varies it
            if replay is not None:
                log.info("%s: attentive reflection on, over %d earlier task(s)", label, i)
            else:
                why = "replay.kl_ratio=0" if reflection else f"per_task.{name}.reflection=false"
                log.info("%s: attentive reflection off (%s)", label, why)
        params = self.model.named_adapter_params()
        if not method.trains_router:
            params = {n: p for n, p in params.items() if not n.startswith("router.")}
        return BlockJob(
            name=label,
            examples=examples,
            params=params,
            steps=num_steps(
                len(examples),
                epochs,
                t.micro_batch_size,
                t.grad_accum,
                max_steps,
                distributed.world_size(),
            ),
            seed=t.seed + 1000 * i,
            lr=lr,
            replay=replay,
            kl_ratio=cfg.replay.kl_ratio,
            router_lr=t.router_lr,
        )

    def _train_with_checkpoints(self, i: int, job: BlockJob, progress: dict) -> list:
        """Train task i's block from its step checkpoint if there is one; after each step:
        keep the best dev block (``train.select_best``), a step checkpoint every
        ``train.checkpoint_every`` steps and at a stop request, the routing trajectory and
        the tracker's step record; a diverged run keeps its last good step."""
        cfg, t = self.cfg, self.cfg.train
        task, params = self.enc[i], job.params
        resume, best = self.state.load_step(i)
        offset = self._global_step(progress)
        per_epoch = num_steps(
            len(job.examples), 1, t.micro_batch_size, t.grad_accum, None, distributed.world_size()
        )
        select_every = per_epoch * t.eval_every_epochs if t.select_best else 0
        every_r = cfg.eval.routing_every if self.method.trains_router else 0

        def trajectory(step: int) -> dict[str, float]:
            """Mean weight of each seen task's dev inputs on its own block, at ``step``."""
            if not every_r or (step % every_r and step != job.steps):
                return {}
            point = self._routing_point(i)
            self._write_trajectory(i, offset + step, point, step, final=step == job.steps)
            return {
                f"routing_own/{self.enc[j].data.name}": point[self.enc[j].data.name][j]
                for j in range(i + 1)
            }

        def on_step(step: int, snapshot) -> None:
            nonlocal best
            if select_every and (step % select_every == 0 or step == job.steps):
                best = self._keep_if_best(task, step, params, best)
            every = t.checkpoint_every
            saved = bool(every and step % every == 0 and step < job.steps)
            if saved:
                self.state.save_step(i, snapshot(), best)
            if preemption.stop_requested():
                if not saved:
                    self.state.save_step(i, snapshot(), best)
                self._stop(f"at step {step}/{job.steps} of {job.name}")

        log_step = None
        if self.tracker.enabled or every_r:
            # every rank calls this at the same point after each step (the trajectory's
            # embedding passes are collective under ZeRO-3); rank 0 alone tracks
            def log_step(step: int, stats: dict) -> None:
                extra = trajectory(step)
                if self.tracker.enabled:
                    self.tracker.log_step(offset + step, {**stats, **extra, "task": i + 1})

        def on_diverge(last_good) -> None:  # exit 3, resumable from the last good step
            self.state.save_step(i, last_good, best)

        losses = self._train(
            job, resume=resume, on_step=on_step, log_step=log_step, on_diverge=on_diverge
        )
        if not getattr(self, "_sharding_written", False):
            self._write_sharding()
        if best is not None and best["step"] != job.steps:
            log.info(
                "%s: keeping the block of step %d (dev %.2f)",
                task.data.name,
                best["step"],
                best["score"],
            )
            with torch.no_grad(), distributed.gathered(list(params.values()), modify=True):
                for name, p in params.items():
                    p.copy_(best["params"][name].to(p))
        return losses

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
        self._make_pseudo(i)
        if distributed.is_main_process():  # progress.json (checksummed) keeps it
            sums = progress.setdefault("pseudo_sha256", {})
            sums[self.enc[i].data.name] = sha256_file(self._pseudo_path(i))
        self.model.start_task(slot, fresh=False)  # the generator took the trainable block

    def _file_task(
        self, i: int, slot: int, progress: dict, row: list, routing: dict, losses: list
    ) -> None:
        """Row i of the matrix, the block's provenance, then blocks + progress in one atomic
        swap of state/blocks (the task boundary a later start resumes from)."""
        cfg, model, task = self.cfg, self.model, self.enc[i]
        offset = self._global_step(progress) - len(losses)
        progress["matrix"].append(row)
        progress["routing"].append(routing)
        progress["completed"] = i + 1
        record = self._provenance(i, slot, row, len(losses))
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
        pseudo = self._pseudo_path(i) if self.method.trains_router and not last else None
        names = [e.data.name for e in self.enc]
        self.tracker.log_task(offset + len(losses), i, names, progress["matrix"], routing, pseudo)

    # ------------------------------------------------------------------ routing dynamics
    def _routing_point(self, i: int) -> dict[str, list[float]]:
        """Mean routing weights (over slots ``0..i``) of each seen task's dev inputs."""
        pad = self.tokenizer.pad_token_id
        was_training = self.model.training
        router = self.model.router
        device = router.key.device
        out = {}
        with torch.no_grad():
            for j in range(i + 1):
                e = self.enc[j]
                if j not in self._dev_pooled:  # the embedding is frozen: pool once
                    self._dev_pooled[j] = pooled_prompts(
                        self.model, e.dev_prompts, pad, self.cfg.eval.batch_size
                    )
                u = self._dev_pooled[j].to(device=device, dtype=router.key.dtype)
                w = router(u).float()  # the module call: ZeRO-3 gathers g and the key
                out[e.data.name] = [round(float(x), 5) for x in w[:, : i + 1].mean(0)]
        self.model.train(was_training)
        return out

    def _write_trajectory(
        self, i: int, global_step: int, point: dict, step: int, final: bool
    ) -> None:
        """Add a point to ``metrics/routing_trajectory.json`` (and draw the ``.png`` at a
        task's end): the dev inputs' mean weights during training, keyed by (task, step),
        so a resumed run writes the same points again, never twice."""
        import json

        from sapt_dist.checkpoint.atomic import atomic_write_json
        from sapt_dist.outputs.report import plot_trajectory

        if not distributed.is_main_process():
            return
        path = self.out / "metrics" / "routing_trajectory.json"
        try:
            data = json.loads(path.read_text()) if path.is_file() else {}
        except (OSError, json.JSONDecodeError):
            data = {}  # a diagnostic file: a damaged one is started again
        name = self.enc[i].data.name
        data.setdefault(name, {})[str(step)] = {"global_step": global_step, "mean": point}
        data[name] = dict(sorted(data[name].items(), key=lambda kv: int(kv[0])))
        atomic_write_json(path, data)
        if final:
            plot_trajectory(data, [e.data.name for e in self.enc], path.with_suffix(".png"))

    def _write_sharding(self) -> None:
        """``metrics/sharding.json``: what each rank holds (collective; once per process)."""
        import json

        self._sharding_written = True
        reports = distributed.all_gather_objects(distributed.shard_report(self.model))
        if not distributed.is_main_process():
            return
        names = list(reports[0]["params"])
        backbone = [n for n in names if not reports[0]["params"][n]["train"]]
        summary = []
        for r in reports:
            full = sum(r["params"][n]["full"] for n in backbone)
            local = sum(r["params"][n]["local"] for n in backbone)
            summary.append(
                {
                    "rank": r["rank"],
                    "frozen_elements_full": full,
                    "frozen_elements_local": local,
                    "frozen_bytes_local": sum(r["params"][n]["bytes"] for n in backbone),
                    "trainable_bytes_local": sum(
                        r["params"][n]["bytes"] for n in names if r["params"][n]["train"]
                    ),
                    "replicated_buffer_bytes": r["buffer_bytes"],
                    "peak_rss_mb": round(r["peak_rss_mb"], 1),
                    **({"peak_gpu_mb": round(r["peak_gpu_mb"], 1)} if "peak_gpu_mb" in r else {}),
                }
            )
            log.info(
                "rank %d holds %d of %d frozen elements (%.1f%%), peak RSS %.0f MB",
                r["rank"],
                local,
                full,
                100 * local / max(1, full),
                r["peak_rss_mb"],
            )
        per_param = {n: [r["params"][n]["local"] for r in reports] for n in names}
        full = {n: reports[0]["params"][n]["full"] for n in names}
        trains = {n: reports[0]["params"][n]["train"] for n in names}
        out = {
            "world": reports[0]["world"],
            "zero_stage": reports[0]["zero_stage"],
            "ranks": summary,
            "params": {
                n: {"full": full[n], "local": per_param[n], "train": trains[n]} for n in names
            },
        }
        path = self.out / "metrics" / "sharding.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=1))

    def _provenance(self, i: int, slot: int, row: list[float | None], steps: int) -> dict:
        """Where block ``slot`` came from, recorded at the end of stage ``i``: its data
        (folder, split sizes, sha256 of the examples it learned from), the config, the
        library versions, the time, and row ``i`` of the accuracy matrix."""
        import datetime

        cfg, method = self.cfg, self.method
        learned = method.tasks_learned(i, len(self.enc))
        data = []
        for j in learned:
            t = self.enc[j].data
            data.append(
                {
                    "task": t.name,
                    "benchmark": t.benchmark,
                    "folder": str(t.source_dir) if t.source_dir else None,
                    "split_sizes": {s: len(t.splits[s]) for s in ("train", "dev", "test")},
                    "train_sha256": split_sha256(t, "train"),
                    "definition_from": t.definition_from,
                    "carved": t.carved,
                }
            )
        names = [e.data.name for e in self.enc]
        return {
            "slot": slot,
            "task": self._block_names(i)[slot],
            "stage": i,
            "method": method.name,
            "trained_at": datetime.datetime.now(datetime.timezone.utc).isoformat(
                timespec="seconds"
            ),
            "optimizer_steps": steps,
            "data": data,
            "scores_after": dict(zip(names, row, strict=True)),
            "metric": {e.data.name: e.data.metric for e in self.enc},
            "config": to_dict(cfg),
            "versions": library_versions(),
        }

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

    def _train(
        self, job: BlockJob, resume=None, on_step=None, log_step=None, on_diverge=None
    ) -> list[float | None]:
        cfg = self.cfg
        return train_block(
            self.model,
            job,
            cfg.train,
            cfg.model.dtype,
            self.tokenizer.pad_token_id,
            ds_config=self.ds_config,
            resume=resume,
            on_step=on_step,
            log_step=log_step,
            on_diverge=on_diverge,
        )

    # ------------------------------------------------------------------ replay
    def _pseudo_path(self, i: int) -> Path:
        return self.out / "pseudo" / f"{i:02d}_{self.enc[i].data.name}.jsonl"

    def _load_pseudo(self, j: int, progress: dict) -> list[dict]:
        """Task j's saved pseudo-samples, checked against the sha256 progress.json holds."""
        path = self._pseudo_path(j)
        want = (progress.get("pseudo_sha256") or {}).get(self.enc[j].data.name)
        if not path.is_file():
            raise StateDamagedError(
                f"{path}: missing; task {j + 1}'s pseudo-samples are replayed by every later "
                f"task and its generator is gone. Restore the file, or start a new output_dir"
            )
        if want is not None and sha256_file(path) != want:
            raise StateDamagedError(
                f"{path} does not match its sha256 in {self.state.progress_path} (edited or "
                f"damaged). Restore it, or start a new output_dir"
            )
        return load_jsonl(path)

    def _n_pseudo(self, task: TaskData) -> int:
        r = self.cfg.replay
        return n_pseudo(len(task.splits["train"]), r.ratio, r.min_samples, r.count_rounding)

    def _real_replay_examples(self, i: int) -> list[EncodedExample]:
        cfg, d = self.cfg, self.cfg.data
        out = []
        for j in range(i):
            task = self.enc[j].data
            rows = real_samples(task, self._n_pseudo(task), cfg.train.seed + j)
            out += [
                encode_train(
                    self.tokenizer,
                    format_prompt(d.template, r["definition"], r["input"], d.truncation),
                    r["output"],
                    d.max_source_length,
                    d.max_target_length,
                    eos=d.target_eos,
                )
                for r in rows
            ]
        return out

    def _make_pseudo(self, i: int) -> None:
        """Task i's pseudo-samples (generative: train the generator block, sample)."""
        cfg, model, task = self.cfg, self.model, self.enc[i].data
        path = self._pseudo_path(i)
        n = self._n_pseudo(task)
        seed = cfg.train.seed + 7919 * (i + 1)
        if cfg.replay.kind == "real":
            rows = real_samples(task, n, seed)
        else:
            d, r = cfg.data, cfg.replay
            examples = generator_examples(
                self.tokenizer, task, d.max_source_length, d.max_source_length
            )
            torch.manual_seed(seed)
            model.start_generator()
            t = cfg.train
            job = BlockJob(
                name=f"generator {task.name}",
                examples=examples,
                params={
                    n_: p
                    for n_, p in model.named_adapter_params().items()
                    if not n_.startswith("router.")
                },
                steps=num_steps(
                    len(examples),
                    r.gen_epochs,
                    t.micro_batch_size,
                    t.grad_accum,
                    r.gen_max_steps,
                    distributed.world_size(),
                ),
                seed=seed,
                lr=r.gen_lr,
                weights=model.generator_weights,
            )
            self._train(job)
            torch.manual_seed(seed)
            k = n * r.gen_candidates_per_sample
            prompt = encode_prompt(self.tokenizer, GEN_PROMPT, d.max_source_length)
            texts = generate_texts(
                model,
                self.tokenizer,
                [prompt] * k,
                cfg.eval.batch_size,
                r.gen_max_new_tokens,
                desc=f"pseudo-samples {task.name}",
                weights=model.generator_weights(k),
                do_sample=True,
                top_k=r.gen_top_k,
                repetition_penalty=r.gen_repetition_penalty,
            )
            rows = choose_pseudo(texts, task, n, seed, r.pseudo_definition)
        if distributed.is_main_process():
            save_jsonl(path, rows)
        log.info("%s: %d pseudo-samples (%s) -> %s", task.name, len(rows), cfg.replay.kind, path)

    # ------------------------------------------------------------------ evaluation
    def _evaluate(self, i: int) -> tuple[list[float | None], dict]:
        """Scores on the test splits of tasks 0..i (row i of the matrix) + routing."""
        cfg, model = self.cfg, self.model
        method = self.method
        n = len(self.enc)
        which = method.tasks_scored(i, n)
        row: list[float | None] = [None] * n
        routing_w: dict[int, torch.Tensor] = {}
        after = method.name if method.joint else f"{i:02d}_{self.enc[i].data.name}"
        for j in which:
            e = self.enc[j]
            preds = generate_texts(
                model,
                self.tokenizer,
                e.test_prompts,
                cfg.eval.batch_size,
                cfg.eval.max_new_tokens,
                desc=f"eval {e.data.name}",
            )
            row[j] = score_predictions(preds, e.test_refs, e.data.metric, cfg.eval.scoring)
            rows = [
                {"id": id_, "prediction": p, "references": refs}
                for id_, p, refs in zip(e.test_ids, preds, e.test_refs, strict=True)
            ]
            if method.trains_router:
                w = routing_weights(
                    model, e.test_prompts, self.tokenizer.pad_token_id, cfg.eval.batch_size
                )
                routing_w[j] = w[:, : i + 1]
                for r_, wr in zip(rows, w.tolist(), strict=True):
                    r_["weights"] = [round(x, 5) for x in wr[: i + 1]]
            if distributed.is_main_process():
                save_jsonl(
                    self.out / "predictions" / f"after_{after}" / f"{j:02d}_{e.data.name}.jsonl",
                    rows,
                )
            log.info("after %s: %s %s = %.2f", after, e.data.name, e.data.metric, row[j])
        return row, (routing_summary(routing_w) if routing_w else {})


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
    try:
        return ContinualRun(cfg).run()
    finally:
        unlock_run_folder(lock)
        if handler is not None:
            pkg.removeHandler(handler)
            handler.close()
