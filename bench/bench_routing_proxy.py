"""The shared attention alone, on a real model's pooled prompts: why the paper's routing
collapses on SmolLM2 at a CPU run's length, and what the centered input changes.

Loads SmolLM2-135M-Instruct (``sapt-models``), max- (or mean-) pools the embeddings of the
``smollm2_superni`` preset's prompts of its three tasks, prints their geometry, then trains
only ``SharedAttention`` (query network + keys) through the 3 tasks in sequence: per step
the ARM over 4 pseudo prompts per earlier task (real prompts standing in for well-formed
pseudo-samples) plus a weak own-task pull ``-beta log w_t`` standing in for a fresh
block's task loss; ``a_t*`` from 40 training prompts; routing accuracy on the test
prompts, for several seeds. Seconds per row after the model loads. docs/ROUTING.md has
the table and its reading.

    python bench/bench_routing_proxy.py
    python bench/bench_routing_proxy.py --seeds 0 1 2 3 4 --beta 0.1
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def pooled_prompts(pool: str, n_train: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
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

    cfg = load_config(preset_path("smollm2_superni"))
    model, tok = load_backbone(cfg.model)
    emb = model.get_input_embeddings().weight.detach()
    root = resolve_data_root(cfg.data.root)
    names, _ = resolve_order(cfg.data, root)
    train, test = [], []
    for name in names:
        task = load_task(root, name, cfg.data, 0)
        for split, out, cap in (("train", train, n_train), ("test", test, None)):
            rows = []
            for x in list(task.splits[split]["input"])[:cap]:
                ids = encode_prompt(
                    tok,
                    format_prompt(cfg.data.template, task.definition, x),
                    cfg.data.max_source_length,
                )
                e = emb[torch.tensor(ids)]
                rows.append(e.max(0).values if pool == "max" else e.mean(0))
            out.append(torch.stack(rows))
    return train, test


def geometry(train: list[torch.Tensor]) -> tuple[float, float, float]:
    u = torch.cat(train)
    mu = u.mean(0)
    c = torch.stack([x.mean(0) for x in train])
    cos = torch.nn.functional.cosine_similarity(c[:, None], c[None], dim=-1).min()
    spread = (u - mu).norm(dim=1).pow(2).mean().sqrt()
    return float(mu.norm()), float(spread), float(cos)


def route(train, test, center: bool, lr: float, steps: int, beta: float, seed: int, init=None):
    from sapt_dist.method.attention import SharedAttention

    n, d = len(train), train[0].shape[1]
    torch.manual_seed(seed)
    att = SharedAttention(d, n, hidden=100, center="tasks" if center else "none")
    if init == "normal":  # the released code's N(0, 0.02)
        for p in att.query.parameters():
            if p.dim() == 2:
                torch.nn.init.normal_(p, 0.0, 0.02)
    for t in range(n):
        att.set_task_mean(t, train[t].mean(0))
        att.current.zero_()
        att.current[t] = True
        att.active.zero_()
        att.active[: t + 1] = True
        att.reset_key()
        opt = torch.optim.AdamW(att.adapter_params(), lr=lr, weight_decay=0.0)
        g = torch.Generator().manual_seed(seed + t)
        for _ in range(steps if t else 0):
            idx = torch.randint(0, len(train[t]), (8,), generator=g)
            loss = -beta * torch.log(att(train[t][idx])[:, t]).mean()
            for j in range(t):
                pidx = torch.randint(0, 4, (8,), generator=g)
                loss = loss + att(train[j][pidx], torch.full((8,), j), output="arm")
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            att.key_bank[t] = att.key
            att.targets[t] = att(train[t][:40]).mean(0)
    with torch.no_grad():
        w = [att(x) for x in test]
        acc = sum(int((x.argmax(1) == k).sum()) for k, x in enumerate(w)) / sum(
            len(x) for x in test
        )
        own = sum(float(w[k][:, k].mean()) for k in range(n)) / n
    return acc, own


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--beta", type=float, default=0.05, help="weight of the own-task pull")
    ap.add_argument("--n-train", type=int, default=160)
    args = ap.parse_args(argv)
    data = {p: pooled_prompts(p, args.n_train) for p in ("max", "mean")}
    print("SmolLM2-135M-Instruct, smollm2_superni prompts (CPU)\n")
    print("| router input | norm of mean u | rms distance to it | ratio | min centroid cosine |")
    print("|---|---|---|---|---|")
    for p, (train, _) in data.items():
        m, s, c = geometry(train)
        print(f"| {p}-pool | {m:.2f} | {s:.2f} | {m / s:.1f} | {c:.3f} |")
    print("\n| router input | g init | lr | steps per task | routing accuracy | own-block weight |")
    print("|---|---|---|---|---|---|")
    cases = [
        ("max", False, None, 1e-3, 40),
        ("max", False, "normal", 1e-3, 40),
        ("max", False, None, 2e-2, 40),
        ("max", False, None, 5e-5, 40),
        ("max", False, None, 1e-3, 200),
        ("mean", False, None, 1e-3, 40),
        ("max", True, None, 1e-3, 40),
        ("max", True, None, 5e-5, 40),
    ]
    for pool, center, init, lr, steps in cases:
        train, test = data[pool]
        res = [route(train, test, center, lr, steps, args.beta, s, init) for s in args.seeds]
        name = f"{pool}-pool" + (" minus the tasks' mean" if center else "")
        print(
            f"| {name} | {init or 'default'} | {lr:g} | {steps} | "
            + ", ".join(f"{100 * r[0]:.0f}%" for r in res)
            + " | "
            + ", ".join(f"{r[1]:.2f}" for r in res)
            + " |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
