"""Saving, loading and exporting SAPT blocks.

A blocks folder holds::

    manifest.json              config, task names in slot order, model signature,
                               library versions, sha256 of every file, per-block
                               provenance, the block mask (disabled slots + history)
                               and a digest of the manifest itself
    router.safetensors         query network g, the stored attention targets a_j*
    block_00.safetensors ...   one per task: A and B of every adapted layer, and its key
                               (GainLoRA: and its gate network, ``gate.w1`` / ``gate.w2``)
    subspace.safetensors       (InfLoRA) each adapted layer's input-subspace memory
    gate_subspace.safetensors  (GainLoRA) the gates' input / hidden / output subspaces

Loading checks the manifest against the model (class, widths, adapted layers and their
shapes, rank, slot count, routing) and every checksum, and refuses a mismatch with a
message naming the field, before touching the model. Only safetensors are read.

The manifest carries its own ``digest`` (sha256 of its canonical JSON without that
field): an edit by hand is refused, and the mask is only changed through
:func:`set_block_enabled`, which validates the edit (known block, slot in range, one block
left), appends it to ``history`` and rewrites the manifest atomically. This is an
integrity check against mistakes and stray edits, not a signature: anyone can recompute
a sha256. Disabled slots stay on disk; :func:`load_blocks` masks them out of the
attention's ``active`` slots, so their weight is exactly 0.

``export_peft`` writes any task's block as a standard peft LoRA adapter folder that
``PeftModel.from_pretrained`` loads on the plain backbone.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from sapt_dist import distributed
from sapt_dist.checkpoint.atomic import (
    CHECKSUMS,
    NUMBER,
    UnreadableFileError,
    atomic_dir,
    atomic_write_text,
    check_shape,
    checksum_files,
    read_json,
    save_safetensors,
    verify_checksums,
)
from sapt_dist.data.tasks import TaskData, split_sha256
from sapt_dist.method.model import SAPTModel

__all__ = [
    "BlockStateError",
    "CheckpointMismatchError",
    "block_provenance",
    "check_files",
    "export_peft",
    "library_versions",
    "load_blocks",
    "load_extra_tensors",
    "manifest_digest",
    "model_signature",
    "read_manifest",
    "resolve_block",
    "save_blocks",
    "set_block_enabled",
]

FORMAT = "sapt-dist-blocks"
#: a gate-routed (GainLoRA) block's gate network in its block file
GATE_TENSORS = ("gate.w1", "gate.w2")
#: 2 added ``digest``, ``disabled``, ``history``, ``provenance``, ``run_config``;
#: version-1 folders still load (no digest to check, nothing disabled).
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
#: the shape of ``manifest.json`` (checked on every read, after its format and digest):
#: what the loaders and ``sapt-blocks`` read from it
MANIFEST = {
    "format": str,
    "format_version": int,
    "tasks": [str],
    "files": CHECKSUMS,
    "model": {"n_slots": int, "target_layers?": {str: [int]}},
    "adapter?": {str: object},
    "versions?": {str: str},
    "extra?": {str: object},
    "run_config?": ({str: object}, None),
    "provenance?": [
        {
            "slot": int,
            "task": str,
            "trained_at?": str,
            "data?": [{"split_sizes": {str: int}, "train_sha256": str}],
            "scores_after?": {str: (NUMBER, None)},
        }
    ],
    "disabled?": [int],
    "history?": [{"time": str, "action": str, "slot": int, "task": str, "reason": str}],
    "digest?": str,
}
_RESTORE = "restore it (or the run folder); change the block mask only with sapt-blocks"


class CheckpointMismatchError(ValueError):
    """A saved checkpoint does not fit the model or config it is loaded into."""


class BlockStateError(ValueError):
    """A block mask edit that cannot be made (unknown block, no block left, no change)."""


def block_provenance(
    *,
    slot: int,
    block: str,
    stage: int,
    method: str,
    steps: int,
    learned: list[TaskData],
    scores_after: dict[str, float | None],
    metric: dict[str, str],
    config: dict,
) -> dict[str, Any]:
    """Where block ``slot`` came from, recorded at the end of stage ``stage``: the data it
    learned from (folder, split sizes, sha256 of the examples), the config, the library
    versions, the time, and the scores after that stage (row ``stage`` of the matrix)."""
    import datetime

    data = [
        {
            "task": t.name,
            "benchmark": t.benchmark,
            "folder": str(t.source_dir) if t.source_dir else None,
            "split_sizes": {s: len(t.splits[s]) for s in ("train", "dev", "test")},
            "train_sha256": split_sha256(t, "train"),
            "definition_from": t.definition_from,
            "carved": t.carved,
        }
        for t in learned
    ]
    return {
        "slot": slot,
        "task": block,
        "stage": stage,
        "method": method,
        "trained_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "optimizer_steps": steps,
        "data": data,
        "scores_after": scores_after,
        "metric": metric,
        "config": config,
        "versions": library_versions(),
    }


def library_versions() -> dict[str, str]:
    """Versions of the libraries that shape a block (recorded with it)."""
    return _versions()


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
        **(
            {"router_center": model.router.center_mode}
            if model.router.center_mode != "none"
            else {}
        ),
        "target_layers": {
            name: [layer.in_features, layer.out_features] for name, layer in model.layers.items()
        },
        **(
            {"kind": "prompt", "prompt_length": model.prompts.length}
            if model.prompts is not None
            else {}
        ),
    }


def _cpu(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu").contiguous().clone()


def _block_tensors(model: SAPTModel, slot: int) -> dict[str, torch.Tensor]:
    """Slot ``slot``'s A and B of every layer and its key (trainable copy if current)."""
    params = [p for layer in model.layers.values() for p in layer.adapter_params()]
    params.append(model.router.key)
    gates = model.router.gates
    if gates is not None:
        params += [gates.w1, gates.w2]
    out: dict[str, torch.Tensor] = {}
    with distributed.gathered(params):
        for name, layer in model.layers.items():
            for part, t in zip(layer.BLOCK_PARTS, layer.stacked()):
                out[f"{name}.{part}"] = _cpu(t[slot])
        out["key"] = _cpu(model.router.keys()[slot])
        if gates is not None:  # GainLoRA: the slot's gate network goes with its block
            for part, t in zip(GATE_TENSORS, gates.stacked(model.router.current)):
                out[part] = _cpu(t[slot])
    return out


def save_blocks(
    model: SAPTModel,
    folder: str | Path,
    task_names: list[str],
    extra: dict | None = None,
    extra_files: dict[str, str] | None = None,
    provenance: list[dict] | None = None,
    run_config: dict | None = None,
    extra_tensors: dict[str, dict[str, torch.Tensor]] | None = None,
) -> Path:
    """Write the blocks of slots ``0..len(task_names)-1`` atomically to ``folder``.

    ``extra_files`` (name -> text) are written in the same atomic swap (the run's progress);
    so are ``extra_tensors`` (file name -> tensors: a method's state beside its blocks, such
    as InfLoRA's subspace memory), checksummed like the blocks.
    ``provenance``: one record per block (task, data, config, versions, time, scores);
    ``run_config``: the run's resolved config, which binds the folder to its run.
    Every block starts enabled. Only rank 0 writes; every rank must call it (ZeRO-3
    gathers are collective).
    """
    folder = Path(folder)
    if len(task_names) > model.n_slots:
        raise ValueError(f"{len(task_names)} task names for {model.n_slots} slots")
    blocks = [_block_tensors(model, j) for j in range(len(task_names))]
    router_params = list(model.router.query.parameters())
    with distributed.gathered(router_params):
        router = {f"query.{k}": _cpu(v) for k, v in model.router.query.state_dict().items()}
    router["targets"] = _cpu(model.router.targets)
    if model.router.center_mode != "none":
        router["task_means"] = _cpu(model.router.task_means)
        router["has_mean"] = _cpu(model.router.has_mean.to(torch.uint8))
    if not distributed.is_main_process():
        return folder
    with atomic_dir(folder) as tmp:
        files = {"router.safetensors": router}
        for j, block in enumerate(blocks):
            files[f"block_{j:02d}.safetensors"] = block
        files.update(extra_tensors or {})
        for fname, tensors in files.items():
            save_safetensors(tensors, tmp / fname, folder / fname)
        checksums = checksum_files(tmp, list(files))
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "tasks": list(task_names),
            "adapter": dataclasses.asdict(model.adapter_config),
            "model": model_signature(model),
            "versions": _versions(),
            "files": checksums,
            "extra": extra or {},
            "run_config": run_config,
            "provenance": list(provenance or []),
            "disabled": [],
            "history": [],
        }
        for name, text in (extra_files or {}).items():
            # the run's progress is checksummed with the blocks: an edited matrix entry is
            # caught on resume like an edited block
            (tmp / name).write_text(text)
        manifest["files"].update(checksum_files(tmp, list(extra_files or {})))
        (tmp / "manifest.json").write_text(_manifest_text(manifest))
    return folder


def manifest_digest(manifest: dict[str, Any]) -> str:
    """sha256 of the manifest's canonical JSON, its ``digest`` field left out."""
    body = {k: v for k, v in manifest.items() if k != "digest"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _manifest_text(manifest: dict[str, Any]) -> str:
    manifest = {k: v for k, v in manifest.items() if k != "digest"}
    manifest["format_version"] = FORMAT_VERSION
    manifest["digest"] = manifest_digest(manifest)
    return json.dumps(manifest, indent=2) + "\n"


def _check_mask(manifest: dict[str, Any], path: Path) -> None:
    """The mask must be what its history says, over known slots, with a block left."""
    tasks = manifest.get("tasks")
    if not isinstance(tasks, list) or not all(isinstance(t, str) for t in tasks):
        raise CheckpointMismatchError(f"{path}: 'tasks' must be a list of block names")
    disabled = manifest.get("disabled", [])
    history = manifest.get("history", [])
    if not isinstance(disabled, list) or not isinstance(history, list):
        raise CheckpointMismatchError(f"{path}: 'disabled' and 'history' must be lists")
    replay: set[int] = set()
    for k, h in enumerate(history):
        ok = (
            isinstance(h, dict)
            and h.get("action") in ("disable", "enable")
            and isinstance(h.get("slot"), int)
            and 0 <= h["slot"] < len(tasks)
            and h.get("task") == tasks[h["slot"]]
        )
        if not ok:
            raise CheckpointMismatchError(
                f"{path}: history[{k}] is not a valid mask edit of a known block: {h!r}"
            )
        (replay.add if h["action"] == "disable" else replay.discard)(h["slot"])
    bad = [j for j in disabled if not isinstance(j, int) or not 0 <= j < len(tasks)]
    if bad or sorted(set(disabled)) != sorted(replay) or len(disabled) != len(set(disabled)):
        raise CheckpointMismatchError(
            f"{path}: 'disabled' {disabled} is not what its history gives ({sorted(replay)})"
        )
    if tasks and len(disabled) >= len(tasks):
        raise CheckpointMismatchError(f"{path}: every block is disabled")


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """The manifest of a blocks folder, checked: format, version, digest, mask.

    Raises:
        CheckpointMismatchError: naming the file and what is wrong.
    """
    folder = Path(folder)
    path = folder / "manifest.json"
    if not path.is_file():
        raise CheckpointMismatchError(f"{folder}: no manifest.json (not a sapt-dist blocks folder)")
    try:
        manifest = read_json(path)
    except UnreadableFileError as e:
        raise CheckpointMismatchError(str(e)) from e
    check_shape(manifest, {str: object}, path, _RESTORE, error=CheckpointMismatchError)
    if manifest.get("format") != FORMAT:
        raise CheckpointMismatchError(
            f"{path}: format is {manifest.get('format')!r}, not {FORMAT!r}"
        )
    version = manifest.get("format_version")
    if version not in READABLE_VERSIONS:
        raise CheckpointMismatchError(
            f"{path}: format_version {version} is not one of {list(READABLE_VERSIONS)}"
        )
    if version >= 2 and manifest.get("digest") != manifest_digest(manifest):
        raise CheckpointMismatchError(
            f"{path} was changed after sapt-dist wrote it (its digest does not match its "
            f"content): edited by hand or copied from elsewhere. Restore the original; "
            f"change the block mask only with `sapt-blocks disable/enable`."
        )
    check_shape(manifest, MANIFEST, path, _RESTORE, error=CheckpointMismatchError)
    if version >= 2:
        _check_mask(manifest, path)
    return manifest


def resolve_block(manifest: dict[str, Any], block: str | int, where: str = "") -> int:
    """The slot of ``block``: a task (block) name of the manifest or a slot number."""
    tasks = manifest["tasks"]
    if isinstance(block, str) and block in tasks:
        return tasks.index(block)
    text = str(block).strip()
    if text.lstrip("-").isdigit():
        slot = int(text)
        if 0 <= slot < len(tasks):
            return slot
        raise BlockStateError(
            f"{where}slot {slot} out of range: blocks are slots 0..{len(tasks) - 1}"
        )
    listed = ", ".join(f"{j}: {t}" for j, t in enumerate(tasks))
    raise BlockStateError(f"{where}no block named {block!r}; the blocks are {listed}")


def set_block_enabled(
    folder: str | Path, block: str | int, enabled: bool, reason: str, now: str | None = None
) -> dict[str, Any]:
    """Disable or re-enable one block of a blocks folder; return the new manifest.

    The block's files are kept; its slot goes into (or out of) ``disabled`` and the edit
    (UTC time, action, slot, task, reason) is appended to ``history``. The manifest is
    checked first (digest, checksums) and rewritten atomically with a new digest.

    Raises:
        BlockStateError: unknown block, empty reason, no change, or the last enabled block.
        CheckpointMismatchError: the folder does not check out.
    """
    import datetime

    folder = Path(folder)
    manifest = read_manifest(folder)
    where = f"{folder}: "
    check_files(manifest, folder)
    if not reason or not reason.strip():
        raise BlockStateError(f"{where}give a reason for the change (it goes into the history)")
    slot = resolve_block(manifest, block, where)
    name = manifest["tasks"][slot]
    disabled = set(manifest.get("disabled", []))
    if enabled and slot not in disabled:
        raise BlockStateError(f"{where}block {slot} ({name}) is already enabled")
    if not enabled and slot in disabled:
        raise BlockStateError(f"{where}block {slot} ({name}) is already disabled")
    if not enabled and len(disabled) + 1 >= len(manifest["tasks"]):
        raise BlockStateError(
            f"{where}cannot disable block {slot} ({name}): it is the last enabled block "
            f"(the attention needs at least one)"
        )
    (disabled.discard if enabled else disabled.add)(slot)
    manifest["disabled"] = sorted(disabled)
    manifest.setdefault("history", []).append(
        {
            "time": now
            or datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "action": "enable" if enabled else "disable",
            "slot": slot,
            "task": name,
            "reason": reason.strip(),
        }
    )
    atomic_write_text(folder / "manifest.json", _manifest_text(manifest))
    return read_manifest(folder)


def check_manifest(manifest: dict[str, Any], model: SAPTModel, where: str) -> None:
    """Raise naming every field where ``manifest`` disagrees with ``model``."""
    saved, mine = manifest.get("model", {}), model_signature(model)
    problems = []
    # keys written only when set (so older manifests still load) are compared both ways
    optional = [
        k for k in ("router_center", "kind", "prompt_length") if k in saved and k not in mine
    ]
    for key in list(mine) + optional:
        if saved.get(key) != mine.get(key):
            if key == "target_layers":
                a, b = set(saved.get(key, {})), set(mine[key])
                diff = (
                    sorted(a ^ b)[:4]
                    or [n for n in mine[key] if saved[key].get(n) != mine[key][n]][:4]
                )
                problems.append(f"target_layers differ (e.g. {diff})")
            else:
                problems.append(f"{key}: saved {saved.get(key)!r}, model has {mine.get(key)!r}")
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
    check_files(manifest, folder)
    router = load_file(str(folder / "router.safetensors"))
    blocks = [load_file(str(folder / f"block_{j:02d}.safetensors")) for j in range(len(tasks))]
    r = model.router
    with torch.no_grad():
        with distributed.gathered(list(r.query.parameters()), modify=True):
            r.query.load_state_dict(
                {k.removeprefix("query."): v for k, v in router.items() if k.startswith("query.")}
            )
        r.targets.copy_(router["targets"].to(r.targets))
        if r.center_mode != "none":
            if "task_means" not in router:
                raise CheckpointMismatchError(
                    f"{folder / 'router.safetensors'}: has no task means, but the model "
                    f"centers the router's input (adapter.router_center={r.center_mode!r})"
                )
            r.task_means.copy_(router["task_means"].to(r.task_means))
            r.has_mean.copy_(router["has_mean"].to(torch.bool))
            r.recompute_center()
        for j, block in enumerate(blocks):
            for name, layer in model.layers.items():
                for part, bank in zip(layer.BLOCK_PARTS, layer.banks()):
                    bank[j].copy_(block[f"{name}.{part}"].to(bank))
            r.key_bank[j].copy_(block["key"].to(r.key_bank))
            if r.gates is not None:
                missing = [k for k in GATE_TENSORS if k not in block]
                if missing:
                    raise CheckpointMismatchError(
                        f"{folder / f'block_{j:02d}.safetensors'}: no gate network "
                        f"({missing}), but the model routes by gates (routing='gate')"
                    )
                r.gates.w1_bank[j].copy_(block["gate.w1"].to(r.gates.w1_bank))
                r.gates.w2_bank[j].copy_(block["gate.w2"].to(r.gates.w2_bank))
    if tasks:
        model.start_task(len(tasks) - 1, fresh=False)
        with torch.no_grad():
            for j in manifest.get("disabled", []):
                r.active[j] = False
    return tasks


def load_extra_tensors(folder: str | Path, name: str) -> dict[str, torch.Tensor] | None:
    """The tensors of ``name`` that :func:`save_blocks` filed with the blocks (its
    ``extra_tensors``), checked against the manifest's sha256; None if it filed none."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if name not in (manifest.get("files") or {}):
        return None
    verify_checksums(
        folder,
        {name: manifest["files"][name]},
        CheckpointMismatchError,
        listed_in=folder / "manifest.json",
        required=[name],
    )
    return load_file(str(folder / name))


def check_files(manifest: dict[str, Any], folder: str | Path) -> None:
    """Every file the manifest lists exists with its sha256 (one clear message when none
    does: the manifest belongs to other block files)."""
    folder = Path(folder)
    tasks = manifest.get("tasks") or []
    verify_checksums(
        folder,
        manifest.get("files"),
        CheckpointMismatchError,
        listed_in=folder / "manifest.json",
        foreign_hint=True,
        # what load_blocks reads: a list that leaves one out would let it through unchecked
        required=["router.safetensors", *(f"block_{j:02d}.safetensors" for j in range(len(tasks)))],
    )


def export_peft(
    model: SAPTModel, slot: int, folder: str | Path, base_model_name_or_path: str | None = None
) -> Path:
    """Write slot ``slot``'s block as a peft adapter folder (atomically): LoRA, or prompt
    tuning for prompt blocks.

    ``PeftModel.from_pretrained(plain_backbone, folder)`` then gives exactly the backbone
    with that one block (SAPT with one-hot weights on ``slot``); the task type is
    ``SEQ_2_SEQ_LM`` for an encoder-decoder backbone (T5), else ``CAUSAL_LM``.
    """
    folder = Path(folder)
    if not 0 <= slot < model.n_slots:
        raise ValueError(f"slot {slot} out of range 0..{model.n_slots - 1}")
    block = _block_tensors(model, slot)
    ac = model.adapter_config
    if model.prompts is not None:
        return _export_peft_prompt(model, block, folder, base_model_name_or_path)
    tensors = {}
    for name in model.layers:
        tensors[f"base_model.model.{name}.lora_A.weight"] = block[f"{name}.A"]
        tensors[f"base_model.model.{name}.lora_B.weight"] = block[f"{name}.B"]
    alpha = int(ac.alpha) if float(ac.alpha).is_integer() else ac.alpha
    config = {
        "peft_type": "LORA",
        "task_type": _peft_task_type(model),
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


def _peft_task_type(model: SAPTModel) -> str:
    return "SEQ_2_SEQ_LM" if model.is_encoder_decoder else "CAUSAL_LM"


def _export_peft_prompt(
    model: SAPTModel, block: dict[str, torch.Tensor], folder: Path, base: str | None
) -> Path:
    """A prompt block as peft's prompt tuning (``PROMPT_TUNING``, ``prompt_embeddings``).
    On an encoder-decoder the prompt goes before the encoder's input only: one transformer
    submodule (peft's seq2seq default of 2 would read a second, decoder-side prompt)."""
    from sapt_dist.method.prompt import PROMPT_BLOCK

    hf = getattr(model.backbone, "config", None)
    prompt = block[f"{PROMPT_BLOCK}.P"]
    config = {
        "peft_type": "PROMPT_TUNING",
        "task_type": _peft_task_type(model),
        "base_model_name_or_path": base,
        "num_virtual_tokens": int(prompt.shape[0]),
        "token_dim": int(prompt.shape[1]),
        "num_transformer_submodules": 1,
        "num_attention_heads": getattr(hf, "num_attention_heads", None),
        "num_layers": getattr(hf, "num_hidden_layers", None),
        "prompt_tuning_init": "RANDOM",
        "inference_mode": True,
    }
    if not distributed.is_main_process():
        return folder
    with atomic_dir(folder) as tmp:
        save_file(
            {"prompt_embeddings": prompt},
            str(tmp / "adapter_model.safetensors"),
            metadata={"format": "pt"},
        )
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return folder
