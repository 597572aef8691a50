"""``sapt-plan``'s activation peak against ``torch.cuda.max_memory_allocated`` on a GPU.

The CPU check (``bench/bench_plan.py``) counts what the CPU kernels save; this one runs a
LLaMA-2-7B-shaped backbone cut to a few layers (random bf16 weights, no download) wrapped
in ``SAPTModel`` with the presets' setting (15 slots + generator, r 4 on q, v, 2 x 1074
padded tokens) through one forward + backward on CUDA, with and without gradient
checkpointing, and prints planner vs measured peak above the step's start. Plain torch,
one GPU (no DeepSpeed on the GPU machine): the planner is asked with
``memory_efficient_linear`` off and one rank, which is what runs.

    PYTHONPATH=. python bench/gpu_plan_check.py                  # on a GPU machine
    PYTHONPATH=. python bench/gpu_plan_check.py --device cpu --dry-run   # tiny, on CPU

Imports torch, transformers and ``sapt_dist.{plan,model,config}`` only; installs nothing.
Exit 2 when CUDA is absent (without ``--device cpu``).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace

import torch


def build(args: argparse.Namespace, device: torch.device):
    from sapt_dist.backbone.load import random_llama
    from sapt_dist.config import AdapterConfig
    from sapt_dist.method.model import SAPTModel

    shape = (args.vocab, args.hidden, args.layers, args.heads, args.heads, args.intermediate)
    with torch.device(device):
        backbone = random_llama(*shape, 4096, train=True).to(torch.bfloat16)
    adapter = AdapterConfig(rank=args.rank, target_modules=["q_proj", "v_proj"])
    model = SAPTModel(
        backbone, adapter, n_slots=args.slots, dtype=torch.bfloat16, generator_slot=True
    ).to(device)
    return model, backbone.config


def batch(args: argparse.Namespace, device: torch.device) -> dict:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, args.vocab, (args.batch, args.seq), generator=g)
    am = torch.ones_like(ids)
    am[0, -args.seq // 10 :] = 0  # one padded row: the masked attention path, as in training
    labels = ids.clone()
    labels[:, : args.seq - 50] = -100
    labels[am == 0] = -100
    return {
        k: v.to(device)
        for k, v in {"input_ids": ids, "attention_mask": am, "labels": labels}.items()
    }


def peak_cuda(model, inputs, device) -> int:
    def step():
        for p in model.parameters():
            p.grad = None
        out = model(**inputs)  # held through backward, as the trainer holds it
        out.loss.backward()

    step()
    torch.cuda.synchronize(device)
    for p in model.parameters():
        p.grad = None
    start = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - start


def peak_cpu(model, inputs) -> int:
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action

    def step():
        for p in model.parameters():
            p.grad = None
        out = model(**inputs)
        out.loss.backward()

    step()
    with profile(
        activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True
    ) as prof:
        step()
    cur = peak = 0
    for _t, action, _key, size in prof._memory_profile().timeline:
        cur += size if action == Action.CREATE else -size if action == Action.DESTROY else 0
        peak = max(peak, cur)
    return peak


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes (CPU smoke run)")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=11008)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--slots", type=int, default=15)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=1074)
    args = ap.parse_args(argv)
    if args.dry_run:
        args.layers, args.hidden, args.intermediate, args.heads = 2, 64, 176, 4
        args.vocab, args.seq = 512, 96
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available (use --device cpu --dry-run for the CPU smoke run)")
        return 2
    from sapt_dist.cluster.plan import DeepSpeedKnobs, PlanInputs, activation_bytes, shape_from_dict

    model, cfg = build(args, device)
    model.train()
    inputs = batch(args, device)
    shape = shape_from_dict(cfg.to_dict(), name="llama2-7b-shaped")
    print(
        f"device {device}, {args.layers} layers of d {args.hidden}, vocab {args.vocab}, "
        f"{args.batch} x {args.seq} tokens, {args.slots} slots, r {args.rank}"
    )
    print(f"{'setting':<26}{'planner MiB':>14}{'measured MiB':>14}{'error':>9}")
    for ckpt in (False, True):
        if ckpt:
            model.gradient_checkpointing_enable()
        measured = (
            peak_cuda(model, inputs, device) if device.type == "cuda" else peak_cpu(model, inputs)
        )
        inp = PlanInputs(
            shape=shape,
            gpus_per_node=1,
            dtype="bf16",
            micro_batch=args.batch,
            seq_len=args.seq,
            slots=args.slots,
            rank=args.rank,
            grad_ckpt=ckpt,
            knobs=replace(DeepSpeedKnobs(), memory_efficient_linear=False),
        )
        planned = activation_bytes(inp)["peak"]
        err = (planned - measured) / measured
        name = f"activation peak, {'ckpt' if ckpt else 'no ckpt'}"
        print(f"{name:<26}{planned / 2**20:>14.1f}{measured / 2**20:>14.1f}{100 * err:>+8.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
