"""SAPT's shared attention: one query network, one key per task slot.

For a sequence ``x`` with prompt mask ``m`` (1 on instruction + input tokens)::

    u = max_{i: m_i = 1} E(x)_i                       (b, d)   prompt max-pool
    q = LayerNorm(SiLU(W2 W1 (u - c)))                (b, d)   query network g
    z_j = <k_j, q> / tau   (active j),  -inf otherwise  (b, T)
    w = softmax(z)                                    (b, T)

The same weights drive learning (the mixture while task t trains), selection (at test
time, no task id) and reflection (ARM: a KL that keeps replayed pseudo-samples of task j
attending as they did when task j was learned).

State is held in fixed-shape buffers so nothing is reallocated between tasks:
``key_bank`` (T, d) holds the frozen keys, ``key`` (d,) is the current task's trainable
key, ``active`` / ``current`` (T,) are boolean slot masks and ``targets`` (T, T) holds each
finished task's stored attention target ``a_j*`` (row j, zero-padded). ``c`` is 0 (the
paper) or, with ``center='tasks'``, the mean of the seen tasks' mean pooled prompts
(``task_means``, ``center``).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from sapt_dist import distributed
from sapt_dist.method.gate import GateBank, mean_pool_prompt

__all__ = ["QueryNetwork", "SharedAttention", "max_pool_prompt", "arm_kl"]

RoutingMode = Literal["attention", "sum", "gate"]


def max_pool_prompt(embeds: torch.Tensor, prompt_mask: torch.Tensor) -> torch.Tensor:
    """Element-wise max over the prompt's token embeddings.

    Args:
        embeds: (batch, seq, d) token embeddings.
        prompt_mask: (batch, seq), non-zero on prompt tokens (padding and target excluded).
    Returns:
        (batch, d). A row with no prompt token pools to zeros (no NaN, no host sync).
    """
    mask = prompt_mask.to(torch.bool).unsqueeze(-1)
    pooled = torch.where(mask, embeds, float("-inf")).amax(dim=1)
    # only a row without prompt tokens pools to -inf (embeddings are finite): make it 0,
    # keeping any NaN / +inf as they are
    return pooled.nan_to_num(nan=float("nan"), posinf=float("inf"), neginf=0.0)


class QueryNetwork(nn.Module):
    """``g``: Linear(d->h, no bias) -> Linear(h->d, no bias) -> SiLU -> LayerNorm(d).

    ``init_std``: ``None`` keeps nn.Linear's default initialisation; a number draws both
    linears' weights from N(0, init_std) (the released code: 0.02). LayerNorm: (1, 0).
    """

    def __init__(self, d: int, hidden: int, init_std: float | None = None) -> None:
        super().__init__()
        self.down = nn.Linear(d, hidden, bias=False)
        self.up = nn.Linear(hidden, d, bias=False)
        self.norm = nn.LayerNorm(d)
        if init_std is not None:
            nn.init.normal_(self.down.weight, 0.0, init_std)
            nn.init.normal_(self.up.weight, 0.0, init_std)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return self.norm(F.silu(self.up(self.down(u))))


def arm_kl(target: torch.Tensor, weights_log: torch.Tensor) -> torch.Tensor:
    """``KL(a* || w)`` per row: ``sum_k a*_k (log a*_k - log w_k)`` with zero terms where
    ``a*_k = 0``.

    Args:
        target: (n, T) stored attention targets (rows sum to 1, zero on later slots).
        weights_log: (n, T) log of the current attention (``-inf`` on inactive slots).
    Returns:
        (n,) the KL of each row.
    """
    pos = target > 0
    safe_log_w = torch.where(pos, weights_log, torch.zeros_like(weights_log))
    return (torch.xlogy(target, target) - target * safe_log_w).sum(-1)


class SharedAttention(nn.Module):
    """Query network + per-slot keys; turns pooled prompts into mixture weights."""

    def __init__(
        self,
        d: int,
        n_slots: int,
        hidden: int = 100,
        tau: float | None = None,
        mode: RoutingMode = "attention",
        center: Literal["none", "tasks"] = "none",
        query_init_std: float | None = None,
    ) -> None:
        super().__init__()
        if mode not in ("attention", "sum", "gate"):
            raise ValueError(f"routing mode must be 'attention', 'sum' or 'gate', got {mode!r}")
        self.d = d
        self.n_slots = n_slots
        self.mode = mode
        self.tau = float(tau) if tau is not None else math.sqrt(d)
        self.query = QueryNetwork(d, hidden, query_init_std)
        self.key = nn.Parameter(torch.empty(d))
        self.register_buffer("key_bank", torch.zeros(n_slots, d))
        self.register_buffer("active", torch.zeros(n_slots, dtype=torch.bool))
        self.register_buffer("current", torch.zeros(n_slots, dtype=torch.bool))
        self.register_buffer("targets", torch.zeros(n_slots, n_slots))
        # The query network's input is ``u - center``. ``none`` (the paper): center stays 0.
        # ``tasks``: the mean of the seen tasks' mean pooled training prompts, so that what
        # every max-pooled prompt shares (its largest component on a real model) does not
        # drown what tells the tasks apart (see docs/ROUTING.md).
        if center not in ("none", "tasks"):
            raise ValueError(f"router center must be 'none' or 'tasks', got {center!r}")
        self.center_mode = center
        self.register_buffer("task_means", torch.zeros(n_slots, d))
        self.register_buffer("has_mean", torch.zeros(n_slots, dtype=torch.bool))
        self.register_buffer("center", torch.zeros(d))
        #: ``gate`` (GainLoRA): a gate network per slot (``method.gate``); the keys above
        #: are the gates' keys and the query network is not used
        self.gates = GateBank(d, n_slots, hidden) if mode == "gate" else None
        self.reset_key()

    def _apply(self, fn, recurse: bool = True):
        """``.to(dtype)`` / ``.bfloat16()`` keep the input center in fp32 (devices move)."""
        super()._apply(fn, recurse)
        for name in ("task_means", "center"):
            t = getattr(self, name)
            if t.dtype != torch.float32:
                setattr(self, name, t.float())
        return self

    @torch.no_grad()
    def set_task_mean(self, slot: int, mean: torch.Tensor) -> None:
        """Record task ``slot``'s mean pooled training prompt and recompute the center (the
        mean of the recorded task means, each task weighing the same). No-op unless the
        attention centers its input (``center='tasks'``)."""
        if self.center_mode != "tasks":
            return
        self.task_means[slot].copy_(mean.to(self.task_means))
        self.has_mean[slot] = True
        self.recompute_center()

    @torch.no_grad()
    def recompute_center(self) -> None:
        if self.center_mode != "tasks" or not bool(self.has_mean.any()):
            self.center.zero_()
            return
        self.center.copy_(self.task_means[self.has_mean].mean(dim=0))

    def adapter_params(self) -> list[nn.Parameter]:
        """Trainable parameters of the attention (none in ``sum`` mode)."""
        if self.mode == "sum":
            return []
        if self.gates is not None:
            return [self.key, self.gates.w1, self.gates.w2]
        return [self.key, *self.query.parameters()]

    def pool(self, embeds: torch.Tensor, prompt_mask: torch.Tensor) -> torch.Tensor:
        """(batch, d) what the routing reads of a sequence: the prompt's max-pooled token
        embeddings (SAPT), their mean (GainLoRA's gates)."""
        if self.gates is not None:
            return mean_pool_prompt(embeds, prompt_mask)
        return max_pool_prompt(embeds, prompt_mask)

    @torch.no_grad()
    def reset_key(self) -> None:
        """A new task's key: uniform in [-1, 1] per component."""
        with distributed.gathered([self.key], modify=True):
            self.key.uniform_(-1.0, 1.0)

    @torch.no_grad()
    def file_key(self, slot: int) -> None:
        with distributed.gathered([self.key]):
            self.key_bank[slot].copy_(self.key)

    @torch.no_grad()
    def load_key(self, slot: int) -> None:
        with distributed.gathered([self.key], modify=True):
            self.key.copy_(self.key_bank[slot])

    def keys(self) -> torch.Tensor:
        """(T, d) every slot's key with the current slot's trainable key in place."""
        return torch.where(self.current.unsqueeze(-1), self.key, self.key_bank)  # key broadcast

    def scores(self, u: torch.Tensor) -> torch.Tensor:
        """(batch, T) key scores before the softmax, ``z_j = <k_j, g(u)> / tau``, for every
        slot (inactive ones included: explanations show what a disabled block would score).

        Only ``attention`` routing has scores; ``sum`` (IncLoRA) has no query network.
        """
        if self.mode == "sum":
            raise ValueError("routing 'sum' (inc_lora) has no key scores: every block weighs 1")
        if self.gates is not None:  # the gates' cosines (the weights are |2 sigmoid(4 cos) - 1|)
            return self.gates(u, self.keys(), self.active, self.current, output="cosines")
        return self._scores(u, self.key.new_zeros(()))

    def _query(self, u: torch.Tensor) -> torch.Tensor:
        """``g(u - c)``. The centering in fp32: the center removes the large shared part of
        u, whose rounding in bf16 would be of the size of what tells tasks apart."""
        if self.center_mode == "none":  # c = 0: nothing to subtract
            return self.query(u.to(self.key.dtype))
        return self.query((u.float() - self.center).to(self.key.dtype))

    def _scores(self, u: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """``bias + <k_j, g(u)> / tau`` in one ``addmm`` (the temperature as alpha): the one
        formula of the scores, masked or not."""
        return torch.addmm(bias, self._query(u), self.keys().t(), alpha=1.0 / self.tau).float()

    def _masked_scores(self, u: torch.Tensor) -> torch.Tensor:
        """(batch, T) the scores with ``-inf`` on inactive slots: the mask enters as the
        bias ``log(active)`` (0 or -inf)."""
        return self._scores(u, torch.log(self.active).to(self.key.dtype))

    def log_weights(self, u: torch.Tensor) -> torch.Tensor:
        """(batch, T) log of the mixture weights for pooled prompts ``u`` (batch, d)."""
        if self.mode == "sum":
            # IncLoRA: every active block with weight 1 (log 0 on active slots)
            w = self.active.to(u.dtype).expand(u.shape[0], -1)
            return torch.log(w)
        return F.log_softmax(self._masked_scores(u), dim=-1)

    def forward(
        self,
        u: torch.Tensor,
        replay_task: torch.Tensor | None = None,
        output: str = "weights",
    ) -> torch.Tensor:
        """(batch, T) mixture weights; exactly 0 on inactive slots.

        ``output="scores"``: :meth:`scores`; ``output="arm"``: :meth:`arm_loss` of ``u`` as
        replayed prompts of tasks ``replay_task``. Callers go through here (the module
        call) rather than the methods so that ZeRO-3's hooks gather the key and ``g``.
        """
        if output == "scores":
            return self.scores(u)
        if output == "arm":
            return self.arm_loss(u, replay_task)
        if output == "gate_features":  # the trainable gate's (hidden, output) of ``u``
            return self.gates(u, self.keys(), self.active, self.current, output="features")
        if self.gates is not None:
            return self.gates(u, self.keys(), self.active, self.current)
        if self.mode == "sum":
            return self.log_weights(u).exp()
        return F.softmax(self._masked_scores(u), dim=-1)

    def arm_loss(self, u_replay: torch.Tensor, replay_task: torch.Tensor) -> torch.Tensor:
        """Attentive reflection: ``sum_j mean_{p in P_j} KL(a_j* || w(p))``.

        Args:
            u_replay: (n, d) pooled pseudo-sample prompts of the earlier tasks.
            replay_task: (n,) long, the slot (task) each pseudo-sample belongs to.
        Returns:
            scalar, summed over earlier tasks (each task's term averaged over its samples).
        """
        kl = arm_kl(self.targets[replay_task], self.log_weights(u_replay))  # (n,)
        per_task_sum = torch.zeros(self.n_slots, device=kl.device, dtype=kl.dtype)
        per_task_sum = per_task_sum.index_add(0, replay_task, kl)
        counts = torch.zeros_like(per_task_sum).index_add(0, replay_task, torch.ones_like(kl))
        return (per_task_sum / counts.clamp(min=1)).sum()
