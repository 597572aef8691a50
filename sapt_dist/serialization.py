"""Saving, loading and exporting SAPT blocks.

A blocks folder holds::

    manifest.json              config, task names in slot order, model signature,
                               library versions, sha256 of every file
    router.safetensors         query network g, the stored attention targets a_j*
    block_00.safetensors ...   one per task: A and B of every adapted layer, and its key

Loading checks the manifest against the model (class, widths, adapted layers and their
shapes, rank, slot count, routing) and every checksum, and refuses a mismatch with a
message naming the field, before touching the model. Only safetensors are read.

``export_peft`` writes any task's block as a standard peft LoRA adapter folder that
``PeftModel.from_pretrained`` loads on the plain backbone.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from sapt_dist import distributed
from sapt_dist.io_utils import atomic_dir, sha256_file
from sapt_dist.model import SAPTModel

__all__ = [
    "CheckpointMismatchError",
    "export_peft",
    "load_blocks",
    "model_signature",
    "save_blocks",
]

FORMAT = "sapt-dist-blocks"
FORMAT_VERSION = 1


class CheckpointMismatchError(ValueError):
    """A saved checkpoint does not fit the model or config it is loaded into."""


def _versions() -> dict[str, str]:
    import safetensors
    import transformers

    from sapt_dist import __version__

    out = {
        "sapt_dist": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "safetensors": safetensors.__version__,
    }
    try:
        import peft

        out["peft"] = peft.__version__
    except ImportError:  # peft is a dependency; tolerate a stripped install when saving
        pass
    return out


def model_signature(model: SAPTModel) -> dict[str, Any]:
    """What a blocks folder must agree with to be loaded into ``model``."""
    cfg = getattr(model.backbone, "config", None)
    return {
        "backbone_class": type(model.backbone).__name__,
        "model_type": getattr(cfg, "model_type", None),
        "hidden_size": model.router.d,
        "vocab_size": getattr(cfg, "vocab_size", None),
        "num_hidden_layers": getattr(cfg, "num_hidden_layers", None),
        "n_slots": model.n_slots,
        "generator_slot": model.has_generator_slot,
        "rank": model.adapter_config.rank,
        "alpha": model.adapter_config.alpha,
        "routing": model.router.mode,
        "query_hidden": model.adapter_config.query_hidden,
        "tau": model.router.tau,
        "target_layers": {
            name: [layer.in_features, layer.out_features] for name, layer in model.layers.items()
        },
    }


def _cpu(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu").contiguous().clone()


def _block_tensors(model: SAPTModel, slot: int) -> dict[str, torch.Tensor]:
    """Slot ``slot``'s A and B of every layer and its key (trainable copy if current)."""
    params = [p for layer in model.layers.values() for p in layer.adapter_params()]
    params.append(model.router.key)
    out: dict[str, torch.Tensor] = {}
    with distributed.gathered(params):
        for name, layer in model.layers.items():
            A, B = layer.stacked()
            out[f"{name}.A"] = _cpu(A[slot])
            out[f"{name}.B"] = _cpu(B[slot])
        out["key"] = _cpu(model.router.keys()[slot])
    return out


def save_blocks(
    model: SAPTModel,
    folder: str | Path,
    task_names: list[str],
    extra: dict | None = None,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Write the blocks of slots ``0..len(task_names)-1`` atomically to ``folder``.

    ``extra_files`` (name -> text) are written in the same atomic swap (the run's progress).
    Only rank 0 writes; every rank must call it (ZeRO-3 gathers are collective).
    """
    folder = Path(folder)
    if len(task_names) > model.n_slots:
        raise ValueError(f"{len(task_names)} task names for {model.n_slots} slots")
    blocks = [_block_tensors(model, j) for j in range(len(task_names))]
    router_params = list(model.router.query.parameters())
    with distributed.gathered(router_params):
        router = {f"query.{k}": _cpu(v) for k, v in model.router.query.state_dict().items()}
    router["targets"] = _cpu(model.router.targets)
    if not distributed.is_main_process():
        return folder
    with atomic_dir(folder) as tmp:
        files = {"router.safetensors": router}
        for j, block in enumerate(blocks):
            files[f"block_{j:02d}.safetensors"] = block
        checksums = {}
        for fname, tensors in files.items():
            save_file(tensors, str(tmp / fname))
            checksums[fname] = sha256_file(tmp / fname)
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "tasks": list(task_names),
            "adapter": dataclasses.asdict(model.adapter_config),
            "model": model_signature(model),
            "versions": _versions(),
            "files": checksums,
            "extra": extra or {},
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return folder


def read_manifest(folder: str | Path) -> dict[str, Any]:
    folder = Path(folder)
    path = folder / "manifest.json"
    if not path.is_file():
        raise CheckpointMismatchError(f"{folder}: no manifest.json (not a sapt-dist blocks folder)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointMismatchError(f"{path}: not valid JSON ({e})") from e
    if manifest.get("format") != FORMAT:
        raise CheckpointMismatchError(
            f"{path}: format is {manifest.get('format')!r}, not {FORMAT!r}"
        )
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointMismatchError(
            f"{path}: format_version {manifest.get('format_version')} is not {FORMAT_VERSION}"
        )
    return manifest


def check_manifest(manifest: dict[str, Any], model: SAPTModel, where: str) -> None:
    """Raise naming every field where ``manifest`` disagrees with ``model``."""
    saved, mine = manifest.get("model", {}), model_signature(model)
    problems = []
    for key in mine:
        if saved.get(key) != mine[key]:
            if key == "target_layers":
                a, b = set(saved.get(key, {})), set(mine[key])
                diff = (
                    sorted(a ^ b)[:4]
                    or [n for n in mine[key] if saved[key].get(n) != mine[key][n]][:4]
                )
                problems.append(f"target_layers differ (e.g. {diff})")
            else:
                problems.append(f"{key}: saved {saved.get(key)!r}, model has {mine[key]!r}")
    if problems:
        raise CheckpointMismatchError(
            f"{where}: saved blocks do not fit this model/config: " + "; ".join(problems)
        )


def load_blocks(model: SAPTModel, folder: str | Path) -> list[str]:
    """Load a blocks folder into ``model``'s banks; return the task names in slot order.

    Slots ``0..n-1`` become filed; the model is left with slot ``n-1`` current (and its
    block as the trainable starting point) and ``0..n-1`` active, i.e. ready to evaluate
    the sequence or to ``start_task(n)``.
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    check_manifest(manifest, model, str(folder))
    tasks = manifest["tasks"]
    for fname, digest in manifest["files"].items():
        path = folder / fname
        if not path.is_file():
            raise CheckpointMismatchError(f"{folder}: missing file {fname}")
        if sha256_file(path) != digest:
            raise CheckpointMismatchError(f"{path}: checksum mismatch (file changed or corrupt)")
    router = load_file(str(folder / "router.safetensors"))
    blocks = [load_file(str(folder / f"block_{j:02d}.safetensors")) for j in range(len(tasks))]
    r = model.router
    with torch.no_grad():
        with distributed.gathered(list(r.query.parameters()), modify=True):
            r.query.load_state_dict(
                {k.removeprefix("query."): v for k, v in router.items() if k.startswith("query.")}
            )
        r.targets.copy_(router["targets"].to(r.targets))
        for j, block in enumerate(blocks):
            for name, layer in model.layers.items():
                layer.A_bank[j].copy_(block[f"{name}.A"].to(layer.A_bank))
                layer.B_bank[j].copy_(block[f"{name}.B"].to(layer.B_bank))
            r.key_bank[j].copy_(block["key"].to(r.key_bank))
    if tasks:
        model.start_task(len(tasks) - 1, fresh=False)
    return tasks


def export_peft(
    model: SAPTModel, slot: int, folder: str | Path, base_model_name_or_path: str | None = None
) -> Path:
    """Write slot ``slot``'s block as a peft LoRA adapter folder (atomically).

    ``PeftModel.from_pretrained(plain_backbone, folder)`` then gives exactly the backbone
    with that one block (SAPT with one-hot weights on ``slot``).
    """
    folder = Path(folder)
    if not 0 <= slot < model.n_slots:
        raise ValueError(f"slot {slot} out of range 0..{model.n_slots - 1}")
    block = _block_tensors(model, slot)
    ac = model.adapter_config
    tensors = {}
    for name in model.layers:
        tensors[f"base_model.model.{name}.lora_A.weight"] = block[f"{name}.A"]
        tensors[f"base_model.model.{name}.lora_B.weight"] = block[f"{name}.B"]
    alpha = int(ac.alpha) if float(ac.alpha).is_integer() else ac.alpha
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": ac.rank,
        "lora_alpha": alpha,
        "lora_dropout": ac.dropout,
        "target_modules": sorted(ac.target_modules),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
    }
    if not distributed.is_main_process():
        return folder
    with atomic_dir(folder) as tmp:
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return folder
