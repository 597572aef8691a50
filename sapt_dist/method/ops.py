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
"""

from __future__ import annotations

import torch

__all__ = [
    "mixture_lora",
    "mixture_lora_slot",
    "mixture_lora_reference",
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


class _MixtureLoRASlot(torch.autograd.Function):
    """Training form: frozen banks plus one trainable block, gradients for that block only."""

    @staticmethod
    def forward(ctx, x, A_bank, B_bank, lora_A, lora_B, current, weights, scaling, cut):
        slots, r, d_in = A_bank.shape
        d_out = B_bank.shape[1]
        sel = current.view(-1, 1, 1)
        A = torch.where(sel, lora_A.unsqueeze(0), A_bank)
        B = torch.where(sel, lora_B.unsqueeze(0), B_bank)
        a2, b2 = stack_blocks(A, B)
        wr = slot_scales(weights, scaling, r, x.dtype)
        y, z = mix_stacked(x, a2, b2, wr)
        idx = current.to(torch.int64).argmax().view(1)  # stays on the device: no sync
        ctx.save_for_backward(x, a2, wr, z, b2, lora_A, idx)
        ctx.shape = (slots, r, d_in, d_out)
        ctx.scaling, ctx.cut, ctx.weights_dtype = scaling, cut, weights.dtype
        return y

    @staticmethod
    def backward(ctx, gy):
        x, a2, wr, z, b2, lora_A, idx = ctx.saved_tensors
        slots, r, d_in, d_out = ctx.shape
        gx = gA = gB = gw = None

        def pick(t: torch.Tensor) -> torch.Tensor:  # (..., T*r) -> (..., r) of the slot
            return t.unflatten(-1, (slots, r)).index_select(-2, idx).flatten(-2)

        gzw = torch.matmul(gy, b2)  # (b, n, T*r): every slot, for the weights' gradient
        wr_cur = pick(wr).unsqueeze(1)  # (b, 1, r)
        gz_cur = pick(gzw) * wr_cur  # (b, n, r)
        if ctx.needs_input_grad[0]:
            if ctx.cut:  # only the trainable block's path reaches x
                gx = torch.matmul(gz_cur, lora_A.to(gz_cur.dtype))
            else:
                gx = torch.matmul(gzw * wr.unsqueeze(1), a2)
        if ctx.needs_input_grad[3]:
            gA = torch.matmul(gz_cur.reshape(-1, r).t(), x.reshape(-1, d_in))
        if ctx.needs_input_grad[4]:
            zw_cur = pick(z) * wr_cur
            gB = torch.matmul(zw_cur.reshape(-1, r).t(), gy.reshape(-1, d_out)).t()
        if ctx.needs_input_grad[6]:
            prod = (gzw.float() * z.float()).sum(dim=1)  # (b, T*r)
            gw = (prod.reshape(-1, slots, r).sum(-1) * ctx.scaling).to(ctx.weights_dtype)
        return gx, None, None, gA, gB, None, gw, None, None


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
    """``mixture_lora`` while one slot trains: the same value, cheaper backward.

    Slot ``current`` (a (slots,) bool mask with exactly one True) uses the trainable
    ``lora_A`` (r, d_in) / ``lora_B`` (d_out, r) instead of its bank entry; the banks get no
    gradient, so ``A``/``B`` gradients are computed for that slot only, and with ``cut``
    (the paper) only its path carries gradient back to ``x``; the weights get their
    gradient through every slot. ``cut=False`` is the exact gradient.
    """
    _check_shapes(x, A_bank, B_bank, weights)
    return _MixtureLoRASlot.apply(
        x, A_bank, B_bank, lora_A, lora_B, current, weights, float(scaling), bool(cut)
    )


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
