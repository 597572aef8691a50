"""Per-task LoRA blocks around one frozen linear layer.

::

    x (b, n, d_in) ─► rows (N, d_in) ─► base (frozen W0: nn.Linear or bnb Linear4bit) ─► y
                        │                                                               │
                        └─► dropout ─► mixture_lora_train( A, B, plan ) ◄───────────────┘
                                         │   y + (x A^T * s w) B^T: one addmm into y
                                         ▼
                                       out (N, d_out) ─► (b, n, d_out)

               A = [A_bank with slot `current` replaced by lora_A]  (T, r, d_in)
               B = [B_bank with slot `current` replaced by lora_B]  (T, d_out, r)

``A_bank`` / ``B_bank`` are buffers holding every slot's block; only the current task's
block (``lora_A``, ``lora_B``) is a trainable parameter. Finishing a task copies it into
its slot of the bank (``file_current``): no tensor is reallocated or changes shape, so
compiled graphs and optimizer state stay valid across tasks, and frozen blocks cannot
receive a gradient or be touched by weight decay.

The per-sequence weights ``w`` (batch, T) are not an argument of ``forward`` (the HF model
calls it); they come from the ``RoutingContext`` that the owning ``SAPTModel`` fills
before every forward of the backbone, with the ``plan`` every layer shares (the
per-rank-column scales ``s w`` per token row, the current slot's mask and columns),
built once per forward rather than once per layer. Per layer and step this leaves about
as many host ops as one peft LoRA (``bench/bench_op_count.py``).
"""

from __future__ import annotations

import math
import sys

import torch
from torch import nn

from sapt_dist import distributed
from sapt_dist.method.ops import (
    SlotPlan,
    SlotTables,
    mix_stacked,
    mixture_lora,
    mixture_lora_train,
    plan_slots,
    slot_scales,
    stack_blocks,
)

__all__ = [
    "MixtureLoRALinear",
    "RoutingContext",
    "disable_bnb_cpu_packing",
    "is_adaptable_linear",
    "is_quantized_linear",
    "quantized_linear_types",
]


class RoutingContext:
    """Shared by every adapted layer of one model; filled by ``SAPTModel`` per forward.

    Attributes:
        weights: (batch, slots) mixture weights of the sequences in flight.
        current: (slots,) bool, True on the slot whose block is the trainable one.
        x_grad_mask: (slots,) bool or float, slots whose path passes gradient to hidden states
            (``None``: all of them).
        inference: set by ``SAPTModel.generate``: layer -> stacked blocks and scales,
            prepared on the first decoding step and reused by every later one (weights
            and blocks are fixed).

    Setting ``weights``, ``current`` or ``x_grad_mask`` drops the per-forward
    :class:`~sapt_dist.method.ops.SlotPlan` s (:meth:`plan`): the scales and masks every
    layer shares are built once per forward, not once per layer.
    """

    def __init__(self) -> None:
        self._weights: torch.Tensor | None = None
        self._current: torch.Tensor | None = None
        self._x_grad_mask: torch.Tensor | None = None
        self._plans: dict = {}
        self.inference: dict | None = None
        #: (scaling, rank) -> the :class:`~sapt_dist.method.ops.SlotTables` of ``current``
        #: the model holds (buffers); a kind without them has its plan build them
        self.tables: dict[tuple[float, int], SlotTables] = {}

    @property
    def weights(self) -> torch.Tensor | None:
        return self._weights

    @weights.setter
    def weights(self, value: torch.Tensor | None) -> None:
        self._weights, self._plans = value, {}

    @property
    def current(self) -> torch.Tensor | None:
        return self._current

    @current.setter
    def current(self, value: torch.Tensor | None) -> None:
        self._current, self._plans = value, {}

    @property
    def x_grad_mask(self) -> torch.Tensor | None:
        return self._x_grad_mask

    @x_grad_mask.setter
    def x_grad_mask(self, value: torch.Tensor | None) -> None:
        self._x_grad_mask, self._plans = value, {}

    def clear(self) -> None:
        """Drop the last forward's weights and plans, and with them its autograd graph.

        ``SAPTModel`` calls this before it routes a new batch. Kept alive into the next
        forward, the previous graph would hand the router's parameters their old
        ``AccumulateGrad`` nodes, which remember the CUDA stream of the step that made
        them: a CUDA graph captured after an eager step on the default stream then fails
        with ``cudaErrorStreamCaptureImplicit`` (the legacy stream would wait on the
        capturing one). The weights stay set through backward, for the recomputation of
        checkpointed layers."""
        self._weights = self._current = self._x_grad_mask = None
        self._plans = {}

    def plan(self, scaling: float, rank: int, dtype: torch.dtype, tokens: int) -> SlotPlan:
        """The forward's shared scales and masks for layers of this rank, scale and compute
        dtype on sequences of ``tokens`` tokens (built on first use, then reused)."""
        # grad mode too: a plan built under no_grad carries no gradient to the weights
        key = (scaling, rank, dtype, tokens, torch.is_grad_enabled())
        plan = self._plans.get(key)
        if plan is None:
            if self._weights is None or self._current is None:
                raise RuntimeError("RoutingContext.plan needs weights and current set")
            tables = self.tables.get((scaling, rank))
            plan = plan_slots(self._weights, self._current, scaling, rank, dtype, tokens, tables)
            self._plans[key] = plan
        return plan


def quantized_linear_types() -> tuple[type, ...]:
    """bitsandbytes' 4-bit and 8-bit linear classes, when bitsandbytes is loaded (a
    quantized backbone loads it; without it no module can be one of them)."""
    bnb = sys.modules.get("bitsandbytes.nn")
    if bnb is None:
        return ()
    return tuple(getattr(bnb, n) for n in ("Linear4bit", "Linear8bitLt") if hasattr(bnb, n))


def is_quantized_linear(module: nn.Module) -> bool:
    """A bitsandbytes 4-bit (``Linear4bit``: NF4 / FP4) or 8-bit linear, by type."""
    types = quantized_linear_types()
    return bool(types) and isinstance(module, types)


def is_adaptable_linear(module: nn.Module) -> bool:
    """A linear layer LoRA can wrap: ``nn.Linear``, bitsandbytes' quantized linears
    included (they subclass it)."""
    return isinstance(module, nn.Linear)


def disable_bnb_cpu_packing(base: nn.Module) -> None:
    """bitsandbytes (0.50) repacks a ``Linear4bit`` weight for its CPU inference kernel the
    first time it runs in eval mode without grad; after that the layer's backward passes
    no gradient to its input (``gemv_4bit`` has no autograd kernel), so an evaluation
    between two tasks would silently cut every LoRA gradient below it. Keep the weight in
    the trainable layout (and undo a packing that already happened). ``SAPTModel`` applies
    this to every quantized layer of the backbone, adapted or not."""
    if not is_quantized_linear(base) or not hasattr(base, "support_avx512bf16_for_cpu"):
        return
    base.support_avx512bf16_for_cpu = False
    qs = getattr(base.weight, "quant_state", None)
    if qs is not None and getattr(qs, "packing_format_for_cpu", False):
        from bitsandbytes.nn.modules import _convert_weight_packed_for_cpu_inverse

        base.weight.data, base.weight.quant_state = _convert_weight_packed_for_cpu_inverse(
            base.weight.data, qs
        )


def _tokens(x: torch.Tensor) -> int:
    """Tokens per sequence of a layer input: (b, n, d) -> n; (b, d) (one decoding
    position) -> 1."""
    return x.shape[1] if x.dim() == 3 else 1


class MixtureLoRALinear(nn.Module):
    """A frozen linear layer plus ``n_slots`` LoRA blocks mixed by per-sequence weights."""

    #: the tensors of one block, as named in block files (``<layer>.A``, ``<layer>.B``)
    BLOCK_PARTS = ("A", "B")

    def __init__(
        self,
        base: nn.Module,
        n_slots: int,
        rank: int,
        alpha: float,
        dropout: float,
        context: RoutingContext,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not is_adaptable_linear(base):
            raise TypeError(f"cannot adapt {type(base).__name__}: not a linear layer")
        disable_bnb_cpu_packing(base)
        self.base = base
        self.in_features = int(base.in_features)
        self.out_features = int(base.out_features)
        self.n_slots = n_slots
        self.rank = rank
        self.scaling = alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        if dtype is None:
            w = base.weight
            dtype = w.dtype if w.dtype.is_floating_point else getattr(base, "compute_dtype", None)
            dtype = dtype or torch.float32
        device = base.weight.device if base.weight.device.type != "meta" else None
        kw = {"dtype": dtype, "device": device}
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, **kw))
        self.register_buffer("A_bank", torch.zeros(n_slots, rank, self.in_features, **kw))
        self.register_buffer("B_bank", torch.zeros(n_slots, self.out_features, rank, **kw))
        # not a submodule: one context is shared by every adapted layer of the model
        object.__setattr__(self, "_context", context)
        self.reset_current()

    @property
    def weight(self) -> torch.Tensor:
        """The frozen base weight: model code reads a linear's ``weight`` (T5's MLP casts
        its input to ``wo.weight.dtype``), as it does through peft's LoRA layers."""
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def adapter_params(self) -> list[nn.Parameter]:
        """The trainable parameters of this layer (the current task's block)."""
        return [self.lora_A, self.lora_B]

    def banks(self) -> tuple[torch.Tensor, ...]:
        """The filed blocks, one buffer per part of ``BLOCK_PARTS``."""
        return (self.A_bank, self.B_bank)

    @torch.no_grad()
    def reset_current(self) -> None:
        """Fresh block for a new task: ``A`` as in LoRA (Kaiming-uniform), ``B`` zero."""
        with distributed.gathered([self.lora_A, self.lora_B], modify=True):
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)

    @torch.no_grad()
    def file_current(self, slot: int) -> None:
        """Copy the trainable block into bank slot ``slot`` (in place, no reallocation)."""
        with distributed.gathered([self.lora_A, self.lora_B]):
            self.A_bank[slot].copy_(self.lora_A)
            self.B_bank[slot].copy_(self.lora_B)

    @torch.no_grad()
    def load_current(self, slot: int) -> None:
        """Make bank slot ``slot`` the starting point of the trainable block."""
        with distributed.gathered([self.lora_A, self.lora_B], modify=True):
            self.lora_A.copy_(self.A_bank[slot])
            self.lora_B.copy_(self.B_bank[slot])

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) of all slots with the current slot's trainable block in place."""
        cur = self._context.current
        if cur is None:
            return self.A_bank, self.B_bank
        sel = cur.view(-1, 1, 1)
        A = torch.where(sel, self.lora_A.unsqueeze(0), self.A_bank)
        B = torch.where(sel, self.lora_B.unsqueeze(0), self.B_bank)
        return A, B

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ctx = self._context
        if ctx.inference is not None and not torch.is_grad_enabled():
            return self._decode(x, ctx)
        if ctx.weights is None:
            raise RuntimeError(
                "MixtureLoRALinear called without routing weights: run the backbone through "
                "SAPTModel (forward / generate), which sets them from the prompt"
            )
        if ctx.current is None:  # a layer used alone, no trainable slot
            return self._forward_banks(x, ctx)
        # the trainable block in its slot, on token rows: the base computes them and the
        # mixture is added into its output; gradients for the current block only, SAPTModel
        # sets ``x_grad_mask`` to the current-slot mask (cut) or None (exact)
        rows = x.reshape(-1, self.in_features)
        plan = ctx.plan(self.scaling, self.rank, self.A_bank.dtype, _tokens(x))
        out = mixture_lora_train(
            self.dropout(rows).to(self.A_bank.dtype),
            self.base(rows),
            self.A_bank,
            self.B_bank,
            self.lora_A,
            self.lora_B,
            plan,
            cut=ctx.x_grad_mask is not None,
        )
        return out.view(*x.shape[:-1], self.out_features)

    def _forward_banks(self, x: torch.Tensor, ctx: RoutingContext) -> torch.Tensor:
        """The banks alone (``mixture_lora``): a layer outside ``SAPTModel`` with no
        current slot set."""
        y = self.base(x)
        h = self.dropout(x).to(self.A_bank.dtype)
        squeeze = h.dim() == 2
        if squeeze:
            h = h.unsqueeze(1)
        out = mixture_lora(h, self.A_bank, self.B_bank, ctx.weights, self.scaling, ctx.x_grad_mask)
        if squeeze:
            out = out.squeeze(1)
        return y + out.to(y.dtype)

    def _decode(self, x: torch.Tensor, ctx: RoutingContext) -> torch.Tensor:
        """Generation: blocks stacked once per ``generate`` call, then per step only
        ``z = x A^T``, ``z * s w`` and one fused ``y + zw B^T`` (addmm): on a small model a
        decoding step is dominated by per-op overhead, so every op counts."""
        entry = ctx.inference.get(self)
        if entry is None:
            A, B = self.stacked()
            a2, b2 = stack_blocks(A, B)
            entry = (a2.t(), b2.t(), slot_scales(ctx.weights, self.scaling, self.rank, A.dtype))
            ctx.inference[self] = entry
        a2t, b2t, wr = entry
        y = self.base(x)
        if x.dim() != 3 or x.dtype != a2t.dtype or y.dtype != a2t.dtype:
            h = x.unsqueeze(1) if x.dim() == 2 else x
            out = mix_stacked(h.to(a2t.dtype), a2t.t(), b2t.t(), wr)[0]
            return y + out.reshape(y.shape).to(y.dtype)
        b, n, _ = x.shape
        zw = torch.matmul(x, a2t).mul_(wr.unsqueeze(1))  # (b, n, T*r)
        return torch.addmm(y.view(b * n, -1), zw.view(b * n, -1), b2t).view(b, n, -1)

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, slots={self.n_slots}, "
            f"rank={self.rank}, scaling={self.scaling:g}"
        )
