"""The fused mixture of per-task LoRA blocks.

SAPT adds, to every adapted linear map ``W0``, a per-sequence weighted sum of ``T`` LoRA
blocks::

    y = W0 h + s * sum_j w_j * B_j (A_j h)

Stacking the blocks turns the sum into one rank ``T*r`` map with a per-sequence diagonal
scale, so the whole mixture is two matrix products whatever ``T`` is::

        x (b, n, d_in)
          |
          |  @ A_stack^T        A_stack = [A_1; ...; A_T]      (T*r, d_in)
          v
        z (b, n, T*r)  --*--  s * (w (x) 1_r)                   (b, T*r)
          |
          |  @ B_stack^T        B_stack = [B_1 ... B_T]         (d_out, T*r)
          v
        y (b, n, d_out)

The op is plain PyTorch with a custom autograd function: no Triton, no Python loop over
slots, no host-device synchronisation, no data-dependent shapes or branches, so it can be
captured in a CUDA graph and compiled with ``torch.compile(fullgraph=True)``.

The autograd function exists for one reason beyond saving a little memory: SAPT's
released code computes the earlier (frozen) blocks without gradient, so the loss reaches
the mixture weights through them but does not flow back into the hidden states along
their path. ``x_grad_mask`` selects, per slot, whether the block's path carries gradient
back to ``x`` (the paper's "cut" behaviour is a one-hot mask on the trainable slot; the
exact gradient is a mask of ones or ``None``). The forward value never depends on it.

Training runs ``mixture_lora_train``: the same value on token rows, added into the frozen
layer's output with one ``addmm``, for banks plus the one trainable block (gradients for
that block only). What every layer of a forward shares (the per-rank-column scales per
token, the current slot's mask and columns: a :class:`SlotPlan`) is built once per
forward by ``plan_slots``, so a layer adds about as many host ops per step as one peft
LoRA (issue 14: the step's cost on a GPU was the host's op count, not arithmetic).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

import torch

__all__ = [
    "SlotPlan",
    "mixture_lora",
    "mixture_lora_slot",
    "mixture_lora_train",
    "plan_slots",
    "mixture_lora_reference",
    "SlotTables",
    "slot_expansion",
    "slot_tables",
    "mix_stacked",
    "slot_scales",
    "stack_blocks",
]


def _check_shapes(
    x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, weights: torch.Tensor
) -> tuple[int, int, int, int]:
    if x.dim() != 3:
        raise ValueError(f"mixture_lora: x must be (batch, seq, d_in), got shape {tuple(x.shape)}")
    if A.dim() != 3:
        raise ValueError(f"mixture_lora: A must be (slots, r, d_in), got shape {tuple(A.shape)}")
    if B.dim() != 3:
        raise ValueError(f"mixture_lora: B must be (slots, d_out, r), got shape {tuple(B.shape)}")
    slots, r, d_in = A.shape
    if x.shape[-1] != d_in:
        raise ValueError(
            f"mixture_lora: x has d_in={x.shape[-1]} but A expects d_in={d_in} "
            f"(A shape {tuple(A.shape)})"
        )
    if B.shape[0] != slots or B.shape[2] != r:
        raise ValueError(
            f"mixture_lora: B shape {tuple(B.shape)} does not match A shape {tuple(A.shape)}; "
            f"expected ({slots}, d_out, {r})"
        )
    if weights.dim() != 2 or weights.shape[0] != x.shape[0] or weights.shape[1] != slots:
        raise ValueError(
            f"mixture_lora: weights must be (batch={x.shape[0]}, slots={slots}), "
            f"got shape {tuple(weights.shape)}"
        )
    return slots, r, d_in, B.shape[1]


def stack_blocks(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, r, d_in), (T, d_out, r) -> ``A_stack`` (T*r, d_in), ``B_stack`` (d_out, T*r)."""
    slots, r, d_in = A.shape
    return A.reshape(slots * r, d_in), B.transpose(0, 1).reshape(B.shape[1], slots * r)


def slot_scales(weights: torch.Tensor, scaling: float, r: int, dtype: torch.dtype) -> torch.Tensor:
    """(b, T) weights -> (b, T*r) per-rank-column scale ``s * w_j`` in the compute dtype."""
    return (weights * scaling).to(dtype).repeat_interleave(r, dim=1)


def mix_stacked(
    x: torch.Tensor, a2: torch.Tensor, b2: torch.Tensor, wr: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two products on pre-stacked blocks: returns (y (b, n, d_out), z (b, n, T*r)).

    The autograd op and the inference path of ``MixtureLoRALinear`` (stacks prepared once
    per ``generate``) both run exactly this, so they agree bit for bit.
    """
    z = torch.matmul(x, a2.t())  # (b, n, T*r)
    return torch.matmul(z * wr.unsqueeze(1), b2.t()), z


class _MixtureLoRA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, A, B, weights, scaling, x_grad_mask):
        slots, r, d_in = A.shape
        d_out = B.shape[1]
        a2, b2 = stack_blocks(A, B)
        wr = slot_scales(weights, scaling, r, x.dtype)
        y, z = mix_stacked(x, a2, b2, wr)
        ctx.save_for_backward(x, a2, b2, wr, z, x_grad_mask)
        ctx.shape = (slots, r, d_in, d_out)
        ctx.scaling = scaling
        ctx.weights_dtype = weights.dtype
        return y

    @staticmethod
    def backward(ctx, gy):
        x, a2, b2, wr, z, x_grad_mask = ctx.saved_tensors
        slots, r, d_in, d_out = ctx.shape
        gx = gA = gB = gw = None
        gzw = torch.matmul(gy, b2)  # d(zw): (b, n, T*r)
        gz = gzw * wr.unsqueeze(1)  # dz:    (b, n, T*r)
        if ctx.needs_input_grad[0]:
            gz_x = gz if x_grad_mask is None else gz * x_grad_mask.to(gz.dtype).repeat_interleave(r)
            gx = torch.matmul(gz_x, a2)  # (b, n, d_in)
        if ctx.needs_input_grad[1]:
            ga2 = torch.matmul(gz.reshape(-1, slots * r).t(), x.reshape(-1, d_in))
            gA = ga2.reshape(slots, r, d_in)
        if ctx.needs_input_grad[2]:
            zw = z * wr.unsqueeze(1)
            # (T*r, N) @ (N, d_out), then transposed: CPU BLAS is up to 13x slower on the
            # (d_out, N) @ (N, T*r) orientation when T*r is small
            gb2 = torch.matmul(zw.reshape(-1, slots * r).t(), gy.reshape(-1, d_out)).t()
            gB = gb2.reshape(d_out, slots, r).transpose(0, 1)
        if ctx.needs_input_grad[3]:
            # dL/dw_j = s * sum_{n, k in slot j} gzw * z ; reduced in fp32 for bf16 inputs
            prod = (gzw.float() * z.float()).sum(dim=1)  # (b, T*r)
            gw = (prod.reshape(-1, slots, r).sum(-1) * ctx.scaling).to(ctx.weights_dtype)
        return gx, gA, gB, gw, None, None


def slot_expansion(slots: int, rank: int, scaling: float, dtype: torch.dtype) -> torch.Tensor:
    """(T, T*r) the matrix that turns (b, T) weights into the (b, T*r) per-rank-column
    scales ``s * w_j`` in one product: ``s`` on slot j's r columns of row j, 0 elsewhere.
    Each output is one product plus exact zeros, so the scales equal ``w * s`` repeated."""
    eye = torch.eye(slots, dtype=dtype) * scaling
    return eye.repeat_interleave(rank, dim=1)


class SlotTables(NamedTuple):
    """What a plan reads that depends on the shapes and the current slot only, not on the
    batch. A model holds them as buffers, rewritten in place when its current slot changes
    (``SAPTModel``), so a forward reads them instead of deriving them (and a captured CUDA
    graph reads the new values); :func:`slot_tables` builds them from a mask.

    Attributes:
        expansion: (T, T*r) float32, :func:`slot_expansion`.
        select: (T, 1, 1) bool, the current slot.
        columns: (r,) int64, the current slot's columns in ``T*r``.
        b_select: ``d_out`` -> (d_out, T, r) bool, the current slot broadcast: the memory
            of :meth:`SlotPlan.b_select` (which reads it transposed).
    """

    expansion: torch.Tensor
    select: torch.Tensor
    columns: torch.Tensor
    b_select: dict[int, torch.Tensor]


def slot_tables(
    current: torch.Tensor, rank: int, scaling: float, d_outs: Iterable[int] = ()
) -> SlotTables:
    """The :class:`SlotTables` of the (T,) bool ``current`` mask (exactly one True), for
    layers of rank ``rank``, scale ``scaling`` and output widths ``d_outs``."""
    slots, dev = current.shape[0], current.device
    first = current.to(torch.int64).argmax()  # stays on the device: no sync
    columns = first * rank + torch.arange(rank, device=dev)
    b_select = {d: b_select_memory(current, d, rank) for d in set(d_outs)}
    expansion = slot_expansion(slots, rank, scaling, torch.float32).to(dev)
    return SlotTables(expansion, current.view(-1, 1, 1).clone(), columns, b_select)


def b_select_memory(current: torch.Tensor, d_out: int, rank: int) -> torch.Tensor:
    """(d_out, T, r) bool: the (T,) ``current`` mask broadcast, the memory of
    :meth:`SlotPlan.b_select` (which reads it transposed)."""
    slots = current.numel()
    return current.reshape(1, slots, 1).expand(d_out, slots, rank).contiguous()


class SlotPlan:
    """What every adapted layer of one forward shares while one slot trains, prepared once
    per forward (``plan_slots``) instead of once per layer: the per-rank-column scales and
    the current slot's mask and columns.

    Attributes:
        scales: (N, T*r) ``s * w_j`` per rank column and token row (``N = b * tokens``)
            in float32 (float64 weights: float64), built from the weights with autograd:
            the weights' gradient enters here per token row, every layer's summed in that
            precision, then over the tokens once. One sequence: an expanded view.
        scales_tok: the forward's scale in the compute dtype: the same rows, or for one
            sequence its one row (it broadcasts); a detached cast when the dtypes differ.
        select: (T, 1, 1) bool, the current slot (splices ``lora_A`` into the A bank).
        columns: (r,) int64, the current slot's columns in ``T*r`` (on the device: no sync).
        batch, tokens: sequences and tokens per sequence.

    ``tables`` (:class:`SlotTables`) are what a model holds; without them they are built
    here from ``current``. With them a plan costs a handful of ops (the scales' product,
    their per-token rows when the batch has several sequences), whatever the number of
    layers.
    """

    def __init__(
        self,
        weights: torch.Tensor,
        current: torch.Tensor,
        scaling: float,
        rank: int,
        dtype: torch.dtype,
        tokens: int,
        tables: SlotTables | None = None,
    ) -> None:
        slots = current.shape[0]
        if weights.dim() != 2 or weights.shape[1] != slots:
            raise ValueError(
                f"plan_slots: weights must be (batch, slots={slots}), got {tuple(weights.shape)}"
            )
        if tables is None:
            tables = slot_tables(current, rank, scaling)
        self.rank, self.tokens, self.dtype = rank, tokens, dtype
        self.batch = batch = weights.shape[0]
        acc = torch.float64 if weights.dtype == torch.float64 else torch.float32  # fp32 at least
        scales = torch.mm(weights.to(acc), tables.expansion.to(acc))  # (b, T*r)
        # one row per token: each layer's weight gradient stays per token, and is reduced
        # over the tokens once, here (the expansion's backward), not in every layer
        if batch > 1:
            scales = scales.unsqueeze(1).expand(batch, tokens, -1).reshape(batch * tokens, -1)
            value = scales
        else:  # one sequence: a view, and its one row broadcasts in the forward
            value, scales = scales, scales.expand(tokens, -1)
        self.scales = scales
        self.scales_tok = value if acc == dtype else value.detach().to(dtype)
        self.select, self.columns = tables.select, tables.columns
        self._b_memory = tables.b_select
        self._b_select: dict[int, torch.Tensor] = {}

    @property
    def rows(self) -> int:
        """Token rows of the layers' inputs: ``batch * tokens``."""
        return self.batch * self.tokens

    def b_select(self, d_out: int) -> torch.Tensor:
        """(T, d_out, r) bool, the current slot, with (d_out, T, r) memory: ``torch.where``
        allocates its output in this layout, so the spliced ``B`` stack transposed,
        (T*r, d_out), is a view of it (no copy)."""
        sel = self._b_select.get(d_out)
        if sel is None:
            mem = self._b_memory.get(d_out)
            if mem is None:  # a width the tables do not hold
                mem = b_select_memory(self.select, d_out, self.rank)
            sel = self._b_select[d_out] = mem.transpose(0, 1)
        return sel


def plan_slots(
    weights: torch.Tensor,
    current: torch.Tensor,
    scaling: float,
    rank: int,
    dtype: torch.dtype,
    tokens: int,
    tables: SlotTables | None = None,
) -> SlotPlan:
    """The per-forward :class:`SlotPlan` of (b, T) ``weights`` and the (T,) bool
    ``current`` mask (exactly one True) for layers of rank ``rank`` and scale ``scaling``
    computing in ``dtype`` on inputs of ``tokens`` tokens per sequence (``tables``: the
    :class:`SlotTables` of ``current``, when the caller holds them)."""
    return SlotPlan(weights, current, scaling, rank, dtype, tokens, tables)


class _MixtureLoRATrain(torch.autograd.Function):
    """Training form on token rows: ``y + mixture`` with frozen banks plus one trainable
    block, gradients for that block only. Per call: the two bank splices (``torch.where``
    into layouts where the stacks are views), ``x A^T``, one scale and one ``addmm`` into
    the base output; everything the layers share comes from the plan."""

    @staticmethod
    def forward(
        ctx,
        x,
        y,
        A_bank,
        B_bank,
        lora_A,
        lora_B,
        scales,
        s_tok,
        select,
        columns,
        b_select,
        cut,
    ):
        slots, r, d_in = A_bank.shape
        d_out = B_bank.shape[1]
        a2 = torch.where(select, lora_A, A_bank).reshape(slots * r, d_in)
        # b_select's layout makes (T, r, d_out) -> (T*r, d_out) a view
        b2t = torch.where(b_select, lora_B, B_bank).transpose(1, 2).reshape(slots * r, d_out)
        if s_tok is None:  # the scales are the value too (passed once: dynamo needs that)
            s_tok = scales
        z = torch.mm(x, a2.t())  # (N, T*r)
        zw = z * s_tok
        # lora_B's gradient reads the current slot's columns of zw: kept from here (N, r)
        zw_cur = zw.index_select(1, columns) if ctx.needs_input_grad[5] else None
        # the mixture lands in the base output: one addmm (an add when dtypes differ)
        same = y.dtype == zw.dtype
        out = torch.addmm(y, zw, b2t) if same else y + torch.mm(zw, b2t).to(y.dtype)
        ctx.save_for_backward(x, a2, b2t, z, zw_cur, lora_A, s_tok, columns)
        ctx.cut, ctx.acc = cut, scales.dtype
        return out

    @staticmethod
    def backward(ctx, gy):
        x, a2, b2t, z, zw_cur, lora_A, s_tok, columns = ctx.saved_tensors
        need = ctx.needs_input_grad
        gx = gA = gB = gs = None
        gyc = gy.to(b2t.dtype)
        gzw = torch.mm(gyc, b2t.t())  # d(zw): (N, T*r), every slot (for the weights)
        if need[0] or need[4]:
            gz = gzw * s_tok  # dz: (N, T*r)
            gz_cur = gz.index_select(1, columns)  # of the current slot (N, r)
        if need[0]:
            # cut: only the trainable block's path reaches x; exact: every slot's
            gx = torch.mm(gz_cur, lora_A) if ctx.cut else torch.mm(gz, a2)
        if need[4]:
            gA = torch.mm(gz_cur.t(), x)
        if need[5]:
            if gyc.device.type == "cpu":
                # (r, N) @ (N, d_out), transposed: CPU BLAS is up to 13x slower on the
                # (d_out, N) @ (N, r) orientation; contiguous as the parameter is
                gB = torch.mm(zw_cur.t(), gyc).t().contiguous()
            else:
                gB = torch.mm(gyc.t(), zw_cur)
        if need[6]:
            # d/d(s w_j) per column and token row, in fp32+ (the plan sums the rows of
            # every layer at once)
            gs = gzw.to(ctx.acc) * z.to(ctx.acc)
        gy_out = gy if need[1] else None
        return gx, gy_out, None, None, gA, gB, gs, None, None, None, None, None


def mixture_lora_train(
    x: torch.Tensor,
    y: torch.Tensor,
    A_bank: torch.Tensor,
    B_bank: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    plan: SlotPlan,
    cut: bool = True,
) -> torch.Tensor:
    """``y + mixture_lora(x, A, B, w, s)`` while one slot trains, on token rows: the same
    value, the mixture added into the base output ``y`` (one ``addmm``), a cheaper backward.

    ``x`` (N, d_in) are the tokens' inputs (after LoRA dropout, in the plan's dtype) and
    ``y`` (N, d_out) the frozen layer's outputs (any dtype), ``N = batch * plan.tokens``
    rows, sequence by sequence. The plan's current slot uses the trainable ``lora_A``
    (r, d_in) / ``lora_B`` (d_out, r) instead of its bank entry; the banks get no gradient,
    so ``A``/``B`` gradients are computed for that slot only, and with ``cut`` (the paper)
    only its path carries gradient back to ``x``; the weights (through ``plan.scales``) get
    their gradient through every slot. ``cut=False`` is the exact gradient.
    """
    _check_train_shapes(x, y, A_bank, B_bank, plan)
    return _MixtureLoRATrain.apply(
        x,
        y,
        A_bank,
        B_bank,
        lora_A,
        lora_B,
        plan.scales,
        None if plan.scales_tok is plan.scales else plan.scales_tok,
        plan.select,
        plan.columns,
        plan.b_select(B_bank.shape[1]),
        bool(cut),
    )


def _check_train_shapes(x, y, A_bank, B_bank, plan: SlotPlan) -> None:
    """Shape checks of ``mixture_lora_train`` from sizes alone (no tensor ops)."""
    if A_bank.dim() != 3:
        raise ValueError(
            f"mixture_lora_train: A must be (slots, r, d_in), got {tuple(A_bank.shape)}"
        )
    slots, r, d_in = A_bank.shape
    rows = plan.rows
    if x.dim() != 2 or x.shape != (rows, d_in):
        raise ValueError(
            f"mixture_lora_train: x must be (tokens={rows}, d_in={d_in}) (the plan's "
            f"{plan.batch} sequences x {plan.tokens} tokens), got {tuple(x.shape)}"
        )
    if B_bank.dim() != 3 or B_bank.shape[0] != slots or B_bank.shape[2] != r:
        raise ValueError(
            f"mixture_lora_train: B shape {tuple(B_bank.shape)} does not match A shape "
            f"{tuple(A_bank.shape)}; expected ({slots}, d_out, {r})"
        )
    if plan.rank != r or plan.scales.shape[1] != slots * r or plan.dtype != x.dtype:
        raise ValueError(
            f"mixture_lora_train: the plan is for rank {plan.rank}, "
            f"{plan.scales.shape[1] // max(plan.rank, 1)} slots, {plan.dtype}; the layer has "
            f"rank {r}, {slots} slots, input {x.dtype}"
        )
    if y.shape != (rows, B_bank.shape[1]):
        raise ValueError(
            f"mixture_lora_train: y shape {tuple(y.shape)}, expected {(rows, B_bank.shape[1])}"
        )


def mixture_lora_slot(
    x: torch.Tensor,
    A_bank: torch.Tensor,
    B_bank: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    current: torch.Tensor,
    weights: torch.Tensor,
    scaling: float,
    cut: bool = True,
) -> torch.Tensor:
    """The mixture alone (no base output) of :func:`mixture_lora_train`, with its plan
    built here: ``mixture_lora`` on the spliced stacks, gradients for the current block
    only. Convenience for tests and benchmarks; layers use the plan shared by a forward.
    """
    _check_shapes(x, A_bank, B_bank, weights)
    plan = plan_slots(weights, current, scaling, A_bank.shape[1], x.dtype, x.shape[1])
    y = x.new_zeros(x.shape[0] * x.shape[1], B_bank.shape[1])
    out = mixture_lora_train(
        x.reshape(-1, x.shape[-1]), y, A_bank, B_bank, lora_A, lora_B, plan, cut
    )
    return out.view(*x.shape[:-1], B_bank.shape[1])


def mixture_lora(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    weights: torch.Tensor,
    scaling: float,
    x_grad_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Weighted sum of ``T`` LoRA blocks in two matrix products.

    Args:
        x: (batch, seq, d_in) input hidden states (already through LoRA dropout).
        A: (slots, r, d_in) stacked down-projections ``A_j``.
        B: (slots, d_out, r) stacked up-projections ``B_j``.
        weights: (batch, slots) mixture weight of each slot for each sequence; held fixed
            over the sequence (SAPT computes it once from the prompt).
        scaling: LoRA scale ``s = alpha / r``.
        x_grad_mask: optional (slots,) tensor; slot ``j``'s path carries gradient back to
            ``x`` only where it is non-zero (SAPT's "cut" gradient). ``None``: all slots.

    Returns:
        (batch, seq, d_out): ``scaling * sum_j weights[:, j] * x A_j^T B_j^T``.
    """
    _check_shapes(x, A, B, weights)
    return _MixtureLoRA.apply(x, A, B, weights, float(scaling), x_grad_mask)


def mixture_lora_reference(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    weights: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """The plain per-slot loop the fused op must equal (used by tests and benchmarks)."""
    out = x.new_zeros(*x.shape[:-1], B.shape[1])
    for j in range(A.shape[0]):
        out = out + (x @ A[j].t() @ B[j].t()) * (weights[:, j] * scaling).to(x.dtype)[:, None, None]
    return out
