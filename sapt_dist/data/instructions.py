"""Task instructions from an instruction file (``data.instructions``), for the tasks whose
task files carry no ``Definition``.

The format is the released pipelines' ``configs/instruction_config.json`` (O-LoRA; SAPT's
``pseudo_data/configs/``)::

    {"<task>": [{"instruction_type": "zero-shot", "instruction": "<text>"}, ...], ...}

and a task's instruction is its first ``zero-shot`` entry (their ``--instruction_strategy
single``). Keys are task folder names (the released file keys task types; see
``instruction_files/README.md``). ``data.instructions`` is a path or the name of a file
shipped in ``sapt_dist/data/instruction_files/`` (``long_sequence``). The whole file is
checked when it is read, before any task or model loads; every problem names the file
and the key.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from sapt_dist.config import ConfigError

__all__ = ["INSTRUCTION_TYPES", "Instructions", "read_instructions", "shipped_instructions"]

#: the released loader's two kinds; a run is zero-shot, so only ``zero-shot`` ones are used
INSTRUCTION_TYPES = ("zero-shot", "few-shot")


@dataclass(frozen=True)
class Instructions:
    """An instruction file, read and checked: ``by_task`` maps a task name to its
    instruction (whitespace stripped, as a task file's ``Definition``)."""

    path: str
    by_task: dict[str, str]


def shipped_instructions() -> list[str]:
    """Names of the instruction files shipped in the package (``long_sequence``)."""
    folder = resources.files("sapt_dist") / "data" / "instruction_files"
    return sorted(
        f.name.removesuffix(".json") for f in folder.iterdir() if f.name.endswith(".json")
    )


def _locate(spec: str) -> tuple[str, str]:
    """(where, text) of ``spec``: a file path, else the name of a shipped file."""
    path = Path(spec).expanduser()
    if path.is_file():
        try:
            return str(path), path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"config key 'data.instructions': cannot read {path} ({e})") from e
    shipped = shipped_instructions()
    if spec not in shipped:
        raise ConfigError(
            f"config key 'data.instructions': no instruction file {spec!r} (a path to a JSON "
            f"file, or one shipped: {shipped})"
        )
    f = resources.files("sapt_dist") / "data" / "instruction_files" / f"{spec}.json"
    return f"{spec} (shipped: sapt_dist/data/instruction_files/{spec}.json)", f.read_text(
        encoding="utf-8"
    )


def read_instructions(spec: str | None) -> Instructions | None:
    """The instruction file ``data.instructions`` names (``None``: none set).

    Raises:
        ConfigError: naming the file (and the key), for a missing file, bad JSON, or an
            entry that is not a list of ``{"instruction_type", "instruction"}`` objects
            with at least one ``zero-shot`` instruction.
    """
    if spec is None:
        return None
    where, text = _locate(spec)
    bad = f"config key 'data.instructions': {where}"
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(
            f"{bad} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}"
        ) from e
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(
            f"{bad} must hold one non-empty JSON object mapping task names to lists of "
            f'{{"instruction_type": "zero-shot", "instruction": "..."}}'
        )
    by_task = {}
    for task, entries in raw.items():
        key = f"{bad}: key {task!r}"
        if not isinstance(entries, list) or not entries:
            raise ConfigError(f"{key} must be a non-empty list of instruction objects")
        first = None
        for k, e in enumerate(entries):
            if not isinstance(e, dict):
                raise ConfigError(f"{key}[{k}] must be an object, not {type(e).__name__}")
            kind = e.get("instruction_type")
            if kind not in INSTRUCTION_TYPES:
                raise ConfigError(
                    f"{key}[{k}]: 'instruction_type' must be one of {list(INSTRUCTION_TYPES)} "
                    f"(got {kind!r})"
                )
            text_ = e.get("instruction")
            if not isinstance(text_, str) or not text_.strip():
                raise ConfigError(f"{key}[{k}]: 'instruction' must be a non-empty string")
            if kind == "zero-shot" and first is None:
                first = text_.strip()
        if first is None:
            raise ConfigError(f"{key} has no 'zero-shot' instruction (the only kind a run uses)")
        by_task[task] = first
    return Instructions(where, by_task)
