"""SAPT around an unmodified Hugging Face causal LM or encoder-decoder (T5).

``SAPTModel`` replaces the target linear layers of the backbone in place with
:class:`~sapt_dist.method.lora.MixtureLoRALinear` (the backbone's code is neither copied nor
patched), owns the :class:`~sapt_dist.method.attention.SharedAttention`, and on every forward:

1. embeds the tokens once with the backbone's own embedding table,
2. max-pools the prompt's embeddings and computes the mixture weights ``w`` (batch, T),
3. puts ``w`` in the routing context every adapted layer reads,
4. runs the backbone on the embeddings (``inputs_embeds``), so the table is read once.

An encoder-decoder backbone (``config.is_encoder_decoder``, e.g. T5) is the one branch,
kept inside ``forward`` / ``generate``: the batch's ``input_ids`` are then the encoder
input (the prompt, all of it routed on) and ``labels`` the decoder's targets; the weights
come from the encoder input and hold for the encoder and every decoder step (LoRA on the
encoder's and the decoder's self- and cross-attention alike); prompt blocks go before the
encoder's input embeddings. ``collate_train(seq2seq=True)`` builds such batches.

The task life cycle is ``start_task(slot)`` -> train -> ``file_current()`` ->
``set_target(slot, a*)``; see ``sapt_dist.train.run`` for the loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from sapt_dist.config import AdapterConfig
from sapt_dist.method.adapter import BlockHolder
from sapt_dist.method.attention import RoutingMode, SharedAttention, max_pool_prompt
from sapt_dist.method.lora import (
    MixtureLoRALinear,
    RoutingContext,
    disable_bnb_cpu_packing,
    is_adaptable_linear,
)
from sapt_dist.method.ops import SlotTables, slot_expansion, slot_tables
from sapt_dist.method.prompt import PROMPT_BLOCK, MixturePrompt

__all__ = ["SAPTModel", "SAPTOutput", "find_target_layers"]

IGNORE_INDEX = -100
#: ``adapter.query_init: normal``: the released model's ``_init_weights`` draws every
#: nn.Linear from N(0, initializer_range), 0.02 in LLaMA-2's config
QUERY_INIT_STD = 0.02


@dataclass
class SAPTOutput:
    """What ``SAPTModel.forward`` returns.

    ``loss`` is what the optimizer minimises: ``task_loss + kl_ratio * arm_loss``.
    """

    loss: torch.Tensor | None
    logits: torch.Tensor
    weights: torch.Tensor
    task_loss: torch.Tensor | None = None
    arm_loss: torch.Tensor | None = None


def find_target_layers(model: nn.Module, targets: list[str]) -> dict[str, nn.Module]:
    """Linear layers of ``model`` whose last name component is in ``targets``.

    Raises:
        ValueError: naming the linear layers the model has, when a target is not found.
    """
    found: dict[str, nn.Module] = {}
    linear_names: set[str] = set()
    seen_targets: set[str] = set()
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if is_adaptable_linear(module):
            linear_names.add(leaf)
            if leaf in targets:
                found[name] = module
                seen_targets.add(leaf)
    missing = [t for t in targets if t not in seen_targets]
    if missing:
        raise ValueError(
            f"{type(model).__name__} has no linear layer named {missing} "
            f"(adapter.target_modules = {targets}); its linear layers are named: "
            f"{sorted(linear_names)}"
        )
    return found


class SAPTModel(nn.Module):
    """A frozen HF causal LM or encoder-decoder with ``n_slots`` per-task blocks (LoRA or
    soft prompts) and SAPT's routing.

    Args:
        backbone: a Hugging Face ``*ForCausalLM`` or ``*ForConditionalGeneration``
            encoder-decoder (T5-style); its parameters are frozen here.
        adapter: rank, alpha, dropout, targets, query width, temperature, gradient mode.
        n_slots: number of task slots, fixed for the model's life.
        routing: ``attention`` (SAPT), ``sum`` (IncLoRA: every active block, weight 1) or
            ``gate`` (GainLoRA: a gate network and key per slot, ``method.gate``).
    """

    def __init__(
        self,
        backbone: nn.Module,
        adapter: AdapterConfig,
        n_slots: int,
        routing: RoutingMode = "attention",
        dtype: torch.dtype | None = None,
        generator_slot: bool = False,
    ) -> None:
        super().__init__()
        if n_slots < 1:
            raise ValueError(f"n_slots must be >= 1, got {n_slots}")
        self.backbone = backbone
        #: T5-style encoder-decoder: prompt -> encoder, target -> decoder (see the module doc)
        self.is_encoder_decoder = bool(
            getattr(getattr(backbone, "config", None), "is_encoder_decoder", False)
        )
        self.adapter_config = adapter
        self.n_slots = n_slots
        # The generator of pseudo-samples is one more block on the same backbone: an extra
        # slot after the task slots that routing never selects (its weight is given).
        self.has_generator_slot = generator_slot
        self.n_layer_slots = n_slots + int(generator_slot)
        self.register_buffer("layer_current", torch.zeros(self.n_layer_slots, dtype=torch.bool))
        for p in backbone.parameters():
            p.requires_grad_(False)
        for m in backbone.modules():
            disable_bnb_cpu_packing(m)
        self.context = RoutingContext()
        emb = backbone.get_input_embeddings()
        #: every block holder (``method.adapter.BlockHolder``): the adapted linear layers
        #: (LoRA) or the one prompt module
        self.layers: dict[str, BlockHolder] = {}
        #: the prompt blocks (``adapter.kind == 'prompt'``), else None
        self.prompts: MixturePrompt | None = None
        if adapter.kind == "prompt":
            self.target_names = []
            self.prompts = MixturePrompt(
                emb, self.n_layer_slots, adapter.prompt_length, self.context, dtype=dtype
            )
            self.layers[PROMPT_BLOCK] = self.prompts
        else:
            self.target_names = sorted(find_target_layers(backbone, list(adapter.target_modules)))
        for name in self.target_names:
            parent_name, _, leaf = name.rpartition(".")
            parent = backbone.get_submodule(parent_name) if parent_name else backbone
            wrapped = MixtureLoRALinear(
                getattr(parent, leaf),
                n_slots=self.n_layer_slots,
                rank=adapter.rank,
                alpha=adapter.alpha,
                dropout=adapter.dropout,
                context=self.context,
                dtype=dtype,
            )
            setattr(parent, leaf, wrapped)
            self.layers[name] = wrapped
        d = emb.embedding_dim
        self.router = SharedAttention(
            d,
            n_slots,
            hidden=adapter.query_hidden,
            tau=adapter.tau,
            mode=routing,
            center=adapter.router_center if routing == "attention" else "none",
            query_init_std=QUERY_INIT_STD if adapter.query_init == "normal" else None,
        )
        if dtype is not None:
            self.router.to(dtype)
        device = emb.weight.device if emb.weight.device.type != "meta" else "cpu"
        self.router.to(device)
        self.layer_current.data = self.layer_current.to(device)
        #: the LoRA layers' (scaling, rank) and output widths: what ``_slot_tables`` serve
        self._plan_kind = (adapter.alpha / adapter.rank, adapter.rank)
        self._b_widths = (
            []
            if self.prompts is not None
            else sorted({m.out_features for m in self.layers.values()})
        )
        if self.prompts is None:
            # the plans' SlotTables as buffers (never saved): rewritten in place from
            # layer_current whenever it changes (_refresh_slot_tables)
            t = slot_tables(self.layer_current, adapter.rank, self._plan_kind[0], self._b_widths)
            self.register_buffer("slot_expansion", t.expansion, persistent=False)
            self.register_buffer("slot_select", t.select, persistent=False)
            self.register_buffer("slot_columns", t.columns, persistent=False)
            for d, mem in t.b_select.items():
                self.register_buffer(f"slot_b_select_{d}", mem, persistent=False)
            # a loaded state dict brings its own layer_current
            self.register_load_state_dict_post_hook(lambda m, _keys: m._refresh_slot_tables())
        #: loss terms a method adds after the forward (``sapt_dist.method.penalties``, built
        #: from the method's row by the run); held here only so that ZeRO-3's hooks gather
        #: what they read. ``forward`` never calls them: the training step does.
        self.penalties = nn.ModuleDict()
        self._set_requires_grad()
        self.start_task(0)

    def _apply(self, fn, recurse: bool = True):
        """``.to(dtype)`` / ``.bfloat16()`` (DeepSpeed's bf16 engine casts the model) keep the
        plans' scale expansion in fp32: the scales are fp32 whatever the compute dtype."""
        super()._apply(fn, recurse)
        exp = getattr(self, "slot_expansion", None)
        if exp is not None and exp.dtype != torch.float32:
            rank, scaling = self.adapter_config.rank, self._plan_kind[0]
            self.slot_expansion = slot_expansion(
                self.n_layer_slots, rank, scaling, torch.float32
            ).to(exp.device)
        return self

    @torch.no_grad()
    def _refresh_slot_tables(self) -> None:
        """Rewrite the plans' slot tables (``ops.SlotTables``) in place from
        ``layer_current``: called by everything that changes it."""
        if self.prompts is not None:
            return
        rank, scaling = self.adapter_config.rank, self._plan_kind[0]
        t = slot_tables(self.layer_current, rank, scaling, self._b_widths)
        self.slot_select.copy_(t.select)
        self.slot_columns.copy_(t.columns)
        for d, mem in t.b_select.items():
            getattr(self, f"slot_b_select_{d}").copy_(mem)

    def _slot_tables(self) -> dict[tuple[float, int], SlotTables]:
        """The routing context's view of the slot tables (the buffers as they are now:
        ``.to()`` replaces them)."""
        b_select = {d: getattr(self, f"slot_b_select_{d}") for d in self._b_widths}
        tables = SlotTables(self.slot_expansion, self.slot_select, self.slot_columns, b_select)
        return {self._plan_kind: tables}

    # ------------------------------------------------------------------ parameters
    def adapter_params(self) -> list[nn.Parameter]:
        """Every trainable parameter: the current block of each layer, its key, ``g``."""
        return self.block_params() + self.router.adapter_params()

    def block_params(self) -> list[nn.Parameter]:
        """The current block of every adapted layer (what the generator trains)."""
        return [p for layer in self.layers.values() for p in layer.adapter_params()]

    def named_adapter_params(self) -> dict[str, nn.Parameter]:
        ids = {id(p) for p in self.adapter_params()}
        return {n: p for n, p in self.named_parameters() if id(p) in ids}

    def _set_requires_grad(self) -> None:
        for p in self.parameters():
            p.requires_grad_(False)
        for p in self.adapter_params():
            p.requires_grad_(True)

    # ------------------------------------------------------------------ task life cycle
    @property
    def current_slot(self) -> int:
        return int(self.router.current.nonzero()[0, 0]) if self.router.current.any() else -1

    @property
    def n_active(self) -> int:
        return int(self.router.active.sum())

    @torch.no_grad()
    def start_task(self, slot: int, fresh: bool = True) -> None:
        """Make ``slot`` the trainable block; slots ``0..slot`` become active.

        With ``fresh=False`` the trainable block starts from what the slot's bank holds
        (used by SeqLoRA, whose one block keeps learning, and by resume).
        """
        if not 0 <= slot < self.n_slots:
            raise ValueError(
                f"slot {slot} out of range: this model has {self.n_slots} task slots "
                f"(adapter.n_slots); a longer task sequence needs more slots"
            )
        r = self.router
        r.current.zero_()
        r.current[slot] = True
        r.active.zero_()
        r.active[: slot + 1] = True
        self.layer_current.zero_()
        self.layer_current[slot] = True
        self._refresh_slot_tables()
        for layer in self.layers.values():
            if fresh:
                layer.reset_current()
            else:
                layer.load_current(slot)
        if fresh or not bool(r.key_bank[slot].any()):
            r.reset_key()
        else:
            r.load_key(slot)
        if r.gates is not None:
            # GainLoRA: a new task's gate starts as the previous task's (the first: fresh)
            if not fresh:
                r.gates.load(slot)
            elif slot > 0:
                r.gates.load(slot - 1)
            else:
                r.gates.reset()

    @property
    def generator_slot(self) -> int:
        if not self.has_generator_slot:
            raise RuntimeError("this SAPTModel was built without a generator slot")
        return self.n_layer_slots - 1

    @torch.no_grad()
    def start_generator(self) -> None:
        """Make the generator slot's (fresh) block the trainable one; routing state and the
        task blocks are untouched. Use ``generator_weights`` as the forward's weights."""
        slot = self.generator_slot
        self.layer_current.zero_()
        self.layer_current[slot] = True
        self._refresh_slot_tables()
        for layer in self.layers.values():
            layer.reset_current()

    def generator_weights(self, batch: int) -> torch.Tensor:
        """(batch, layer slots) one-hot weights on the generator block."""
        w = torch.zeros(batch, self.n_layer_slots, device=self.layer_current.device)
        w[:, self.generator_slot] = 1.0
        return w

    @torch.no_grad()
    def file_current(self) -> None:
        """Copy the trainable block and key into their slot's bank (in place)."""
        slot = self.current_slot
        for layer in self.layers.values():
            layer.file_current(slot)
        self.router.file_key(slot)
        if self.router.gates is not None:
            self.router.gates.file(slot)

    @torch.no_grad()
    def set_target(self, slot: int, target: torch.Tensor) -> None:
        """Store task ``slot``'s attention target ``a*`` (over slots ``0..slot``)."""
        row = torch.zeros(self.n_slots, dtype=self.router.targets.dtype, device=target.device)
        row[: target.numel()] = target.to(row.dtype)
        self.router.targets[slot].copy_(row.to(self.router.targets.device))

    def pooled_prompts(self, input_ids: torch.Tensor, prompt_mask: torch.Tensor) -> torch.Tensor:
        """(batch, d) the pooled prompt embeddings the routing reads (SAPT: max-pooled,
        before centering; gates: their mean)."""
        return self.router.pool(self.embed(input_ids), prompt_mask)

    def x_grad_mask(self) -> torch.Tensor | None:
        if self.adapter_config.gradient == "exact":
            return None
        return self.layer_current.to(torch.float32)

    # ------------------------------------------------------------------ routing
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.backbone.get_input_embeddings()(input_ids)

    def routing_weights(
        self, input_ids: torch.Tensor, prompt_mask: torch.Tensor, embeds: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(batch, T) mixture weights from the prompt tokens of ``input_ids``."""
        if embeds is None:
            embeds = self.embed(input_ids)
        return self.router(self.router.pool(embeds, prompt_mask))

    def routing_scores(self, input_ids: torch.Tensor, prompt_mask: torch.Tensor) -> torch.Tensor:
        """(batch, T) the attention's key scores before the softmax (see
        :meth:`SharedAttention.scores`), from the same pooled prompt as the weights."""
        return self.router(self.router.pool(self.embed(input_ids), prompt_mask), output="scores")

    def _new_block_only(self, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``adapter.learning_mixture=new_block``: the training mixture one-hot on the
        trainable slot (no gradient reaches the attention through it), and the attention's
        own loss on the task's inputs: ``KL(onehot || w(x)) = -log w(x)[new]``, per row,
        averaged (the ARM's loss with a one-hot target), so that the router learns to pick
        the block being trained while that block learns alone.

        Returns:
            (the one-hot mixture (b, T), the scalar routing loss).
        """
        onehot = self.router.current.to(weights.dtype).expand_as(weights)
        own = (weights * onehot).sum(-1).clamp_min(torch.finfo(weights.dtype).tiny)
        return onehot, -own.log().mean()

    def _route(self, weights: torch.Tensor, tokens: int | None = None) -> None:
        """Hand the (batch, T) or (batch, layer slots) weights to every adapted layer.

        With ``tokens`` (the sequence length of the forward to come) the scales and masks
        every layer shares are prepared here, once, outside any layer: a layer under
        gradient checkpointing then only reads them.
        """
        extra = self.n_layer_slots - weights.shape[-1]
        if extra > 0:
            weights = torch.nn.functional.pad(weights, (0, extra))
        ctx = self.context
        ctx.weights = weights
        ctx.current = self.layer_current
        ctx.x_grad_mask = None if self.adapter_config.gradient == "exact" else self.layer_current
        if self.prompts is None:
            ctx.tables = self._slot_tables()
        if tokens is not None and self.prompts is None:
            for kind in {(m.scaling, m.rank, m.A_bank.dtype) for m in self.layers.values()}:
                ctx.plan(*kind, tokens)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        prompt_mask: torch.Tensor | None = None,
        replay_input_ids: torch.Tensor | None = None,
        replay_attention_mask: torch.Tensor | None = None,
        replay_task: torch.Tensor | None = None,
        kl_ratio: float = 1.0,
        weights: torch.Tensor | None = None,
        decoder_input_ids: torch.Tensor | None = None,
    ) -> SAPTOutput:
        """One SAPT forward: task loss (if ``labels``) plus the ARM loss (if replay given).

        Args:
            input_ids: (b, L) prompt + target tokens; encoder-decoder: the prompt (the
                encoder input).
            attention_mask: (b, L), 0 on padding.
            labels: (b, L) target token ids, ``-100`` on prompt and padding;
                encoder-decoder: (b, U) the decoder's targets, ``-100`` on padding.
            prompt_mask: (b, L) 1 on prompt tokens; derived from ``attention_mask`` and
                ``labels`` when omitted (encoder-decoder: the whole encoder input).
            replay_input_ids / replay_attention_mask: (n, Lr) pseudo-sample prompts.
            replay_task: (n,) the earlier task (slot) of each pseudo-sample.
            kl_ratio: weight of the ARM loss.
            weights: (b, T) mixture weights to use instead of the attention's (oracle
                routing, diagnostics, tests).
            decoder_input_ids: encoder-decoder only: the decoder's input (default: the
                labels shifted right behind the decoder start token, as HF does).
        """
        if decoder_input_ids is not None and not self.is_encoder_decoder:
            raise ValueError("decoder_input_ids is for an encoder-decoder backbone")
        self.context.clear()  # the last step's graph goes before this one's is built
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if prompt_mask is None:
            if labels is not None and not self.is_encoder_decoder:
                # causal LM: one sequence, prompt + target; the target is not routed on:
                # attended and not a target, ``mask > is_target`` in one comparison
                prompt_mask = attention_mask > (labels != IGNORE_INDEX)
            else:
                prompt_mask = attention_mask.bool()
        embeds = self.embed(input_ids)
        own_route = None  # learning_mixture=new_block: the router's loss on these inputs
        if weights is None:
            weights = self.routing_weights(input_ids, prompt_mask, embeds=embeds)
            if self.training and self.adapter_config.learning_mixture == "new_block":
                weights, own_route = self._new_block_only(weights)
        # LoRA layers' shared scales are prepared once here (prompt blocks have none)
        self._route(weights, tokens=None if self.prompts is not None else input_ids.shape[1])
        if self.prompts is not None:
            embeds, attention_mask, labels = self._prepend_prompt(embeds, attention_mask, labels)
        extra = {"decoder_input_ids": decoder_input_ids} if self.is_encoder_decoder else {}
        out = self.backbone(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            labels=labels,
            use_cache=False,
            **extra,
        )
        task_loss = out.loss
        arm = None
        if replay_input_ids is not None:
            if replay_task is None or replay_attention_mask is None:
                raise ValueError("replay_input_ids needs replay_attention_mask and replay_task")
            u = max_pool_prompt(self.embed(replay_input_ids), replay_attention_mask)
            arm = self.router(u, replay_task, output="arm")
        if own_route is not None:  # a one-hot target on the new task's inputs: ARM's term
            arm = own_route if arm is None else arm + own_route
        loss = task_loss
        if arm is not None:
            loss = arm * kl_ratio if loss is None else loss + kl_ratio * arm
        logits = out.logits
        if self.prompts is not None and not self.is_encoder_decoder:
            # the virtual tokens' positions are not the input's (an encoder-decoder's logits
            # are the decoder's: no virtual tokens there)
            logits = logits[:, self.prompts.length :]
        return SAPTOutput(
            loss=loss, logits=logits, weights=weights, task_loss=task_loss, arm_loss=arm
        )

    def _prepend_prompt(
        self,
        embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Prompt blocks: the mixed prompt (routing weights already set) before the input
        embeddings; the attention mask sees it, the labels ignore it (as peft does). On an
        encoder-decoder these are the encoder's embeddings and the decoder's labels are
        left alone (peft's prompt tuning of a seq2seq LM does the same)."""
        assert self.prompts is not None
        mixed = self.prompts(self.context.weights).to(embeds.dtype)
        b, L = embeds.shape[0], self.prompts.length
        embeds = torch.cat([mixed, embeds], dim=1)
        attention_mask = torch.cat([attention_mask.new_ones(b, L), attention_mask], dim=1)
        if labels is not None and not self.is_encoder_decoder:
            labels = torch.cat([labels.new_full((b, L), IGNORE_INDEX), labels], dim=1)
        return embeds, attention_mask, labels

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        weights: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """HF ``generate`` with the weights computed once from the (left-padded) prompt
        (or given) and held fixed through every decoding step.

        Returns HF's output: the prompt ids followed by the new tokens (causal LM) or the
        decoder's tokens from its start token on (encoder-decoder); :meth:`new_tokens`
        takes the generated part of either."""
        self.context.clear()
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if weights is None:
            weights = self.routing_weights(input_ids, attention_mask)
        if self.is_encoder_decoder:
            return self._generate_seq2seq(input_ids, attention_mask, weights, kwargs)
        if self.prompts is not None:  # HF expands the embeddings (beams) itself
            self._route(weights)
            return self._generate_with_prompt(input_ids, attention_mask, kwargs)
        expand = self._expansion(kwargs)
        if expand > 1:
            weights = weights.repeat_interleave(expand, dim=0)
        self._route(weights)
        self.context.inference = {}
        try:
            return self.backbone.generate(
                input_ids=input_ids, attention_mask=attention_mask, **kwargs
            )
        finally:
            self.context.inference = None

    @staticmethod
    def _expansion(kwargs: dict[str, Any]) -> int:
        """How many rows HF makes of each prompt: num_beams for beam search, else
        num_return_sequences."""
        beams = int(kwargs.get("num_beams", 1) or 1)
        return beams if beams > 1 else int(kwargs.get("num_return_sequences", 1) or 1)

    def _generate_seq2seq(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        weights: torch.Tensor,
        kwargs: dict[str, Any],
    ) -> torch.Tensor:
        """Encoder-decoder: the encoder runs once, here, with the prompt's weights (and, for
        prompt blocks, the mixed prompt before its embeddings); HF ``generate`` decodes
        from its output (``encoder_outputs``, the encoder cache), expanding it for beams or
        several return sequences as the weights are expanded here; the weights hold for
        every decoder step (self- and cross-attention)."""
        self._route(weights)
        self.context.inference = {}
        try:
            embeds = self.embed(input_ids)
            if self.prompts is not None:
                embeds, attention_mask, _ = self._prepend_prompt(embeds, attention_mask, None)
            encoder_outputs = self.backbone.get_encoder()(
                inputs_embeds=embeds, attention_mask=attention_mask, return_dict=True
            )
            expand = self._expansion(kwargs)
            if expand > 1:  # the decoder's rows; the encoder layers are done
                self._route(weights.repeat_interleave(expand, dim=0))
            return self.backbone.generate(
                encoder_outputs=encoder_outputs, attention_mask=attention_mask, **kwargs
            )
        finally:
            self.context.inference = None

    def new_tokens(self, output: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """The generated tokens of :meth:`generate`'s ``output`` for prompts ``input_ids``:
        after the prompt (causal LM) or after the decoder's start token (encoder-decoder,
        whose output never holds the prompt)."""
        if self.is_encoder_decoder:
            return output[:, 1:]
        return output[:, input_ids.shape[1] :]

    def _generate_with_prompt(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, kwargs: dict[str, Any]
    ) -> torch.Tensor:
        """Prompt blocks: HF ``generate`` from ``inputs_embeds`` = [mixed prompt; prompt
        embeddings]. The ids beside them (HF needs both of one length) start with ``L``
        copies of each row's last prompt token, a token the row already has, so a
        repetition penalty sees the same set of tokens; they are cut from the result,
        which is, as without prompt blocks, the prompt ids followed by the new tokens."""
        embeds, mask, _ = self._prepend_prompt(self.embed(input_ids), attention_mask, None)
        L = self.prompts.length
        ids = torch.cat([input_ids[:, -1:].expand(-1, L), input_ids], dim=1)
        out = self.backbone.generate(
            input_ids=ids, inputs_embeds=embeds, attention_mask=mask, **kwargs
        )
        return out[:, L:]

    def gradient_checkpointing_enable(self) -> None:
        """Checkpoint the backbone's layers; the mixture stays in (the routing context
        keeps the weights for the recomputation in backward).

        Non-reentrant checkpointing (the routing weights reach every layer through the
        context, not as inputs, which reentrant checkpointing would cut). Its check that a
        recomputed layer saved tensors of the same shapes is off: under ZeRO-3 the
        recomputation runs after DeepSpeed has released the layer's frozen weights again,
        and the check, comparing the live (now empty) weight it saved, fails although the
        backward that follows gathers them (DeepSpeed 0.19; the 2-rank ZeRO-3 test with
        checkpointing equals the one-process run without)."""
        self.backbone.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False, "determinism_check": "none"}
        )
