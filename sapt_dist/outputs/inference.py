"""Using a run's blocks: prediction without a task id, routing explanations, re-evaluation.

::

    load_run(run folder)
        config.yaml (+ overrides, --model-path)        the run's model / adapter / data
        blocks folder: blocks/ (finished) or state/blocks/ (tasks finished so far)
        manifest checked: digest, checksums, mask, bound to this run's config
        checkpoint.run_model.build_run_model             the run's own model-building
                                                        path: backbone + SAPTModel +
                                                        blocks, disabled slots masked out
    predict(...)      method.generation.generate_texts: batched greedy, KV cache, weights
                      fixed from each prompt by the shared attention (no task id)
    explain_routing   method.generation.routing_weights / routing_scores: the run's
                      diagnostics, per input, with names, top blocks, entropy
    reevaluate(...)   outputs.evaluation.evaluate_tasks (the run's own evaluation) on every
                      seen task's test split with the current mask; a new matrix file
                      beside the training run's (which is never overwritten)

Inputs come from the command line, a text file (one input per line), a JSONL file (one
``{"input": ..., "definition": ..., "id": ...}`` object per line), a SuperNI split file
(``.json``) or a task of the run's data (``--task``). The prompt is the run's template
filled with the input's definition (the instruction) and its text; the task a row came
from, when known, is carried to the output but never used for routing.
"""

from __future__ import annotations

import datetime
import html
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sapt_dist import distributed
from sapt_dist.checkpoint.atomic import atomic_write_json, atomic_write_jsonl, atomic_write_text
from sapt_dist.checkpoint.blocks import (
    CheckpointMismatchError,
    check_files,
    read_manifest,
)
from sapt_dist.checkpoint.run_state import flat_config, read_progress, restart_may_change
from sapt_dist.config import ConfigError, RunConfig, load_config, load_yaml
from sapt_dist.data.tasks import (
    TaskData,
    TaskDataError,
    TruncationStats,
    check_text,
    encode_prompt,
    format_prompt,
    load_task,
    resolve_data_root,
)
from sapt_dist.method.generation import (
    generate_texts,
    pooled_prompts,
    routing_scores,
    routing_weights,
)
from sapt_dist.method.model import SAPTModel
from sapt_dist.methods import METHODS

__all__ = [
    "InputError",
    "InputRecord",
    "LoadedRun",
    "explain_routing",
    "find_blocks",
    "judge_routing",
    "load_run",
    "load_run_config",
    "predict",
    "read_inputs",
    "reevaluate",
    "routing_report",
    "routing_verdict",
    "task_centres",
    "task_inputs",
    "write_jsonl",
]

log = logging.getLogger(__name__)

#: config keys that may differ between a block's manifest and its run's config.yaml
#: (the same as a restart may change; see run_state)


class InputError(ValueError):
    """Bad prediction inputs; the message names the file (and line) or the option."""


# ---------------------------------------------------------------------------- inputs
@dataclass
class InputRecord:
    """One input to predict. ``task`` and ``references`` are known only for a task's
    split; they are carried to the output, never used to route."""

    id: str
    input: str
    definition: str
    references: list[str] | None = None
    task: str | None = None


def _need_definition(where: str, definition: str | None) -> str:
    if definition is None or not definition.strip():
        raise InputError(
            f"{where}: no definition (the instruction the prompt starts with); give it in "
            f"the record's 'definition' field or with --definition"
        )
    return definition


def _read_jsonl(path: Path, definition: str | None) -> list[InputRecord]:
    out = []
    text = path.read_text(encoding="utf-8")
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path} line {n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from e
        except RecursionError:
            raise InputError(f"{where}: nested too deeply (an input is one flat object)") from None
        except ValueError as e:  # a number past Python's digit limit for int()
            raise InputError(f"{where}: a number too long to read ({str(e)[:100]})") from None
        if not isinstance(row, dict):
            raise InputError(
                f"{where}: expected a JSON object with an 'input' field, got {type(row).__name__}"
            )
        if "input" not in row:
            raise InputError(
                f"{where}: no 'input' field (each line is an object with 'input' and "
                f"optionally 'definition', 'id', 'references'); it has {sorted(row)}"
            )
        if not isinstance(row["input"], str):
            raise InputError(f"{where}: 'input' must be a string")
        d = row.get("definition", definition)
        if d is not None and not isinstance(d, str):
            raise InputError(f"{where}: 'definition' must be a string")
        refs = row.get("references", row.get("output"))
        if isinstance(refs, str):
            refs = [refs]
        if refs is not None and not (
            isinstance(refs, list) and all(isinstance(r, str) for r in refs)
        ):
            raise InputError(f"{where}: 'references' must be a string or a list of strings")
        rid = row.get("id", f"{path.stem}-{n}")
        if isinstance(rid, bool) or not isinstance(rid, (str, int)):
            raise InputError(f"{where}: 'id' must be a string or an integer")
        record = InputRecord(
            id=str(rid),
            input=row["input"],
            definition=_need_definition(where, d),
            references=refs,
            task=row.get("task") if isinstance(row.get("task"), str) else None,
        )
        _check_record(record, where)
        out.append(record)
    return out


def _check_record(r: InputRecord, where: str) -> None:
    """Every text of ``r`` is text a tokenizer takes (no lone surrogate)."""
    fields = [("input", r.input), ("definition", r.definition), ("id", r.id)]
    fields += [("references", x) for x in r.references or []]
    for name, value in fields:
        try:
            check_text(value, f"{where}: '{name}'")
        except TaskDataError as e:
            raise InputError(str(e)) from None


def read_inputs(
    texts: list[str] | None = None, path: str | Path | None = None, definition: str | None = None
) -> list[InputRecord]:
    """Inputs from ``texts`` and/or a file, validated before any model loads.

    ``path``: ``.jsonl`` (objects with ``input``, optional ``definition``, ``id``,
    ``references``), ``.json`` (a SuperNI split file: ``Definition`` + ``Instances``), or
    any other file as plain text, one input per line (blank lines skipped).

    Raises:
        InputError: a missing, empty or malformed file, a record without a field.
    """
    out: list[InputRecord] = []
    for k, t in enumerate(texts or []):
        if not t.strip():
            raise InputError(f"--text number {k + 1} is empty")
        out.append(InputRecord(f"text-{k + 1}", t, _need_definition("--text", definition)))
        # bytes of the command line that are not UTF-8 arrive as lone surrogates
        _check_record(out[-1], f"--text number {k + 1}")
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise InputError(f"input file not found: {path}")
        try:
            if path.suffix == ".jsonl":
                rows = _read_jsonl(path, definition)
            elif path.suffix == ".json":
                rows = _read_split_file(path)
            else:
                lines = [x for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
                rows = [
                    InputRecord(f"{path.stem}-{k + 1}", x, _need_definition(str(path), definition))
                    for k, x in enumerate(lines)
                ]
                for r in rows[:1]:  # the file decoded as UTF-8: only --definition can be bad
                    _check_record(r, f"{path}")
        except UnicodeDecodeError as e:
            raise InputError(f"{path}: not UTF-8 text ({e})") from e
        except OSError as e:
            raise InputError(f"{path}: cannot be read ({e.strerror or e})") from e
        if not rows:
            raise InputError(f"{path}: no inputs in the file (it is empty)")
        out += rows
    if not out:
        raise InputError("no inputs: give --text, --input FILE or --task NAME")
    return out


def _read_split_file(path: Path) -> list[InputRecord]:
    from sapt_dist.data.tasks import _read_split

    try:
        definition, examples = _read_split(path.parent.name, path.stem, path)
    except TaskDataError as e:
        raise InputError(str(e)) from e
    if not definition:
        # the run's instruction file and template are applied by --task, not to a bare file
        raise InputError(
            f"{path} has a missing or empty 'Definition'; use --task {path.parent.name} to "
            f"read it as the run does (its data.instructions and template)"
        )
    return [
        InputRecord(x.id, x.input, definition, list(x.outputs), task=path.parent.name)
        for x in examples
    ]


def _records(task: TaskData, split: str) -> list[InputRecord]:
    ds = task.splits[split]
    return [
        InputRecord(i, x, task.definition, list(o), task=task.name)
        for i, x, o in zip(ds["id"], ds["input"], ds["outputs"], strict=True)
    ]


def task_inputs(cfg: RunConfig, task: str, split: str = "test") -> list[InputRecord]:
    """A split of one of the run's data tasks, as the run loads it (caps, carving)."""
    root = resolve_data_root(cfg.data.root)
    return _records(load_task(root, task, cfg.data, cfg.train.seed), split)


# ---------------------------------------------------------------------------- the run
def find_blocks(run_dir: str | Path) -> tuple[Path, bool]:
    """The run's blocks folder and whether the run is finished: ``blocks/`` of a finished
    run, else ``state/blocks/`` (the tasks finished so far)."""
    run_dir = Path(run_dir)
    final = run_dir / "blocks"
    partial = run_dir / "state" / "blocks"
    finished = (run_dir / "state" / "finished.json").is_file()
    if (final / "manifest.json").is_file() and finished:
        return final, True
    if (partial / "manifest.json").is_file():
        return partial, False
    if (final / "manifest.json").is_file():
        return final, finished
    raise CheckpointMismatchError(
        f"{run_dir}: no blocks yet (neither blocks/manifest.json nor "
        f"state/blocks/manifest.json): no task of this run has finished"
    )


def load_run_config(
    run_dir: str | Path, model_path: str | None = None, overrides: list[str] | tuple = ()
) -> RunConfig:
    """The run's saved ``config.yaml`` with ``overrides``; ``model_path`` points
    ``model.path`` at the backbone on this machine."""
    run_dir = Path(run_dir)
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{run_dir}: no config.yaml (not a sapt-train run folder)")
    extra = list(overrides)
    if model_path:
        extra.append(f"model.path={model_path}")
    return load_config(path, extra)


def check_run_binding(manifest: dict[str, Any], run_dir: Path, blocks_dir: Path) -> None:
    """Refuse a blocks folder written by another run: its recorded config must be this
    run folder's ``config.yaml`` (keys a restart may change excepted)."""
    saved = manifest.get("run_config")
    if not saved:
        return  # written outside a run (or before format 2): nothing to bind to
    path = run_dir / "config.yaml"
    mine = load_yaml(path.read_text(encoding="utf-8"), str(path)) or {}
    a, b = flat_config(saved), flat_config(mine)
    diff = [
        k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k) and not restart_may_change(k)
    ]
    if diff:
        shown = "; ".join(f"{k}: blocks {a.get(k)!r}, run {b.get(k)!r}" for k in diff[:4])
        raise CheckpointMismatchError(
            f"{blocks_dir / 'manifest.json'} was written by another run than {run_dir} "
            f"(config differs: {shown})"
        )


@dataclass
class LoadedRun:
    """A run's model with its blocks loaded, ready to predict and explain."""

    run_dir: Path
    blocks_dir: Path
    finished: bool
    cfg: RunConfig
    model: SAPTModel
    tokenizer: Any
    manifest: dict[str, Any]

    @property
    def blocks(self) -> list[str]:
        """Block names in slot order."""
        return list(self.manifest["tasks"])

    @property
    def disabled(self) -> list[int]:
        return list(self.manifest.get("disabled", []))


def load_run(
    run_dir: str | Path,
    model_path: str | None = None,
    overrides: list[str] | tuple = (),
    blocks_dir: str | Path | None = None,
    cfg: RunConfig | None = None,
) -> LoadedRun:
    """Load a (finished or partly finished) run's model through the run's own path.

    Every check on the blocks (manifest digest, checksums, mask, the run it belongs to,
    the model signature) runs before or instead of loading tensors into the model.
    """
    run_dir = Path(run_dir)
    cfg = cfg or load_run_config(run_dir, model_path, overrides)
    if blocks_dir is None:
        bdir, finished = find_blocks(run_dir)
    else:
        bdir, finished = Path(blocks_dir), (run_dir / "state" / "finished.json").is_file()
    manifest = read_manifest(bdir)
    check_run_binding(manifest, run_dir, bdir)
    check_files(manifest, bdir)  # before the backbone loads
    if not finished:
        log.info(
            "%s: run not finished; using the blocks of its %d finished task(s) in %s",
            run_dir,
            len(manifest["tasks"]),
            bdir,
        )
    from sapt_dist.checkpoint.run_model import build_run_model

    distributed.init(
        timeout_s=cfg.distributed.timeout_s
    )  # as the run: one process group, whichever launcher started us
    # ZeRO-3 runs load the backbone partitioned, as in training
    distributed.configure(distributed.run_engine_config(cfg))
    # the run's own model-building path, its blocks and their mask loaded
    model, tokenizer = build_run_model(cfg, int(manifest["model"]["n_slots"]), blocks=bdir)
    model.eval()
    off = [manifest["tasks"][j] for j in manifest.get("disabled", [])]
    log.info(
        "loaded %d block(s) from %s%s",
        len(manifest["tasks"]),
        bdir,
        f"; disabled: {', '.join(off)}" if off else "",
    )
    return LoadedRun(run_dir, bdir, finished, cfg, model, tokenizer, manifest)


def encode_inputs(loaded: LoadedRun, records: list[InputRecord]) -> list[list[int]]:
    """Prompt token ids, exactly as the run encodes its evaluation prompts."""
    d = loaded.cfg.data
    stats = TruncationStats()
    out = [
        encode_prompt(
            loaded.tokenizer,
            format_prompt(d.template, r.definition, r.input, d.truncation),
            d.max_source_length,
            stats,
        )
        for r in records
    ]
    if stats.source_truncated:
        log.warning(
            "%d of %d input(s) are longer than the run's data.max_source_length (%d tokens) "
            "and are cut as in training (data.truncation=%s: %s); raise it with --set "
            "data.max_source_length=N or shorten the inputs",
            stats.source_truncated,
            stats.total,
            d.max_source_length,
            d.truncation,
            {
                "input": "the end of the input goes, definition and answer cue stay",
                "right": "the end goes, the answer cue with it",
                "left": "the start goes, the definition (the strongest routing cue) with it",
            }[d.truncation],
        )
    return out


# ---------------------------------------------------------------------------- routing
#: training prompts per task that make its centre when the run did not keep one
CENTRE_EXAMPLES = 256


def task_centres(loaded: LoadedRun, batch_size: int | None = None) -> dict[str, Any] | None:
    """Each block's task centre in the space the router reads (the max-pooled prompt
    embedding): ``{"centres": {task: (d,) tensor}, "source": words}``.

    A run with ``adapter.router_center=tasks`` kept every task's mean pooled training
    prompt in its blocks (``router.task_means``); otherwise it is the mean over the task's
    first ``CENTRE_EXAMPLES`` training prompts, read from the run's data. ``None`` (logged)
    when neither is there: a data folder that is not on this machine.
    """
    import torch

    router, names = loaded.model.router, loaded.blocks
    n = len(names)
    if bool(router.has_mean[:n].all()):
        means = router.task_means[:n].float().cpu()
        return {
            "centres": {b: means[j] for j, b in enumerate(names)},
            "source": "each task's mean pooled training prompt, kept by the run "
            "(adapter.router_center=tasks)",
        }
    bs = batch_size or loaded.cfg.eval.batch_size
    pad = loaded.tokenizer.pad_token_id
    centres = {}
    for b in names:
        try:
            records = task_inputs(loaded.cfg, b, "train")[:CENTRE_EXAMPLES]
        except (TaskDataError, ConfigError, KeyError) as e:
            log.info("no task centres: %s's training data is not readable here (%s)", b, e)
            return None
        if not records:
            return None
        u = pooled_prompts(loaded.model, encode_inputs(loaded, records), pad, bs)
        centres[b] = u.double().mean(0).to(torch.float32)
    return {
        "centres": centres,
        "source": f"the mean pooled prompt of each task's first {CENTRE_EXAMPLES} training "
        f"examples, read from data.root",
    }


def _add_distances(
    loaded: LoadedRun, prompts: list[list[int]], out: list[dict[str, Any]], bs: int
) -> None:
    """Per row: the input's Euclidean distance to each block's task centre (``distances``)
    and the nearest task (``nearest_task``): whether the input looks like a task's
    training prompts, next to what the keys scored."""
    centres = task_centres(loaded, bs)
    if centres is None:
        return
    import torch

    names = list(centres["centres"])
    c = torch.stack([centres["centres"][b] for b in names])
    u = pooled_prompts(loaded.model, prompts, loaded.tokenizer.pad_token_id, bs)
    d = torch.cdist(u.double(), c.double())
    for row, dist in zip(out, d.tolist(), strict=True):
        row["distances"] = dict(zip(names, dist, strict=True))
        row["nearest_task"] = names[min(range(len(names)), key=dist.__getitem__)]
        row["centre_source"] = centres["source"]


def explain_routing(
    loaded: LoadedRun,
    prompts: list[list[int]],
    batch_size: int | None = None,
    top_k: int = 3,
    distances: bool = True,
) -> list[dict[str, Any]]:
    """Per prompt: the weight on every block, the top blocks, the key scores before the
    softmax and the entropy of the weights in nats (both SAPT only; ``None`` for
    baselines, whose weights are not an attention); with ``distances``, the input's
    distance to each block's task centre (:func:`task_centres`) and the nearest task.

    The weights are :func:`method.generation.routing_weights` (the run's diagnostics), the
    scores :func:`method.generation.routing_scores`, both batched alike.
    """
    model, names = loaded.model, loaded.blocks
    bs = batch_size or loaded.cfg.eval.batch_size
    pad = loaded.tokenizer.pad_token_id
    n = len(names)
    w = routing_weights(model, prompts, pad, bs)[:, :n]
    # only SAPT trains the query network and keys; the one-slot baselines route with
    # weight 1 through an untrained router, and IncLoRA sums its blocks
    attends = METHODS[loaded.cfg.method].trains_router and model.router.mode == "attention"
    z = routing_scores(model, prompts, pad, bs)[:, :n] if attends else None
    disabled = set(loaded.disabled)
    enabled = [j for j in range(n) if j not in disabled]
    out = []
    for i in range(len(prompts)):
        row = w[i].tolist()
        top = sorted(enabled, key=lambda j, row=row: (-row[j], j))[:top_k]
        entropy = None
        if attends:
            entropy = 0.0 - sum(p * math.log(p) for p in row if p > 0)
        out.append(
            {
                "weights": dict(zip(names, row, strict=True)),
                "top": [{"block": names[j], "slot": j, "weight": row[j]} for j in top],
                "scores": dict(zip(names, z[i].tolist(), strict=True)) if z is not None else None,
                "entropy": entropy,
                "max_entropy": math.log(len(enabled)) if entropy is not None else None,
                "disabled": [names[j] for j in sorted(disabled)],
            }
        )
    if attends and distances and prompts:
        _add_distances(loaded, prompts, out, bs)
    return out


def predict(
    loaded: LoadedRun,
    records: list[InputRecord],
    batch_size: int | None = None,
    max_new_tokens: int | None = None,
    top_k: int = 3,
    generate: bool = True,
) -> list[dict[str, Any]]:
    """One output row per input: id, input, prediction (unless ``generate=False``), the
    routing explanation, and the source task / references when the input had them."""
    cfg = loaded.cfg
    prompts = encode_inputs(loaded, records)
    bs = batch_size or cfg.eval.batch_size
    preds: list[str] | None = None
    if generate:
        preds = generate_texts(
            loaded.model,
            loaded.tokenizer,
            prompts,
            bs,
            max_new_tokens or cfg.eval.max_new_tokens,
            desc="predict",
        )
    routing = explain_routing(loaded, prompts, bs, top_k)
    for r, rt in zip(records, routing, strict=True):
        judge_routing(rt, r.task, loaded.blocks)
    rows = []
    for k, (r, rt) in enumerate(zip(records, routing, strict=True)):
        row: dict[str, Any] = {"id": r.id, "input": r.input}
        if preds is not None:
            row["prediction"] = preds[k]
        if r.task is not None:
            row["task"] = r.task
        if r.references is not None:
            row["references"] = r.references
        row["routing"] = rt
        rows.append(row)
    return rows


#: entropy above this share of the maximum (ln of the enabled blocks) is called weak
WEAK_ENTROPY = 0.8


def judge_routing(rt: dict[str, Any], task: str | None, blocks: list[str]) -> dict[str, Any]:
    """Add a reader's verdict to one routing explanation (in place, and returned):
    ``task`` (the input's task, where known: a task split or a ``task`` field),
    ``own_block`` (is the top block that task's? ``None`` when the task is unknown or has
    no block), ``weak`` (weights near uniform) and ``note``: the same in words."""
    top = rt["top"][0] if rt["top"] else None
    rt["task"] = task
    rt["own_block"] = None
    weak = (
        rt.get("entropy") is not None
        and rt.get("max_entropy")
        and rt["entropy"] >= WEAK_ENTROPY * rt["max_entropy"]
    )
    rt["weak"] = bool(weak)
    if top is None:
        rt["note"] = "no enabled block"
        return rt
    words = f"routes to {top['block']} (weight {top['weight']:.2f})"
    if task is not None and task in blocks:
        rt["own_block"] = top["block"] == task
        if rt["own_block"]:
            words = f"routes to its own task's block {task} (weight {top['weight']:.2f})"
        else:
            words += f", not to its own task's block {task} ({rt['weights'][task]:.2f})"
    elif task is not None:
        words += f"; its task {task} has no block in this run"
    if weak:
        words += (
            f"; weak routing: weights near uniform (entropy {rt['entropy']:.2f} of at most "
            f"{rt['max_entropy']:.2f} nats)"
        )
    rt["note"] = words
    return rt


def routing_verdict(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """How many inputs of a known task went to their own task's block, per task and in
    all, and how many were weakly routed; ``text`` says it in one paragraph."""
    per_task: dict[str, list[int]] = {}
    weak = 0
    for r in rows:
        rt = r["routing"]
        weak += int(bool(rt.get("weak")))
        if rt.get("own_block") is None:
            continue
        right, total = per_task.setdefault(rt["task"], [0, 0])
        per_task[rt["task"]] = [right + int(rt["own_block"]), total + 1]
    right = sum(v[0] for v in per_task.values())
    total = sum(v[1] for v in per_task.values())
    parts = [f"{len(rows)} input(s)"]
    if total:
        parts.append(
            f"{right} of {total} with a known task went to their own task's block "
            f"({100 * right / total:.1f}%)"
        )
        parts.append("; ".join(f"{t}: {a}/{n}" for t, (a, n) in per_task.items() if n))
    else:
        parts.append("none with a known task (give a task split or a 'task' field to check)")
    parts.append(f"{weak} weakly routed (entropy >= {WEAK_ENTROPY:.0%} of the maximum)")
    return {
        "inputs": len(rows),
        "known_task": total,
        "own_block": right,
        "own_block_rate": right / total if total else None,
        "per_task": {t: {"own_block": a, "inputs": n} for t, (a, n) in per_task.items()},
        "weak": weak,
        "text": ". ".join(parts) + ".",
    }


def write_jsonl(rows: list[dict[str, Any]], path: str | Path | None) -> None:
    """JSONL to ``path`` (atomically) or to stdout when ``path`` is ``None`` or ``-``."""
    if path is not None and str(path) != "-":
        atomic_write_jsonl(path, rows)
        return
    import sys

    sys.stdout.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    sys.stdout.flush()


def _color(v: float) -> tuple[str, str]:
    """Background (white -> deep blue) and a readable text colour for a weight in [0, 1]."""
    v = min(max(v, 0.0), 1.0)
    r, g, b = (round(255 + (c - 255) * v) for c in (8, 48, 107))
    return f"rgb({r},{g},{b})", "white" if v > 0.5 else "black"


def _short(text: str, n: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "\u2026"


def routing_report(
    path: str | Path, rows: list[dict[str, Any]], blocks: list[str], title: str = "routing"
) -> Path:
    """A one-page heatmap of inputs x blocks: ``.html`` (a table: each input in full, its
    weights and key scores, its distance to each task's centre where known, top block,
    entropy, verdict and, from ``sapt-predict``, the prediction) or ``.png``
    (matplotlib). The file's mode follows the umask, as any file the user writes."""
    path = Path(path)
    matrix = [[r["routing"]["weights"][b] for b in blocks] for r in rows]
    if path.suffix == ".png":
        from sapt_dist.outputs.metrics import save_heatmap

        verdict = routing_verdict(rows)
        if verdict["known_task"]:
            title += f" ({verdict['own_block']}/{verdict['known_task']} to their own task's block)"
        labels = [f"{r['id']}: {_short(r['input'])}" for r in rows]
        save_heatmap(matrix, labels, blocks, path, title, fmt=".2f", vmin=0.0, vmax=1.0)
        return path
    if path.suffix not in (".html", ".htm"):
        raise InputError(f"--report {path}: the report is .html or .png")
    disabled = set(rows[0]["routing"]["disabled"]) if rows else set()
    head = "".join(
        f"<th>{html.escape(b)}{' (disabled)' if b in disabled else ''}</th>" for b in blocks
    )
    predicted = any("prediction" in r for r in rows)
    with_dist = any(r["routing"].get("distances") for r in rows)
    verdict = routing_verdict(rows)
    body = []
    for r, ws in zip(rows, matrix, strict=True):
        rt = r["routing"]
        scores = rt.get("scores") or {}
        dists = rt.get("distances") or {}
        cells = []
        for b, w in zip(blocks, ws, strict=True):
            bg, fg = _color(w)
            z, d = scores.get(b), dists.get(b)
            extra = ""
            if z is not None:
                extra += f'<br><small title="key score before the softmax">z {z:+.2f}</small>'
            if d is not None:
                near = " &#9679;" if rt.get("nearest_task") == b else ""
                extra += (
                    f'<br><small title="distance of the input to this task\'s centre">'
                    f"d {d:.2f}{near}</small>"
                )
            own = rt.get("task") == b
            border = ";outline:2px solid #d95f02" if own else ""
            cells.append(f'<td style="background:{bg};color:{fg}{border}">{w:.3f}{extra}</td>')
        ent = "" if rt["entropy"] is None else f"{rt['entropy']:.3f}"
        top = rt["top"][0]["block"] if rt["top"] else ""
        mark = {True: "&#10003;", False: "&#10007;", None: ""}[rt.get("own_block")]
        style = ' style="color:#b00"' if rt.get("own_block") is False or rt.get("weak") else ""
        note = rt.get("note", "")
        if rt.get("nearest_task"):
            near = rt["nearest_task"]
            note += f"; nearest task centre: {near}" + (
                "" if near == top else f" (not the top block {top})"
            )
        body.append(
            f'<tr><td class="input"><b>{html.escape(str(r["id"]))}</b> '
            f"{html.escape(r['input'])}</td>"
            + f"<td>{html.escape(rt.get('task') or '')}</td>"
            + "".join(cells)
            + f"<td>{html.escape(top)} {mark}</td><td>{ent}</td>"
            + f'<td class="text"{style}>{html.escape(note)}</td>'
            + (
                f'<td class="text">{html.escape(str(r.get("prediction", "")))}</td>'
                if predicted
                else ""
            )
            + "</tr>"
        )
    source = next((r["routing"]["centre_source"] for r in rows if with_dist), "")
    dist_text = (
        f" Below the score, d: the input's distance (max-pooled prompt embedding, the "
        f"router's input) to each task's centre, {html.escape(source)}; &#9679; marks the "
        f"nearest: an input far from its chosen block's centre was routed by the key, not by "
        f"looking like that task's training prompts."
        if with_dist
        else ""
    )
    pred_text = (
        ""
        if predicted
        else " No prediction column: this report shows routing only (sapt-route); "
        "sapt-predict --report adds each input's prediction."
    )
    doc = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; font-size: 13px; margin: 1.5em; }}
table {{ border-collapse: collapse; }}
td, th {{ border: 1px solid #ccc; padding: 3px 6px; text-align: right; vertical-align: top; }}
td.input, td.text {{ text-align: left; max-width: 36em; white-space: pre-wrap;
  overflow-wrap: anywhere; }}
</style></head><body>
<h2>{html.escape(title)}</h2>
<p><b>{html.escape(verdict["text"])}</b></p>
<p>{len(rows)} input(s) x {len(blocks)} block(s). Cell: the weight the shared attention
gives the block for the input (no task id is used), and below it the block's key score z
before the softmax.{dist_text} An orange outline marks the block of the input's own task,
where the task is known; the top block column says whether it is that block. Entropy in
nats (at most ln of the enabled blocks); a row is weak when it is {WEAK_ENTROPY:.0%} of
that or more.{pred_text}</p>
<table><tr><th>input</th><th>task</th>{head}<th>top block</th><th>entropy</th><th>verdict</th>{"<th>prediction</th>" if predicted else ""}</tr>
{chr(10).join(body)}
</table></body></html>
"""
    atomic_write_text(path, doc)
    return path


# ---------------------------------------------------------------------------- re-evaluation
def reevaluate(loaded: LoadedRun) -> dict[str, Any]:
    """Score every task the blocks have seen on its test split with the current mask.

    Writes ``metrics/accuracy_matrix_reevaluated.{json,md}`` (the training matrix, the
    new row, their difference; the training run's own files are left alone) and the
    predictions to ``predictions/reevaluated/``. Compare ``row`` with
    ``training_row`` to see what the mask did.
    """
    cfg, run_dir = loaded.cfg, loaded.run_dir
    if not METHODS[cfg.method].per_task_slots:
        per_task = sorted(m for m, spec in METHODS.items() if spec.per_task_slots)
        raise ConfigError(
            f"re-evaluation with a block mask needs a run with one block per task "
            f"(method {', '.join(per_task)}); {run_dir} is a {cfg.method} run"
        )
    progress_path = run_dir / "state" / "blocks" / "progress.json"
    if not progress_path.is_file():
        raise CheckpointMismatchError(f"{run_dir}: no {progress_path} (the training matrix)")
    progress = read_progress(progress_path)
    tasks: list[str] = progress["tasks"]
    if not progress["matrix"]:
        raise CheckpointMismatchError(f"{progress_path}: no row of the accuracy matrix yet")
    training_row = progress["matrix"][-1]
    seen = loaded.blocks
    if seen != tasks[: len(seen)]:
        raise CheckpointMismatchError(
            f"{loaded.blocks_dir}: blocks {seen} are not the first tasks of the run {tasks}"
        )
    root = resolve_data_root(cfg.data.root)
    data = [load_task(root, t, cfg.data, cfg.train.seed) for t in seen]
    row: list[float | None] = [None] * len(tasks)
    from sapt_dist.outputs.evaluation import EvalTask, evaluate_tasks
    from sapt_dist.outputs.metrics import matrix_markdown

    main = distributed.is_main_process()
    splits = []
    for j, task in enumerate(data):
        records = _records(task, "test")
        refs = [r.references or [] for r in records]
        ids = [r.id for r in records]
        splits.append(
            EvalTask(j, task.name, task.metric, encode_inputs(loaded, records), refs, ids)
        )
    scores = evaluate_tasks(
        loaded.model,
        loaded.tokenizer,
        splits,
        batch_size=cfg.eval.batch_size,
        max_new_tokens=cfg.eval.max_new_tokens,
        scoring=cfg.eval.scoring,
        predictions_dir=run_dir / "predictions" / "reevaluated",
        with_weights=True,
        n_weights=len(seen),
        desc="re-evaluate",
    )
    for s in scores:
        j = s.task.index
        row[j] = s.score
        was = training_row[j]
        log.info(
            "re-evaluated %s: %s %.2f (training run: %s)",
            s.task.name,
            s.task.metric,
            row[j],
            "-" if was is None else f"{was:.2f}",
        )
    diff = [
        None if a is None or b is None else b - a for a, b in zip(training_row, row, strict=True)
    ]
    off = [seen[j] for j in loaded.disabled]
    result = {
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "blocks": str(loaded.blocks_dir),
        "disabled": off,
        "tasks": tasks,
        "training_matrix": progress["matrix"],
        "training_row": training_row,
        "row": row,
        "difference": diff,
    }
    label = "now (disabled: " + (", ".join(off) or "none") + ")"
    table = matrix_markdown(
        [*progress["matrix"], row, diff],
        tasks,
        row_labels=[*(f"after {t}" for t in tasks[: len(progress["matrix"])]), label, "difference"],
    )
    result["report"] = f"# re-evaluation of {run_dir}\n\n{table}\n"
    if main:
        mdir = run_dir / "metrics"
        atomic_write_json(mdir / "accuracy_matrix_reevaluated.json", result)
        atomic_write_text(mdir / "accuracy_matrix_reevaluated.md", result["report"])
    return result
