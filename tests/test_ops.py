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
