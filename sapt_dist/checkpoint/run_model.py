"""The model of a run: backbone + ``SAPTModel`` + (optionally) saved blocks with their mask.

One path for the two users of a run's model: ``train.run`` (a new run, or a resumed one
from ``state/blocks``) and ``outputs.inference.load_run`` (a finished or partly finished
run's blocks for ``sapt-predict`` / ``sapt-route`` / re-evaluation). Both therefore build
exactly the same model from the same config.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from sapt_dist.backbone.load import load_backbone, torch_dtype
from sapt_dist.checkpoint.blocks import load_blocks
from sapt_dist.config import RunConfig
from sapt_dist.method.model import SAPTModel
from sapt_dist.methods import METHODS

__all__ = ["build_run_model"]


def build_run_model(
    cfg: RunConfig, n_slots: int, blocks: str | Path | None = None
) -> tuple[SAPTModel, Any]:
    """Load ``cfg.model``'s backbone (partitioned when ``distributed.configure`` set up
    ZeRO-3) and wrap it in a ``SAPTModel`` of ``n_slots`` task slots as the method's row
    says (routing, the generator slot, the gradient through earlier blocks); with
    ``blocks``, load that blocks folder into it (its mask applied). Returns the model and
    the tokenizer.

    The query network's initialisation is seeded by ``train.seed`` alone, so it does not
    depend on what used the RNG before (a resumed run builds the same model)."""
    method = METHODS[cfg.method]
    backbone, tokenizer = load_backbone(cfg.model)
    torch.manual_seed(cfg.train.seed)
    adapter = cfg.adapter
    if method.gradient == "exact":
        adapter = dataclasses.replace(adapter, gradient="exact")
    model = SAPTModel(
        backbone,
        adapter,
        n_slots=n_slots,
        routing=method.routing,
        dtype=torch_dtype(cfg.model.dtype),
        generator_slot=method.generator_slot(cfg.replay.kind),
    )
    if blocks is not None:
        load_blocks(model, blocks)
    return model, tokenizer
