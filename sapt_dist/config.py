"""One typed config tree for a run, loaded from YAML with dotted command-line overrides.

Unknown keys, wrong types and impossible values fail here, naming the key (and the file),
before any model or data loads. The resolved tree is saved beside every run's outputs.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from sapt_dist.methods import METHODS

__all__ = [
    "AdapterConfig",
    "ConfigError",
    "DataConfig",
    "DistributedConfig",
    "EvalConfig",
    "ModelConfig",
    "ReplayConfig",
    "RunConfig",
    "SubspaceConfig",
    "GateConfig",
    "TaskSettings",
    "TrackingConfig",
    "TrainConfig",
    "load_config",
    "load_yaml",
    "to_dict",
]

#: a method's name: a row of the method table (``sapt_dist/methods.py``), nothing repeated here
MethodName = Literal[tuple(METHODS)]  # type: ignore[valid-type]


class ConfigError(ValueError):
    """A config problem, with the key (and file) that caused it."""


@dataclass
class ModelConfig:
    """The frozen backbone."""

    #: Folder of a Hugging Face causal LM or encoder-decoder (T5-style seq2seq LM; told apart
    #: by its config's ``is_encoder_decoder``), ``config.json`` + weights. Required unless
    #: ``builder`` is ``demo``.
    path: str | None = None
    #: ``pretrained``: load ``path`` with ``from_pretrained``. ``demo``: build (and cache) the
    #: tiny backbone (``demo_arch``) and tokenizer of the CPU demo, no network needed.
    builder: Literal["pretrained", "demo"] = "pretrained"
    #: Tokenizer folder; defaults to ``path``.
    tokenizer: str | None = None
    #: DANGEROUS. Let transformers import and run Python code that the model's or
    #: tokenizer's folder names (an ``auto_map`` in ``config.json`` / ``tokenizer_config.json``):
    #: that code runs with your permissions. ``false`` (default): such a folder is refused
    #: (exit 2) and every ``from_pretrained`` passes ``trust_remote_code=False``, so
    #: transformers never asks (in a batch job, whatever stdin holds would answer).
    trust_remote_code: bool = False
    #: Parameter / compute dtype of the backbone and adapters.
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    #: Quantize the frozen backbone to 4 bits with bitsandbytes (QLoRA-style): ``nf4`` or
    #: ``fp4``; compute and storage dtype are ``dtype`` (so ZeRO-3 can partition it).
    quantization: Literal["none", "nf4", "fp4"] = "none"
    #: Recompute activations in the backward pass (needed for 13B+ backbones).
    gradient_checkpointing: bool = False
    #: ``demo`` builder only: width and depth of the tiny backbone (``None``: the demo's
    #: 128 and 2), so a scaling study can compare tiny model sizes on a CPU.
    demo_hidden_size: int | None = None
    demo_layers: int | None = None
    #: ``demo`` builder only: ``llama`` (a decoder-only LLaMA-family model) or ``t5`` (a T5
    #: encoder-decoder, ``demo_layers`` encoder and as many decoder layers); both use the
    #: BPE tokenizer trained on the demo data.
    demo_arch: Literal["llama", "t5"] = "llama"


@dataclass
class AdapterConfig:
    """Per-task blocks (LoRA or soft prompts) and SAPT's shared attention."""

    #: The PET block of each task: ``lora`` (low-rank matrices on ``target_modules``) or
    #: ``prompt`` (a soft prompt of ``prompt_length`` virtual tokens prepended to the input
    #: embeddings; the attention mixes the prompts; no backbone weight changes).
    kind: Literal["lora", "prompt"] = "lora"
    #: Virtual tokens per prompt block (``kind: prompt``).
    prompt_length: int = 20

    #: Names of the linear layers to adapt (matched on the last component of the module
    #: path, e.g. ``q_proj`` adapts ``model.layers.*.self_attn.q_proj``; on a T5, ``q``
    #: adapts the q of the encoder's self-attention and the decoder's self- and
    #: cross-attention).
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    #: LoRA rank ``r`` of every block.
    rank: int = 4
    #: LoRA ``alpha``; the block's scale is ``alpha / rank``.
    alpha: float = 32.0
    #: Dropout on the LoRA path's input.
    dropout: float = 0.0
    #: Number of task slots, fixed at start. ``None``: the number of tasks in the sequence.
    n_slots: int | None = None
    #: Hidden width ``h`` of the query network.
    query_hidden: int = 100
    #: Attention temperature ``tau``. ``None``: ``sqrt(d)`` (d = embedding width).
    tau: float | None = None
    #: ``cut``: earlier blocks pass no gradient to hidden states (the paper). ``exact``: they do.
    gradient: Literal["cut", "exact"] = "cut"
    #: What the query network reads. ``none``: the max-pooled prompt embedding (the paper).
    #: ``tasks``: that minus the mean of the seen tasks' mean pooled training prompts,
    #: updated when a task starts. On a real model every max-pooled prompt shares one large
    #: component (|mean| ~7x the spread on SmolLM2) and the paper's routing collapses onto
    #: the first block; centering removes it (docs/ROUTING.md has the measurements).
    router_center: Literal["none", "tasks"] = "none"
    #: Initialisation of the query network's two linears: ``pytorch`` (nn.Linear's default,
    #: Kaiming-uniform) or ``normal``: N(0, 0.02), the released code's (its model's
    #: ``_init_weights`` with LLaMA-2's ``initializer_range``). ``g`` first learns at the
    #: second task, so this is where it starts from then.
    query_init: Literal["pytorch", "normal"] = "pytorch"
    #: The mixture the training forward of a task's block runs with (a method that trains
    #: the router: SAPT). ``attention``: the attention's weights over every active block
    #: (the paper's shared attentive learning). ``new_block``: one-hot on the new block,
    #: the earlier blocks weighted 0 (no reuse while learning), an ablation. The router
    #: learns to pick the new block from the ARM's loss with a one-hot target on the task's
    #: own inputs (``KL(onehot || w(x))``, weight ``replay.kl_ratio``, in ``arm_loss``)
    #: beside the ARM over pseudo-samples; the attention targets, selection at test time
    #: and everything else are unchanged. (A first version let the router learn from the
    #: task loss straight-through instead: it moved off the new block entirely, so it was
    #: no ablation; docs/BENCHMARKS.md.)
    learning_mixture: Literal["attention", "new_block"] = "attention"


@dataclass
class DataConfig:
    """Task data in the SuperNI / Long Sequence JSON format."""

    #: Folder holding one sub-folder per task (``<task>/{train,dev,test}.json``); a
    #: ``CL_Benchmark`` root works too (tasks are looked up under its benchmarks).
    #: ``demo``: the small data shipped inside the package.
    root: str = "demo"
    #: A named order (``superni_1``, ``superni_2``, ``long_3``, ``long_4``, ``demo``) or ``custom``.
    order: str = "demo"
    #: The task list when ``order`` is ``custom``; with a named order, an optional subset
    #: that keeps the order's sequence.
    tasks: list[str] = field(default_factory=list)
    #: Skip tasks of a named order that the data folder lacks (they are listed in the log).
    skip_missing_tasks: bool = True
    #: Prompt template; ``{definition}`` and ``{input}`` are filled in. Or the name of one in
    #: ``TEMPLATES``: ``superni`` (the default) or ``long_sequence``, the released Long
    #: Sequence loader's ``"{definition}\n{input}\nOutput: "`` (no newlines to type on a
    #: command line); the name is replaced by its text when the config loads.
    #: For a task with no instruction, a line holding only ``{definition}`` is left out,
    #: newline and all (as that loader does); a template without such a line needs one.
    template: str = (
        "Definition: {definition}\n\nNow complete the following example -\nInput: {input}\nOutput: "
    )
    #: Instruction file for tasks whose task files have no ``Definition``: a path or a file
    #: shipped in ``sapt_dist/data/instruction_files/`` (``long_sequence``), in the format of
    #: the released ``configs/instruction_config.json`` keyed by task name; a task's own
    #: ``Definition`` wins. ``None``: none.
    instructions: str | None = None
    #: Max prompt tokens (longer prompts are cut, see ``truncation``; counted).
    max_source_length: int = 1024
    #: A prompt longer than max_source_length loses: ``input`` the end of its input (the
    #: definition, the strongest routing cue, and the answer cue stay); ``right`` its end
    #: (the released SAPT code: the answer cue goes); ``left`` its start (the definition goes).
    truncation: Literal["input", "right", "left"] = "input"
    #: Max target tokens (longer targets are cut; counted).
    max_target_length: int = 50
    #: The end-of-sequence token of a training target: ``appended`` after the target is
    #: cut to max_target_length (a cut target still learns to stop), or ``cut_with_target``:
    #: appended first and cut with the target (the released collator: a target of
    #: max_target_length tokens or more has no EOS).
    target_eos: Literal["appended", "cut_with_target"] = "appended"
    #: Caps on examples per split (``None``: all).
    max_train: int | None = None
    max_dev: int | None = None
    max_test: int | None = None
    #: When a split file is missing, carve it from this split with a seeded split
    #: (``None``: a missing split is an error).
    carve_missing_from: Literal["train", "dev", "test"] | None = None
    #: Fraction of the source split taken when carving.
    carve_fraction: float = 0.1
    #: ``rouge`` (ROUGE-L x100), ``exact`` (exact match x100) or ``auto`` (by benchmark).
    metric: Literal["auto", "rouge", "exact"] = "auto"


#: ``data.template`` by name: the released pipelines' prompt templates
TEMPLATES = {
    "superni": DataConfig.template,
    "long_sequence": "{definition}\n{input}\nOutput: ",
}


@dataclass
class TrainConfig:
    """Optimisation of each task's block."""

    epochs: int = 1
    #: Fixed number of optimizer steps per task (overrides ``epochs`` when set).
    max_steps: int | None = None
    lr: float = 5e-5
    #: Learning rate of the shared attention (query network and keys); ``None``: ``lr``, as
    #: in the paper. A small random backbone's routing learns faster with a higher one.
    router_lr: float | None = None
    weight_decay: float = 0.0
    micro_batch_size: int = 2
    grad_accum: int = 4
    #: Sequences per optimizer step over all processes. When set it decides the
    #: accumulation: grad_accum = global_batch / (micro_batch_size x processes), which must
    #: divide (an error names the numbers), and ``grad_accum`` is ignored. The same run on
    #: 4 or 16 GPUs then takes the same optimizer steps. ``None``: ``grad_accum`` as given.
    global_batch: int | None = None
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = 0
    max_grad_norm: float | None = 1.0
    seed: int = 42
    #: Save a resumable checkpoint every N optimizer steps (0: only at task ends).
    checkpoint_every: int = 0
    #: CPU threads per process for torch's kernels (``torch.set_num_threads``); ``None``:
    #: torch's choice (OMP_NUM_THREADS, else the cores). The result of a CPU run depends on
    #: it (float sums split differently), so the CPU demo fixes it (docs/BENCHMARKS.md).
    threads: int | None = None
    #: Optimizer steps with a NaN / infinite loss or weights that are undone and skipped
    #: (their batch dropped) before the run stops; it stops with a checkpoint of the last
    #: good step (exit 3). A restart may raise it to step over a bad batch.
    nonfinite_tolerance: int = 0
    #: Evaluate on the current task's dev split every N epochs and keep the best block.
    select_best: bool = False
    eval_every_epochs: int = 5
    #: Graph mode of the training step (``sapt_dist/train/compile.py``): ``off``;
    #: ``graphs``: ``torch.compile(mode="reduce-overhead")``, forward and backward replayed
    #: as CUDA graphs (CUDA only); ``trace``: the same capture with eager kernels
    #: (``backend="aot_eager"``, any device: checks on a CPU that the step traces as one
    #: graph). Batches are padded to length buckets. Not with ZeRO-3, 4-bit backbones or
    #: gradient checkpointing (a config error says why).
    compile: Literal["off", "graphs", "trace"] = "off"


@dataclass
class ReplayConfig:
    """Attentive reflection (SAPT) and replay (the ``replay`` baseline)."""

    #: ``generative``: a generation block per task writes pseudo-inputs (the paper).
    #: ``real``: keep a buffer of real training inputs.
    kind: Literal["generative", "real"] = "generative"
    #: Pseudo-samples per task as a share of its training set (at least ``min_samples``).
    ratio: float = 0.02
    min_samples: int = 1
    #: ``ratio x n`` rounded ``up`` (every task keeps at least its share) or ``down``:
    #: ``int(ratio x n)``, the released scripts' count (samsum's 160: 4 vs 3).
    count_rounding: Literal["up", "down"] = "up"
    #: The definition a replayed pseudo-prompt is built with: ``per_sample``, the one its
    #: generation wrote; ``per_task``: one for all of a task's pseudo-samples, a seeded pick
    #: among the distinct definitions its generations wrote (the released scripts sample
    #: one). Fill-ins (too few well-formed generations) take it too.
    pseudo_definition: Literal["per_sample", "per_task"] = "per_sample"
    #: Weight of the ARM KL loss.
    kl_ratio: float = 1.0
    #: Generator block: epochs and learning rate.
    gen_epochs: int = 1
    gen_lr: float = 1e-3
    gen_max_steps: int | None = None
    gen_top_k: int = 20
    gen_repetition_penalty: float = 2.5
    gen_max_new_tokens: int = 128
    #: Candidates sampled per kept pseudo-sample (the paper samples one per training
    #: instance and keeps ``ratio`` of the well-formed ones).
    gen_candidates_per_sample: int = 4


@dataclass
class EvalConfig:
    max_new_tokens: int = 50
    batch_size: int = 8
    #: SAPT: every N optimizer steps, the mean routing weights of every seen task's dev
    #: inputs (metrics/routing_trajectory.{json,png}, W&B ``train/routing_own/<task>``);
    #: 0: off. Costs one embedding + pooling pass over the dev prompts.
    routing_every: int = 5
    #: Examples with several references: ``best`` scores the best of them (SuperNI's
    #: standard); ``released`` scores one (a fixed seeded pick per example, as the released
    #: SAPT code picks one at random) with its exact-match normalisation (every punctuation
    #: mark removed, not only at the ends). Training always uses the first reference.
    scoring: Literal["best", "released"] = "best"


@dataclass
class DistributedConfig:
    """How DeepSpeed shards the run (the process count comes from the launcher)."""

    #: DeepSpeed config: a JSON file, or the name of one in ``ds_configs/`` (``zero0``,
    #: ``zero2``, ``zero3``, ``zero3_offload``). ``None``: ZeRO stage 0.
    deepspeed_config: str | None = None
    #: Seconds a rank waits for a peer that has gone silent (process killed, node down,
    #: link cut) before it ends with a message naming that peer (exit 69); also the
    #: process group's collective timeout. A live but slow peer must never take this
    #: long: the default (30 min, torch's own) suits GPU clusters; tests use seconds.
    timeout_s: float = 1800.0


@dataclass
class TrackingConfig:
    """Experiment tracking (``sapt_dist.outputs.tracking``): one W&B run per continual-learning run,
    logged by rank 0 only. Never holds a secret: the API key comes from ``WANDB_API_KEY``
    or ``wandb login``, never from a config."""

    #: ``wandb``: track the run with Weights & Biases. ``none``: no tracking at all.
    backend: Literal["wandb", "none"] = "wandb"
    #: ``auto``: online when an API key is configured (``WANDB_API_KEY`` or ``wandb login``)
    #: and ``WANDB_MODE`` does not say otherwise, else offline (files to ``wandb sync``
    #: later). ``offline`` / ``online`` / ``disabled``: as W&B's own modes.
    mode: Literal["auto", "offline", "online", "disabled"] = "auto"
    #: W&B project and entity (team or user; ``None``: the key's default entity).
    project: str = "sapt-dist"
    entity: str | None = None
    #: Run group, e.g. the sweep or scaling study this run belongs to (``None``: none,
    #: or ``WANDB_RUN_GROUP``).
    group: str | None = None
    #: Job type (``None``: the method, e.g. ``sapt``, ``seq_lora``).
    job_type: str | None = None
    #: Display name (``None``: the run folder's name).
    name: str | None = None
    tags: list[str] = field(default_factory=list)
    #: Folder W&B writes into (as ``<dir>/wandb/``); ``None``: the run folder.
    dir: str | None = None
    #: Log the per-step metrics every N optimizer steps.
    log_every: int = 1
    #: Rows of the pseudo-sample table logged per task.
    pseudo_examples: int = 20


@dataclass
class OLoRAConfig:
    """O-LoRA (``method=olora``, Wang et al. 2023): the loss adds ``lambda_1`` x the sum
    over adapted layers of ``|A_old A_new^T|`` (every entry, every earlier block) and
    ``lambda_2`` x the sum of the new block's parameter 2-norms, as its released trainer.
    Defaults: lambda_1 0.5 (its scripts); lambda_2 0 (set it to the script you compare
    with). Its released scripts change both per task: ``per_task.<task>.olora_lambda_1`` /
    ``olora_lambda_2`` (the ``*_olora`` presets carry its Long Sequence values)."""

    lambda_1: float = 0.5
    lambda_2: float = 0.0


@dataclass
class SubspaceConfig:
    """InfLoRA's input-subspace memory (``method=inflora``, ``gainlora``; the T5 code of
    liangyanshuo/gainlora, ``src/cl_trainer_gainlora_inflora.py`` / ``src/cl_trainer_inflora.py``).

    After task t the memory of each adapted layer takes in the directions of the task's
    inputs that hold a fraction ``threshold_t`` of their energy (DualGPM, with
    ``threshold_t = threshold + (1 - threshold) * t / total_tasks``, t counted from 0).
    The inputs are read from the first ``max_batches`` batches of ``batch_size`` training
    examples, once before the task (the new block's A) and once after it (the memory).
    Defaults: ``--threshold 0.995`` in every ``gen_script_*_t5_inflora.sh`` (SuperNI
    orders 1-2, Long Sequence orders 3-4); 1001 batches (``if step > 1000: break``); the
    released code hard-codes ``total_sessions = 15``, the length of every paper order."""

    #: energy fraction of a task's inputs the memory keeps after the first task, in (0, 1]
    threshold: float = 0.995
    #: the task count of the threshold's schedule (None: the run's number of tasks)
    total_tasks: int | None = None
    #: batches of training examples read per pass (None: all of them)
    max_batches: int | None = 1001
    #: examples per batch of those passes (None: ``train.micro_batch_size``)
    batch_size: int | None = None


@dataclass
class GateConfig:
    """GainLoRA's gates (``method=gainlora``; liangyanshuo/gainlora's T5 code,
    ``src/t5_large.py``, ``src/cl_trainer_gainlora_inflora.py``).

    A gate network per task, ``Linear(d -> adapter.query_hidden) -> SiLU -> Linear(->
    d) -> SiLU`` (no biases; ``--mlp_hidden_dim 100``, the same key as SAPT's query width),
    and a key; the branch weight is ``|2 sigmoid(4 cos(g_t(u), k_t)) - 1|``. After each task
    three memories take in the task's gate inputs, hidden activations and outputs
    (DualGPM, as ``subspace.*``, with ``threshold`` on the same schedule and the same
    ``subspace.total_tasks`` / ``max_batches`` / ``batch_size`` passes); after every
    optimizer step of a later task the change of the gate weights and key is projected
    off them. Default: ``--transthreshold 0.995`` in every
    ``gen_script_*_t5_gainlora_inflora.sh``."""

    #: energy fraction of a task's gate inputs / hiddens / outputs the memories keep after
    #: the first task, in (0, 1]
    threshold: float = 0.995
    #: project each step's change of the gate off the old tasks' subspaces (false: an
    #: ablation, the new gate then drifts on old inputs)
    project: bool = True


@dataclass
class TaskOverride:
    """Settings of one task that differ from the run's (``per_task.<task name>``): the
    released Long Sequence script trains cb, copa, boolq, imdb, dbpedia and multirc a fixed
    number of steps with the reflection off. Unset fields follow the run's."""

    #: Epochs of this task (then the run's ``train.max_steps`` does not apply to it).
    epochs: int | None = None
    #: Optimizer steps of this task (wins over ``epochs``).
    max_steps: int | None = None
    lr: float | None = None
    #: ``false``: no attentive reflection (ARM) while this task trains.
    reflection: bool | None = None
    #: O-LoRA's ``olora.lambda_1`` / ``olora.lambda_2`` while this task trains (its released
    #: scripts set them per task); methods without O-LoRA's penalty ignore them.
    olora_lambda_1: float | None = None
    olora_lambda_2: float | None = None


@dataclass(frozen=True)
class TaskSettings:
    """What one task trains with: the run's ``train`` settings with its ``per_task`` entry
    applied (:meth:`RunConfig.for_task`)."""

    epochs: int
    max_steps: int | None
    lr: float
    #: attentive reflection (ARM) while this task trains
    reflection: bool
    #: O-LoRA's two penalty weights while this task trains (``olora`` unless overridden)
    olora_lambda_1: float
    olora_lambda_2: float
    #: the ``per_task`` fields that were set for this task (name -> value), for the log
    overridden: dict[str, Any]


@dataclass
class RunConfig:
    """A whole continual-learning run."""

    #: ``sapt`` or a baseline: ``seq_lora``, ``inc_lora``, ``replay``, ``mtl``, ``single_task``.
    method: MethodName = "sapt"
    #: Run folder; outputs, checkpoints and logs go here.
    output_dir: str = "runs/demo"
    #: Single-task run folder whose scores give ``b_j`` for FWT (FWT is missing without it).
    single_task_run: str | None = None
    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    #: Per-task settings by task name (see :class:`TaskOverride`).
    per_task: dict[str, TaskOverride] = field(default_factory=dict)
    #: O-LoRA's regularisers (``method=olora`` only).
    olora: OLoRAConfig = field(default_factory=OLoRAConfig)
    #: InfLoRA's input-subspace memory (``method=inflora`` and ``gainlora``).
    subspace: SubspaceConfig = field(default_factory=SubspaceConfig)
    #: GainLoRA's gates and their subspace memories (``method=gainlora`` only).
    gate: GateConfig = field(default_factory=GateConfig)

    def for_task(self, name: str) -> TaskSettings:
        """The settings task ``name`` trains with: ``per_task.<name>`` over ``train``
        (its ``epochs`` replaces the run's ``max_steps``; its ``max_steps`` wins over
        both; its ``olora_lambda_*`` over ``olora.lambda_*``). A joint method's one stage has
        no per-task settings."""
        t, o = self.train, self.olora
        ov = None if METHODS[self.method].joint else self.per_task.get(name)
        if ov is None:
            return TaskSettings(t.epochs, t.max_steps, t.lr, True, o.lambda_1, o.lambda_2, {})
        epochs, max_steps = t.epochs, t.max_steps
        if ov.epochs is not None:
            epochs, max_steps = ov.epochs, None
        if ov.max_steps is not None:
            max_steps = ov.max_steps
        return TaskSettings(
            epochs=epochs,
            max_steps=max_steps,
            lr=ov.lr if ov.lr is not None else t.lr,
            reflection=ov.reflection if ov.reflection is not None else True,
            olora_lambda_1=o.lambda_1 if ov.olora_lambda_1 is None else ov.olora_lambda_1,
            olora_lambda_2=o.lambda_2 if ov.olora_lambda_2 is None else ov.olora_lambda_2,
            overridden={k: v for k, v in dataclasses.asdict(ov).items() if v is not None},
        )

    def validate(self) -> None:
        """Impossible values, named by key (a ``data.template`` name becomes its text)."""
        t = self.data.template
        if t in TEMPLATES:
            self.data.template = TEMPLATES[t]
        elif "{input}" not in t:
            raise ConfigError(
                f"config key 'data.template': {t!r} is neither a template (it has no "
                f"'{{input}}') nor the name of one ({', '.join(sorted(TEMPLATES))})"
            )
        checks = [
            (self.adapter.rank >= 1, "adapter.rank", "must be >= 1"),
            (self.adapter.alpha > 0, "adapter.alpha", "must be > 0"),
            (0.0 <= self.adapter.dropout < 1.0, "adapter.dropout", "must be in [0, 1)"),
            (
                self.adapter.kind == "prompt" or len(self.adapter.target_modules) > 0,
                "adapter.target_modules",
                "must not be empty",
            ),
            (self.adapter.prompt_length >= 1, "adapter.prompt_length", "must be >= 1"),
            (
                self.adapter.kind in METHODS[self.method].block_kinds,
                "adapter.kind",
                f"does not fit method {self.method!r}, which works with "
                f"{' or '.join(repr(k) for k in METHODS[self.method].block_kinds)} blocks",
            ),
            (
                self.adapter.n_slots is None or self.adapter.n_slots >= 1,
                "adapter.n_slots",
                "must be >= 1",
            ),
            (self.adapter.query_hidden >= 1, "adapter.query_hidden", "must be >= 1"),
            (0.0 < self.subspace.threshold <= 1.0, "subspace.threshold", "must be in (0, 1]"),
            (0.0 < self.gate.threshold <= 1.0, "gate.threshold", "must be in (0, 1]"),
            (
                self.subspace.total_tasks is None or self.subspace.total_tasks >= 1,
                "subspace.total_tasks",
                "must be >= 1",
            ),
            (
                self.subspace.max_batches is None or self.subspace.max_batches >= 1,
                "subspace.max_batches",
                "must be >= 1",
            ),
            (
                self.subspace.batch_size is None or self.subspace.batch_size >= 1,
                "subspace.batch_size",
                "must be >= 1",
            ),
            (
                self.model.demo_hidden_size is None
                or (self.model.demo_hidden_size >= 8 and self.model.demo_hidden_size % 4 == 0),
                "model.demo_hidden_size",
                "must be a multiple of 4 (the attention heads), >= 8",
            ),
            (
                self.model.demo_layers is None or self.model.demo_layers >= 1,
                "model.demo_layers",
                "must be >= 1",
            ),
            (self.adapter.tau is None or self.adapter.tau > 0, "adapter.tau", "must be > 0"),
            (self.train.epochs >= 1, "train.epochs", "must be >= 1"),
            (
                self.train.max_steps is None or self.train.max_steps >= 1,
                "train.max_steps",
                "must be >= 1",
            ),
            (self.train.lr > 0, "train.lr", "must be > 0"),
            (
                self.train.router_lr is None or self.train.router_lr > 0,
                "train.router_lr",
                "must be > 0",
            ),
            (self.train.micro_batch_size >= 1, "train.micro_batch_size", "must be >= 1"),
            (self.train.grad_accum >= 1, "train.grad_accum", "must be >= 1"),
            (self.train.checkpoint_every >= 0, "train.checkpoint_every", "must be >= 0"),
            (
                self.train.threads is None or self.train.threads >= 1,
                "train.threads",
                "must be >= 1 or null",
            ),
            (self.train.nonfinite_tolerance >= 0, "train.nonfinite_tolerance", "must be >= 0"),
            (
                self.train.global_batch is None
                or (
                    self.train.global_batch >= 1
                    and self.train.global_batch % self.train.micro_batch_size == 0
                ),
                "train.global_batch",
                f"must be a positive multiple of train.micro_batch_size "
                f"({self.train.micro_batch_size}) or null",
            ),
            (self.train.eval_every_epochs >= 1, "train.eval_every_epochs", "must be >= 1"),
            (0.0 < self.data.carve_fraction < 1.0, "data.carve_fraction", "must be in (0, 1)"),
            (self.data.max_source_length >= 8, "data.max_source_length", "must be >= 8"),
            (self.data.max_target_length >= 1, "data.max_target_length", "must be >= 1"),
            (0.0 <= self.replay.ratio <= 1.0, "replay.ratio", "must be in [0, 1]"),
            (self.replay.min_samples >= 1, "replay.min_samples", "must be >= 1"),
            (self.replay.gen_epochs >= 1, "replay.gen_epochs", "must be >= 1"),
            (self.replay.gen_lr > 0, "replay.gen_lr", "must be > 0"),
            (self.replay.gen_top_k >= 1, "replay.gen_top_k", "must be >= 1"),
            (self.replay.gen_max_new_tokens >= 1, "replay.gen_max_new_tokens", "must be >= 1"),
            (
                self.replay.gen_candidates_per_sample >= 1,
                "replay.gen_candidates_per_sample",
                "must be >= 1",
            ),
            (
                self.replay.gen_max_steps is None or self.replay.gen_max_steps >= 1,
                "replay.gen_max_steps",
                "must be >= 1",
            ),
            (self.train.warmup_steps >= 0, "train.warmup_steps", "must be >= 0"),
            (self.train.weight_decay >= 0, "train.weight_decay", "must be >= 0"),
            (
                self.data.max_train is None or self.data.max_train >= 1,
                "data.max_train",
                "must be >= 1",
            ),
            (self.data.max_dev is None or self.data.max_dev >= 1, "data.max_dev", "must be >= 1"),
            (
                self.data.max_test is None or self.data.max_test >= 1,
                "data.max_test",
                "must be >= 1",
            ),
            (self.replay.kl_ratio >= 0, "replay.kl_ratio", "must be >= 0"),
            (self.olora.lambda_1 >= 0, "olora.lambda_1", "must be >= 0"),
            (self.olora.lambda_2 >= 0, "olora.lambda_2", "must be >= 0"),
            (self.eval.batch_size >= 1, "eval.batch_size", "must be >= 1"),
            (self.eval.max_new_tokens >= 1, "eval.max_new_tokens", "must be >= 1"),
            (self.eval.routing_every >= 0, "eval.routing_every", "must be >= 0"),
            (
                self.model.builder == "demo" or bool(self.model.path),
                "model.path",
                "is required (a Hugging Face model folder) unless model.builder is 'demo'",
            ),
            (bool(self.tracking.project.strip()), "tracking.project", "must not be empty"),
            (self.tracking.log_every >= 1, "tracking.log_every", "must be >= 1"),
            (self.tracking.pseudo_examples >= 0, "tracking.pseudo_examples", "must be >= 0"),
            (
                self.data.order == "custom" or not self.data.order.startswith("custom"),
                "data.order",
                "use 'custom' with data.tasks",
            ),
            (
                self.data.order != "custom" or len(self.data.tasks) > 0,
                "data.tasks",
                "must list the tasks when data.order is 'custom'",
            ),
        ]
        for ok, key, msg in checks:
            if not ok:
                raise ConfigError(f"config key '{key}' {msg} (got {_get(self, key)!r})")
        for key in _PATH_KEYS:
            value = _get(self, key)
            if isinstance(value, str) and value.startswith("~"):
                try:
                    Path(value).expanduser()
                except RuntimeError:  # ~name of no user: pathlib cannot expand it
                    raise ConfigError(
                        f"config key '{key}': {_clip(value)!r} names the home folder of no "
                        f"user on this machine"
                    ) from None
        for key, value in _floats(self):
            if not math.isfinite(value):
                raise ConfigError(f"config key '{key}' must be a finite number (got {value!r})")
        for k, task in enumerate(self.data.tasks):
            if not _plain_name(task):
                raise ConfigError(
                    f"config key 'data.tasks[{k}]': {task!r} is not a task folder name (no "
                    f"path separators, '..', leading '.' or '~'): task names become file "
                    f"names inside the run folder"
                )
        for name, ov in self.per_task.items():
            for field_, v in (("epochs", ov.epochs), ("max_steps", ov.max_steps)):
                if v is not None and v < 1:
                    raise ConfigError(f"config key 'per_task.{name}.{field_}' must be >= 1")
            if ov.lr is not None and not ov.lr > 0:
                raise ConfigError(f"config key 'per_task.{name}.lr' must be > 0")
            for field_, v in (
                ("olora_lambda_1", ov.olora_lambda_1),
                ("olora_lambda_2", ov.olora_lambda_2),
            ):
                if v is not None and v < 0:
                    raise ConfigError(f"config key 'per_task.{name}.{field_}' must be >= 0")
        if self.adapter.learning_mixture != "attention" and not METHODS[self.method].trains_router:
            raise ConfigError(
                f"config key 'adapter.learning_mixture' is {self.adapter.learning_mixture!r}: "
                f"method {self.method!r} has no learned attention mixture to change (only a "
                f"method that trains the router, as sapt, has one)"
            )
        if self.per_task and METHODS[self.method].joint:
            raise ConfigError(
                f"config key 'per_task': {self.method} trains one stage on every task at once; "
                f"per-task settings do not apply to it"
            )
        try:
            ds = resolve_ds_config(self.distributed.deepspeed_config)
        except ValueError as e:
            raise ConfigError(f"config key 'distributed.deepspeed_config': {e}") from e
        self._check_compile(ds.get("zero_optimization", {}).get("stage", 0))

    def _check_compile(self, zero_stage: int) -> None:
        """Where ``train.compile`` (graph mode, ``sapt_dist/train/compile.py``) cannot apply."""
        mode = self.train.compile
        if mode == "off":
            return
        why = None
        if zero_stage == 3:
            why = (
                "ZeRO-3 gathers and releases parameters in hooks around every module's "
                "forward and backward, which dynamo cannot trace into one graph nor a CUDA "
                "graph replay; use distributed.deepspeed_config=zero0 or zero2 (one GPU: zero0)"
            )
        elif self.model.quantization != "none":
            why = (
                "4-bit backbones (bitsandbytes kernels) are not traced; use model.quantization=none"
            )
        elif self.model.gradient_checkpointing:
            why = (
                "gradient checkpointing recomputes layers in backward, outside the captured "
                "graphs; use model.gradient_checkpointing=false"
            )
        if why is not None:
            raise ConfigError(
                f"config key 'train.compile' is {mode!r}: {why}, or train.compile=off"
            )


#: keys that hold a path (checked for a ``~user`` that does not exist)
_PATH_KEYS = (
    "output_dir",
    "model.path",
    "model.tokenizer",
    "data.root",
    "data.instructions",
    "distributed.deepspeed_config",
    "tracking.dir",
)


def _floats(obj: Any, prefix: str = "") -> list[tuple[str, float]]:
    """Every float value of the config tree, with its dotted key."""
    out = []
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v):
            out += _floats(v, f"{prefix}{f.name}.")
        elif isinstance(v, dict):
            for k, sub in v.items():
                if dataclasses.is_dataclass(sub):
                    out += _floats(sub, f"{prefix}{f.name}.{k}.")
        elif isinstance(v, float):
            out.append((prefix + f.name, v))
    return out


def _plain_name(name: str) -> bool:
    """A task name that stays one path component wherever it is joined to a folder."""
    return (
        bool(name)
        and name.strip() == name
        and not any(c in name for c in "/\\\0")
        and not name.startswith((".", "~"))
    )


def _get(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def to_dict(cfg: Any) -> dict:
    """The config tree as plain data (for YAML/JSON and W&B)."""
    return dataclasses.asdict(cfg)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against annotation ``tp``; return it (ints widen to float)."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(
            f"config key '{key}': expected {_type_name(tp)}, got {_clip(repr(value))}"
        )
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(
                f"config key '{key}': {_clip(repr(value))} is not one of {list(get_args(tp))}"
            )
        return value
    if origin is dict:
        key_tp, val_tp = get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a mapping, got {_clip(repr(value))}")
        return {
            _coerce(k, key_tp, f"{key} name"): _coerce(v, val_tp, f"{key}.{k}")
            for k, v in value.items()
        }
    if origin is list:
        (item_tp,) = get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}': expected a list, got {_clip(repr(value))}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a mapping, got {_clip(repr(value))}")
        return _build(tp, value, key + ".")
    if tp is float:
        if isinstance(value, str) and re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+", value):
            value = float(value)  # YAML 1.1 reads 1e-4 (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}': expected a number, got {_clip(repr(value))}")
        try:
            return float(value)
        except OverflowError:
            raise ConfigError(f"config key '{key}': {_clip(str(value))} is too large") from None
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}': expected an integer, got {_clip(repr(value))}")
        if not -(2**63) <= value < 2**63:
            raise ConfigError(f"config key '{key}': {_clip(str(value))} is out of range")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}': expected true/false, got {_clip(repr(value))}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}': expected a string, got {_clip(repr(value))}")
        if "\0" in value:  # never in a name, path or text; the OS refuses it in paths
            raise ConfigError(f"config key '{key}': contains a NUL character")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:  # a lone surrogate ("\ud800"): no text can hold it
            raise ConfigError(
                f"config key '{key}': not valid Unicode text ({e.reason} at character {e.start})"
            ) from None
        return value
    raise ConfigError(f"config key '{key}': unsupported type {tp}")


def _build(cls: type, data: dict, prefix: str = "") -> Any:
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names, key=str)  # YAML keys may be numbers too
    if unknown:
        raise ConfigError(
            f"unknown config key '{prefix}{unknown[0]}' (known keys under "
            f"'{prefix.rstrip('.') or '<root>'}': {sorted(names)})"
        )
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
    return cls(**kwargs)


def _hints(cls: type) -> dict[str, Any]:
    """The type hints of a config dataclass (resolved once: ``get_type_hints`` evaluates
    every annotation string, and ``per_task`` builds one dataclass per task)."""
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


_HINTS: dict[type, dict[str, Any]] = {}

#: a config file larger than this is refused unread (a run config is a few KB; the
#: shipped presets are under 4 KB): parsing YAML builds Python objects for every key
MAX_CONFIG_BYTES = 1 << 20
#: sections and lists nest at most this deep in a config (its real depth is 3 or 4)
MAX_DEPTH = 32
#: a number written with more digits than this is refused (int64 needs 19)
MAX_DIGITS = 400


def load_yaml(text: str, where: str) -> Any:
    """YAML ``text`` (from ``where``: a file or an override) as Python data, bounded.

    The event stream is read first (libyaml's, when installed: iterative and fast) and
    stopped at the first collection nested deeper than :data:`MAX_DEPTH` or number
    longer than :data:`MAX_DIGITS`, naming the line; only then is the tree built (with
    libyaml's loader: its builder recurses in C, which this bound keeps off a deep input).

    Raises:
        ConfigError: naming ``where`` (and the line) for bad YAML, deep nesting, huge numbers.
    """
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    depth = 0
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # a lone surrogate: bytes of argv that are not UTF-8
        raise ConfigError(
            f"{where}: not valid Unicode text ({e.reason} at character {e.start})"
        ) from None
    try:
        for ev in yaml.parse(text, Loader=loader):
            if isinstance(ev, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
                depth += 1
                if depth > MAX_DEPTH:
                    raise ConfigError(
                        f"{where}{_line(ev)}: nested more than {MAX_DEPTH} levels deep (a "
                        f"config is a few levels of sections and lists)"
                    )
            elif isinstance(ev, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
                depth -= 1
            elif (
                isinstance(ev, yaml.ScalarEvent)
                and not ev.style  # plain (libyaml says '', PyYAML None)
                and len(ev.value) > MAX_DIGITS
                and re.fullmatch(r"[-+]?[0-9_.eE+-]+", ev.value)
            ):
                raise ConfigError(
                    f"{where}{_line(ev)}: a number of {len(ev.value)} characters (at most "
                    f"{MAX_DIGITS}); quote it if it is a string"
                )
        return yaml.load(text, Loader=loader)
    except ConfigError:
        raise
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        at = f" line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        what = " ".join(x for x in (e.context, e.problem) if x)
        if "nesting depth" in what:
            what = f"nested more than {MAX_DEPTH} levels deep"
        raise ConfigError(f"{where}{at}: not valid YAML ({_short(ValueError(what))})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: not valid YAML: {_short(e)}") from None
    except (ValueError, OverflowError, RecursionError) as e:  # what slipped past the bounds
        raise ConfigError(f"{where}: cannot be read as a config ({_short(e)})") from None


def _line(ev: Any) -> str:
    mark = getattr(ev, "start_mark", None)
    return f" line {mark.line + 1}" if mark is not None else ""


def _short(e: BaseException, limit: int = 300) -> str:
    text = str(e) or type(e).__name__
    return text if len(text) <= limit else text[:limit] + " ..."


def _parse_scalar(text: str, key: str = "") -> Any:
    """A CLI override value, parsed as YAML (so ``1e-4``, ``true``, ``[a, b]``, ``null`` work)."""
    value = load_yaml(text, f"override {key}={_clip(text)}") if text != "" else ""
    # YAML reads 1e-4 as a string; accept it as a float
    if isinstance(value, str):
        try:
            return float(value) if any(c in value for c in "eE.") else value
        except ValueError:
            return value
    return value


def _clip(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"override '{dotted}': '{p}' is not a section")
        node = nxt
    node[parts[-1]] = value


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load a YAML config (or the defaults) and apply ``key.sub=value`` overrides.

    Raises:
        ConfigError: naming the file and key for unknown keys, wrong types, bad values.
    """
    tree: dict = {}
    where = "defaults"
    if path is not None:
        where = str(path)
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        size = p.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise ConfigError(
                f"{p}: {size / 2**20:.1f} MiB, larger than a config can be "
                f"({MAX_CONFIG_BYTES // 2**20} MiB; a run config is a few KB): not read"
            )
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(f"{p}: not UTF-8 text ({e})") from e
        except OSError as e:
            raise ConfigError(f"{p}: cannot be read ({e.strerror or e})") from e
        loaded = load_yaml(text, str(p))
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: top level must be a mapping of config keys")
        tree = loaded
    given: dict[str, str] = {}  # key -> the override that set it
    for ov in overrides or []:
        if "=" not in ov:
            raise ConfigError(f"override {ov!r} must look like key.sub=value")
        key, text = ov.split("=", 1)
        _set_dotted(tree, key.strip(), _parse_scalar(text, key.strip()))
        given[key.strip()] = ov
    try:
        cfg = _build(RunConfig, tree)
        cfg.validate()
    except ConfigError as e:
        raise ConfigError(f"{_source(str(e), given, where)}: {e}") from None
    return cfg


def _source(message: str, given: dict[str, str], where: str) -> str:
    """Where the key an error names came from: the command line's override that set it
    (or a section above it), else the file (``where``)."""
    m = re.search(r"config key '([^'\[ ]+)", message)
    if m:
        key = m.group(1)
        for k, ov in given.items():
            if key == k or key.startswith(k + "."):
                return f"command line override {ov!r}"
    return where


# --------------------------------------------------------------------------- DeepSpeed configs
def preset_path(name: str) -> Path:
    """Path of a preset shipped in the package (``demo``, ``llama2_7b_superni_order1``,
    with or without ``.yaml``); it may not exist (callers check)."""
    stem = name.removesuffix(".yaml")
    return Path(str(resources.files("sapt_dist") / "presets" / f"{stem}.yaml"))


def shipped_ds_configs() -> dict[str, str]:
    """Name -> JSON text of the DeepSpeed configs shipped in the package
    (``sapt_dist/ds_configs``, also at the repository's top level as ``ds_configs/``)."""
    folder = resources.files("sapt_dist") / "ds_configs"
    return {
        f.name.removesuffix(".json"): f.read_text(encoding="utf-8")
        for f in folder.iterdir()
        if f.name.endswith(".json")
    }


def resolve_ds_config(spec: str | None) -> dict:
    """The DeepSpeed config a run names: a JSON file path, or the name of one shipped in
    the package (``zero0``, ``zero2``, ``zero3``, ``zero3_offload``). ``None``: stage 0.

    Raises:
        ValueError: naming the file, when it is missing, not JSON or not a JSON object.
    """
    if not spec:
        return {"zero_optimization": {"stage": 0}}
    path = Path(spec).expanduser()
    if path.is_file():
        where, text = str(path), path.read_text(encoding="utf-8")
    else:
        shipped = shipped_ds_configs()
        if spec not in shipped:
            raise ValueError(f"no DeepSpeed config {spec!r} (a path, or one of {sorted(shipped)})")
        where, text = f"{spec} (shipped: sapt_dist/ds_configs/{spec}.json)", shipped[spec]
    try:
        cfg = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON: {e}") from e
    if not isinstance(cfg, dict):
        raise ValueError(f"{where}: expected a JSON object")
    stage = cfg.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"{where}: zero_optimization.stage must be 0-3, not {stage!r}")
    return cfg


def resolve_batch(cfg: RunConfig, world_size: int) -> None:
    """Set ``train.grad_accum`` from ``train.global_batch`` for ``world_size`` processes
    (no-op when it is not set).

    Raises:
        ConfigError: naming the numbers, when micro-batch x processes does not divide it.
    """
    t = cfg.train
    if t.global_batch is None:
        return
    per_pass = t.micro_batch_size * world_size
    if t.global_batch % per_pass:
        fits = [
            m for m in range(1, t.micro_batch_size + 1) if t.global_batch % (m * world_size) == 0
        ]
        hint = (
            f"train.micro_batch_size={max(fits)} divides it on {world_size} process(es)"
            if fits
            else f"{world_size} process(es) cannot split {t.global_batch} sequences evenly"
        )
        raise ConfigError(
            f"config key 'train.global_batch' is {t.global_batch}, not a multiple of "
            f"train.micro_batch_size {t.micro_batch_size} x {world_size} process(es) = "
            f"{per_pass}; {hint}"
        )
    t.grad_accum = t.global_batch // per_pass
