"""The demo's numbers, side by side in one run (CPU).

    python bench/bench_demo.py                 # both parts
    python bench/bench_demo.py --part cl       # SAPT vs SeqLoRA on the demo sequence
    python bench/bench_demo.py --part gen      # generation throughput, 15 slots vs plain HF

``cl``: runs the demo preset with ``method=sapt`` and ``method=seq_lora`` (fresh run
folders under ``--out``) and prints both F.Ra values, AP, and SAPT's routing accuracy
against chance. Targets: SAPT's F.Ra clearly below SeqLoRA's; routing accuracy well above
1 / number of tasks.

``seeds``: SAPT on the demo over ``--seeds`` with the paper's router input
(``adapter.router_center=none``) and the centered one (``tasks``), one table: routing
accuracy, F.Ra and AP per seed, and how many seeds route above 90%. A finished run folder
under ``--out/demo_seeds`` is read, not rerun.

``gen``: greedy generation of the same prompts (adapter: the paper's q_proj/v_proj, r 4
by default; ``--targets demo`` for the demo preset's seven projections at r 8) (the demo's test prompts, ``--new``
tokens each, EOS disabled so every run decodes the same number of tokens) by the plain HF
``generate`` of the demo backbone and by SAPT at 15 slots (15 random filed blocks, routing
from the prompt). Repetitions are interleaved and the median taken. Target: >= 0.9x.
"""

from __future__ import annotations

import argparse
import copy
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def part_cl(out: Path, overrides: list[str]) -> None:
    from sapt_dist.cli.train import preset_path, setup_logging
    from sapt_dist.config import load_config
    from sapt_dist.train.run import run

    res = {}
    for method in ("sapt", "seq_lora"):
        folder = out / f"demo_{method}"
        shutil.rmtree(folder, ignore_errors=True)
        cfg = load_config(
            preset_path("demo"), [f"method={method}", f"output_dir={folder}", *overrides]
        )
        setup_logging()
        t0 = time.time()
        res[method] = run(cfg)
        res[method]["seconds"] = time.time() - t0
    sapt, seq = res["sapt"], res["seq_lora"]
    n = len(sapt["tasks"])
    print("\n## demo: SAPT vs SeqLoRA (CPU)\n")
    print("| method | AP | F.Ra | BWT | routing accuracy | time |")
    print("|---|---|---|---|---|---|")
    for m in ("sapt", "seq_lora"):
        r = res[m]
        ra = f"{100 * r['routing_accuracy']:.1f}%" if "routing_accuracy" in r else "-"
        mt = r["metrics"]
        print(
            f"| {m} | {mt['AP']:.2f} | {mt['F.Ra']:.2f} | {mt['BWT']:.2f} | {ra} | {r['seconds']:.0f} s |"
        )
    print(f"\nchance routing accuracy: {100 / n:.1f}%")
    for m in ("sapt", "seq_lora"):
        print(f"\n### {m}\n\n{res[m]['report']}")
    ok_fra = sapt["metrics"]["F.Ra"] < seq["metrics"]["F.Ra"]
    ok_route = sapt["routing_accuracy"] > 1.5 / n
    print(
        f"RESULT fra_sapt={sapt['metrics']['F.Ra']:.2f} fra_seq_lora={seq['metrics']['F.Ra']:.2f} (target: sapt clearly below) {'PASS' if ok_fra else 'FAIL'}"
    )
    print(
        f"RESULT routing_accuracy={100 * sapt['routing_accuracy']:.1f}% chance={100 / n:.1f}% {'PASS' if ok_route else 'FAIL'}"
    )


def part_seeds(out: Path, seeds: list[int], overrides: list[str]) -> None:
    import json

    from sapt_dist.cli.train import preset_path, setup_logging
    from sapt_dist.config import load_config
    from sapt_dist.train.run import run

    setup_logging()
    rows: dict[tuple[str, int], dict] = {}
    for seed in seeds:
        for center in ("none", "tasks"):
            folder = out / "demo_seeds" / f"{center}_s{seed}"
            done = folder / "metrics" / "results.json"
            if not done.is_file():
                cfg = load_config(
                    preset_path("demo"),
                    [
                        f"output_dir={folder}",
                        f"train.seed={seed}",
                        f"adapter.router_center={center}",
                        "tracking.backend=none",
                        *overrides,
                    ],
                )
                t0 = time.time()
                run(cfg)
                print(f"[bench] {center} seed {seed}: {time.time() - t0:.0f} s", flush=True)
            rows[(center, seed)] = json.loads(done.read_text())
    print(f"\n## demo: SAPT's router input over seeds (CPU, {torch.get_num_threads()} threads)\n")
    print("| seed | routing, paper's input | F.Ra | AP | routing, centered | F.Ra | AP |")
    print("|---|---|---|---|---|---|---|")
    for seed in seeds:
        cells = []
        for center in ("none", "tasks"):
            r = rows[(center, seed)]
            m = r["metrics"]
            cells += [f"{100 * r['routing_accuracy']:.1f}%", f"{m['F.Ra']:.2f}", f"{m['AP']:.2f}"]
        print(f"| {seed} | " + " | ".join(cells) + " |")
    for center, label in (("none", "paper's input"), ("tasks", "centered")):
        good = sum(rows[(center, s)]["routing_accuracy"] >= 0.9 for s in seeds)
        print(f"RESULT {label}: routing >= 90% on {good} of {len(seeds)} seeds")


def part_gen(
    reps: int, new_tokens: int, batch: int, slots: int, targets: list[str], rank: int
) -> None:
    from sapt_dist.backbone.load import load_backbone
    from sapt_dist.config import AdapterConfig, ModelConfig, load_config
    from sapt_dist.data.tasks import (
        ORDERS,
        collate_prompts,
        encode_prompt,
        format_prompt,
        load_task,
        resolve_data_root,
    )
    from sapt_dist.method.model import SAPTModel

    cfg = load_config(ROOT / "sapt_dist/presets/demo.yaml")
    backbone, tok = load_backbone(ModelConfig(builder="demo"))
    plain = copy.deepcopy(backbone)
    model = SAPTModel(backbone, AdapterConfig(target_modules=targets, rank=rank), n_slots=slots)
    g = torch.Generator().manual_seed(0)
    for t in range(slots):  # filed random blocks, so all 15 are live in the mixture
        model.start_task(t)
        with torch.no_grad():
            for layer in model.layers.values():
                layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.01)
        model.file_current()
    model.eval()
    root = resolve_data_root("demo")
    prompts = []
    for name in ORDERS["demo"]:
        task = load_task(root, name, cfg.data, 0)
        prompts += [
            encode_prompt(tok, format_prompt(cfg.data.template, task.definition, ex["input"]), 256)
            for ex in task.splits["test"]
        ]
    batches = [
        collate_prompts(prompts[i : i + batch], tok.pad_token_id)
        for i in range(0, len(prompts), batch)
    ]
    kw = dict(
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=tok.pad_token_id,
    )

    def run_plain() -> float:
        t0 = time.perf_counter()
        with torch.no_grad():
            for b in batches:
                plain.generate(input_ids=b["input_ids"], attention_mask=b["attention_mask"], **kw)
        return time.perf_counter() - t0

    def run_sapt() -> float:
        t0 = time.perf_counter()
        for b in batches:
            model.generate(b["input_ids"], b["attention_mask"], **kw)
        return time.perf_counter() - t0

    run_plain(), run_sapt()  # warm-up
    tp, ts = [], []
    for _ in range(reps):
        tp.append(run_plain())
        ts.append(run_sapt())
    n_tok = len(prompts) * new_tokens
    p, s = statistics.median(tp), statistics.median(ts)
    ratio = p / s
    print(
        f"\n## generation throughput ({len(prompts)} prompts, batch {batch}, {new_tokens} new "
        f"tokens; targets {','.join(targets)}, r {rank}: {len(model.layers)} adapted layers, "
        f"mixture rank {slots * rank} on d={backbone.config.hidden_size}; CPU)\n"
    )
    print("| model | tokens/s | median s |")
    print("|---|---|---|")
    print(f"| plain HF generate | {n_tok / p:.0f} | {p:.2f} |")
    print(f"| SAPT, {slots} slots | {n_tok / s:.0f} | {s:.2f} |")
    print(
        f"RESULT generation_ratio={ratio:.2f}x (target >= 0.9x) {'PASS' if ratio >= 0.9 else 'FAIL'}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--part", choices=["cl", "gen", "seeds", "all"], default="all")
    ap.add_argument("--seeds", type=int, nargs="+", default=[42, 1, 2, 3, 7], help="(seeds)")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bench")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--new", type=int, default=24, help="new tokens per prompt (gen)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--slots", type=int, default=15)
    ap.add_argument(
        "--targets",
        default="q_proj,v_proj",
        help="adapted layers for gen (default: the paper's; 'demo' = the demo preset's)",
    )
    ap.add_argument("--rank", type=int, default=4, help="LoRA rank for gen (the paper's 4)")
    ap.add_argument("overrides", nargs="*", help="config overrides for the cl part")
    args = ap.parse_args()
    if args.part in ("gen", "all"):
        from sapt_dist.config import load_config

        demo = load_config(ROOT / "sapt_dist/presets/demo.yaml").adapter
        targets = list(demo.target_modules) if args.targets == "demo" else args.targets.split(",")
        rank = demo.rank if args.targets == "demo" else args.rank
        part_gen(args.reps, args.new, args.batch, args.slots, targets, rank)
    if args.part in ("cl", "all"):
        part_cl(args.out, args.overrides)
    if args.part == "seeds":
        part_seeds(args.out, args.seeds, args.overrides)


if __name__ == "__main__":
    main()
