"""Loss terms a baseline adds to the task loss, computed from the parameters after the
forward (never inside ``SAPTModel.forward``, so gradient checkpointing's recomputation
and the model's own code are untouched).

A method's row names its penalty (``Method.penalty``); the run builds it with
:func:`build_penalty`, puts it in ``SAPTModel.penalties`` (so that ZeRO-3's hooks gather
the parameters it reads: :func:`sapt_dist.distributed.gather_in_forward`) and the
training step adds ``penalty()`` to the loss. Before each task trains, the run calls
``set_task(settings)`` with that task's :class:`sapt_dist.config.TaskSettings`, so a
penalty's weights follow ``per_task`` (O-LoRA's released scripts change them per task).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from sapt_dist import distributed
from sapt_dist.method.lora import MixtureLoRALinear

__all__ = ["PENALTIES", "OLoRAPenalty", "build_penalty"]


class OLoRAPenalty(nn.Module):
    """O-LoRA's two regularisers (Wang et al. 2023, its released trainer), summed over the
    adapted layers: ``lambda_1 * sum |A_old A_new^T|`` (L1 of the r x r products with every
    block filed before the current slot) ``+ lambda_2 * (||A_new|| + ||B_new||)`` (2-norms
    of the trainable block). Static shapes: earlier slots are selected by a mask, not a
    loop over tasks."""

    def __init__(self, layers: list[MixtureLoRALinear], lambda_1: float, lambda_2: float) -> None:
        super().__init__()
        if not layers:
            raise ValueError("O-LoRA's penalty needs LoRA layers (adapter.kind 'lora')")
        # a plain list: the layers belong to the backbone, not to this module
        self._layers = list(layers)
        self.lambda_1, self.lambda_2 = float(lambda_1), float(lambda_2)
        distributed.gather_in_forward(self, [p for m in self._layers for p in (m.lora_A, m.lora_B)])

    @staticmethod
    def terms(layer: MixtureLoRALinear, current: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(orthogonality, L2) of one layer's trainable block against the slots before
        ``current`` (the (slots,) bool mask of the trainable slot)."""
        earlier = (torch.cumsum(current.to(torch.int32), 0) == 0).to(layer.A_bank.dtype)
        old = (layer.A_bank * earlier.view(-1, 1, 1)).reshape(-1, layer.in_features)
        orth = (old @ layer.lora_A.t()).abs().sum()
        return orth, layer.lora_A.norm() + layer.lora_B.norm()

    def set_task(self, settings: Any) -> None:
        """The weights task ``settings`` (a :class:`sapt_dist.config.TaskSettings`) trains
        with: ``per_task.<task>.olora_lambda_*`` where set, else ``olora.lambda_*``."""
        self.lambda_1 = float(settings.olora_lambda_1)
        self.lambda_2 = float(settings.olora_lambda_2)

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The two weighted terms for the model's current slot (set by its last forward);
        the training step adds them to the loss one after the other."""
        current = self._layers[0]._context.current
        if current is None:
            raise RuntimeError("OLoRAPenalty is computed after a SAPTModel forward")
        terms = [self.terms(m, current) for m in self._layers]
        return (
            self.lambda_1 * torch.stack([o for o, _ in terms]).sum(),
            self.lambda_2 * torch.stack([n for _, n in terms]).sum(),
        )


def _olora(model: Any, cfg: Any) -> nn.Module:
    layers = [m for m in model.layers.values() if isinstance(m, MixtureLoRALinear)]
    return OLoRAPenalty(layers, cfg.olora.lambda_1, cfg.olora.lambda_2)


#: ``Method.penalty`` -> builder ``(SAPTModel, RunConfig) -> module``
PENALTIES: dict[str, Callable[[Any, Any], nn.Module]] = {"olora": _olora}


def build_penalty(name: str, model: Any, cfg: Any) -> nn.Module:
    """The penalty ``name`` of a method row for ``model``, registered in
    ``model.penalties`` (before any engine is built, so ZeRO-3 hooks it)."""
    if name not in PENALTIES:
        raise ValueError(f"unknown penalty {name!r} (known: {sorted(PENALTIES)})")
    module = PENALTIES[name](model, cfg)
    model.penalties[name] = module
    return module
