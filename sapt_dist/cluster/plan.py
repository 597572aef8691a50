"""``sapt-plan``: how much memory one GPU needs to train SAPT on a ZeRO-3-sharded backbone.

Nothing is loaded: the planner works from the model's shapes (a built-in LLaMA-2 shape,
an HF ``config.json`` or a run config YAML) and counts, per GPU, what SAPT and DeepSpeed
ZeRO-3 put there (the code it models is named in each item):

backbone shard
    Every frozen backbone tensor partitioned over all ranks (``ds_tensor``: ``ceil(numel /
    world)`` elements, DeepSpeed pads each tensor to a multiple of the world size), in the
    training dtype. Tensors of at most ``stage3_param_persistence_threshold`` elements
    (default 1e5: the norms) are *persistent*: kept whole on every rank besides their
    partition. With 4-bit (``--quant nf4``/``fp4``) every decoder linear is a bitsandbytes
    ``Params4bit`` whose packed 4-bit data sits in a tensor of the training dtype
    (``bnb_4bit_quant_storage``, so ZeRO-3 partitions it by bytes: 0.5 byte a weight);
    its quantization constants (fp32 absmax per block of 64, or 8-bit absmax + fp32
    second level with ``--double-quant``) are not parameters: DeepSpeed does not
    partition them, every rank holds them all. Embeddings, ``lm_head`` and norms stay in
    the training dtype. ``--offload-param`` moves the partitions to CPU memory.
gathered working set
    The full parameters ZeRO-3 holds gathered at once (persistent ones are in the backbone
    row): the largest module's plus what ``stage3_max_reuse_distance`` keeps across the
    forward/backward turn (parameters reused within that many elements of the trace are
    not released: taken as half the distance); with prefetching on
    (``stage3_prefetch_bucket_size`` > 0) DeepSpeed keeps fetching ahead until
    ``stage3_max_live_parameters`` elements are available, so that cap is the figure;
    never more than the whole partitioned model; none on one GPU, where a gathered
    parameter shares its partition's storage. An upper bound: measured on CPU it is
    exact without prefetch and reuse, and 14-38 % high with them.
block stack (replicated)
    Per adapted linear the banks ``A_bank`` (slots, r, in) and ``B_bank`` (slots, out, r)
    (``sapt_dist.method.lora``), the router's ``key_bank`` (T, d), ``targets`` (T, T),
    ``task_means`` (T, d) and ``center`` (d) (the input center, 0 unless centered): module
    *buffers*, which ZeRO-3 does not partition: every rank holds all of them. SAPT with
    generative replay has one more layer slot (the generator's block).
trainable + optimizer
    The current block (``lora_A``, ``lora_B`` per adapted linear), the current key and the
    query network ``g`` (``sapt_dist.method.attention``). ZeRO-3 keeps per rank and per trainable
    element (partitioned, ``ceil(numel / world)``): the low-precision partition and its
    gradient partition (training dtype each), the fp32 master and AdamW's two fp32
    moments: ``2 e + 12`` bytes (``e`` = 2 in bf16, 4 in fp32). Persistent trainable
    tensors (below the threshold, e.g. every LoRA A/B of LLaMA-2 at r 4) are also whole.
activations
    The peak of one forward + backward, counted from the code that runs (HF
    ``LlamaDecoderLayer`` with SDPA, ``MixtureLoRALinear``'s fused op) for micro-batch
    ``b`` and length ``s`` (``N = b s`` tokens, ``e`` bytes per element). Saved per decoder
    layer: two RMSNorms (fp32 input copy + rsqrt, ``4 (N d + N)`` each; the first layer's
    input norm passes no gradient and saves nothing); q, k, v after RoPE and the attention
    output (``e N (d + 2 d_kv + d)``; with a padding mask HF repeats k, v to all heads, so
    ``d_kv = d``); the attention's log-sum-exp (``4 b heads s``) and, with padding, its
    mask (``e b s^2``); the SwiGLU MLP's gate, up and SiLU outputs (``3 e N d_ff``); per
    adapted linear its input (once per tensor read), the stacked blocks
    ``e T r (in + out)``, ``z = x A^T`` (``e N T r``) and the current slot's columns of
    ``z w`` (``e N r``); once per forward the scales every adapted linear shares
    (``SlotPlan``: ``e N T r``, one row per token; one sequence: ``e T r``; with
    checkpointing held by the routing context, not saved).
    ZeRO-3's ``memory_efficient_linear`` (DeepSpeed's default) replaces torch's linear by
    one that saves every linear's input, frozen or not: the MLP input (``e N d``), the
    SwiGLU product (``e N d_ff``) and ``lm_head``'s input (``e N d``) are added (o_proj's
    input is a view of the attention output; bitsandbytes 4-bit linears don't go through
    it). With it off, torch's linear saves a view of each frozen weight instead, which
    under ZeRO-3 keeps the *gathered* weight alive until backward (``held_weights``): keep
    it on. On top of the layers: the final norm, the loss's fp32 log-probabilities
    (``4 N V``), the logits the model returns (``e N V``, held through backward) and the
    loss's backward (two more fp32 ``N V`` gradients). With gradient checkpointing (HF,
    non-reentrant) each layer keeps only its input (``e N d``) and one layer is recomputed
    at a time in backward (plus, with 4-bit, one dequantized weight); HF then makes the
    embedding output require grad, so the prompt max-pool saves ``e N d`` more. Batches
    are taken to be padded (SAPT's collation pads); ``--no-padding`` drops the mask.

T5 encoder-decoders (``--model t5-large``, a T5 ``config.json``, or a run config whose
model folder holds one): the parameter side (backbone shard, gathered working set, block
stack, trainable + optimizer) is counted from T5's own tensors as above (shared embedding,
per encoder layer self-attention q/k/v/o + MLP ``wi``/``wo`` (``wi_0``/``wi_1`` gated),
per decoder layer self- and cross-attention + MLP, relative position biases, the
RMS norms; an adapted leaf name such as ``q`` counts once per encoder layer and twice per
decoder layer) and checked against a real T5 SAPTModel in ``tests/test_plan.py``. The
activations are an **estimate, not measured** (``bench/bench_plan.py`` measures
LLaMA-style models only): ``--seq-len`` tokens minus ``--target-len`` go through the
encoder, ``--target-len`` through the decoder; per layer it counts the norms, q/k/v and
the attention output, T5's eager attention probabilities (fp32 softmax output, plus a
copy in a 2-byte dtype) for self- and cross-attention, the cross-attention's k/v over the
encoder's tokens, the MLP's activation output, the mixture terms as for LLaMA, and
logits / loss over the decoder's tokens; dropout masks (T5 checkpoints ship dropout 0.1,
active in training), the position-bias tensors and allocator effects are not counted.

Not counted: the CUDA context and NCCL buffers (about 0.5-1 GiB per GPU), allocator
fragmentation, DeepSpeed's reduce/all-gather bucket buffers (``reduce_bucket_size``), the
ARM replay micro-batches (embedding lookups and the router only: small), evaluation and
generation (no optimizer state, a KV cache instead of activations). Loading with 4-bit
quantization has one more peak: each rank loads the whole quantized model before
``deepspeed.initialize`` partitions it (``load peak`` in the output).

``bench/bench_plan.py`` checks these numbers against DeepSpeed's per-rank tensors and the
saved tensors of tiny models on CPU; ``docs/MEMORY.md`` has its results and the table for
LLaMA-2 7B / 13B / 70B.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

__all__ = [
    "PRESETS",
    "DeepSpeedKnobs",
    "ModelShape",
    "PlanError",
    "PlanInputs",
    "activation_bytes",
    "backbone_tensors",
    "main",
    "plan",
    "shape_from_config",
    "shape_from_dict",
]

GiB = 1024**3

#: Linear layers of a LLaMA-style decoder layer, by the leaf name SAPT matches targets on.
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
#: Linear layers of a T5 layer (attention q, k, v, o; the MLP's ``wi``, ``wo``, or with a
#: gated activation ``wi_0``, ``wi_1``, ``wo``).
T5_ATTENTION = ("q", "k", "v", "o")
T5_LINEAR_NAMES = (*T5_ATTENTION, "wi", "wi_0", "wi_1", "wo")
#: Adapted linears that read the same input tensor (its saved copy is counted once).
_INPUT_GROUPS = {
    "q_proj": "attn_in",
    "k_proj": "attn_in",
    "v_proj": "attn_in",
    "o_proj": "attn_out",
    "gate_proj": "mlp_in",
    "up_proj": "mlp_in",
    "down_proj": "mlp_mid",
}


class PlanError(ValueError):
    """A bad planner input, naming the flag or file."""


@dataclass(frozen=True)
class ModelShape:
    """The shapes of a LLaMA-style causal LM (LLaMA, Mistral, Qwen2 without biases) or, with
    ``arch="t5"``, of a T5 encoder-decoder: ``hidden`` = d_model, ``intermediate`` = d_ff,
    ``layers`` = encoder layers, ``decoder_layers``, ``heads`` (= ``kv_heads``),
    ``head_dim`` = d_kv, ``gated_ff`` (``gated-gelu`` MLP), ``rel_buckets``."""

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tie_embeddings: bool = False
    head_dim: int | None = None
    attention_bias: bool = False
    arch: str = "llama"
    decoder_layers: int = 0
    gated_ff: bool = False
    rel_buckets: int = 32

    @property
    def hd(self) -> int:
        return self.head_dim or self.hidden // self.heads

    @property
    def is_t5(self) -> bool:
        return self.arch == "t5"

    @property
    def linear_names(self) -> tuple[str, ...]:
        """The leaf names of the linear layers (what ``--targets`` may name)."""
        if not self.is_t5:
            return LINEAR_NAMES
        return (*T5_ATTENTION, *(("wi_0", "wi_1") if self.gated_ff else ("wi",)), "wo")

    def validate(self) -> None:
        if self.arch not in ("llama", "t5"):
            raise PlanError(f"model {self.name}: arch must be llama or t5 (got {self.arch!r})")
        keys = ["hidden", "intermediate", "layers", "heads", "kv_heads", "vocab"]
        for key in keys + (["decoder_layers", "rel_buckets"] if self.is_t5 else []):
            if getattr(self, key) < 1:
                raise PlanError(f"model {self.name}: {key} must be >= 1 (got {getattr(self, key)})")
        if self.heads % self.kv_heads:
            raise PlanError(
                f"model {self.name}: heads ({self.heads}) must be a multiple of kv heads "
                f"({self.kv_heads})"
            )
        if self.head_dim is None and self.hidden % self.heads:
            raise PlanError(
                f"model {self.name}: hidden ({self.hidden}) is not a multiple of heads "
                f"({self.heads}) and the config gives no head_dim"
            )


#: LLaMA-2 shapes from the released ``config.json`` files (70B uses GQA with 8 kv heads).
PRESETS: dict[str, ModelShape] = {
    "llama2-7b": ModelShape("llama2-7b", 4096, 11008, 32, 32, 32, 32000),
    "llama2-13b": ModelShape("llama2-13b", 5120, 13824, 40, 40, 40, 32000),
    "llama2-70b": ModelShape("llama2-70b", 8192, 28672, 80, 64, 8, 32000),
    # google-t5/t5-large's config.json (T5 v1.0: ReLU MLP, embeddings tied)
    "t5-large": ModelShape(
        "t5-large", 1024, 4096, 24, 16, 16, 32128, True, 64, arch="t5", decoder_layers=24
    ),
}


@dataclass(frozen=True)
class DeepSpeedKnobs:
    """The ZeRO-3 settings the working set depends on (DeepSpeed's defaults)."""

    prefetch_bucket_size: int = 50_000_000
    max_live_parameters: int = 1_000_000_000
    max_reuse_distance: int = 1_000_000_000
    param_persistence_threshold: int = 100_000
    #: ``zero_optimization.memory_efficient_linear``: ZeRO-3 then replaces
    #: ``torch.nn.functional.linear`` by its own autograd function, which saves every
    #: linear's input, frozen or not (bitsandbytes 4-bit linears do not go through it)
    memory_efficient_linear: bool = True

    @classmethod
    def from_ds_config(cls, path: str | Path) -> DeepSpeedKnobs:
        """Read the ``stage3_*`` knobs of a DeepSpeed JSON config (defaults where absent;
        ``"auto"`` values, which HF fills from the model, are taken as the defaults)."""
        from sapt_dist.config import resolve_ds_config

        p = Path(path)  # a file, or the name of one shipped in ds_configs/ ("zero3")
        try:
            cfg = resolve_ds_config(str(path))
        except ValueError as e:
            raise PlanError(f"--ds-config: {e}") from e
        zero = cfg.get("zero_optimization", {}) if isinstance(cfg, dict) else {}
        stage = zero.get("stage", 0) if isinstance(zero, dict) else None
        if stage != 3:
            raise PlanError(
                f"--ds-config {p}: zero_optimization.stage is {stage!r}; sapt-plan models "
                "ZeRO stage 3 (the backbone sharded over the GPUs)"
            )
        out = {}
        for f, key in (
            ("prefetch_bucket_size", "stage3_prefetch_bucket_size"),
            ("max_live_parameters", "stage3_max_live_parameters"),
            ("max_reuse_distance", "stage3_max_reuse_distance"),
            ("param_persistence_threshold", "stage3_param_persistence_threshold"),
        ):
            v = zero.get(key, zero.get(key.removeprefix("stage3_")))
            if v is None or v == "auto":
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise PlanError(
                    f"--ds-config {p}: zero_optimization.{key} must be >= 0 (got {v!r})"
                )
            out[f] = int(v)
        mel = zero.get("memory_efficient_linear", True)
        if not isinstance(mel, bool):
            raise PlanError(
                f"--ds-config {p}: zero_optimization.memory_efficient_linear must be true or "
                f"false (got {mel!r})"
            )
        out["memory_efficient_linear"] = mel
        return cls(**out)


@dataclass(frozen=True)
class PlanInputs:
    """Everything the estimate depends on (the CLI's flags)."""

    shape: ModelShape
    gpus_per_node: int = 8
    nodes: int = 1
    dtype: str = "bf16"
    quant: str = "none"
    double_quant: bool = False
    micro_batch: int = 2
    seq_len: int = 1074
    #: T5 only: tokens of ``seq_len`` that are the decoder's (the target); the rest go
    #: through the encoder
    target_len: int = 50
    slots: int = 15
    generator_slot: bool = True
    rank: int = 4
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    #: virtual tokens of a prompt block (``adapter.kind: prompt``); 0: LoRA blocks
    prompt_length: int = 0
    query_hidden: int = 100
    grad_ckpt: bool = True
    padded: bool = True
    offload_param: bool = False
    gpu_mem_gib: float = 80.0
    knobs: DeepSpeedKnobs = field(default_factory=DeepSpeedKnobs)

    @property
    def world(self) -> int:
        return self.gpus_per_node * self.nodes

    @property
    def e(self) -> int:
        """Bytes per element of the training dtype."""
        return 2 if self.dtype == "bf16" else 4

    @property
    def tokens(self) -> int:
        """Positions the backbone runs per sequence: the prompt block's virtual tokens too."""
        return self.seq_len + self.prompt_length

    @property
    def layer_slots(self) -> int:
        return self.slots + int(self.generator_slot)

    def validate(self) -> None:
        self.shape.validate()
        checks = [
            ("--gpus-per-node", self.gpus_per_node),
            ("--nodes", self.nodes),
            ("--micro-batch", self.micro_batch),
            ("--seq-len", self.seq_len),
            ("--target-len", self.target_len),
            ("--slots", self.slots),
            ("--rank", self.rank),
            ("--query-hidden", self.query_hidden),
        ]
        for flag, v in checks:
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise PlanError(f"{flag} must be a whole number >= 1 (got {v!r})")
        if self.dtype not in ("bf16", "fp32"):
            raise PlanError(f"--dtype must be bf16 or fp32 (got {self.dtype!r})")
        if self.quant not in ("none", "nf4", "fp4"):
            raise PlanError(f"--quant must be none, nf4 or fp4 (got {self.quant!r})")
        if self.prompt_length < 0:
            raise PlanError(f"--prompt-length must be >= 0 (got {self.prompt_length!r})")
        if self.prompt_length:
            return  # prompt blocks: no adapted linear layer
        if not self.targets:
            raise PlanError("--targets must name at least one linear layer")
        names = self.shape.linear_names
        bad = [t for t in self.targets if t not in names]
        if bad:
            kind = "T5" if self.shape.is_t5 else "LLaMA-style"
            raise PlanError(
                f"--targets: {bad} are not linear layers of a {kind} model "
                f"(its linears: {list(names)})"
            )
        if self.shape.is_t5 and self.target_len >= self.seq_len:
            raise PlanError(
                f"--target-len ({self.target_len}) must be below --seq-len ({self.seq_len}): "
                "a T5's encoder reads seq_len - target_len tokens, its decoder target_len"
            )
        if not self.gpu_mem_gib > 0:
            raise PlanError(f"--gpu-mem must be > 0 GiB (got {self.gpu_mem_gib})")


# --------------------------------------------------------------------------- shapes
def shape_from_config(path: str | Path) -> ModelShape:
    """A ``ModelShape`` from an HF ``config.json`` (or the model folder holding it).

    Raises:
        PlanError: naming the file and the missing key.
    """
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    if not p.is_file():
        raise PlanError(f"--config: no such file: {p}")
    try:
        cfg = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise PlanError(f"--config {p}: not valid JSON: {e}") from e
    if not isinstance(cfg, dict):
        raise PlanError(f"--config {p}: top level must be a JSON object")
    return shape_from_dict(cfg, name=p.parent.name or "model", where=f"--config {p}")


def shape_from_dict(cfg: dict, name: str = "model", where: str = "config") -> ModelShape:
    """A ``ModelShape`` from the keys of an HF config (``PretrainedConfig.to_dict()``): a
    LLaMA-style decoder or a T5 encoder-decoder."""
    cfg = cfg.get("text_config", cfg)
    if cfg.get("model_type") in ("t5", "mt5") or (
        cfg.get("is_encoder_decoder") and "d_model" in cfg and "d_kv" in cfg
    ):
        return _t5_shape(cfg, name, where)
    if cfg.get("is_encoder_decoder"):
        raise PlanError(
            f"{where}: a {cfg.get('model_type', 'encoder-decoder')!r} model; sapt-plan knows "
            "LLaMA-style decoders and T5 encoder-decoders"
        )

    def need(key: str) -> int:
        if key not in cfg:
            raise PlanError(f"{where}: key '{key}' missing (a LLaMA-style config has it)")
        v = cfg[key]
        if isinstance(v, bool) or not isinstance(v, int):
            raise PlanError(f"{where}: key '{key}' must be an integer (got {v!r})")
        return v

    heads = need("num_attention_heads")
    shape = ModelShape(
        name=str(cfg.get("_name_or_path") or name),
        hidden=need("hidden_size"),
        intermediate=need("intermediate_size"),
        layers=need("num_hidden_layers"),
        heads=heads,
        kv_heads=int(cfg.get("num_key_value_heads") or heads),
        vocab=need("vocab_size"),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        head_dim=cfg.get("head_dim"),
        # Qwen2 has q, k, v biases without saying so in its config
        attention_bias=bool(cfg.get("attention_bias", cfg.get("model_type") == "qwen2")),
    )
    shape.validate()
    return shape


def _t5_shape(cfg: dict, name: str, where: str) -> ModelShape:
    def need(key: str) -> int:
        if key not in cfg:
            raise PlanError(f"{where}: key '{key}' missing (a T5 config has it)")
        v = cfg[key]
        if isinstance(v, bool) or not isinstance(v, int):
            raise PlanError(f"{where}: key '{key}' must be an integer (got {v!r})")
        return v

    heads, layers = need("num_heads"), need("num_layers")
    shape = ModelShape(
        name=str(cfg.get("_name_or_path") or name),
        hidden=need("d_model"),
        intermediate=need("d_ff"),
        layers=layers,
        heads=heads,
        kv_heads=heads,
        vocab=need("vocab_size"),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", True)),  # T5's default
        head_dim=need("d_kv"),
        arch="t5",
        decoder_layers=int(cfg.get("num_decoder_layers") or layers),
        gated_ff=str(cfg.get("feed_forward_proj", "relu")).startswith("gated-"),
        rel_buckets=int(cfg.get("relative_attention_num_buckets", 32)),
    )
    shape.validate()
    return shape


@dataclass(frozen=True)
class Tensor:
    """One backbone parameter: name, leaf kind and full shape (out, in) or (n,)."""

    name: str
    kind: str  # "embed" | "lm_head" | "norm" | "bias" | one of LINEAR_NAMES
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def backbone_tensors(shape: ModelShape) -> list[Tensor]:
    """Every parameter of the HF LLaMA-style model (or T5), in module order."""
    if shape.is_t5:
        return _t5_tensors(shape)
    d, hd = shape.hidden, shape.hd
    q, kv, ff = shape.heads * hd, shape.kv_heads * hd, shape.intermediate
    out = [Tensor("model.embed_tokens.weight", "embed", (shape.vocab, d))]
    linears = {
        "q_proj": (q, d),
        "k_proj": (kv, d),
        "v_proj": (kv, d),
        "o_proj": (d, q),
        "gate_proj": (ff, d),
        "up_proj": (ff, d),
        "down_proj": (d, ff),
    }
    for i in range(shape.layers):
        pre = f"model.layers.{i}."
        out.append(Tensor(pre + "input_layernorm.weight", "norm", (d,)))
        for leaf, sh in linears.items():
            block = "self_attn" if leaf in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            out.append(Tensor(f"{pre}{block}.{leaf}.weight", leaf, sh))
            if shape.attention_bias and block == "self_attn":
                out.append(Tensor(f"{pre}{block}.{leaf}.bias", "bias", (sh[0],)))
        out.append(Tensor(pre + "post_attention_layernorm.weight", "norm", (d,)))
    out.append(Tensor("model.norm.weight", "norm", (d,)))
    if not shape.tie_embeddings:
        out.append(Tensor("lm_head.weight", "lm_head", (shape.vocab, d)))
    return out


def _t5_tensors(shape: ModelShape) -> list[Tensor]:
    """Every parameter of ``T5ForConditionalGeneration`` (one shared embedding; the
    encoder's and decoder's ``embed_tokens`` and a tied ``lm_head`` are the same tensor)."""
    d = shape.hidden
    dims = _linear_dims(shape)
    out = [Tensor("shared.weight", "embed", (shape.vocab, d))]

    def attention(pre: str, first: bool) -> None:
        for leaf in T5_ATTENTION:
            d_in, d_out = dims[leaf]
            out.append(Tensor(f"{pre}.{leaf}.weight", leaf, (d_out, d_in)))
        if first:  # the relative position bias lives in each stack's first layer
            rel = (shape.rel_buckets, shape.heads)
            out.append(Tensor(f"{pre}.relative_attention_bias.weight", "norm", rel))

    def mlp(pre: str) -> None:
        for leaf in shape.linear_names[len(T5_ATTENTION) :]:
            d_in, d_out = dims[leaf]
            out.append(Tensor(f"{pre}.DenseReluDense.{leaf}.weight", leaf, (d_out, d_in)))

    for stack, n in (("encoder", shape.layers), ("decoder", shape.decoder_layers)):
        for i in range(n):
            pre = f"{stack}.block.{i}.layer"
            attention(f"{pre}.0.SelfAttention", i == 0)
            out.append(Tensor(f"{pre}.0.layer_norm.weight", "norm", (d,)))
            k = 1
            if stack == "decoder":
                attention(f"{pre}.1.EncDecAttention", False)
                out.append(Tensor(f"{pre}.1.layer_norm.weight", "norm", (d,)))
                k = 2
            mlp(f"{pre}.{k}")
            out.append(Tensor(f"{pre}.{k}.layer_norm.weight", "norm", (d,)))
        out.append(Tensor(f"{stack}.final_layer_norm.weight", "norm", (d,)))
    if not shape.tie_embeddings:
        out.append(Tensor("lm_head.weight", "lm_head", (shape.vocab, d)))
    return out


def linear_count(shape: ModelShape, leaf: str) -> int:
    """How many linear layers of the model carry the leaf name ``leaf``: one per layer for
    LLaMA; for T5 an attention leaf (q, k, v, o) is in every encoder layer and twice in
    every decoder layer (self- and cross-attention), an MLP leaf once per layer."""
    if not shape.is_t5:
        return shape.layers
    if leaf in T5_ATTENTION:
        return shape.layers + 2 * shape.decoder_layers
    return shape.layers + shape.decoder_layers


def _linear_dims(shape: ModelShape) -> dict[str, tuple[int, int]]:
    """(in, out) of each linear of one decoder layer."""
    if shape.is_t5:
        d, inner, ff = shape.hidden, shape.heads * shape.hd, shape.intermediate
        return {
            "q": (d, inner),
            "k": (d, inner),
            "v": (d, inner),
            "o": (inner, d),
            "wi": (d, ff),
            "wi_0": (d, ff),
            "wi_1": (d, ff),
            "wo": (ff, d),
        }
    d, hd = shape.hidden, shape.hd
    q, kv, ff = shape.heads * hd, shape.kv_heads * hd, shape.intermediate
    return {
        "q_proj": (d, q),
        "k_proj": (d, kv),
        "v_proj": (d, kv),
        "o_proj": (q, d),
        "gate_proj": (d, ff),
        "up_proj": (d, ff),
        "down_proj": (ff, d),
    }


def trainable_tensors(inp: PlanInputs) -> list[Tensor]:
    """The trainable tensors of one block: LoRA A/B per adapted linear (or the soft prompt),
    key, ``g``."""
    shape, r = inp.shape, inp.rank
    dims = _linear_dims(shape)
    out = []
    if inp.prompt_length:
        out.append(Tensor("prompts.prompt", "prompt", (inp.prompt_length, shape.hidden)))
    for leaf in shape.linear_names if not inp.prompt_length else ():
        if leaf in inp.targets:
            d_in, d_out = dims[leaf]
            for i in range(linear_count(shape, leaf)):
                out.append(Tensor(f"{leaf}.{i}.lora_A", "lora", (r, d_in)))
                out.append(Tensor(f"{leaf}.{i}.lora_B", "lora", (d_out, r)))
    d, h = shape.hidden, inp.query_hidden
    out += [
        Tensor("router.key", "router", (d,)),
        Tensor("router.query.down.weight", "router", (h, d)),
        Tensor("router.query.up.weight", "router", (d, h)),
        Tensor("router.query.norm.weight", "router", (d,)),
        Tensor("router.query.norm.bias", "router", (d,)),
    ]
    return out


def _quantized(inp: PlanInputs, t: Tensor) -> bool:
    return inp.quant != "none" and t.kind in inp.shape.linear_names


def storage_numel(inp: PlanInputs, t: Tensor) -> int:
    """Elements of the tensor DeepSpeed sees: packed 4-bit data in the training dtype
    (``quant_storage``: ``e`` bytes hold ``2 e`` weights) or the tensor itself."""
    if _quantized(inp, t):
        return math.ceil(t.numel / (2 * inp.e))
    return t.numel


def quant_const_bytes(inp: PlanInputs, numel: int) -> int:
    """bitsandbytes 4-bit constants of one weight (blocksize 64): fp32 absmax per block
    plus the 16-value code, or with double quantization 8-bit absmax + fp32 absmax per
    256 blocks + two codes (the second one 256 values)."""
    blocks = math.ceil(numel / 64)
    if not inp.double_quant:
        return 4 * blocks + 4 * 16
    return blocks + 4 * math.ceil(blocks / 256) + 4 * 16 + 4 * 256 + 4


def _shard(numel: int, world: int) -> int:
    """``ds_tensor`` elements of one tensor: padded to a multiple of the world size."""
    return math.ceil(numel / world)


# --------------------------------------------------------------------------- activations
def activation_bytes(inp: PlanInputs) -> dict[str, int]:
    """Bytes of activations per rank (see the module docstring for each term).

    Returns the parts: ``layer`` (one decoder layer that passes gradient to its input),
    ``layer0`` (the first one), ``stored_ckpt`` (the layer inputs gradient checkpointing
    keeps), ``top`` (final norm + loss log-probs + targets), ``router``, ``logits``
    (returned), ``loss_backward`` (the loss's backward peak), ``saved`` (what autograd
    holds at the end of the forward: without checkpointing every layer, with it the
    stored inputs) and ``peak`` (the activations' peak in forward + backward). For T5 see
    :func:`_t5_activation_bytes` (an estimate).
    """
    if inp.shape.is_t5:
        return _t5_activation_bytes(inp)
    s = inp.shape
    S = inp.tokens  # positions per sequence (a prompt block's virtual tokens included)
    e, b, n = inp.e, inp.micro_batch, inp.micro_batch * S
    d, ff, heads, hd = s.hidden, s.intermediate, s.heads, s.hd
    q, kv = heads * hd, s.kv_heads * hd
    kv_saved = q if inp.padded else kv  # HF repeats k, v to every head when a mask is given
    T, r = inp.layer_slots, inp.rank
    norm = 4 * (n * d + n)  # RMSNorm: fp32 copy of its input + rsqrt per row
    core = (
        norm  # post-attention norm
        + e * n * (q + 2 * kv_saved + q)  # q, k, v after RoPE; attention output
        + 4 * b * heads * S  # log-sum-exp of the fused attention
        + (e * b * S**2 if inp.padded else 0)  # the padding mask
        + 3 * e * n * ff  # gate, up, SiLU(gate)
    )
    dims = _linear_dims(s)
    # o_proj's input is a view of the attention output SDPA saves already (its kernels
    # write (b, s, heads, hd) memory): no new storage
    group_size = {"attn_in": d, "attn_out": 0, "mlp_in": d, "mlp_mid": ff}
    targets = () if inp.prompt_length else inp.targets
    groups = {_INPUT_GROUPS[t] for t in targets}
    zero_linear = inp.knobs.memory_efficient_linear
    if zero_linear and inp.quant == "none":
        groups = set(group_size)  # ZeRO-3's linear saves every linear's input
    mixture = sum(e * n * group_size[g] for g in groups)
    if inp.prompt_length:  # the mixed prompt (b, L, d) and its copy in the embeddings' concat
        mixture += 2 * e * b * inp.prompt_length * d
    for t in targets:
        d_in, d_out = dims[t]
        # the stacked blocks, z = x A^T and the current slot's columns of z w (lora_B's)
        mixture += e * (T * r * (d_in + d_out) + n * T * r + n * r)
    # once per forward, shared by every adapted linear (``SlotPlan``): the scales, one row
    # per token (one sequence: its one row); the slot tables are the model's buffers
    plan = e * (n if b > 1 else 1) * T * r
    layer = core + norm + mixture
    layer0 = core + mixture
    rope = 2 * e * S * hd  # cos, sin (shared by every layer)
    h = inp.query_hidden
    router = e * (b * (4 * d + h) + d * inp.slots) + 8 * b * inp.slots
    top = norm + 4 * n * s.vocab + 8 * n + 4
    if zero_linear:
        top += e * n * d  # lm_head's input (lm_head is never quantized)
    logits = e * n * s.vocab
    # the loss's backward: fp32 gradients of the log-probabilities and of the logits,
    # while the saved log-probabilities are still alive
    loss_backward = 8 * n * s.vocab
    # torch's own linear (memory_efficient_linear off) saves ``weight.t()`` of a frozen
    # linear: under ZeRO-3 that view keeps the gathered weight alive until backward
    held_layer = held_top = 0
    if not zero_linear and inp.world > 1:  # one rank: the "gathered" weight is the partition
        if inp.quant == "none":
            held_layer = e * sum(i * o for i, o in dims.values())
        held_top = e * s.vocab * d + e * 2 * d * inp.query_hidden  # lm_head, g's linears
    # bitsandbytes dequantizes a 4-bit weight in its backward (a transient per linear)
    dequant = e * max(i * o for i, o in dims.values()) if inp.quant != "none" else 0

    def peak_of(held_layer: int, held_top: int) -> tuple[int, int]:
        lay, top_ = layer + held_layer, top + held_top
        if inp.grad_ckpt:
            # the plan lives in the routing context (the layers that save it are recomputed)
            saved = s.layers * e * n * d + top_ + router_ckpt
            return saved, saved + plan + logits + max(lay + rope + dequant, loss_backward)
        saved = (layer0 + held_layer) + (s.layers - 1) * lay + rope + top_ + router + plan
        return saved, saved + logits + loss_backward

    # HF's gradient_checkpointing_enable makes the embedding output require grad, so the
    # prompt max-pool then saves its masked copy of the embeddings and the mask
    router_ckpt = router + e * n * d + n + b * (1 + e * d)
    saved, peak = peak_of(held_layer, held_top)
    _, peak_unheld = peak_of(0, 0)
    return {
        "layer": layer,
        "layer0": layer0,
        "stored_ckpt": s.layers * e * n * d,
        "held_weights": peak - peak_unheld,
        "top": top,
        "router": router_ckpt if inp.grad_ckpt else router,
        "rope": rope,
        "dequant": dequant,
        "logits": logits,
        "loss_backward": loss_backward,
        "saved": saved,
        "peak": peak,
    }


def _t5_activation_bytes(inp: PlanInputs) -> dict[str, int]:
    """T5's activations per rank: an estimate from the code that runs (HF ``T5Attention``,
    eager; ``T5LayerNorm``; ``MixtureLoRALinear``), not checked against measurement. The
    encoder reads ``S = seq_len - target_len`` tokens per sequence, the decoder
    ``U = target_len``; keys as :func:`activation_bytes` (``layer``: a decoder layer,
    ``layer0``: an encoder layer). Dropout masks and position-bias tensors not counted."""
    s = inp.shape
    e, b = inp.e, inp.micro_batch
    # prompt blocks: the encoder reads the virtual tokens too; no adapted linear
    S, U = inp.seq_len - inp.target_len + inp.prompt_length, inp.target_len
    ns, nu = b * S, b * U
    d, ff, heads, inner = s.hidden, s.intermediate, s.heads, s.heads * s.hd
    T, r = inp.layer_slots, inp.rank
    dims = _linear_dims(s)
    targets = set() if inp.prompt_length else set(inp.targets)
    zero_linear = inp.knobs.memory_efficient_linear
    soft = 4 + (e if e != 4 else 0)  # fp32 softmax output (+ its copy in a 2-byte dtype)
    ff_leaves = s.linear_names[len(T5_ATTENTION) :]

    def norm(n: int) -> int:  # fp32 copy of the input + rsqrt per row
        return 4 * (n * d + n)

    def saved_input(n: int, width: int, leaves) -> int:
        """A linear's input is kept when it is adapted (the mixture reads it in backward)
        or when ZeRO-3's memory-efficient linear keeps every linear's input."""
        return e * n * width if zero_linear or targets & set(leaves) else 0

    def blocks(rows: dict[str, int]) -> int:
        """Per adapted linear: the stacked blocks, z = x A^T and the per-row scales."""
        out = 0
        for t, n in rows.items():
            if t in targets:
                d_in, d_out = dims[t]
                out += e * (T * r * (d_in + d_out) + n * T * r + b * T * r) + 8
        return out

    def self_attention(n: int, length: int) -> int:
        return (
            e * 3 * n * inner  # q, k, v
            + soft * b * heads * length * length  # the attention probabilities
            + saved_input(n, d, ("q", "k", "v"))
            + saved_input(n, inner, ("o",))
            + blocks(dict.fromkeys(T5_ATTENTION, n))
        )

    def mlp(n: int) -> int:
        act = e * n * ff * (3 if s.gated_ff else 1)  # wo's input is the activation's output
        return act + saved_input(n, d, ff_leaves[:-1]) + blocks(dict.fromkeys(ff_leaves, n))

    cross = (
        e * (nu * inner + 2 * ns * inner)  # q over the decoder's tokens, k and v over the encoder's
        + soft * b * heads * U * S
        + saved_input(nu, d, ("q",))
        + saved_input(nu, inner, ("o",))  # k, v read the encoder output (counted once, top)
        + blocks({"q": nu, "k": ns, "v": ns, "o": nu})
    )
    enc = 2 * norm(ns) + self_attention(ns, S) + mlp(ns)
    dec = 3 * norm(nu) + self_attention(nu, U) + cross + mlp(nu)
    h = inp.query_hidden
    router = e * (b * (4 * d + h) + d * inp.slots) + 8 * b * inp.slots
    encoder_out = e * ns * d  # the encoder's output, read by every cross-attention
    top = norm(ns) + norm(nu) + encoder_out + 4 * nu * s.vocab + 8 * nu + 4
    if zero_linear:
        top += e * nu * d  # lm_head's input
    logits = e * nu * s.vocab
    loss_backward = 8 * nu * s.vocab
    held = 0  # torch's linear keeps each gathered frozen weight alive until backward
    if not zero_linear and inp.world > 1 and inp.quant == "none":
        held = e * (
            2 * sum(dims[t][0] * dims[t][1] for t in T5_ATTENTION)
            + sum(dims[t][0] * dims[t][1] for t in ff_leaves)
        )  # a decoder layer's weights (the largest layer)
    stored_ckpt = e * d * (s.layers * ns + s.decoder_layers * nu)
    if inp.grad_ckpt:
        router += e * ns * d + ns + b * (1 + e * d)  # the pool's saved copy (see LLaMA's)
        saved = stored_ckpt + top + router
        peak = saved + logits + max(max(enc, dec) + held, loss_backward)
        held_total = held
    else:
        saved = s.layers * enc + s.decoder_layers * (dec + held) + top + router
        peak = saved + logits + loss_backward
        held_total = held * s.decoder_layers
    return {
        "layer": dec,
        "layer0": enc,
        "stored_ckpt": stored_ckpt,
        "held_weights": held_total,
        "top": top,
        "router": router,
        "rope": 0,
        "dequant": 0,
        "logits": logits,
        "loss_backward": loss_backward,
        "saved": saved,
        "peak": peak,
    }


# --------------------------------------------------------------------------- the plan
def plan(inp: PlanInputs) -> dict[str, Any]:
    """Per-GPU bytes of each component, the total and whether it fits ``gpu_mem_gib``."""
    inp.validate()
    W, e, k = inp.world, inp.e, inp.knobs
    backbone = persistent = quant_consts = 0
    partitioned_total = largest_module = 0
    full_quantized = 0
    for t in backbone_tensors(inp.shape):
        n = storage_numel(inp, t)
        shard = _shard(n, W) * e
        backbone += shard
        if n <= k.param_persistence_threshold:
            persistent += n * e
        else:
            partitioned_total += n
            largest_module = max(largest_module, n)
        if _quantized(inp, t):
            quant_consts += quant_const_bytes(inp, t.numel)
        full_quantized += n * e
    full_quantized += quant_consts
    backbone_gpu = (0 if inp.offload_param else backbone) + persistent + quant_consts
    # measured (bench_plan.py): with prefetching on, DeepSpeed keeps fetching ahead until
    # max_live_parameters are available; reuse keeps modules reused within the distance
    kept = largest_module + k.max_reuse_distance // 2
    if k.prefetch_bucket_size > 0:
        kept = max(kept, k.max_live_parameters)
    # with one rank a "gathered" parameter is its partition (same storage): nothing extra
    gathered_numel = min(partitioned_total, kept) if W > 1 else 0
    gathered = gathered_numel * e
    dims = _linear_dims(inp.shape)
    if inp.prompt_length:
        banks = inp.layer_slots * inp.prompt_length * inp.shape.hidden * e
    else:
        banks = sum(
            inp.layer_slots * inp.rank * (dims[t][0] + dims[t][1]) * e * linear_count(inp.shape, t)
            for t in inp.targets
        )
    # key_bank, targets, task_means, center; active / current / has_mean (bool) and
    # SAPTModel.layer_current (bool)
    # (task_means and center stay fp32 whatever the dtype)
    router_buffers = (
        e * (inp.slots * inp.shape.hidden + inp.slots**2)
        + 4 * (inp.slots * inp.shape.hidden + inp.shape.hidden)
        + 3 * inp.slots
    )
    router_buffers += inp.layer_slots
    blocks = banks + router_buffers
    train_tensors = trainable_tensors(inp)
    trainable_numel = sum(t.numel for t in train_tensors)
    train_partition = sum(_shard(t.numel, W) for t in train_tensors)
    train_persistent = sum(
        t.numel for t in train_tensors if t.numel <= k.param_persistence_threshold
    )
    trainable = train_partition * (2 * e + 12) + train_persistent * e
    acts = activation_bytes(inp)
    parts = {
        "backbone_shard": backbone_gpu,
        "gathered": gathered,
        "block_stack": blocks,
        "trainable_optimizer": trainable,
        "activations": acts["peak"],
    }
    total = sum(parts.values())
    return {
        "inputs": {
            **{k2: v for k2, v in asdict(inp).items() if k2 not in ("shape", "knobs")},
            "model": inp.shape.name,
            "world": W,
            "knobs": asdict(k),
        },
        "shape": asdict(inp.shape),
        "bytes": parts,
        "total": total,
        "fits": total <= inp.gpu_mem_gib * GiB,
        "detail": {
            "backbone_partitions": backbone,
            "backbone_persistent_full": persistent,
            "quant_constants_replicated": quant_consts,
            "backbone_offloaded_to_cpu": backbone if inp.offload_param else 0,
            "gathered_numel": gathered_numel,
            "largest_module_numel": largest_module,
            "banks": banks,
            "router_buffers": router_buffers,
            "trainable_numel": trainable_numel,
            "trainable_partition_numel": train_partition,
            "trainable_persistent_numel": train_persistent,
            "load_peak": full_quantized if inp.quant != "none" else backbone_gpu,
            **{f"act_{k2}": v for k2, v in acts.items()},
        },
    }


# --------------------------------------------------------------------------- output
COLUMNS = [
    ("backbone_shard", "backbone shard"),
    ("gathered", "gathered"),
    ("block_stack", "blocks (repl.)"),
    ("trainable_optimizer", "train+optim"),
    ("activations", "activations"),
]


def _gib(x: float) -> str:
    return f"{x / GiB:.2f}"


def _label(result: dict) -> str:
    i = result["inputs"]
    q = i["quant"] if i["quant"] != "none" else i["dtype"]
    return f"{i['model']} {q} x{i['world']}"


def format_table(results: list[dict], markdown: bool = False) -> str:
    head = ["model / GPUs", *[c[1] for c in COLUMNS], "total GiB", "fits"]
    rows = []
    for r in results:
        gpu = r["inputs"]["gpu_mem_gib"]
        rows.append(
            [
                _label(r),
                *[_gib(r["bytes"][c[0]]) for c in COLUMNS],
                _gib(r["total"]),
                f"{'yes' if r['fits'] else 'NO'} ({gpu:g})",
            ]
        )
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [max(len(x[i]) for x in [head, *rows]) for i in range(len(head))]
    fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    return "\n".join(fmt.format(*row) for row in [head, *rows])


def assumptions(inp: PlanInputs) -> str:
    k = inp.knobs
    tokens = f"{inp.seq_len} tokens"
    if inp.shape.is_t5:
        enc = inp.seq_len - inp.target_len
        tokens = f"({enc} encoder + {inp.target_len} decoder) tokens"
    t5 = (
        " T5: the activations are an estimate, not measured (dropout masks and position "
        "biases not counted; see sapt_dist/cluster/plan.py)."
        if inp.shape.is_t5
        else ""
    )
    return (
        f"per GPU, GiB; micro-batch {inp.micro_batch} x {tokens} (padded), "
        f"{inp.slots} task slots{' + generator slot' if inp.generator_slot else ''}, "
        + (
            f"prompt blocks of {inp.prompt_length} virtual tokens, AdamW, "
            if inp.prompt_length
            else f"LoRA r {inp.rank} on {','.join(inp.targets)}, AdamW, "
        )
        + f"gradient checkpointing {'on' if inp.grad_ckpt else 'off'}"
        f"{', backbone partitions offloaded to CPU' if inp.offload_param else ''}; "
        f"ZeRO-3 prefetch {k.prefetch_bucket_size:.3g}, max live {k.max_live_parameters:.3g}, "
        f"reuse distance {k.max_reuse_distance:.3g}, persistence {k.param_persistence_threshold:.3g} "
        f"elements, memory_efficient_linear {str(k.memory_efficient_linear).lower()}. Not counted: CUDA context/NCCL (~0.5-1 GiB), fragmentation, "
        f"communication buckets.{t5}"
    )


SWEEP_MODELS = ("llama2-7b", "llama2-13b", "llama2-70b")
SWEEP_GPUS = ((1, 1), (8, 1), (8, 2))  # (gpus per node, nodes): 1, 8 and 16 GPUs
SWEEP_QUANT = ("none", "nf4")


def sweep(base: PlanInputs) -> list[dict]:
    """The docs table: LLaMA-2 7B / 13B / 70B, bf16 and nf4, on 1, 8 and 16 GPUs."""
    out = []
    for m in SWEEP_MODELS:
        for quant in SWEEP_QUANT:
            for g, n in SWEEP_GPUS:
                out.append(
                    plan(replace(base, shape=PRESETS[m], quant=quant, gpus_per_node=g, nodes=n))
                )
    return out


# --------------------------------------------------------------------------- CLI
def _from_run_config(path: str) -> dict[str, Any]:
    """Planner defaults from a run config YAML (a preset name or a path)."""
    from sapt_dist.config import ConfigError, load_config, preset_path
    from sapt_dist.data.tasks import ORDERS

    p = Path(path)
    if not p.is_file():
        preset = preset_path(path)
        if not preset.is_file():
            names = sorted(x.stem for x in preset.parent.glob("*.yaml"))
            raise PlanError(f"--run-config: no file {p} and no preset {path!r} (presets: {names})")
        p = preset
    import yaml

    tree = yaml.safe_load(p.read_text()) or {}
    overrides = []
    demo = (tree.get("model") or {}).get("builder") == "demo"
    if not (tree.get("model") or {}).get("path"):
        overrides.append("model.builder=demo")  # the shape then comes from --model/--config
    try:
        cfg = load_config(p, overrides)
    except ConfigError as e:
        raise PlanError(f"--run-config: {e}") from None
    from sapt_dist.methods import METHODS

    arm = METHODS[cfg.method].replay == "arm"
    out: dict[str, Any] = {
        "dtype": "fp32" if cfg.model.dtype == "float32" else "bf16",
        "quant": cfg.model.quantization,
        "micro_batch": cfg.train.micro_batch_size,
        "seq_len": cfg.data.max_source_length + cfg.data.max_target_length,
        "target_len": cfg.data.max_target_length,
        "rank": cfg.adapter.rank,
        "targets": tuple(cfg.adapter.target_modules),
        "prompt_length": cfg.adapter.prompt_length if cfg.adapter.kind == "prompt" else 0,
        "query_hidden": cfg.adapter.query_hidden,
        "grad_ckpt": cfg.model.gradient_checkpointing,
        "generator_slot": arm and cfg.replay.kind == "generative",
    }
    n_tasks = len(cfg.data.tasks) or len(ORDERS.get(cfg.data.order, [])) or None
    slots = cfg.adapter.n_slots or n_tasks
    if slots:
        out["slots"] = slots
    if cfg.model.path and (Path(cfg.model.path) / "config.json").is_file():
        out["shape"] = shape_from_config(cfg.model.path)
    elif demo:  # the demo backbone's recipe gives its shape (nothing is built)
        from sapt_dist.backbone.load import demo_spec

        m = cfg.model
        spec = demo_spec(m.demo_hidden_size, m.demo_layers, m.demo_arch)
        hf = {k: v for k, v in spec.items() if k not in ("seed", "arch")}
        hf.update(model_type=m.demo_arch, tie_word_embeddings=m.demo_arch == "t5")
        out["shape"] = shape_from_dict(hf, name=f"demo-{m.demo_arch}")
    if cfg.distributed.deepspeed_config:
        from sapt_dist.config import resolve_ds_config
        from sapt_dist.distributed import zero_stage

        ds = resolve_ds_config(cfg.distributed.deepspeed_config)
        if zero_stage(ds) == 3:
            out["knobs"] = DeepSpeedKnobs.from_ds_config(cfg.distributed.deepspeed_config)
        else:  # e.g. the 7B presets' zero2: every GPU holds the whole backbone
            print(
                f"note: {p} uses ZeRO stage {zero_stage(ds)}, which keeps the whole backbone on "
                "every GPU; the 1-GPU figures below are its per-GPU memory",
                file=sys.stderr,
            )
    return out


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="sapt-plan",
        description="Per-GPU memory of SAPT training on a ZeRO-3-sharded backbone "
        "(backbone shard, gathered working set, replicated block stack, trainable + "
        "optimizer, activations). Defaults follow the LLaMA-2 presets.",
    )
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--model", help=f"built-in shape: {', '.join(PRESETS)}")
    src.add_argument(
        "--config", help="an HF config.json (or model folder) of a LLaMA-style model or a T5"
    )
    ap.add_argument(
        "--run-config",
        help="a run config YAML or preset name (e.g. llama2_13b_superni_order1): dtype, "
        "4-bit, micro-batch, lengths, rank, targets, slots and checkpointing come from it "
        "(flags given explicitly still win)",
    )
    ap.add_argument("--gpus-per-node", type=int, default=None)
    ap.add_argument("--nodes", type=int, default=None)
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default=None)
    ap.add_argument("--quant", choices=["none", "nf4", "fp4"], default=None)
    ap.add_argument("--double-quant", action="store_true", default=None)
    ap.add_argument("--micro-batch", type=int, default=None)
    ap.add_argument(
        "--seq-len", type=int, default=None, help="tokens per sequence (prompt + target)"
    )
    ap.add_argument(
        "--target-len",
        type=int,
        default=None,
        help="T5: the target's tokens of --seq-len (the decoder's; the rest are the encoder's)",
    )
    ap.add_argument("--slots", type=int, default=None, help="task slots (tasks in the sequence)")
    ap.add_argument(
        "--no-generator-slot", dest="generator_slot", action="store_false", default=None
    )
    ap.add_argument("--rank", type=int, default=None)
    ap.add_argument(
        "--targets", default=None, help="comma-separated linear names (q_proj,v_proj; T5: q,v)"
    )
    ap.add_argument(
        "--prompt-length",
        type=int,
        default=None,
        help="prompt blocks of this many virtual tokens instead of LoRA (adapter.kind: prompt)",
    )
    ap.add_argument("--query-hidden", type=int, default=None)
    ap.add_argument("--grad-ckpt", dest="grad_ckpt", action="store_true", default=None)
    ap.add_argument("--no-grad-ckpt", dest="grad_ckpt", action="store_false")
    ap.add_argument("--no-padding", dest="padded", action="store_false", default=None)
    ap.add_argument("--offload-param", action="store_true", default=None)
    ap.add_argument("--ds-config", default=None, help="DeepSpeed JSON: its stage3_* knobs")
    ap.add_argument("--gpu-mem", type=float, default=None, help="GiB per GPU (default 80)")
    ap.add_argument("--format", choices=["table", "json", "markdown"], default="table")
    ap.add_argument(
        "--sweep",
        action="store_true",
        help="the docs table: LLaMA-2 7B/13B/70B, bf16 and nf4, on 1, 8 and 16 GPUs",
    )
    return ap


def inputs_from_args(args: argparse.Namespace) -> PlanInputs:
    values: dict[str, Any] = {}
    if args.run_config:
        values.update(_from_run_config(args.run_config))
    if args.model:
        if args.model not in PRESETS:
            raise PlanError(f"--model: unknown model {args.model!r} (built in: {list(PRESETS)})")
        values["shape"] = PRESETS[args.model]
    elif args.config:
        values["shape"] = shape_from_config(args.config)
    if "shape" not in values:
        if args.sweep:
            values["shape"] = PRESETS["llama2-7b"]
        else:
            raise PlanError(f"give the model: --model {{{','.join(PRESETS)}}} or --config PATH")
    if args.ds_config:
        values["knobs"] = DeepSpeedKnobs.from_ds_config(args.ds_config)
    flags = {
        "gpus_per_node": args.gpus_per_node,
        "nodes": args.nodes,
        "dtype": args.dtype,
        "quant": args.quant,
        "double_quant": args.double_quant,
        "micro_batch": args.micro_batch,
        "seq_len": args.seq_len,
        "target_len": args.target_len,
        "slots": args.slots,
        "generator_slot": args.generator_slot,
        "rank": args.rank,
        "prompt_length": args.prompt_length,
        "query_hidden": args.query_hidden,
        "grad_ckpt": args.grad_ckpt,
        "padded": args.padded,
        "offload_param": args.offload_param,
        "gpu_mem_gib": args.gpu_mem,
    }
    values.update({k: v for k, v in flags.items() if v is not None})
    if args.targets is not None:
        values["targets"] = tuple(t.strip() for t in args.targets.split(",") if t.strip())
    elif "targets" not in values and values["shape"].is_t5:
        values["targets"] = ("q", "v")  # the paper's T5 setting (the default names LLaMA's)
    inp = PlanInputs(**values)
    inp.validate()
    return inp


#: what each required key's placeholder in the printed sbatch command asks for
PLACEHOLDERS = {
    "model.path": "model.path=<your model folder>",
    "data.root": "data.root=<your CL_Benchmark folder>",
}


def required_placeholders(config_file: str | None) -> list[str]:
    """The keys a submitted run needs that the run config does not give, as named
    placeholders (``model.path=<your model folder>``): ``model.path`` when the config
    leaves it empty (a real backbone), ``data.root`` when its folder is not there from
    here (a preset's ``../shared/data``). Without a run config (``my.yaml``): both."""
    if config_file is None:
        return list(PLACEHOLDERS.values())
    import yaml

    try:
        tree = yaml.safe_load(Path(config_file).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return list(PLACEHOLDERS.values())
    model, data = tree.get("model") or {}, tree.get("data") or {}
    out = []
    if model.get("builder") != "demo" and not model.get("path"):
        out.append(PLACEHOLDERS["model.path"])
    root = data.get("root", "demo")
    if root != "demo" and not Path(str(root)).expanduser().is_dir():
        out.append(PLACEHOLDERS["data.root"])
    return out


def submit_command(inp: PlanInputs, fits: bool, config: str | None = None) -> str:
    """The ``sbatch`` command that runs the planned layout: the script for one node or
    several, the GPU counts, and the overrides the estimate assumed (dtype, 4-bit,
    micro-batch, gradient checkpointing, ZeRO-3). ``config``: the run config named by
    ``--run-config`` (else a placeholder to fill in)."""
    cfg = "my.yaml"
    if config:
        from sapt_dist.config import preset_path

        preset = preset_path(config)
        cfg = config if Path(config).is_file() or not preset.is_file() else str(preset)
        if Path(cfg).resolve().is_relative_to(Path.cwd()):
            cfg = str(Path(cfg).resolve().relative_to(Path.cwd()))
    needed = required_placeholders(cfg if config else None)
    sets = [
        f"model.dtype={'bfloat16' if inp.dtype == 'bf16' else 'float32'}",
        f"train.micro_batch_size={inp.micro_batch}",
        f"model.gradient_checkpointing={'true' if inp.grad_ckpt else 'false'}",
    ]
    if not config:  # a run config keeps its own DeepSpeed config
        ds = "zero3_offload" if inp.offload_param else "zero3"
        sets.append(f"distributed.deepspeed_config={ds}")
    if inp.quant != "none":
        sets.append(f"model.quantization={inp.quant}")
    if inp.prompt_length and not config:
        sets += ["adapter.kind=prompt", f"adapter.prompt_length={inp.prompt_length}"]
    if inp.nodes == 1:
        head = (
            f"sbatch --ntasks-per-node={inp.gpus_per_node} --gpus-per-task=1 "
            f"slurm/train.sbatch {cfg}"
        )
    else:
        head = (
            f"sbatch --nodes={inp.nodes} --gpus-per-node={inp.gpus_per_node} "
            f"slurm/train_multinode.sbatch {cfg}"
        )
    line = head + "".join(" \\\n    " + part for part in (" ".join(needed), " ".join(sets)) if part)
    if needed:
        who = "the config does" if config else "my.yaml (your run config) may"
        line = f"# replace each <...>: keys the run needs that {who} not set\n" + line
    if not fits:
        return (
            f"# does not fit {inp.gpu_mem_gib:g} GiB per GPU: add GPUs (--nodes), use "
            f"--quant nf4, a smaller --micro-batch or --grad-ckpt, then plan again\n"
            + "\n".join("# " + x for x in line.splitlines())
        )
    return line


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        inp = inputs_from_args(args)
        results = sweep(inp) if args.sweep else [plan(inp)]
    except PlanError as e:
        print(f"sapt-plan: error: {e}", file=sys.stderr)
        return 2
    if args.format == "json":
        print(json.dumps(results if args.sweep else results[0], indent=2))
        return 0
    print(format_table(results, markdown=args.format == "markdown"))
    print()
    print(assumptions(inp))
    if not args.sweep:
        d = results[0]["detail"]
        if inp.quant != "none":
            print(
                f"load peak: {_gib(d['load_peak'])} GiB per GPU (each rank loads the whole "
                "quantized model before DeepSpeed partitions it)"
            )
        print(
            f"of which replicated on every GPU: block stack {_gib(d['banks'] + d['router_buffers'])}, "
            f"quantization constants {_gib(d['quant_constants_replicated'])}, persistent "
            f"parameters {_gib(d['backbone_persistent_full'])} GiB"
        )
        print()
        print("submit (from the repository root):")
        print(submit_command(inp, results[0]["fits"], args.run_config))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
