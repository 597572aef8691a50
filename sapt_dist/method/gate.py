"""GainLoRA's gates: one small gate network and one key per task slot.

GainLoRA (NeurIPS 2025; the T5 code of liangyanshuo/gainlora, ``src/t5_large.py``) sums
the tasks' LoRA branches with a weight per branch and sequence, read from the sequence's
mean token embedding ``u`` (prompt tokens only)::

    g_t(u) = SiLU(W2_t SiLU(W1_t u))        W1_t (h, d), W2_t (d, h), no bias
    w_t(u) = |2 sigmoid(4 cos(g_t(u), k_t)) - 1|     (0 at cos 0; no softmax)

Inactive slots weigh exactly 0. Every slot's gate runs in one batched product (the
stacked banks, the current slot's trainable copy in place): no loop over slots.

A new task's gate starts as a copy of the previous task's, its key as the top direction
of its gate outputs off the old tasks' output subspace; after every optimizer step the
*change* of each gate weight is projected off the old tasks' subspaces
(:func:`project_change`), so the new gate computes on old inputs what the old one did,
and its key stays orthogonal to those outputs: the new branch weighs ~0 on old inputs.
The subspace memories are :class:`~sapt_dist.method.subspace.SubspaceMemory` (the run's
``sapt_dist.train.subspace``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sapt_dist import distributed

__all__ = ["GateBank", "gate_value", "mean_pool_prompt", "project_change"]

#: the memories' names: gate inputs ``u`` (d), hidden activations (h), gate outputs (d)
GATE_PARTS = ("input", "hidden", "output")


def mean_pool_prompt(embeds: torch.Tensor, prompt_mask: torch.Tensor) -> torch.Tensor:
    """(batch, d) the mean of the prompt's token embeddings (padding and targets excluded;
    a row with no prompt token pools to zeros)."""
    m = prompt_mask.to(embeds.dtype).unsqueeze(-1)
    return (m * embeds).sum(1) / m.sum(1).clamp_min(1.0)


def gate_value(cos: torch.Tensor) -> torch.Tensor:
    """``|2 sigmoid(4 cos) - 1|``, GainLoRA's gate of a cosine."""
    return (2.0 * torch.sigmoid(4.0 * cos) - 1.0).abs()


@torch.no_grad()
def project_change(
    new: torch.Tensor, old: torch.Tensor, basis: torch.Tensor | None
) -> torch.Tensor:
    """``new`` with the change ``new - old`` of its rows projected off ``basis`` (the
    columns of an orthonormal (in, k) basis of the rows' input space), each row then
    rescaled to its norm before the projection (the released trainer's step). A 1-d tensor
    is one row. None / an empty basis: ``new`` unchanged."""
    if basis is None or basis.shape[1] == 0:
        return new
    shape = new.shape
    # in float64: the fp32 result then does not hang on which kernel a product takes (a
    # basis read back from a file sits elsewhere in memory: a resume must step the same)
    n, o = new.reshape(-1, shape[-1]).double(), old.reshape(-1, shape[-1]).double()
    b = basis.to(n)
    out = n - ((n - o) @ b) @ b.t()
    out = out * (n.norm(dim=1, keepdim=True) / out.norm(dim=1, keepdim=True).clamp_min(1e-30))
    return out.reshape(shape).to(new.dtype)


class GateBank(nn.Module):
    """Every slot's gate network: banks ``w1_bank`` (T, h, d) and ``w2_bank`` (T, d, h) of
    the filed gates, and the current slot's trainable ``w1`` (h, d), ``w2`` (d, h). The keys
    are the attention's (``SharedAttention.key`` / ``key_bank``)."""

    def __init__(self, d: int, n_slots: int, hidden: int) -> None:
        super().__init__()
        self.d, self.hidden = d, hidden
        self.w1 = nn.Parameter(torch.empty(hidden, d))
        self.w2 = nn.Parameter(torch.empty(d, hidden))
        self.register_buffer("w1_bank", torch.zeros(n_slots, hidden, d))
        self.register_buffer("w2_bank", torch.zeros(n_slots, d, hidden))
        self.reset()

    @torch.no_grad()
    def reset(self) -> None:
        """A first task's gate: nn.Linear's default initialisation (the released
        ``nn.Sequential(nn.Linear(...), ...)``)."""
        with distributed.gathered([self.w1, self.w2], modify=True):
            for w in (self.w1, self.w2):
                nn.init.kaiming_uniform_(w, a=5**0.5)

    @torch.no_grad()
    def load(self, slot: int) -> None:
        """The trainable gate := slot ``slot``'s filed gate."""
        with distributed.gathered([self.w1, self.w2], modify=True):
            self.w1.copy_(self.w1_bank[slot])
            self.w2.copy_(self.w2_bank[slot])

    @torch.no_grad()
    def file(self, slot: int) -> None:
        with distributed.gathered([self.w1, self.w2]):
            self.w1_bank[slot].copy_(self.w1)
            self.w2_bank[slot].copy_(self.w2)

    def stacked(self, current: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(T, h, d), (T, d, h) every slot's gate, the trainable one in the current slot."""
        c = current.view(-1, 1, 1)
        return (
            torch.where(c, self.w1.unsqueeze(0), self.w1_bank),
            torch.where(c, self.w2.unsqueeze(0), self.w2_bank),
        )

    def features(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The trainable gate's hidden activations (b, h) and outputs (b, d) for ``u``."""
        hidden = F.silu(u.to(self.w1.dtype) @ self.w1.t())
        return hidden, F.silu(hidden @ self.w2.t())

    def cosines(self, u: torch.Tensor, keys: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
        """(b, T) ``cos(g_t(u), k_t)`` of every slot t."""
        w1, w2 = self.stacked(current)
        hidden = F.silu(torch.einsum("bd,thd->bth", u.to(w1.dtype), w1))
        out = F.silu(torch.einsum("bth,tdh->btd", hidden, w2))
        return F.cosine_similarity(out.float(), keys.float().unsqueeze(0), dim=-1, eps=1e-12)

    def forward(
        self,
        u: torch.Tensor,
        keys: torch.Tensor,
        active: torch.Tensor,
        current: torch.Tensor,
        output: str = "weights",
    ):
        """(b, T) the gate values, exactly 0 on inactive slots; ``output="cosines"``:
        :meth:`cosines`; ``"features"``: :meth:`features`. Callers go through here (the
        module call) so that ZeRO-3's hooks gather the trainable gate."""
        if output == "features":
            return self.features(u)
        cos = self.cosines(u, keys, current)
        if output == "cosines":
            return cos
        w = gate_value(cos)
        return torch.where(active.unsqueeze(0), w, torch.zeros_like(w))
