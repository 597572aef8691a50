"""SAPT against its baselines on a real pretrained model (SmolLM2-135M-Instruct), seeds x
methods, one table.

Every run is an ordinary ``sapt-train`` of a preset (``--preset``: ``smollm2_superni``, the
3-task SuperNI benchmark, or ``smollm2_long5``, the 5-task Long Sequence one), started here
as a subprocess (``--jobs`` at a time, the cores shared out between them), into
``<out>/<method>_s<seed>`` (``--out``: ``runs/real`` for ``smollm2_superni``, else
``runs/real_<preset>``); a finished run is read, not retrained, and a killed one resumes, so
a benchmark spreads over sittings. Each finished run is also kept as a small record,
``bench/results/<preset>/<method>_s<seed>.json`` (``--records``; committed: run folders stay
on the machine that ran them), and the table takes a run from its record when its folder
is not here; a run with a record is not retrained. Methods: ``sapt`` (the preset: centered router input),
``sapt_paper`` (the paper's router input, ``adapter.router_center=none``), ``sapt_onehot``
(SAPT whose training mixture is one-hot on the new block, ``adapter.learning_mixture=
new_block``: no reuse of earlier blocks while learning), ``seq_lora``, ``inc_lora``,
``olora``, ``inflora``, ``gainlora``, ``replay``, ``mtl``, ``single_task`` (gives ``b_j`` for
FWT), ``sapt_prompt`` (SAPT with prompt-tuning blocks, ``adapter.kind=prompt``, lr 3e-2; no
FWT: its reference would be LoRA blocks). The zero-shot row is the backbone without blocks
on the same prompts (``<out>/zero_shot.json``).

Seeds: ``--seeds`` for every method; without it 42 and 1 for SAPT and the LoRA-family
baselines, 42 for MTL and single-task (FWT of a seed without its own single-task run uses
the first seed's).

Printed (markdown, also written to ``<out>/table.md``): per method the mean and every
seed's AP, F.Ra, FWT, BWT, FWT and BWT in the released scorer's convention
(``outputs.metrics.released_metrics``: BWT over N, FWT = mean diagonal - 50.94), routing
accuracy, the mean weight on the own block, the mean off-diagonal mass of the attention
targets a* SAPT files per task (``1 - a_j*[j]`` over tasks 2..N: how much a task's own
inputs weighed earlier blocks when it was learned), the zero-shot row, one accuracy
matrix per method (first seed), and the targets of issue 10 checked per seed: routing
accuracy >= 90%, F.Ra(SAPT) <= 0.5 x F.Ra(SeqLoRA), AP(SAPT) within 5 points of MTL.

    python bench/bench_real_model.py --jobs 2                         # smollm2_superni
    python bench/bench_real_model.py --preset smollm2_long5 --jobs 1  # the 5-task benchmark
    python bench/bench_real_model.py --methods sapt sapt_paper --seeds 42 --jobs 2
    python bench/bench_real_model.py --preset smollm2_long5 --collect-only   # just the table
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sapt_dist.methods import METHODS as TABLE  # noqa: E402

#: the methods run by default (``--methods``)
DEFAULT_METHODS = [
    "sapt",
    "sapt_onehot",
    "seq_lora",
    "inc_lora",
    "olora",
    "inflora",
    "gainlora",
    "mtl",
    "single_task",
]
#: default seeds: two for SAPT and the LoRA-family baselines, one for the references
SEEDS = [42, 1]
ONE_SEED = {"mtl", "single_task"}
#: settings of the methods that are SAPT with something changed
VARIANTS = {
    "sapt_paper": ["method=sapt", "adapter.router_center=none"],
    "sapt_onehot": ["method=sapt", "adapter.learning_mixture=new_block"],
    "sapt_prompt": [
        "method=sapt",
        "adapter.kind=prompt",
        "train.lr=3.0e-2",
        "replay.gen_lr=3.0e-2",
    ],
}
#: every method of the table (``sapt_dist.methods``) and the SAPT variants above
METHODS = [*TABLE, *VARIANTS]
PRESET = "smollm2_superni"
#: the committed records of finished runs, ``<preset>/<method>_s<seed>.json``
RECORDS = ROOT / "bench" / "results"


def default_out(preset: str) -> Path:
    """Where a preset's runs go: ``runs/real`` (``smollm2_superni``, as before), else
    ``runs/real_<preset>``."""
    return ROOT / "runs" / ("real" if preset == PRESET else f"real_{preset}")


def method_seeds(method: str, seeds: list[int] | None) -> list[int]:
    """The seeds ``method`` runs with: ``seeds`` when given, else the defaults."""
    if seeds is not None:
        return list(seeds)
    return SEEDS[:1] if method in ONE_SEED else list(SEEDS)


def single_dir(out: Path, seed: int, single_seeds: list[int]) -> Path:
    """The single-task run giving FWT to a run of ``seed``: its own seed's when that seed
    is run (or finished), else the first single-task seed's."""
    own = run_dir(out, "single_task", seed)
    if seed in single_seeds or finished(own):
        return own
    return run_dir(out, "single_task", single_seeds[0])


def run_dir(out: Path, method: str, seed: int) -> Path:
    return out / f"{method}_s{seed}"


def command(
    out: Path,
    method: str,
    seed: int,
    extra: list[str],
    preset: str = PRESET,
    single_seeds: list[int] | None = None,
) -> list[str]:
    folder = run_dir(out, method, seed)
    args = [
        sys.executable,
        "-m",
        "sapt_dist.cli.train",
        "--preset",
        preset,
        f"output_dir={folder}",
        f"train.seed={seed}",
    ]
    args += VARIANTS.get(method, [f"method={method}"])
    if method not in ("single_task", "mtl", "sapt_prompt"):
        args.append(f"single_task_run={single_dir(out, seed, single_seeds or [seed])}")
    return args + extra


def finished(folder: Path) -> bool:
    return (folder / "metrics" / "results.json").is_file() and (
        folder / "state" / "finished.json"
    ).is_file()


def run_all(
    out: Path,
    jobs: list[tuple[str, int]],
    lanes: int,
    extra: list[str],
    preset: str = PRESET,
    single_seeds: list[int] | None = None,
) -> None:
    """Run the unfinished (method, seed) pairs, ``lanes`` at a time (single-task runs
    first: the others' FWT reads them)."""
    todo = [(m, s) for m, s in jobs if not finished(run_dir(out, m, s))]
    todo.sort(key=lambda ms: ms[0] != "single_task")
    threads = max(1, (os.cpu_count() or 2) // max(1, lanes))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    env.setdefault("DS_ACCELERATOR", "cpu")
    running: list[tuple[subprocess.Popen, str, float]] = []
    out.mkdir(parents=True, exist_ok=True)
    while todo or running:
        while todo and len(running) < lanes:
            m, s = todo.pop(0)
            cmd = command(out, m, s, extra, preset, single_seeds)
            log = open(out / f"{m}_s{s}.log", "ab")  # noqa: SIM115 - closed with the process
            print(f"[bench] start {m} seed {s}: {' '.join(cmd[2:])}", flush=True)
            running.append(
                (subprocess.Popen(cmd, stdout=log, stderr=log, env=env), f"{m}_s{s}", time.time())
            )
        time.sleep(5)
        for item in list(running):
            proc, name, t0 = item
            if proc.poll() is not None:
                running.remove(item)
                state = "done" if proc.returncode == 0 else f"FAILED (exit {proc.returncode})"
                print(f"[bench] {name} {state} in {time.time() - t0:.0f} s", flush=True)


def zero_shot(out: Path, extra: list[str], preset: str = PRESET) -> dict[str, float]:
    """The backbone without blocks on every task's test prompts (cached in zero_shot.json)."""
    path = out / "zero_shot.json"
    if path.is_file():
        return json.loads(path.read_text())
    import torch

    from sapt_dist.backbone.load import load_backbone
    from sapt_dist.cli.train import preset_path
    from sapt_dist.config import load_config
    from sapt_dist.data.tasks import (
        encode_prompt,
        format_prompt,
        load_task,
        resolve_data_root,
        resolve_order,
    )
    from sapt_dist.method.generation import generate_texts
    from sapt_dist.method.model import SAPTModel
    from sapt_dist.outputs.metrics import score_predictions

    cfg = load_config(preset_path(preset), extra)
    backbone, tok = load_backbone(cfg.model)
    model = SAPTModel(backbone, cfg.adapter, n_slots=1)  # one zero block: the plain model
    root = resolve_data_root(cfg.data.root)
    names, _ = resolve_order(cfg.data, root)
    scores = {}
    with torch.no_grad():
        for name in names:
            task = load_task(root, name, cfg.data, cfg.train.seed)
            test = task.splits["test"]
            prompts = [
                encode_prompt(
                    tok,
                    format_prompt(cfg.data.template, task.definition, x),
                    cfg.data.max_source_length,
                )
                for x in test["input"]
            ]
            preds = generate_texts(
                model, tok, prompts, cfg.eval.batch_size, cfg.eval.max_new_tokens, desc=name
            )
            scores[name] = score_predictions(preds, list(test["outputs"]), task.metric)
    path.write_text(json.dumps(scores, indent=1))
    return scores


def off_diagonal_mass(targets: list[list[float]] | None, n: int) -> float | None:
    """Mean over tasks 2..N of ``1 - a_j*[j]``: the weight a task's own dev inputs put on
    earlier blocks when it was learned (the attention targets SAPT files, ``targets`` in
    the run's ``blocks/router.safetensors``); None without them."""
    if targets is None or n < 2:
        return None
    return sum(1.0 - float(targets[j][j]) for j in range(1, n)) / (n - 1)


def record_of(folder: Path) -> dict:
    """What the table needs of a finished run folder, small enough to commit: the matrix,
    the single-task scores, the attention targets, the routing diagnostics, the
    pseudo-samples' well-formed counts and where the time went."""
    res = json.loads((folder / "metrics" / "results.json").read_text())
    rec: dict = {
        "source": "run folder",
        "method": res["method"],
        "tasks": res["tasks"],
        "matrix": res["matrix"],
        "AP": res.get("metrics", {}).get("AP"),
        "single_task_scores": res.get("single_task_scores"),
        "targets": None,
        "routing": None,
        "well_formed": None,
        "timing": None,
    }
    router = folder / "blocks" / "router.safetensors"
    if router.is_file():
        from safetensors.torch import load_file

        targets = load_file(str(router)).get("targets")
        if targets is not None:
            rec["targets"] = [[round(float(v), 6) for v in row] for row in targets]
    routing = folder / "metrics" / "routing.json"
    if routing.is_file():
        r = json.loads(routing.read_text())
        keep = ("overall_routing_accuracy", "routing_accuracy", "mean_weights", "tasks")
        rec["routing"] = {k: r[k] for k in keep if k in r}
    pseudo = sorted((folder / "pseudo").glob("*.jsonl"))
    if pseudo:
        counts = []
        for p in pseudo:
            rows = [json.loads(x) for x in p.read_text().splitlines() if x.strip()]
            counts.append(f"{sum(bool(x.get('well_formed')) for x in rows)}/{len(rows)}")
        rec["well_formed"] = " ".join(counts)
    timing = folder / "metrics" / "timing.json"
    if timing.is_file():
        rec["timing"] = json.loads(timing.read_text())
    return rec


def record_text(rec: dict) -> str:
    """A record as JSON, each list of numbers on one line (a matrix row, a* row)."""
    text = json.dumps(rec, indent=1)
    flat = re.sub(
        r"\[\s*([^\[\]{}\"]*?)\s*\]", lambda m: "[" + " ".join(m.group(1).split()) + "]", text
    )
    return flat + "\n"


def record_path(records: Path, preset: str, method: str, seed: int) -> Path:
    return records / preset / f"{method}_s{seed}.json"


def load_record(out: Path, records: Path, preset: str, method: str, seed: int) -> dict | None:
    """A run's record: from its finished folder (then also written to ``records``, which
    is committed: run folders stay on the machine that ran them), else the committed
    record, else None."""
    folder = run_dir(out, method, seed)
    path = record_path(records, preset, method, seed)
    if finished(folder):
        rec = record_of(folder)
        text = record_text(rec)
        if not path.is_file() or path.read_text() != text:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(text)
            tmp.replace(path)
        return rec
    if path.is_file():
        return json.loads(path.read_text())
    return None


def row_of(rec: dict, single: list[float] | None) -> dict:
    """A table row (metrics in both conventions, routing, a*) from a run's record."""
    from sapt_dist.outputs.metrics import cl_metrics, released_metrics

    matrix = rec["matrix"]
    row: dict = {"matrix": matrix, "tasks": rec["tasks"], "source": rec.get("source")}
    if rec["method"] in TABLE and TABLE[rec["method"]].evaluates != "seen":  # mtl, single_task
        row["AP"] = rec["AP"]
        return row
    row.update(cl_metrics(matrix, single))
    row.update(released_metrics(matrix))  # computed here: runs written before it lack it
    trains_router = rec["method"] in TABLE and TABLE[rec["method"]].trains_router
    if trains_router:  # SAPT's attention: its targets a* and routing diagnostics
        row["a_off"] = off_diagonal_mass(rec.get("targets"), len(rec["tasks"]))
        if rec.get("a_off") is not None:  # a transcribed record: the mass as written then
            row["a_off"] = rec["a_off"]
    r = rec.get("routing")
    if trains_router and r:
        if "overall_routing_accuracy" in r:
            row["routing"] = 100 * r["overall_routing_accuracy"]
        if "mean_weights" in r:
            own = [r["mean_weights"][k][j] for k, j in enumerate(r["tasks"])]
            row["own_weight"] = sum(own) / len(own)
        elif "own_weight" in r:
            row["own_weight"] = r["own_weight"]
    if rec.get("well_formed"):
        row["well_formed"] = rec["well_formed"]
    return row


def _fmt(vals: list[float | None], digits: int = 1) -> str:
    vals = [v for v in vals if v is not None]
    if not vals:
        return "-"
    mean = statistics.fmean(vals)
    each = ", ".join(f"{v:.{digits}f}" for v in vals)
    return f"{mean:.{digits}f}" + (f" ({each})" if len(vals) > 1 else "")


def table(
    out: Path,
    methods: list[str],
    seeds: list[int] | None,
    zs: dict[str, float] | None,
    preset: str = PRESET,
    records: Path | None = None,
) -> str:
    """The markdown table of ``methods`` x seeds, from finished run folders under ``out``
    or, for a run not there, its committed record under ``records`` (``bench/results``)."""
    records = RECORDS if records is None else records
    runs: dict[str, dict[int, dict]] = {}
    single_seeds = method_seeds("single_task", seeds)
    read: dict[tuple[str, int], dict | None] = {}  # each run read once (folder or record)

    def get(m: str, s: int) -> dict | None:
        if (m, s) not in read:
            read[m, s] = load_record(out, records, preset, m, s)
        return read[m, s]

    for m in methods:
        for s in method_seeds(m, seeds):
            sref = get("single_task", s) or get("single_task", single_seeds[0])
            single = list(sref["single_task_scores"].values()) if sref else None
            rec = get(m, s)
            if rec is not None:
                runs.setdefault(m, {})[s] = row_of(rec, single)
    all_seeds = sorted({s for m in methods for s in method_seeds(m, seeds)}, key=str)
    lines = [
        f"SmolLM2-135M-Instruct, preset `{preset}`, seeds {seeds or 'default'}; mean (per "
        "seed). CPU. `*_rel`: the released scorer's convention (BWT over N, FWT = mean "
        "diagonal - 50.94); a* off-diag: mean over tasks 2..N of 1 - a_j*[j].",
        "",
        "| method | seeds done | AP | F.Ra | FWT | BWT | FWT_rel | BWT_rel | routing acc % "
        "| own-block weight | a* off-diag | pseudo well-formed |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in methods:
        rs = runs.get(m, {})
        want = method_seeds(m, seeds)
        got = [rs[s] for s in want if s in rs]
        lines.append(
            f"| {m} | {len(got)}/{len(want)} | {_fmt([r.get('AP') for r in got])} | "
            f"{_fmt([r.get('F.Ra') for r in got])} | {_fmt([r.get('FWT') for r in got])} | "
            f"{_fmt([r.get('BWT') for r in got])} | "
            f"{_fmt([r.get('FWT_released') for r in got])} | "
            f"{_fmt([r.get('BWT_released') for r in got])} | "
            f"{_fmt([r.get('routing') for r in got])} | "
            f"{_fmt([r.get('own_weight') for r in got], 2)} | "
            f"{_fmt([r.get('a_off') for r in got], 2)} | "
            f"{'; '.join(r.get('well_formed', '') for r in got if r.get('well_formed')) or '-'} |"
        )
    transcribed = [
        f"{m} seed {s}"
        for m in methods
        for s, r in sorted(runs.get(m, {}).items())
        if r.get("source") not in (None, "run folder")
    ]
    if transcribed:
        lines += [
            "",
            "Transcribed records (their run folders were lost; the numbers as written "
            "when they ran, see the record's `source`): " + ", ".join(transcribed),
        ]
    any_run = next((r for rs in runs.values() for r in rs.values()), None)
    if zs and any_run:
        vals = [zs.get(t) for t in any_run["tasks"]]
        lines += [
            "",
            "Zero-shot (the backbone, no block): "
            + ", ".join(f"{t} {v:.1f}" for t, v in zip(any_run["tasks"], vals, strict=True))
            + f"; mean {statistics.fmean(vals):.1f}",
        ]
    for m in methods:
        rs = runs.get(m, {})
        if not rs:
            continue
        s = min(rs)
        r = rs[s]
        if not r["matrix"]:  # a transcribed record with the mean only
            lines += ["", f"`{m}` seed {s}: per-task scores not recorded"]
            continue
        lines += ["", f"`{m}` seed {s}, accuracy matrix (row: after task i; column: task j):", ""]
        short = [t.split("_")[1] if "_" in t else t for t in r["tasks"]]
        lines.append("| after \\ on | " + " | ".join(short) + " |")
        lines.append("|---" * (len(short) + 1) + "|")
        for i, row in enumerate(r["matrix"]):
            cells = ["" if v is None else f"{v:.1f}" for v in row]
            label = "all (mtl)" if m == "mtl" else short[i]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    # the targets of issue 10, per seed
    checks = []
    for s in all_seeds:
        sapt, seq, mtl = (runs.get(k, {}).get(s) for k in ("sapt", "seq_lora", "mtl"))
        if sapt is None:
            continue
        part = [f"seed {s}:"]
        if sapt.get("routing") is not None:
            ok = sapt["routing"] >= 90
            part.append(
                f"routing {sapt['routing']:.1f}% {'>=' if ok else '<'} 90% {'ok' if ok else 'MISSED'}"
            )
        if seq is not None:
            ok = sapt["F.Ra"] <= 0.5 * seq["F.Ra"]
            part.append(
                f"F.Ra {sapt['F.Ra']:.2f} vs 0.5 x SeqLoRA {0.5 * seq['F.Ra']:.2f} {'ok' if ok else 'MISSED'}"
            )
        if mtl is not None:
            ok = sapt["AP"] >= mtl["AP"] - 5
            part.append(
                f"AP {sapt['AP']:.1f} vs MTL {mtl['AP']:.1f} - 5 {'ok' if ok else 'MISSED'}"
            )
        checks.append(" ".join(part))
    if checks:
        lines += ["", "Targets (issue 10): " + "; ".join(checks)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--preset", default=PRESET, help="a shipped preset (smollm2_superni, smollm2_long5)"
    )
    ap.add_argument("--out", type=Path, default=None, help="default: runs/real[_<preset>]")
    ap.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=METHODS)
    ap.add_argument(
        "--seeds",
        nargs="+",
        type=int,
        default=None,
        help="seeds of every method (default: 42 1 for SAPT and the LoRA family, 42 for "
        "mtl and single_task)",
    )
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time (cores shared out)")
    ap.add_argument(
        "--runs",
        nargs="+",
        default=None,
        metavar="METHOD:SEED",
        help="run exactly these (in this order) instead of methods x seeds; the table still "
        "covers --methods x --seeds",
    )
    ap.add_argument("--collect-only", action="store_true", help="read finished runs only")
    ap.add_argument(
        "--records", type=Path, default=RECORDS, help="committed run records (bench/results)"
    )
    ap.add_argument("--no-zero-shot", action="store_true")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="preset overrides")
    args = ap.parse_args(argv)
    from sapt_dist.config import preset_path

    if not preset_path(args.preset).is_file():
        ap.error(f"--preset: no shipped preset {args.preset!r} (sapt_dist/presets/)")
    out = args.out or default_out(args.preset)
    methods = list(args.methods)
    if not args.collect_only:
        jobs = [(m, s) for m in methods for s in method_seeds(m, args.seeds)]
        if args.runs:
            jobs = [(r.split(":")[0], int(r.split(":")[1])) for r in args.runs]
            bad = [m for m, _ in jobs if m not in METHODS]
            if bad:
                ap.error(f"--runs: unknown method(s) {bad}; known: {METHODS}")
        single_seeds = method_seeds("single_task", args.seeds)
        kept = [
            (m, s)
            for m, s in jobs
            if not finished(run_dir(out, m, s))
            and record_path(args.records, args.preset, m, s).is_file()
        ]
        if kept:
            print(
                "[bench] kept from their records, not rerun: "
                + ", ".join(f"{m}:{s}" for m, s in kept)
                + f" ({args.records / args.preset}; delete a record to rerun it)",
                flush=True,
            )
        jobs = [j for j in jobs if j not in kept]
        run_all(out, jobs, args.jobs, args.set, args.preset, single_seeds)
    zs = None if args.no_zero_shot else zero_shot(out, args.set, args.preset)
    text = table(out, methods, args.seeds, zs, args.preset, args.records)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
