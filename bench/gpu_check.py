"""CUDA-graph / torch.compile checks of SAPT on a GPU (run through ``bench/gpu_check.sh``).

On a small random LLaMA wrapped in ``SAPTModel`` with 15 slots (14 filed random blocks and
a trainable one), for each dtype:

1. ``forward``: a SAPT forward (no grad) captured in a ``torch.cuda.CUDAGraph`` with static
   input buffers (warm-up on a side stream, as the PyTorch docs require), replayed and
   compared with eager; ``train step``: the same for forward + backward (static grads).
2. ``decode step``: routing weights fixed from the prompt (``routing_weights`` + ``_route``),
   the prompt prefilled into a ``transformers.StaticCache``, then one decode step of the
   backbone captured and compared with eager (and eager with a full forward).
3. ``compile``: ``torch.compile(model, mode="reduce-overhead", fullgraph=True)`` forward.

Prints ``check | eager ms | graph ms | speedup | max abs diff | ok`` and exits 1 when a
comparison fails, 2 when CUDA is not available. ``--device cpu --dry-run`` runs the same
eager paths on CPU with tiny shapes (no capture; the compile check traces with dynamo's
``eager`` backend, which still proves ``fullgraph=True``). Imports only torch, transformers
and ``sapt_dist.{ops,model,config,lora,attention}``; installs nothing.
"""

from __future__ import annotations

import argparse
import inspect
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass

import torch

FORBIDDEN = ("deepspeed", "bitsandbytes", "wandb")


@dataclass
class Row:
    check: str
    eager_ms: float | None = None
    graph_ms: float | None = None
    diff: float | None = None
    ok: bool = True
    note: str = ""


def import_sapt() -> list[str]:
    """Import the SAPT modules; return the forbidden packages they pulled in."""
    import sapt_dist.config  # noqa: F401
    import sapt_dist.method.attention  # noqa: F401
    import sapt_dist.method.lora  # noqa: F401
    import sapt_dist.method.model  # noqa: F401
    import sapt_dist.method.ops  # noqa: F401

    return sorted({m.split(".")[0] for m in sys.modules if m.split(".")[0] in FORBIDDEN})


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], reps: int, device: torch.device) -> float:
    """Median wall time of ``fn`` in ms (synchronised around each call)."""
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def compare(ref: list[torch.Tensor], got: list[torch.Tensor], rtol: float) -> tuple[float, bool]:
    """Max abs diff over tensor pairs; ok when each is <= rtol * max(1, max |ref|)."""
    worst, ok = 0.0, True
    for r, g in zip(ref, got):
        d = (r.float() - g.float()).abs().max().item()
        worst = max(worst, d)
        ok &= d <= rtol * max(1.0, r.float().abs().max().item())
    return worst, ok


def capture(fn: Callable[[], object], prepare: Callable[[], None] = lambda: None, warmup: int = 3):
    """Warm ``fn`` up on a side stream, then capture it; returns (graph, static outputs)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(warmup):
            prepare()
            fn()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    prepare()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def build(args: argparse.Namespace, dtype: torch.dtype, device: torch.device):
    """A random LLaMA in ``SAPTModel`` with ``slots - 1`` filed random blocks."""
    from sapt_dist.backbone.load import random_llama
    from sapt_dist.config import AdapterConfig
    from sapt_dist.method.model import SAPTModel

    shape = (args.vocab, args.hidden, args.layers, args.heads, args.heads, args.intermediate)
    backbone = random_llama(*shape, 2 * args.seq, train=True).to(device=device, dtype=dtype)
    model = SAPTModel(backbone, AdapterConfig(), n_slots=args.slots)
    for j in range(args.slots - 1):
        model.start_task(j)
        with torch.no_grad():
            for layer in model.layers.values():
                layer.lora_B.normal_(std=0.02)
        model.file_current()
    model.start_task(args.slots - 1)
    with torch.no_grad():  # a non-zero trainable block too, so its path is exercised
        for layer in model.layers.values():
            layer.lora_B.normal_(std=0.02)
    return model.eval(), backbone.config


def static_cache(cfg, batch: int, max_len: int, device: torch.device, dtype: torch.dtype):
    """A ``StaticCache`` across transformers versions (older ones want batch/device/dtype)."""
    from transformers import StaticCache

    params = inspect.signature(StaticCache.__init__).parameters
    kw: dict = {"config": cfg, "max_cache_len": max_len}
    for name, value in [
        ("max_batch_size", batch),
        ("batch_size", batch),
        ("device", device),
        ("dtype", dtype),
    ]:
        if name in params:
            kw[name] = value
    return StaticCache(**kw)


def run_checks(args: argparse.Namespace, dtype: torch.dtype, device: torch.device) -> list[Row]:
    """Every check for one dtype."""
    model, cfg = build(args, dtype, device)
    name = str(dtype).replace("torch.", "")
    rtol = args.rtol_fp32 if dtype == torch.float32 else args.rtol_bf16
    dry = args.dry_run
    g = torch.Generator(device="cpu").manual_seed(1)
    ids = torch.randint(3, args.vocab, (args.batch, args.seq), generator=g).to(device)
    mask = torch.ones_like(ids)
    labels = ids.clone()
    labels[:, : args.seq // 2] = -100
    rows: list[Row] = []

    def guarded(check: str, body: Callable[[Row], None]) -> None:
        row = Row(f"{name} {check}")
        try:
            body(row)
        except Exception as e:  # report and go on with the next check
            row.ok, row.note = False, f"{type(e).__name__}: {e}".splitlines()[0][:160]
            traceback.print_exc()
        rows.append(row)

    # ---- (i) forward, no grad
    def forward() -> torch.Tensor:
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=mask).logits

    ref_logits = forward().clone()

    def check_forward(row: Row) -> None:
        row.eager_ms = time_ms(forward, args.reps, device)
        if dry:
            row.diff, row.ok = compare([ref_logits], [forward()], rtol)
            row.note = "eager twice (no capture)"
            return
        graph, out = capture(forward)
        graph.replay()
        row.diff, row.ok = compare([ref_logits], [out], rtol)
        row.graph_ms = time_ms(graph.replay, args.reps, device)

    guarded("forward (no grad)", check_forward)

    # ---- (i) forward + backward with static grads
    params = model.adapter_params()

    def zero() -> None:
        for p in params:
            p.grad = None

    def train_step() -> torch.Tensor:
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        return loss

    def check_train(row: Row) -> None:
        zero()
        ref = [train_step().detach().clone()] + [p.grad.clone() for p in params]
        row.eager_ms = time_ms(lambda: (zero(), train_step()), args.reps, device)
        if dry:
            zero()
            got = [train_step().detach()] + [p.grad for p in params]
            row.diff, row.ok = compare(ref, got, rtol)
            row.note = "eager twice (no capture)"
            return
        graph, loss = capture(train_step, prepare=zero)
        graph.replay()
        row.diff, row.ok = compare(ref, [loss] + [p.grad for p in params], rtol)
        row.graph_ms = time_ms(graph.replay, args.reps, device)

    guarded("train step (fwd+bwd)", check_train)
    zero()

    # ---- (ii) one decode step on a StaticCache, weights fixed from the prompt
    def check_decode(row: Row) -> None:
        P = args.seq // 2
        prompt = ids[:, :P]
        fwd_params = inspect.signature(model.backbone.forward).parameters
        cache_kw = "cache" if "cache" in fwd_params else "past_key_values"  # renamed in 5.x
        with torch.no_grad():
            w = model.routing_weights(prompt, torch.ones_like(prompt))
            model._route(w)
            if hasattr(model.context, "inference"):
                model.context.inference = {}  # what SAPTModel.generate does
            cache = static_cache(cfg, args.batch, args.seq, device, dtype)
            pos = torch.arange(P, device=device)
            out = model.backbone(
                input_ids=prompt, cache_position=pos, use_cache=True, **{cache_kw: cache}
            )
            tok = out.logits[:, -1:].argmax(-1)
            static_pos = torch.tensor([P], device=device)

            def rewind() -> None:
                # newer StaticCache layers write at their own counter, not at cache_position:
                # put it back to the prompt length so every call is the same decode step
                for layer in getattr(cache, "layers", []):
                    if isinstance(getattr(layer, "cumulative_length", None), torch.Tensor):
                        layer.cumulative_length.fill_(P)

            def step() -> torch.Tensor:
                return model.backbone(
                    input_ids=tok, cache_position=static_pos, use_cache=True, **{cache_kw: cache}
                ).logits

            rewind()
            ref = step()[:, -1].clone()
            full = model(input_ids=torch.cat([prompt, tok], 1), weights=w).logits[:, -1]
            d_full, ok_full = compare([full], [ref], rtol * 10)
            row.note = f"decode vs full forward diff {d_full:.2e} ({'ok' if ok_full else 'FAIL'})"
            row.eager_ms = time_ms(lambda: (rewind(), step()), args.reps, device)
            if dry:
                rewind()
                row.diff, row.ok = compare([ref], [step()[:, -1]], rtol)
                row.ok &= ok_full
                return
            graph, static_out = capture(step, prepare=rewind)
            rewind()
            graph.replay()
            row.diff, row.ok = compare([ref], [static_out[:, -1]], rtol)
            row.ok &= ok_full
            row.graph_ms = time_ms(lambda: (rewind(), graph.replay()), args.reps, device)

    guarded("decode step (StaticCache)", check_decode)
    if hasattr(model.context, "inference"):
        model.context.inference = None

    # ---- (iii) torch.compile(fullgraph=True)
    def check_compile(row: Row) -> None:
        if dry:
            compiled = torch.compile(model, backend="eager", fullgraph=True)
            row.note = "dynamo fullgraph trace, eager backend"
        else:
            compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)

        def cfwd() -> torch.Tensor:
            with torch.no_grad():
                return compiled(input_ids=ids, attention_mask=mask).logits

        t0 = time.perf_counter()
        for _ in range(3):  # compile, then record the CUDA graph
            cfwd()
        sync(device)
        row.note = (row.note + f"; first 3 calls {time.perf_counter() - t0:.1f}s").lstrip("; ")
        row.diff, row.ok = compare([ref_logits], [cfwd().clone()], rtol * 10)
        row.eager_ms = time_ms(forward, args.reps, device)
        if dry:
            # also trace the loss forward in one graph: no host sync on the training path
            with torch.no_grad():
                loss = compiled(input_ids=ids, attention_mask=mask, labels=labels).loss
                ref_loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            d, ok = compare([ref_loss], [loss], rtol * 10)
            row.diff, row.ok = max(row.diff, d), row.ok and ok
            row.note += "; logits and loss forward traced (no timing: not compiled code)"
            return
        row.graph_ms = time_ms(cfwd, args.reps, device)

    if not args.skip_compile:
        guarded("compile reduce-overhead fwd", check_compile)
    return rows


def fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu (with --dry-run)")
    ap.add_argument("--dry-run", action="store_true", help="eager paths only, tiny shapes")
    ap.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated dtypes")
    ap.add_argument("--slots", type=int, default=15)
    ap.add_argument("--layers", type=int, default=None, help="default 4 (dry run 2)")
    ap.add_argument("--hidden", type=int, default=None, help="default 1024 (dry run 64)")
    ap.add_argument("--seq", type=int, default=None, help="tokens; default 256 (dry run 32)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--reps", type=int, default=None, help="timed calls; default 20 (dry run 3)")
    ap.add_argument("--skip-compile", action="store_true", help="skip the torch.compile check")
    ap.add_argument("--rtol-fp32", type=float, default=1e-4, help="diff / max(1, max|ref|)")
    ap.add_argument("--rtol-bf16", type=float, default=2e-2, help="diff / max(1, max|ref|)")
    args = ap.parse_args(argv)
    tiny = args.dry_run
    args.layers = args.layers or (2 if tiny else 4)
    args.hidden = args.hidden or (64 if tiny else 1024)
    args.seq = args.seq or (32 if tiny else 256)
    args.reps = args.reps or (3 if tiny else 20)
    args.heads = 4 if tiny else 16
    args.intermediate = 2 * args.hidden if tiny else 2752
    args.vocab = 256 if tiny else 32000

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(
            "gpu_check: torch.cuda.is_available() is False: no GPU here; run "
            "`python bench/gpu_check.py --device cpu --dry-run` for the CPU dry run"
        )
        return 2
    if device.type != "cuda" and not args.dry_run:
        print("gpu_check: CUDA graphs need --device cuda; use --dry-run on the CPU")
        return 2

    forbidden = import_sapt()
    import transformers

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"# torch {torch.__version__}, transformers {transformers.__version__}, {where}")
    print(
        f"# random LLaMA {args.layers} layers, hidden {args.hidden}, SAPT {args.slots} slots, "
        f"batch {args.batch} x seq {args.seq}, reps {args.reps}{', DRY RUN' if tiny else ''}\n"
    )
    rows = [
        Row("imports (no deepspeed/bitsandbytes/wandb)", ok=not forbidden, note=",".join(forbidden))
    ]
    for dt in args.dtypes.split(","):
        rows += run_checks(args, getattr(torch, dt.strip()), device)

    print("| check | eager ms | graph ms | speedup | max abs diff | ok | note |")
    print("|---|---:|---:|---:|---:|---|---|")
    for r in rows:
        speed = r.eager_ms / r.graph_ms if r.eager_ms and r.graph_ms else None
        print(
            f"| {r.check} | {fmt(r.eager_ms, '.3f')} | {fmt(r.graph_ms, '.3f')} | "
            f"{fmt(speed, '.2f')}{'x' if speed else ''} | {fmt(r.diff, '.2e')} | "
            f"{'ok' if r.ok else 'FAIL'} | {r.note} |"
        )
    failed = [r.check for r in rows if not r.ok]
    print(f"\ngpu_check: {'FAILED: ' + ', '.join(failed) if failed else 'all checks passed'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
