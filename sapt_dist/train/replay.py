"""Pseudo-samples for attentive reflection (and the real-sample buffer of ``replay``).

Generative (the paper's default): after task t, a generator block on the same frozen
backbone learns, from the bare prompt ``__gen__``, to write
``<task definition> __inp__ <task input>``; it samples candidates (top-k, repetition
penalty), keeps the well-formed ones (containing ``__inp__``), and ``ratio * |train_t|``
of them (at least ``min_samples``) become task t's pseudo-samples. A replayed prompt is
built with the normal task template from the generated definition and input. If the
generator writes too few well-formed candidates, the rest are filled with the task's own
definition and the generated text as the input (recorded per sample as ``well_formed``).

Real: a seeded choice of ``ratio * |train_t|`` real training inputs.

Either way the samples are saved per task as JSONL (``pseudo/<NN>_<task>.jsonl``), their
sha256 kept in the run's progress, and reused from there on resume
(:class:`PseudoSamples`).
"""

from __future__ import annotations

import json
import logging
import math
import random
from pathlib import Path

import torch

from sapt_dist import distributed
from sapt_dist.checkpoint.atomic import (
    UnreadableFileError,
    atomic_write_jsonl,
    check_shape,
    sha256_file,
)
from sapt_dist.checkpoint.run_state import StateDamagedError
from sapt_dist.config import RunConfig
from sapt_dist.data.tasks import (
    EncodedExample,
    TaskData,
    collate_prompts,
    encode_prompt,
    encode_train,
    format_prompt,
)
from sapt_dist.method.generation import generate_texts
from sapt_dist.method.model import SAPTModel
from sapt_dist.train.block import BlockJob, num_steps, train_block

__all__ = [
    "GEN_PROMPT",
    "INPUT_MARK",
    "PseudoSamples",
    "ReplayBatches",
    "generator_examples",
    "load_jsonl",
    "n_pseudo",
    "parse_generated",
    "real_samples",
]

log = logging.getLogger(__name__)

GEN_PROMPT = "__gen__"
INPUT_MARK = "__inp__"


def n_pseudo(n_train: int, ratio: float, minimum: int, rounding: str = "up") -> int:
    """How many samples a task of ``n_train`` examples keeps (2% of 1000 -> 20), at least
    ``minimum``. ``rounding`` (``replay.count_rounding``): ``up`` (160 -> 4; float noise
    ignored: 2% of 100 is 2) or ``down``: ``int(ratio * n_train)`` as the released scripts
    (160 -> 3)."""
    if rounding == "up":
        return max(minimum, math.ceil(ratio * n_train - 1e-9))
    if rounding == "down":
        return max(minimum, int(ratio * n_train))
    raise ValueError(f"rounding must be 'up' or 'down' (got {rounding!r})")


def generator_examples(tokenizer, task: TaskData, max_source: int, max_target: int):
    """The generator block's training set: ``__gen__`` -> ``definition __inp__ input``."""
    return [
        encode_train(
            tokenizer,
            GEN_PROMPT,
            f"{task.definition} {INPUT_MARK} {ex['input']}",
            max_source,
            max_target,
        )
        for ex in task.splits["train"]
    ]


def parse_generated(text: str) -> tuple[str, str] | None:
    """``(definition, input)`` of a well-formed generation, else ``None``."""
    if INPUT_MARK not in text:
        return None
    definition, _, inp = text.partition(INPUT_MARK)
    definition, inp = definition.strip(), inp.strip()
    if not inp:
        return None
    return definition, inp


def choose_pseudo(
    candidates: list[str], task: TaskData, n: int, seed: int, definition: str = "per_sample"
) -> list[dict]:
    """Keep ``n`` samples: well-formed candidates first (seeded choice), then fill-ins.

    ``definition`` (``replay.pseudo_definition``): ``per_sample`` keeps the definition each
    generation wrote (fill-ins: the task's); ``per_task`` gives every kept sample one
    definition, a seeded pick among the distinct non-empty definitions of all well-formed
    candidates (the task's own when there is none), as the released scripts sample one
    from the set of generated instructions.
    """
    rng = random.Random(seed)
    good, rest = [], []
    seen = set()
    for c in candidates:
        parsed = parse_generated(c)
        if parsed is not None and parsed not in seen:
            seen.add(parsed)
            good.append(
                {
                    "definition": parsed[0] or task.definition,
                    "input": parsed[1],
                    "well_formed": True,
                }
            )
        elif parsed is None and c.strip():
            rest.append({"definition": task.definition, "input": c.strip(), "well_formed": False})
    rng.shuffle(good)
    rng.shuffle(rest)
    chosen = (good + rest)[:n]
    if definition == "per_task":
        written = sorted({p[0] for c in candidates if (p := parse_generated(c)) and p[0]})
        one = random.Random(f"{seed}:definition").choice(written) if written else task.definition
        chosen = [{**c, "definition": one} for c in chosen]
    elif definition != "per_sample":
        raise ValueError(f"definition must be 'per_sample' or 'per_task' (got {definition!r})")
    if len(good) < n:
        log.warning(
            "%s: generator wrote %d well-formed pseudo-samples of %d wanted; %d filled in "
            "with the task definition and the generated text as input",
            task.name,
            len(good),
            n,
            len(chosen) - min(len(good), n),
        )
    return chosen


def real_samples(task: TaskData, n: int, seed: int) -> list[dict]:
    """``n`` real training examples (seeded), for the real buffer and ``replay``."""
    train = task.splits["train"]
    idx = random.Random(seed).sample(range(len(train)), min(n, len(train)))
    return [
        {
            "definition": task.definition,
            "input": train[i]["input"],
            "output": train[i]["outputs"][0],
            "real": True,
        }
        for i in idx
    ]


#: one pseudo-sample (a line of ``pseudo/<task>.jsonl``)
PSEUDO_SAMPLE = {"definition": str, "input": str, "output?": str}


def load_jsonl(path: Path) -> list[dict]:
    """The pseudo-samples of one file, each line's shape checked (:data:`PSEUDO_SAMPLE`)."""
    rows = []
    how = "delete the file and the run's state/step to make these pseudo-samples again"
    for i, line in enumerate(Path(path).read_text().splitlines()):
        if line.strip():
            try:
                row = json.loads(line)
            except (ValueError, RecursionError) as e:
                raise UnreadableFileError(f"{path}:{i + 1}: not valid JSON ({e}); {how}") from e
            rows.append(check_shape(row, PSEUDO_SAMPLE, f"{path}:{i + 1}", how))
    return rows


class ReplayBatches:
    """Micro-step -> the ARM batch: ``micro_batch`` pseudo-prompts of every earlier task.

    Deterministic in the micro-step (task j's samples are cycled in a seeded order), so
    resumed and uninterrupted runs replay the same batches.
    """

    def __init__(
        self,
        tokenizer,
        samples: dict[int, list[dict]],
        template: str,
        max_source: int,
        micro_batch: int,
        seed: int,
        truncation: str = "input",
    ) -> None:
        self.pad = tokenizer.pad_token_id
        self.micro_batch = micro_batch
        self.prompts: dict[int, list[list[int]]] = {}
        self.orders: dict[int, list[int]] = {}
        for slot, rows in sorted(samples.items()):
            if not rows:
                raise ValueError(f"no pseudo-samples for task slot {slot}: ARM needs at least one")
            self.prompts[slot] = [
                encode_prompt(
                    tokenizer,
                    format_prompt(template, r["definition"], r["input"], truncation),
                    max_source,
                )
                for r in rows
            ]
            order = list(range(len(rows)))
            random.Random(seed + slot).shuffle(order)
            self.orders[slot] = order

    @property
    def longest(self) -> int:
        """Tokens of the longest pseudo-prompt (graph mode pads every ARM batch to it)."""
        return max(len(p) for prompts in self.prompts.values() for p in prompts)

    def __call__(self, micro_step: int) -> dict[str, torch.Tensor]:
        ids, tasks = [], []
        for slot, prompts in self.prompts.items():
            order = self.orders[slot]
            for k in range(self.micro_batch):
                ids.append(prompts[order[(micro_step * self.micro_batch + k) % len(order)]])
                tasks.append(slot)
        batch = collate_prompts(ids, self.pad)
        return {
            "replay_input_ids": batch["input_ids"],
            "replay_attention_mask": batch["attention_mask"],
            "replay_task": torch.tensor(tasks, dtype=torch.long),
        }


class PseudoSamples:
    """A run's pseudo-samples (SAPT) and real-sample buffer (``replay``), by task index:
    where they live, making them after a task, and reading them back checked."""

    def __init__(self, cfg: RunConfig, out: Path, tasks: list[TaskData], tokenizer) -> None:
        self.cfg, self.out, self.tasks, self.tokenizer = cfg, Path(out), tasks, tokenizer

    def path(self, i: int) -> Path:
        return self.out / "pseudo" / f"{i:02d}_{self.tasks[i].name}.jsonl"

    def count(self, task: TaskData) -> int:
        r = self.cfg.replay
        return n_pseudo(len(task.splits["train"]), r.ratio, r.min_samples, r.count_rounding)

    def load(self, j: int, sums: dict[str, str], progress_path: Path) -> list[dict]:
        """Task j's saved pseudo-samples, checked against the sha256 the run's progress
        holds (``sums``: task name -> sha256, kept in ``progress_path``)."""
        path = self.path(j)
        want = sums.get(self.tasks[j].name)
        if not path.is_file():
            raise StateDamagedError(
                f"{path}: missing; task {j + 1}'s pseudo-samples are replayed by every later "
                f"task and its generator is gone. Restore the file, or start a new output_dir"
            )
        if want is not None and sha256_file(path) != want:
            raise StateDamagedError(
                f"{path} does not match its sha256 in {progress_path} (edited or "
                f"damaged). Restore it, or start a new output_dir"
            )
        return load_jsonl(path)

    def replay_batches(self, i: int, sums: dict[str, str], progress_path: Path) -> ReplayBatches:
        """The ARM batches of task i: the pseudo-samples of every earlier task."""
        cfg = self.cfg
        samples = {j: self.load(j, sums, progress_path) for j in range(i)}
        return ReplayBatches(
            self.tokenizer,
            samples,
            cfg.data.template,
            cfg.data.max_source_length,
            cfg.train.micro_batch_size,
            cfg.train.seed,
            cfg.data.truncation,
        )

    def real_examples(self, i: int) -> list[EncodedExample]:
        """``replay``: real samples of every task before i, encoded for training."""
        cfg, d = self.cfg, self.cfg.data
        out = []
        for j in range(i):
            task = self.tasks[j]
            rows = real_samples(task, self.count(task), cfg.train.seed + j)
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

    def make(self, i: int, model: SAPTModel, ds_config: dict | None) -> str | None:
        """Task i's pseudo-samples (generative: train the generator block on the task, then
        sample), written by rank 0; returns their sha256 there (None on other ranks).
        Every rank calls it (training and generation are collective)."""
        cfg, task = self.cfg, self.tasks[i]
        path = self.path(i)
        n = self.count(task)
        seed = cfg.train.seed + 7919 * (i + 1)
        if cfg.replay.kind == "real":
            rows = real_samples(task, n, seed)
        else:
            rows = self._generate(task, n, seed, model, ds_config)
        log.info("%s: %d pseudo-samples (%s) -> %s", task.name, len(rows), cfg.replay.kind, path)
        if not distributed.is_main_process():
            return None
        atomic_write_jsonl(path, rows)
        return sha256_file(path)

    def _generate(
        self, task: TaskData, n: int, seed: int, model: SAPTModel, ds_config: dict | None
    ) -> list[dict]:
        cfg, d, r, t = self.cfg, self.cfg.data, self.cfg.replay, self.cfg.train
        examples = generator_examples(
            self.tokenizer, task, d.max_source_length, d.max_source_length
        )
        torch.manual_seed(seed)
        model.start_generator()
        job = BlockJob(
            name=f"generator {task.name}",
            examples=examples,
            params={
                name: p
                for name, p in model.named_adapter_params().items()
                if not name.startswith("router.")
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
        train_block(model, job, t, cfg.model.dtype, self.tokenizer.pad_token_id, ds_config)
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
        return choose_pseudo(texts, task, n, seed, r.pseudo_definition)
