"""Per-task soft-prompt blocks (prompt tuning) mixed by SAPT's shared attention.

With ``adapter.kind: prompt`` each task's block is a soft prompt of ``L`` virtual tokens
(``L`` x d, d the embedding width) instead of LoRA matrices; no weight of the backbone
changes. The shared attention's weights ``w`` (batch, T) mix the stacked prompts in one
product, and the mixed prompt is prepended to the input embeddings::

    P_stack (T, L*d)   = [P_1; ...; P_T]            (current slot: the trainable prompt)
    P_mix   (b, L, d)  = (w @ P_stack).view(b, L, d) = sum_j w_j P_j
    inputs_embeds      = [P_mix ; E(x)]             attention mask and labels extended

Static shapes, no loop over slots, no host sync, as the LoRA mixture. A one-hot ``w`` on
slot ``j`` is exactly peft's prompt tuning with ``P_j`` (``tests/test_prompt.py``).

The life cycle mirrors :class:`~sapt_dist.method.lora.MixtureLoRALinear`: the current
task's prompt is the trainable parameter, finished prompts live in the ``bank`` buffer
(``file_current`` copies in place; nothing is reallocated between tasks).
"""

from __future__ import annotations

import torch
from torch import nn

from sapt_dist import distributed
from sapt_dist.method.lora import RoutingContext

__all__ = ["PROMPT_BLOCK", "MixturePrompt"]

#: the name of the prompt "layer" in ``SAPTModel.layers`` and in block files
PROMPT_BLOCK = "prompt"

#: a fresh prompt copies the embeddings of random tokens among the vocabulary's first ids
#: (Lester et al. 2021 initialise from the 5,000 most common tokens; tokenizers built by
#: BPE order merges by frequency, so low ids are the common ones)
INIT_VOCAB = 5000


class MixturePrompt(nn.Module):
    """``n_slots`` soft prompts of ``length`` tokens; ``forward(w)`` returns their mixture."""

    #: the tensors of one block, as named in block files (``prompt.P``)
    BLOCK_PARTS = ("P",)

    def __init__(
        self,
        embedding: nn.Embedding,
        n_slots: int,
        length: int,
        context: RoutingContext,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if length < 1:
            raise ValueError(f"prompt length must be >= 1, got {length}")
        d = int(embedding.embedding_dim)
        self.n_slots, self.length, self.d = n_slots, length, d
        # the block signature reads in/out like a linear layer's: (d, d)
        self.in_features = self.out_features = d
        w = embedding.weight
        dtype = dtype or (w.dtype if w.dtype.is_floating_point else torch.float32)
        device = w.device if w.device.type != "meta" else None
        kw = {"dtype": dtype, "device": device}
        self.prompt = nn.Parameter(torch.zeros(length, d, **kw))
        self.register_buffer("bank", torch.zeros(n_slots, length, d, **kw))
        # not submodules: the embedding belongs to the backbone, the context to the model
        object.__setattr__(self, "_embedding", embedding)
        object.__setattr__(self, "_context", context)
        self.reset_current()

    def adapter_params(self) -> list[nn.Parameter]:
        return [self.prompt]

    def banks(self) -> tuple[torch.Tensor, ...]:
        return (self.bank,)

    @torch.no_grad()
    def reset_current(self) -> None:
        """A fresh prompt: the embeddings of ``length`` random common tokens."""
        emb = self._embedding.weight
        with distributed.gathered([emb]):
            vocab = emb.shape[0]
            ids = torch.randint(0, min(vocab, INIT_VOCAB), (self.length,))
            rows = emb[ids.to(emb.device)].to(self.prompt.dtype)
        with distributed.gathered([self.prompt], modify=True):
            self.prompt.copy_(rows.to(self.prompt.device))

    @torch.no_grad()
    def file_current(self, slot: int) -> None:
        with distributed.gathered([self.prompt]):
            self.bank[slot].copy_(self.prompt)

    @torch.no_grad()
    def load_current(self, slot: int) -> None:
        with distributed.gathered([self.prompt], modify=True):
            self.prompt.copy_(self.bank[slot])

    def stacked(self) -> tuple[torch.Tensor, ...]:
        """(T, L, d) every slot's prompt with the current slot's trainable one in place."""
        cur = self._context.current
        if cur is None:
            return (self.bank,)
        return (torch.where(cur.view(-1, 1, 1), self.prompt.unsqueeze(0), self.bank),)

    def forward(self, weights: torch.Tensor) -> torch.Tensor:
        """(batch, T) weights -> (batch, L, d) mixed prompt ``sum_j w_j P_j`` (one matmul).

        Called as a module so that ZeRO-3's hooks gather the trainable prompt."""
        (P,) = self.stacked()
        mixed = torch.matmul(weights.to(P.dtype), P.reshape(P.shape[0], -1))
        return mixed.view(weights.shape[0], self.length, self.d)

    def extra_repr(self) -> str:
        return f"slots={self.n_slots}, length={self.length}, d={self.d}"
