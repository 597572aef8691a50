"""Per-step time and per-rank peak memory of SAPT training: 1 process vs 2 ZeRO-3 ranks.

Every configuration trains the same SAPT model (a random LLaMA, 15 slots, the current block
trainable, a real ARM batch) on the same global batch for the same number of steps; each
runs in its own fresh processes (so peak RSS is that configuration's own) and the parent
prints the ratios side by side. Configurations:

- ``1p-zero0``: one process, no sharding (the unsharded reference);
- ``1p-zero3``: one process under ZeRO-3 (its overhead with nothing to shard);
- ``2p-zero3``: two ranks under ZeRO-3 (each holds half of every backbone parameter).

On a 2-core CPU the two ranks share the cores (one thread each, against two threads for
one process), so time ratios measure overhead, not GPU speed-up; memory ratios carry over.
Run from the repo root::

    PYTHONPATH=. python bench/bench_zero3.py            # ~1-2 minutes
    PYTHONPATH=. python bench/bench_zero3.py --tiny     # smoke run (seconds)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ZERO3 = {
    "zero_optimization": {
        "stage": 3,
        "stage3_param_persistence_threshold": 0,
        "stage3_prefetch_bucket_size": 1_000_000,
        "reduce_bucket_size": 1_000_000,
        # release each layer after use: DeepSpeed's defaults (1e9 live elements, reuse
        # distance 1e9) would keep this whole 165M model gathered, hiding the sharding
        "stage3_max_live_parameters": 10_000_000,
        "stage3_max_reuse_distance": 0,
    }
}


def _rss_mb() -> float:
    """Current resident set size of this process (MB)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


SHAPES = {
    "default": {"hidden": 1024, "layers": 8, "vocab": 32000, "seq": 128, "micro": 4, "steps": 4},
    "tiny": {"hidden": 64, "layers": 2, "vocab": 512, "seq": 32, "micro": 2, "steps": 3},
}


def worker(args: argparse.Namespace) -> None:
    """One rank of one configuration: train ``steps`` steps, write timing and memory."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from sapt_dist import distributed
    from sapt_dist.config import AdapterConfig
    from sapt_dist.method.model import SAPTModel

    shape = SHAPES[args.shape]
    distributed.init()
    rank, world = distributed.rank(), distributed.world_size()
    ds = ZERO3 if args.stage == 3 else {"zero_optimization": {"stage": 0}}
    ga = args.global_micro // world  # same global batch in every configuration
    config = distributed.engine_config(
        ds, micro_batch_size=shape["micro"], grad_accum=ga, max_grad_norm=1.0, dtype="float32"
    )
    distributed.configure(config)
    base_rss = _rss_mb()  # libraries and process group, before any model memory
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=shape["vocab"],
        hidden_size=shape["hidden"],
        intermediate_size=shape["hidden"] * 8 // 3,
        num_hidden_layers=shape["layers"],
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=shape["seq"] * 2,
    )
    if args.stage == 3:  # partitioned as it is built, like from_pretrained under ZeRO-3
        import deepspeed

        with deepspeed.zero.Init(config_dict_or_path=config):
            backbone = LlamaForCausalLM(cfg)
    else:
        backbone = LlamaForCausalLM(cfg)
    model = SAPTModel(backbone, AdapterConfig(rank=4), n_slots=15)
    for slot in range(3):  # three filed blocks, the fourth trains with ARM over them
        model.start_task(slot, fresh=True)
        model.file_current()
        model.set_target(slot, torch.full((slot + 1,), 1.0 / (slot + 1)))
    model.start_task(3, fresh=True)
    params = model.named_adapter_params()
    engine, _, _ = distributed.build_engine(
        model,
        list(params.values()),
        lr=1e-3,
        weight_decay=0.0,
        micro_batch_size=shape["micro"],
        grad_accum=ga,
        max_grad_norm=1.0,
        dtype="float32",
    )
    g = torch.Generator().manual_seed(1)
    b, s = shape["micro"], shape["seq"]

    def micro_batch(k: int) -> dict:
        ids = torch.randint(3, shape["vocab"], (b, s), generator=g)
        prompt = torch.zeros(b, s, dtype=torch.bool)
        prompt[:, : s // 2] = True
        labels = ids.masked_fill(prompt, -100)
        return {
            "input_ids": ids,
            "attention_mask": torch.ones(b, s, dtype=torch.long),
            "labels": labels,
            "prompt_mask": prompt,
            "replay_input_ids": ids[:, : s // 2],
            "replay_attention_mask": torch.ones(b, s // 2, dtype=torch.long),
            "replay_task": torch.arange(b) % 3,
            "kl_ratio": 1.0,
        }

    times = []
    for step in range(shape["steps"] + 2):  # the first two are warm-up
        distributed.barrier()
        t0 = time.perf_counter()
        for k in range(ga):
            out = engine(**micro_batch(step * ga + k))
            engine.backward(out.loss)
            engine.step()
        distributed.barrier()
        if step >= 2:
            times.append(time.perf_counter() - t0)
    report = distributed.shard_report(model)
    frozen = sum(p["bytes"] for p in report["params"].values() if not p["train"])
    result = {
        "rank": rank,
        "step_s": statistics.median(times),
        "peak_rss_mb": report["peak_rss_mb"],
        "model_mb": report["peak_rss_mb"] - base_rss,
        "frozen_mb": frozen / 2**20,
        "buffers_mb": report["buffer_bytes"] / 2**20,
        "frozen_params_full_mb": sum(
            p["full"] * 4 for p in report["params"].values() if not p["train"]
        )
        / 2**20,
    }
    Path(args.out, f"rank{rank}.json").write_text(json.dumps(result))
    distributed.finish()
    distributed.leave_together()


def run_config(name: str, procs: int, stage: int, shape: str) -> list[dict]:
    out = Path(tempfile.mkdtemp(prefix=f"bench_zero3_{name}_"))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(PYTHONPATH=str(ROOT), DS_ACCELERATOR="cpu")
    # glibc keeps freed heap (per-thread arenas, no trim): gloo's gather buffers then stay
    # in RSS and a 2-rank run looked 1.5x bigger than it is; measure what is in use
    env.setdefault("MALLOC_ARENA_MAX", "1")
    env.setdefault("MALLOC_TRIM_THRESHOLD_", "0")
    args = ["--worker", "--stage", str(stage), "--shape", shape, "--out", str(out)]
    args += ["--global-micro", "2"]
    if procs == 1:
        cmd = [sys.executable, __file__, *args]
    else:
        env["OMP_NUM_THREADS"] = "1"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs)]
        cmd += [__file__, *args]
    t0 = time.time()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(f"{name} failed:\n{res.stderr[-3000:]}")
    rows = [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]
    print(f"  {name}: done in {time.time() - t0:.0f} s", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="smoke run with a tiny model")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--stage", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--shape", default="default", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--global-micro", type=int, default=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    shape = "tiny" if args.tiny else "default"
    s = SHAPES[shape]
    print(
        f"SAPT training step, random LLaMA d={s['hidden']} x {s['layers']} layers, vocab "
        f"{s['vocab']}, 15 slots (r 4, q/v), global batch 2 x {s['micro']} x seq {s['seq']}, "
        f"ARM on; {platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    )
    configs = [("1p-zero0", 1, 0), ("1p-zero3", 1, 3), ("2p-zero3", 2, 3)]
    results = {name: run_config(name, p, st, shape) for name, p, st in configs}
    ref = results["1p-zero0"][0]
    print()
    print(
        "| config | rank | step (s) | step vs 1p-zero0 | peak RSS (MB) | peak above start "
        "(MB) | vs 1p-zero0 | backbone held (MB) | of full |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, rows in results.items():
        for r in rows:
            print(
                f"| {name} | {r['rank']} | {r['step_s']:.3f} | {r['step_s'] / ref['step_s']:.2f}x "
                f"| {r['peak_rss_mb']:.0f} | {r['model_mb']:.0f} "
                f"| {r['model_mb'] / ref['model_mb']:.2f}x "
                f"| {r['frozen_mb']:.1f} | {r['frozen_mb'] / r['frozen_params_full_mb']:.2f} |"
            )
    print(
        "\npeak above start = peak RSS minus the RSS after imports and process-group start "
        "(what the model, its activations and DeepSpeed's buffers cost)"
    )


if __name__ == "__main__":
    main()
