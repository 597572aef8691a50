"""``sapt-predict``, ``sapt-route`` and ``sapt-blocks``: using a run folder's blocks.

::

    sapt-predict RUN --input questions.jsonl --output preds.jsonl [--report routing.html]
    sapt-predict RUN --text "I loved it" --definition "Classify the sentiment ..."
    sapt-predict RUN --task task363_sst2_polarity_classification --split test
    sapt-route   RUN --input questions.jsonl --report routing.png   (routing only)
    sapt-blocks list RUN                      blocks, state, provenance in a table
    sapt-blocks provenance RUN [BLOCK]        the full record of one block (or all), JSON
    sapt-blocks disable RUN BLOCK --reason "hurts task X"
    sapt-blocks enable  RUN BLOCK --reason "fixed upstream"
    sapt-blocks history RUN                   every mask edit with time and reason
    sapt-blocks reevaluate RUN                every seen task's test split, current mask

``RUN`` is a ``sapt-train`` output folder; ``--model-path`` points at the backbone on this
machine and ``--set key=value`` overrides any key of the run's config.yaml. Bad input
exits with status 2 and a message naming the file, line or key, before a model loads.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

__all__ = ["blocks_main", "predict_main", "route_main"]


def _errors() -> tuple[type[Exception], ...]:
    from sapt_dist.checkpoint.atomic import UnreadableFileError
    from sapt_dist.checkpoint.blocks import BlockStateError, CheckpointMismatchError
    from sapt_dist.config import ConfigError
    from sapt_dist.data.tasks import TaskDataError
    from sapt_dist.outputs.inference import InputError

    return (
        ConfigError,
        TaskDataError,
        InputError,
        CheckpointMismatchError,
        BlockStateError,
        UnreadableFileError,
    )


def _run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="a sapt-train run folder (finished or partly finished)")
    p.add_argument("--model-path", help="the backbone folder on this machine (model.path)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a key of the run's config.yaml, e.g. eval.batch_size=4",
    )


def _input_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--text", action="append", default=[], help="an input (repeatable)")
    p.add_argument(
        "--input",
        help="inputs file: .jsonl ({'input', 'definition'?, 'id'?} per line), .json (a "
        "SuperNI split file) or plain text (one input per line)",
    )
    p.add_argument("--task", help="a task of the run's data (its split's inputs)")
    p.add_argument("--split", default="test", choices=["train", "dev", "test"])
    p.add_argument(
        "--definition", help="the instruction for inputs that carry none (--text, text files)"
    )
    p.add_argument("--output", default="-", help="JSONL output file (default: stdout)")
    p.add_argument("--batch-size", type=int, help="default: the run's eval.batch_size")
    p.add_argument("--top-k", type=int, default=3, help="top blocks listed per input")
    p.add_argument("--report", help="a one-page heatmap of inputs x blocks: .html or .png")


def _setup(prog: str) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from sapt_dist.cli.train import setup_logging

    setup_logging()


def _serve(args: argparse.Namespace, prog: str, generate: bool) -> int:
    from sapt_dist import distributed
    from sapt_dist.methods import METHODS
    from sapt_dist.outputs.inference import (
        InputError,
        load_run,
        load_run_config,
        predict,
        read_inputs,
        routing_report,
        routing_verdict,
        task_inputs,
        write_jsonl,
    )

    try:
        if args.report and Path(args.report).suffix not in (".html", ".htm", ".png"):
            raise InputError(f"--report {args.report}: the report is .html or .png")
        for opt in ("batch_size", "top_k", "max_new_tokens"):
            v = getattr(args, opt, None)
            if v is not None and v < 1:
                raise InputError(f"--{opt.replace('_', '-')} must be >= 1 (got {v})")
        if args.output != "-" and Path(args.output).is_dir():
            raise InputError(f"--output {args.output} is a folder; give a .jsonl file path")
        # config and every input are checked before the model loads
        cfg = load_run_config(args.run, args.model_path, args.overrides)
        records = []
        if args.text or args.input:
            records += read_inputs(args.text, args.input, args.definition)
        if args.task:
            records += task_inputs(cfg, args.task, args.split)
        if not records:
            raise InputError("no inputs: give --text, --input FILE or --task NAME")
        loaded = load_run(args.run, cfg=cfg)
        rows = predict(
            loaded,
            records,
            batch_size=args.batch_size,
            max_new_tokens=getattr(args, "max_new_tokens", None),
            top_k=args.top_k,
            generate=generate,
        )
    except _errors() as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
    if distributed.is_main_process():
        write_jsonl(rows, args.output)
        if METHODS[loaded.cfg.method].trains_router:
            print(f"{prog}: {routing_verdict(rows)['text']}", file=sys.stderr)
        if args.report:
            routing_report(
                args.report, rows, loaded.blocks, title=f"routing of {len(rows)} input(s)"
            )
            print(f"{prog}: report written to {args.report}", file=sys.stderr)
        if args.output != "-":
            print(f"{prog}: {len(rows)} row(s) written to {args.output}", file=sys.stderr)
    distributed.leave_together()  # rank 1 must not exit while rank 0 still writes
    return 0


def predict_main(argv: list[str] | None = None) -> int:
    """``sapt-predict``: predictions + routing explanations, no task id."""
    p = argparse.ArgumentParser(
        prog="sapt-predict",
        description="Predict with a run's blocks; the shared attention picks them per input.",
    )
    _run_args(p)
    _input_args(p)
    p.add_argument("--max-new-tokens", type=int, help="default: the run's eval.max_new_tokens")
    args = p.parse_args(argv)
    _setup(p.prog)
    return _serve(args, p.prog, generate=True)


def route_main(argv: list[str] | None = None) -> int:
    """``sapt-route``: the routing explanation only (no generation)."""
    p = argparse.ArgumentParser(
        prog="sapt-route",
        description="Which blocks a run's shared attention picks for each input, and how strongly.",
    )
    _run_args(p)
    _input_args(p)
    args = p.parse_args(argv)
    _setup(p.prog)
    return _serve(args, p.prog, generate=False)


# ---------------------------------------------------------------------------- sapt-blocks
def _fmt_score(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def blocks_table(manifest: dict) -> str:
    """One row per block: slot, name, state, when trained, data, scores at the time."""
    disabled = set(manifest.get("disabled", []))
    prov = {p.get("slot"): p for p in manifest.get("provenance") or []}
    head = "| slot | block | state | trained at | train examples | train data sha256 | own score then | mean score then |"
    lines = [head, "|---" * 8 + "|"]
    for j, name in enumerate(manifest["tasks"]):
        p = prov.get(j, {})
        data = p.get("data") or []
        n_train = sum(d["split_sizes"]["train"] for d in data) if data else None
        sha = ",".join(d["train_sha256"][:12] for d in data) if data else "-"
        scores = p.get("scores_after") or {}
        own = scores.get(name)
        seen = [v for v in scores.values() if v is not None]
        mean = sum(seen) / len(seen) if seen else None
        lines.append(
            f"| {j} | {name} | {'DISABLED' if j in disabled else 'enabled'} | "
            f"{p.get('trained_at', '-')} | {'-' if n_train is None else n_train} | {sha} | "
            f"{_fmt_score(own)} | {_fmt_score(mean)} |"
        )
    return "\n".join(lines)


def _mask_folder(run: Path) -> Path:
    from sapt_dist.checkpoint.blocks import BlockStateError

    if not (run / "state" / "finished.json").is_file():
        raise BlockStateError(
            f"{run}: the run is not finished; a block mask applies to a finished run's "
            f"blocks/ (training would resume and rewrite them)"
        )
    return run / "blocks"


def blocks_main(argv: list[str] | None = None) -> int:
    """``sapt-blocks``: list, explain, disable / enable blocks, re-evaluate."""
    p = argparse.ArgumentParser(
        prog="sapt-blocks", description="A run's task blocks: state, provenance, mask."
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    for name, help_ in [
        ("list", "blocks with state and provenance, as a table"),
        ("history", "every mask edit (time, action, block, reason)"),
    ]:
        sp = sub.add_parser(name, help=help_)
        sp.add_argument("run")
    sp = sub.add_parser("provenance", help="the full provenance record(s) as JSON")
    sp.add_argument("run")
    sp.add_argument("block", nargs="?", help="block name or slot (default: all)")
    for name, help_ in [("disable", "switch a block off"), ("enable", "switch it back on")]:
        sp = sub.add_parser(name, help=help_)
        sp.add_argument("run")
        sp.add_argument("block", help="block (task) name or slot number")
        sp.add_argument("--reason", required=True, help="why (recorded in the manifest)")
    sp = sub.add_parser("reevaluate", help="score every seen task with the current mask")
    _run_args(sp)
    args = p.parse_args(argv)
    _setup(p.prog)

    from sapt_dist.checkpoint.blocks import read_manifest, resolve_block, set_block_enabled
    from sapt_dist.outputs.inference import find_blocks

    run = Path(args.run)
    try:
        if args.cmd in ("disable", "enable"):
            folder = _mask_folder(run)
            m = set_block_enabled(folder, args.block, args.cmd == "enable", args.reason)
            h = m["history"][-1]
            print(f"{h['action']}d block {h['slot']} ({h['task']}) at {h['time']}: {h['reason']}")
            print(blocks_table(m))
            return 0
        if args.cmd == "reevaluate":
            from sapt_dist import distributed
            from sapt_dist.outputs.inference import load_run, reevaluate

            res = reevaluate(load_run(run, args.model_path, args.overrides))
            if distributed.is_main_process():
                print(res["report"])
                print(f"written: {run / 'metrics' / 'accuracy_matrix_reevaluated.md'}")
            distributed.leave_together()
            return 0
        folder, finished = find_blocks(run)
        m = read_manifest(folder)
        if args.cmd == "list":
            state = "finished" if finished else "not finished"
            print(f"{folder} ({state} run, {len(m['tasks'])} block(s))\n")
            print(blocks_table(m))
        elif args.cmd == "history":
            if not m.get("history"):
                print("no mask edits")
            for h in m.get("history", []):
                print(f"{h['time']}  {h['action']:7s}  {h['slot']:2d} {h['task']}  {h['reason']}")
        else:  # provenance
            prov = m.get("provenance") or []
            if args.block is not None:
                slot = resolve_block(m, args.block, f"{folder}: ")
                prov = [p for p in prov if p.get("slot") == slot]
                if not prov:
                    print(f"{p.prog}: block {slot} has no provenance record", file=sys.stderr)
                    return 2
            print(json.dumps(prov, indent=2))
    except _errors() as e:
        print(f"{p.prog}: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    tool = {"predict": predict_main, "route": route_main, "blocks": blocks_main}
    if len(sys.argv) < 2 or sys.argv[1] not in tool:
        print("usage: python -m sapt_dist.cli.tools {predict,route,blocks} ...", file=sys.stderr)
        sys.exit(2)
    sys.exit(tool[sys.argv[1]](sys.argv[2:]))
