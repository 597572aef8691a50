"""The contract between ``SAPTModel`` and what holds its blocks.

``SAPTModel.layers`` maps a name to a block holder: an adapted linear layer
(:class:`~sapt_dist.method.lora.MixtureLoRALinear`, LoRA) or the one soft-prompt module
(:class:`~sapt_dist.method.prompt.MixturePrompt`). The model, the block files
(``checkpoint.blocks``) and the sharding report use a holder through this protocol only,
so a new kind of block is a new class that satisfies it (``tests/test_model.py`` checks
both kinds do).
"""

from __future__ import annotations

from typing import ClassVar, Protocol, runtime_checkable

import torch
from torch import nn

__all__ = ["BlockHolder"]


@runtime_checkable
class BlockHolder(Protocol):
    """Fixed-shape banks of every slot's filed block plus the current task's trainable
    block, whose tensors are named by ``BLOCK_PARTS`` (``<holder name>.<part>`` in block
    files)."""

    BLOCK_PARTS: ClassVar[tuple[str, ...]]

    def adapter_params(self) -> list[nn.Parameter]:
        """The trainable block's parameters."""
        ...

    def banks(self) -> tuple[torch.Tensor, ...]:
        """The filed blocks, one (slots, ...) buffer per part."""
        ...

    def stacked(self) -> tuple[torch.Tensor, ...]:
        """The banks with the trainable block in its slot, one tensor per part."""
        ...

    def reset_current(self) -> None:
        """A fresh trainable block (the task's initialisation)."""
        ...

    def file_current(self, slot: int) -> None:
        """Copy the trainable block into ``slot`` of the banks."""
        ...

    def load_current(self, slot: int) -> None:
        """Start the trainable block from what ``slot`` of the banks holds."""
        ...
