"""Per-task LoRA blocks around one frozen linear layer.

::

            x ──────────────► base (frozen W0: nn.Linear or bnb Linear4bit) ──► + ──► y
            │                                                                   ▲
            └─► dropout ─► mixture_lora( A, B, w ) ─────────────────────────────┘
                                  ▲   ▲
               A = [A_bank with slot `current` replaced by lora_A]  (T, r, d_in)
               B = [B_bank with slot `current` replaced by lora_B]  (T, d_out, r)

``A_bank`` / ``B_bank`` are buffers holding every slot's block; only the current task's
block (``lora_A``, ``lora_B``) is a trainable parameter. Finishing a task copies it into
its slot of the bank (``file_current``): no tensor is reallocated or changes shape, so
compiled graphs and optimizer state stay valid across tasks, and frozen blocks cannot
receive a gradient or be touched by weight decay.

The per-sequence weights ``w`` (batch, T) are not an argument of ``forward`` (the HF model
calls it); they come from the ``RoutingContext`` that the owning ``SAPTModel`` fills
before every forward of the backbone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from sapt_dist import distributed
from sapt_dist.method.ops import (
    mix_stacked,
    mixture_lora,
    mixture_lora_slot,
    slot_scales,
    stack_blocks,
)

__all__ = ["MixtureLoRALinear", "RoutingContext", "disable_bnb_cpu_packing", "is_adaptable_linear"]


@dataclass
class RoutingContext:
    """Shared by every adapted layer of one model; filled by ``SAPTModel`` per forward.

    Attributes:
        weights: (batch, slots) mixture weights of the sequences in flight.
        current: (slots,) bool, True on the slot whose block is the trainable one.
        x_grad_mask: (slots,) float, slots whose path passes gradient to hidden states
            (``None``: all of them).
    """

    weights: torch.Tensor | None = None
    current: torch.Tensor | None = None
    x_grad_mask: torch.Tensor | None = None
    #: set by ``SAPTModel.generate``: layer -> stacked blocks and scales, prepared on the
    #: first decoding step and reused by every later one (weights and blocks are fixed)
    inference: dict | None = None
    #: O-LoRA training: each adapted layer appends its (orthogonality, L2) terms here
    #: (computed where ZeRO-3 has its parameters gathered); ``None``: not collected
    regularizers: list | None = None


def is_adaptable_linear(module: nn.Module) -> bool:
    """``nn.Linear`` or a bitsandbytes 4-/8-bit linear (anything with a 2-D ``weight`` and
    ``in_features`` / ``out_features``)."""
    if isinstance(module, nn.Linear):
        return True
    return (
        hasattr(module, "in_features")
        and hasattr(module, "out_features")
        and hasattr(module, "weight")
        and type(module).__module__.startswith("bitsandbytes")
    )


def disable_bnb_cpu_packing(base: nn.Module) -> None:
    """bitsandbytes (0.50) repacks a ``Linear4bit`` weight for its CPU inference kernel the
    first time it runs in eval mode without grad; after that the layer's backward passes
    no gradient to its input (``gemv_4bit`` has no autograd kernel), so an evaluation
    between two tasks would silently cut every LoRA gradient below it. Keep the weight in
    the trainable layout (and undo a packing that already happened). ``SAPTModel`` applies
    this to every quantized layer of the backbone, adapted or not."""
    if not hasattr(base, "support_avx512bf16_for_cpu"):
        return
    base.support_avx512bf16_for_cpu = False
    qs = getattr(base.weight, "quant_state", None)
    if qs is not None and getattr(qs, "packing_format_for_cpu", False):
        from bitsandbytes.nn.modules import _convert_weight_packed_for_cpu_inverse

        base.weight.data, base.weight.quant_state = _convert_weight_packed_for_cpu_inverse(
            base.weight.data, qs
        )


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

    def olora_terms(self, current: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """O-LoRA's two regularisers for this layer (Wang et al. 2023, its released trainer):
        ``sum |A_old A_new^T|`` over every block filed before the current slot (L1 of the
        r x r products) and ``||A_new|| + ||B_new||`` (2-norms) of the trainable block.
        Static shapes: earlier slots are selected by a mask, not a loop."""
        earlier = (torch.cumsum(current.to(torch.int32), 0) == 0).to(self.A_bank.dtype)
        old = (self.A_bank * earlier.view(-1, 1, 1)).reshape(-1, self.in_features)
        orth = (old @ self.lora_A.t()).abs().sum()
        return orth, self.lora_A.norm() + self.lora_B.norm()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ctx = self._context
        if ctx.inference is not None and not torch.is_grad_enabled():
            return self._decode(x, ctx)
        y = self.base(x)
        if ctx.weights is None:
            raise RuntimeError(
                "MixtureLoRALinear called without routing weights: run the backbone through "
                "SAPTModel (forward / generate), which sets them from the prompt"
            )
        squeeze = x.dim() == 2
        if squeeze:
            x = x.unsqueeze(1)
        if ctx.current is not None and torch.is_grad_enabled():
            # training: gradients for the current block only; SAPTModel sets ``x_grad_mask``
            # to the current-slot mask (cut) or None (exact)
            h = self.dropout(x).to(self.A_bank.dtype)
            out = mixture_lora_slot(
                h,
                self.A_bank,
                self.B_bank,
                self.lora_A,
                self.lora_B,
                ctx.current,
                ctx.weights,
                self.scaling,
                cut=ctx.x_grad_mask is not None,
            )
            if ctx.regularizers is not None:
                ctx.regularizers.append(self.olora_terms(ctx.current))
        else:
            A, B = self.stacked()
            h = self.dropout(x).to(A.dtype)
            out = mixture_lora(h, A, B, ctx.weights, self.scaling, ctx.x_grad_mask)
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
