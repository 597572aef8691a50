"""The fused mixture against a plain per-slot loop."""

from __future__ import annotations

import pytest
import torch

from sapt_dist.method.ops import mixture_lora, mixture_lora_reference


def _inputs(slots, rank, dtype, batch=3, seq=7, d_in=24, d_out=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, seq, d_in, generator=g).to(dtype).requires_grad_()
    A = torch.randn(slots, rank, d_in, generator=g).to(dtype).requires_grad_()
    B = torch.randn(slots, d_out, rank, generator=g).to(dtype).requires_grad_()
    w = torch.softmax(torch.randn(batch, slots, generator=g), -1).requires_grad_()
    return x, A, B, w


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rank", [1, 4, 8])
@pytest.mark.parametrize("slots", [1, 3, 15])
def test_fused_matches_loop(dtype, rank, slots):
    x, A, B, w = _inputs(slots, rank, dtype)
    y = mixture_lora(x, A, B, w, 2.0)
    gy = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, A, B, w), gy)

    # the reference runs in fp32 on the same (rounded) inputs
    xr, Ar, Br, wr = (t.detach().float().requires_grad_() for t in (x, A, B, w))
    yr = mixture_lora_reference(xr, Ar, Br, wr, 2.0)
    grads_r = torch.autograd.grad(yr, (xr, Ar, Br, wr), gy.float())

    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 5e-2}
    scale = yr.abs().max().item()
    torch.testing.assert_close(y.float() / scale, yr / scale, **tol)
    for name, g, gr in zip("xABw", grads, grads_r):
        s = gr.abs().max().item() + 1e-12
        torch.testing.assert_close(g.float() / s, gr / s, **tol, msg=f"grad of {name}")
    assert y.dtype == dtype and grads[0].dtype == dtype


def test_x_grad_mask_cuts_frozen_paths():
    """With a one-hot mask only slot 1's path carries gradient to x; the weights still get
    gradient through every slot (the paper's 'cut' behaviour)."""
    x, A, B, w = _inputs(3, 4, torch.float32)
    mask = torch.tensor([0.0, 1.0, 0.0])
    y = mixture_lora(x, A, B, w, 1.0, x_grad_mask=mask)
    gx, gw = torch.autograd.grad(y.sum(), (x, w))
    # reference: the other slots' outputs computed from a detached x
    xr = x.detach().requires_grad_()
    wr = w.detach().requires_grad_()
    parts = [
        mixture_lora_reference(
            xr if j == 1 else xr.detach(), A[j : j + 1], B[j : j + 1], wr[:, j : j + 1], 1.0
        )
        for j in range(3)
    ]
    gxr, gwr = torch.autograd.grad(sum(parts).sum(), (xr, wr))
    torch.testing.assert_close(gx, gxr)
    torch.testing.assert_close(gw, gwr)
    # and the forward value does not depend on the mask
    torch.testing.assert_close(y, mixture_lora(x, A, B, w, 1.0))


def test_zero_weight_slot_contributes_nothing():
    x, A, B, w = _inputs(3, 4, torch.float32)
    w = torch.tensor([[0.3, 0.7, 0.0]]).expand(3, 3).contiguous()
    y = mixture_lora(x, A, B, w, 1.0)
    A2, B2 = A.detach().clone(), B.detach().clone()
    A2[2] = 1e3 * torch.randn_like(A2[2])
    B2[2] = 1e3 * torch.randn_like(B2[2])
    torch.testing.assert_close(y, mixture_lora(x, A2, B2, w, 1.0))


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"x": torch.zeros(2, 5)}, "x must be"),
        ({"A": torch.zeros(3, 4)}, "A must be"),
        ({"x": torch.zeros(2, 5, 7)}, "d_in=7"),
        ({"B": torch.zeros(2, 6, 4)}, "does not match A"),
        ({"weights": torch.zeros(2, 2)}, "weights must be"),
    ],
)
def test_bad_shapes(bad, match):
    args = {
        "x": torch.zeros(2, 5, 8),
        "A": torch.zeros(3, 4, 8),
        "B": torch.zeros(3, 6, 4),
        "weights": torch.zeros(2, 3),
    }
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        mixture_lora(args["x"], args["A"], args["B"], args["weights"], 1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cut", [True, False])
def test_slot_training_op_matches_general_op(dtype, cut):
    """The training form (banks + one trainable block, gradients for that block only)
    against mixture_lora on the composed stacks: value and every gradient."""
    from sapt_dist.method.ops import mixture_lora_slot

    x, A, B, w = _inputs(15, 4, dtype)
    cur = torch.zeros(15, dtype=torch.bool)
    cur[6] = True
    lA = A[6].detach().clone().requires_grad_()
    lB = B[6].detach().clone().requires_grad_()
    bankA, bankB = A.detach().clone(), B.detach().clone()
    bankA[6].normal_()  # the bank's stale copy of the current slot must not matter
    y = mixture_lora_slot(x, bankA, bankB, lA, lB, cur, w, 2.0, cut=cut)
    gy = torch.randn_like(y)
    g = torch.autograd.grad(y, (x, lA, lB, w), gy)

    A2 = torch.where(cur.view(-1, 1, 1), lA.unsqueeze(0), bankA)
    B2 = torch.where(cur.view(-1, 1, 1), lB.unsqueeze(0), bankB)
    mask = cur.float() if cut else None
    yr = mixture_lora(x, A2, B2, w, 2.0, x_grad_mask=mask)
    gr = torch.autograd.grad(yr, (x, lA, lB, w), gy)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 5e-2}
    torch.testing.assert_close(y.float(), yr.float(), **tol)
    for name, a, b in zip(["x", "A", "B", "w"], g, gr):
        s = b.float().abs().max().item() + 1e-12
        torch.testing.assert_close(a.float() / s, b.float() / s, **tol, msg=f"grad of {name}")


# --------------------------------------------------------------------------- training form
def _train_inputs(slots, rank, dtype, batch=3, seq=7, d_in=24, d_out=20, current=None, seed=0):
    """Banks, the trainable block (slot ``current``), weights, token rows x and a base
    output y; the bank's copy of the current slot is stale (it must not matter)."""
    g = torch.Generator().manual_seed(seed)
    x, A, B, w = _inputs(slots, rank, torch.float64, batch, seq, d_in, d_out, seed)
    cur = torch.zeros(slots, dtype=torch.bool)
    cur[slots - 1 if current is None else current] = True
    j = int(cur.nonzero())
    lA = A[j].detach().clone().to(dtype).requires_grad_()
    lB = B[j].detach().clone().to(dtype).requires_grad_()
    bankA, bankB = A.detach().clone().to(dtype), B.detach().clone().to(dtype)
    bankA[j] = torch.randn(bankA[j].shape, generator=g, dtype=torch.float64).to(dtype)
    rows = x.detach().reshape(-1, d_in).to(dtype).requires_grad_()
    y = torch.randn(batch * seq, d_out, generator=g, dtype=torch.float64).to(dtype)
    w = w.detach().to(dtype).requires_grad_()
    return rows, y.requires_grad_(), bankA, bankB, lA, lB, cur, w


def _train_reference(rows, y, bankA, bankB, lA, lB, cur, w, scaling, cut, batch):
    """The plain per-slot loop: ``y + s * sum_j w_j B_j A_j x`` with the trainable block in
    its slot; with ``cut`` the frozen slots see a detached x (SAPT's released code)."""
    j = int(cur.nonzero())
    x3 = rows.reshape(batch, -1, rows.shape[-1])
    out = y.reshape(batch, -1, y.shape[-1])
    for k in range(bankA.shape[0]):
        a, b = (lA, lB) if k == j else (bankA[k], bankB[k])
        xk = x3 if (k == j or not cut) else x3.detach()
        out = out + mixture_lora_reference(xk, a[None], b[None], w[:, k : k + 1], scaling)
    return out.reshape(y.shape)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cut", [True, False])
@pytest.mark.parametrize("slots, current", [(1, 0), (5, 2), (15, 14)])
def test_train_op_matches_the_per_slot_loop(dtype, cut, slots, current):
    """``mixture_lora_train`` (the mixture added into the base output, a plan shared by the
    layers) against the plain loop: value and the gradients of x, y, the trainable block
    and the weights (the latter reaching the op through the plan's scales)."""
    from sapt_dist.method.ops import mixture_lora_train, plan_slots

    args = _train_inputs(slots, 4, dtype, current=current)
    rows, y, bankA, bankB, lA, lB, cur, w = args
    plan = plan_slots(w, cur, 2.0, 4, dtype, tokens=7)
    out = mixture_lora_train(rows, y, bankA, bankB, lA, lB, plan, cut=cut)
    gy = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(dtype)
    got = torch.autograd.grad(out, (rows, y, lA, lB, w), gy)

    ref_in = [t.detach().double().requires_grad_(t.requires_grad) for t in args[:-2]]
    wr = w.detach().double().requires_grad_()
    ref = _train_reference(*ref_in, cur, wr, 2.0, cut, batch=3)
    r0, ry, _, _, rA, rB = ref_in
    want = torch.autograd.grad(ref, (r0, ry, rA, rB, wr), gy.double())
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 5e-2}
    s = ref.abs().max().item()
    torch.testing.assert_close(out.double() / s, ref / s, **tol)
    assert out.dtype == dtype
    for name, a, b in zip(["x", "y", "A", "B", "w"], got, want):
        assert a.dtype == b.dtype or a.dtype == dtype, name
        s = b.abs().max().item() + 1e-12
        torch.testing.assert_close(a.double() / s, b / s, **tol, msg=f"grad of {name}")


@pytest.mark.parametrize("cut", [True, False])
def test_train_op_gradcheck(cut):
    """float64 gradcheck of the training op's backward against finite differences: every
    input with the exact gradient; with the cut gradient every input but x (whose
    gradient is the cut one by design, checked against the loop above)."""
    from sapt_dist.method.ops import mixture_lora_train, plan_slots

    rows, y, bankA, bankB, lA, lB, cur, w = _train_inputs(
        4, 2, torch.float64, batch=2, seq=3, d_in=5, d_out=4, current=1
    )
    rows.requires_grad_(not cut)

    def f(rows, y, lA, lB, w):
        plan = plan_slots(w, cur, 1.5, 2, torch.float64, tokens=3)
        return mixture_lora_train(rows, y, bankA, bankB, lA, lB, plan, cut=cut)

    assert torch.autograd.gradcheck(f, (rows, y, lA, lB, w))


def test_one_plan_serves_every_layer():
    """Two layers reading the same plan (as in a model): the weights' gradient is the sum
    over both layers, as with the loop; the plan is built once."""
    from sapt_dist.method.ops import mixture_lora_train, plan_slots

    r1, y, bankA, bankB, lA, lB, cur, w = _train_inputs(5, 4, torch.float64, d_out=24, current=3)
    plan = plan_slots(w, cur, 2.0, 4, torch.float64, tokens=7)
    h = mixture_lora_train(r1, y, bankA, bankB, lA, lB, plan)
    out = mixture_lora_train(h, h, bankA, bankB, lA, lB, plan)
    g = torch.autograd.grad(out.sum(), (lA, lB, w))

    wr, rA, rB = (t.detach().clone().requires_grad_() for t in (w, lA, lB))
    h = _train_reference(r1, y, bankA, bankB, rA, rB, cur, wr, 2.0, True, 3)
    ref = _train_reference(h, h, bankA, bankB, rA, rB, cur, wr, 2.0, True, 3)
    for a, b in zip(g, torch.autograd.grad(ref.sum(), (rA, rB, wr))):
        torch.testing.assert_close(a, b)


def test_train_op_adds_into_another_dtype():
    """A base output in another dtype than the blocks (fp32 blocks on a float64 base):
    the mixture is cast and added, and y's gradient keeps y's dtype."""
    from sapt_dist.method.ops import mixture_lora_train, plan_slots

    rows, y, bankA, bankB, lA, lB, cur, w = _train_inputs(3, 4, torch.float32, current=1)
    y64 = y.detach().double().requires_grad_()
    plan = plan_slots(w, cur, 2.0, 4, torch.float32, tokens=7)
    out = mixture_lora_train(rows, y64, bankA, bankB, lA, lB, plan)
    assert out.dtype == torch.float64
    mix = mixture_lora_train(rows, torch.zeros_like(y), bankA, bankB, lA, lB, plan)
    torch.testing.assert_close(out, y64 + mix.double())
    (gy,) = torch.autograd.grad(out.sum(), (y64,))
    assert gy.dtype == torch.float64 and torch.equal(gy, torch.ones_like(gy))


def test_train_op_shape_errors():
    from sapt_dist.method.ops import mixture_lora_train, plan_slots

    rows, y, bankA, bankB, lA, lB, cur, w = _train_inputs(3, 4, torch.float32)
    plan = plan_slots(w, cur, 2.0, 4, torch.float32, tokens=7)
    with pytest.raises(ValueError, match="x must be"):
        mixture_lora_train(rows[:-1], y, bankA, bankB, lA, lB, plan)
    with pytest.raises(ValueError, match="y shape"):
        mixture_lora_train(rows, y[:, :-1], bankA, bankB, lA, lB, plan)
    with pytest.raises(ValueError, match="the plan is for rank 2"):
        mixture_lora_train(
            rows, y, bankA, bankB, lA, lB, plan_slots(w, cur, 2.0, 2, torch.float32, 7)
        )
    with pytest.raises(ValueError, match="weights must be"):
        plan_slots(w[:, :2], cur, 2.0, 4, torch.float32, 7)


def test_b_stack_is_a_view_of_the_splice():
    """The layout the training op relies on to skip a copy per layer: ``torch.where`` with
    the plan's B mask allocates (d_out, T, r) memory, so the (T*r, d_out) stack is a view
    (were it not, ``reshape`` would copy: the values are the same either way)."""
    from sapt_dist.method.ops import plan_slots

    _, _, _, bankB, _, lB, cur, w = _train_inputs(5, 4, torch.float32, current=2)
    plan = plan_slots(w, cur, 1.0, 4, torch.float32, tokens=7)
    spliced = torch.where(plan.b_select(bankB.shape[1]), lB.detach(), bankB)
    stack_t = spliced.transpose(1, 2)
    assert stack_t.view(5 * 4, bankB.shape[1]).data_ptr() == spliced.data_ptr()
    want = torch.where(cur.view(-1, 1, 1), lB.detach()[None], bankB)
    torch.testing.assert_close(stack_t.reshape(20, -1), want.transpose(1, 2).reshape(20, -1))
