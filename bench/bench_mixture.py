"""CPU benchmark of SAPT's fused mixture of LoRA blocks, every ratio measured side by side.

(a) ``MixtureLoRALinear`` (``sapt_dist.method.ops.mixture_lora``) against a per-slot loop in the style of the paper's
    released code (one ``nn.Linear`` pair per slot, earlier slots under ``torch.no_grad``),
    on a LLaMA-7B-shaped projection, forward + backward and forward only.
(b) One training step (forward + backward) of a small random LLaMA with SAPT at 15 slots,
    against the same backbone with one plain peft LoRA, and SAPT at 1 slot.
(c) The step time of (b)'s SAPT model over the number of slots.

Measurements of one part are interleaved (round robin, the order reversed every other
repetition) after a warm-up, and the medians are compared, so machine noise hits every
contender alike. Run from the repo root::

    PYTHONPATH=. python bench/bench_mixture.py            # full run (minutes)
    PYTHONPATH=. python bench/bench_mixture.py --quick    # fewer repetitions
    PYTHONPATH=. python bench/bench_mixture.py --quick --tiny   # smoke run (seconds)
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from sapt_dist.config import AdapterConfig
from sapt_dist.method.lora import MixtureLoRALinear, RoutingContext
from sapt_dist.method.model import SAPTModel

TARGET_FUSED_VS_LOOP = 5.0  # fused >= 5x faster than the loop at 15 slots (fwd + bwd)
TARGET_SAPT_VS_LORA = 1.10  # SAPT-15 step <= 1.10x one plain LoRA's step


@dataclass
class Shapes:
    """Every size the benchmark uses (``--tiny`` shrinks them all)."""

    d: int = 4096  # (a) d_in = d_out
    batch: int = 2  # (a)
    seq: int = 512  # (a)
    layers: int = 4  # (b), (c)
    hidden: int = 1024
    intermediate: int = 2752
    heads: int = 16
    vocab: int = 32000
    lm_seq: int = 256
    lm_batch: int = 1


TINY = Shapes(
    d=128, batch=2, seq=16, layers=2, hidden=64, intermediate=128, heads=4, vocab=256, lm_seq=32
)


def interleaved(fns: dict[str, Callable[[], object]], reps: int, warmup: int) -> dict[str, float]:
    """Median wall time (ms) of each callable, measured round robin."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    names = list(fns)
    times: dict[str, list[float]] = {k: [] for k in names}
    for i in range(reps):
        for k in names if i % 2 == 0 else names[::-1]:
            t0 = time.perf_counter()
            fns[k]()
            times[k].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


# --------------------------------------------------------------------------- (a) the op
class PaperLoop(nn.Module):
    """The released code's style: ``lora_B(lora_A(dropout(x))) * scaling * weight[:, j]``
    per slot with ``nn.Linear`` modules, earlier slots computed under ``torch.no_grad``
    (the weights still get their gradient through them), accumulated into the result."""

    def __init__(self, d: int, r: int, slots: int, scaling: float) -> None:
        super().__init__()
        self.scaling = scaling
        self.prev_A = nn.ModuleList(nn.Linear(d, r, bias=False) for _ in range(slots - 1))
        self.prev_B = nn.ModuleList(nn.Linear(r, d, bias=False) for _ in range(slots - 1))
        self.lora_A = nn.Linear(d, r, bias=False)
        self.lora_B = nn.Linear(r, d, bias=False)
        self.dropout = nn.Identity()  # lora_dropout = 0 in the paper's LLaMA scripts
        for p in [*self.prev_A.parameters(), *self.prev_B.parameters()]:
            p.requires_grad_(False)

    def forward(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # stands in for the frozen ``W0 x`` the released code accumulates into
        result = x.new_zeros(*x.shape[:-1], self.lora_B.out_features)
        for j in range(len(self.prev_A)):
            with torch.no_grad():
                h = self.prev_B[j](self.prev_A[j](self.dropout(x)))
            result += h * self.scaling * weight[:, j].view(-1, 1, 1)
        h = self.lora_B(self.lora_A(self.dropout(x)))
        result += h * self.scaling * weight[:, -1].view(-1, 1, 1)
        return result


class ZeroBase(nn.Linear):
    """Stands in for the frozen ``W0`` (weight on the meta device): both contenders start
    from zeros, so only the mixture is timed."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(*x.shape[:-1], self.out_features)


class Fused(nn.Module):
    """The project's own layer (``MixtureLoRALinear``, hence ``mixture_lora``) holding the
    loop's blocks: frozen banks, the last slot trainable, the paper's cut gradient."""

    def __init__(self, loop: PaperLoop, rank: int) -> None:
        super().__init__()
        slots = len(loop.prev_A) + 1
        d_in, d_out = loop.lora_A.in_features, loop.lora_B.out_features
        self.context = RoutingContext()
        base = ZeroBase(d_in, d_out, bias=False, device="meta")
        self.layer = MixtureLoRALinear(base, slots, rank, 32.0, 0.0, self.context)
        assert self.layer.scaling == loop.scaling
        with torch.no_grad():
            self.layer.A_bank.copy_(torch.stack([a.weight for a in [*loop.prev_A, loop.lora_A]]))
            self.layer.B_bank.copy_(torch.stack([b.weight for b in [*loop.prev_B, loop.lora_B]]))
            self.layer.load_current(slots - 1)
        current = torch.arange(slots) == slots - 1
        self.context.current, self.context.x_grad_mask = current, current.float()

    def forward(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        self.context.weights = weight
        return self.layer(x)


def bench_op(sh: Shapes, rank: int, slot_counts: list[int], reps: int, warmup: int) -> list[dict]:
    """Part (a): rows of slots, loop / fused ms, forward + backward and forward only."""
    rows = []
    for slots in slot_counts:
        torch.manual_seed(slots)
        loop = PaperLoop(sh.d, rank, slots, scaling=32.0 / rank)
        with torch.no_grad():
            for lin in [*loop.prev_B, loop.lora_B]:
                lin.weight.normal_(std=0.02)
        fused = Fused(loop, rank)
        x = torch.randn(sh.batch, sh.seq, sh.d, requires_grad=True)
        w = torch.softmax(torch.randn(sh.batch, slots), -1).requires_grad_()
        gy = torch.randn(sh.batch, sh.seq, sh.d)
        with torch.no_grad():  # sanity: the two compute the same thing
            torch.testing.assert_close(fused(x, w), loop(x, w), rtol=1e-4, atol=1e-4)

        def train_step(mod: nn.Module, x=x, w=w, gy=gy) -> None:
            x.grad = w.grad = None
            mod.zero_grad(set_to_none=True)
            mod(x, w).backward(gy)

        def forward(mod: nn.Module, x=x, w=w) -> None:
            with torch.no_grad():
                mod(x, w)

        fb = interleaved(
            {"loop": partial(train_step, loop), "fused": partial(train_step, fused)}, reps, warmup
        )
        fo = interleaved(
            {"loop": partial(forward, loop), "fused": partial(forward, fused)}, reps, warmup
        )
        rows.append({"slots": slots, "fb": fb, "fwd": fo})
    return rows


# --------------------------------------------------------------------------- (b), (c) a model
def build_backbone(sh: Shapes) -> nn.Module:
    from sapt_dist.backbone.load import random_llama

    shape = (sh.vocab, sh.hidden, sh.layers, sh.heads, sh.heads, sh.intermediate)
    return random_llama(*shape, max(sh.lm_seq, 128), train=True)


def shared_copy(model: nn.Module) -> nn.Module:
    """A copy of the module tree that shares the (frozen) weights, to save memory."""
    memo = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return copy.deepcopy(model, memo)


def build_sapt(base: nn.Module, slots: int, rank: int) -> SAPTModel:
    """SAPT with ``slots - 1`` filed random frozen blocks and a trainable last one."""
    model = SAPTModel(shared_copy(base), AdapterConfig(rank=rank), n_slots=slots)
    for j in range(slots - 1):
        model.start_task(j)
        with torch.no_grad():
            for layer in model.layers.values():
                layer.lora_B.normal_(std=0.02)
        model.file_current()
    model.start_task(slots - 1)
    return model.train()


def build_lora(base: nn.Module, rank: int) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=rank, lora_alpha=32, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    return get_peft_model(shared_copy(base), cfg).train()


def bench_model(
    sh: Shapes, rank: int, curve: list[int], reps: int, warmup: int
) -> tuple[dict[str, float], dict[str, int]]:
    """Parts (b) and (c) in one interleaved run: step ms of plain LoRA and SAPT-n."""
    base = build_backbone(sh)
    ids = torch.randint(3, sh.vocab, (sh.lm_batch, sh.lm_seq))
    mask = torch.ones_like(ids)
    labels = ids.clone()
    labels[:, : sh.lm_seq // 2] = -100  # prompt = first half, target = second half
    models: dict[str, nn.Module] = {"lora": build_lora(base, rank)}
    for n in sorted(set(curve) | {1, 15}):
        models[f"sapt{n}"] = build_sapt(base, n, rank)
    trainable = {
        k: sum(p.numel() for p in m.parameters() if p.requires_grad) for k, m in models.items()
    }

    def step(m: nn.Module) -> None:
        m.zero_grad(set_to_none=True)
        m(input_ids=ids, attention_mask=mask, labels=labels, **_no_cache(m)).loss.backward()

    fns = {k: partial(step, m) for k, m in models.items()}
    return interleaved(fns, reps, warmup), trainable


def _no_cache(m: nn.Module) -> dict:
    # SAPTModel already passes use_cache=False; the peft model must not build a KV cache
    return {} if isinstance(m, SAPTModel) else {"use_cache": False}


# --------------------------------------------------------------------------- report
def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions (smoke run)")
    ap.add_argument("--tiny", action="store_true", help="shrink every shape (seconds)")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions per contender")
    ap.add_argument("--rank", type=int, default=4, help="LoRA rank r")
    ap.add_argument("--lm-batch", type=int, default=None, help="batch of (b)/(c) (default 1)")
    ap.add_argument("--curve", default="1,2,4,8,15,32", help="slot counts of (c)")
    ap.add_argument("--skip-op", action="store_true", help="skip part (a)")
    ap.add_argument("--skip-model", action="store_true", help="skip parts (b) and (c)")
    ap.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave default)")
    args = ap.parse_args(argv)

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    sh = copy.copy(TINY if args.tiny else Shapes())
    if args.lm_batch:
        sh.lm_batch = args.lm_batch
    reps_op = args.reps or (3 if args.quick else 21)
    reps_lm = args.reps or (2 if args.quick else 9)
    warmup = 1 if args.quick else 2
    curve = [int(s) for s in args.curve.split(",")]
    print(
        f"# torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{platform.processor() or platform.machine()}, python {platform.python_version()}, "
        f"load average at start {os.getloadavg()[0]:.2f}"
    )
    print(f"# shapes: {sh}, rank {args.rank}, reps {reps_op} (a) / {reps_lm} (b, c)\n")
    results: list[tuple[str, float, str, bool | None]] = []

    if not args.skip_op:
        rows = bench_op(sh, args.rank, [1, 5, 15], reps_op, warmup)
        print(f"## (a) mixture op, d={sh.d}, r={args.rank}, batch {sh.batch} x seq {sh.seq}, fp32")
        print(
            "| slots | loop fwd+bwd ms | fused fwd+bwd ms | speedup | loop fwd ms | fused fwd ms | speedup |"
        )
        print("|---:|---:|---:|---:|---:|---:|---:|")
        for row in rows:
            fb, fo = row["fb"], row["fwd"]
            print(
                f"| {row['slots']} | {fb['loop']:.2f} | {fb['fused']:.2f} | "
                f"{fb['loop'] / fb['fused']:.2f}x | {fo['loop']:.2f} | {fo['fused']:.2f} | "
                f"{fo['loop'] / fo['fused']:.2f}x |"
            )
        last = rows[-1]
        sp = last["fb"]["loop"] / last["fb"]["fused"]
        results.append(
            ("fused_vs_loop_15", sp, f">= {TARGET_FUSED_VS_LOOP:g}x", sp >= TARGET_FUSED_VS_LOOP)
        )
        spf = last["fwd"]["loop"] / last["fwd"]["fused"]
        results.append(("fused_vs_loop_fwd_15", spf, "info", None))
        print()

    if not args.skip_model:
        med, trainable = bench_model(sh, args.rank, curve, reps_lm, warmup)
        lora = med["lora"]
        print(
            f"## (b) train step (fwd+bwd), random LLaMA {sh.layers} layers, hidden {sh.hidden}, "
            f"ffn {sh.intermediate}, {sh.heads} heads, vocab {sh.vocab}, batch {sh.lm_batch} x "
            f"seq {sh.lm_seq}, fp32, q_proj/v_proj r={args.rank}"
        )
        print("| model | trainable params | step ms | vs plain LoRA |")
        print("|---|---:|---:|---:|")
        for k in ["lora", "sapt1", "sapt15"]:
            print(f"| {k} | {trainable[k]} | {med[k]:.1f} | {med[k] / lora:.3f}x |")
        print("\n## (c) SAPT step time over slots (same run)")
        print("| slots | step ms | vs SAPT-1 | vs plain LoRA |")
        print("|---:|---:|---:|---:|")
        for n in sorted(set(curve) | {1, 15}):
            t = med[f"sapt{n}"]
            print(f"| {n} | {t:.1f} | {t / med['sapt1']:.3f}x | {t / lora:.3f}x |")
        r15 = med["sapt15"] / lora
        results.append(
            ("sapt15_vs_lora", r15, f"<= {TARGET_SAPT_VS_LORA:.2f}x", r15 <= TARGET_SAPT_VS_LORA)
        )
        results.append(("sapt1_vs_lora", med["sapt1"] / lora, "info", None))
        print()

    missed = False
    for name, value, target, ok in results:
        tail = "" if ok is None else f" {verdict(ok)}"
        print(f"RESULT {name}={value:.2f}x (target {target}){tail}")
        missed |= ok is False
    return 1 if (missed and args.strict) else 0


if __name__ == "__main__":
    sys.exit(main())
