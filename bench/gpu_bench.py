"""Every GPU measurement of issue 14 in one run, printed as one table (``gpu_bench.sh``).

Parts (``--parts``, all by default), each a ratio of contenders timed in this process,
interleaved, medians of synchronised calls:

- ``op``: the training mixture (``MixtureLoRALinear``: ``mixture_lora_train``) against the
  released code's per-slot loop (``bench_mixture.PaperLoop``), d 4096, r 4, forward +
  backward, 1 / 5 / 15 slots at 1k and 16k tokens; and at 16k tokens, 15 slots the
  fused forward against the memory floor (one read of x and one write of the output at
  the bandwidth a device-to-device copy reaches here). Targets: fused >= loop everywhere,
  forward <= 3x the floor.
- ``step``: one training step (forward + backward) of a LLaMA-7B-wide slice (4 layers,
  d 4096, ffn 11008, batch 4 x 512, r 4 on q, v) with SAPT-15, SAPT-1 and peft LoRA (its
  adapters in the model dtype); CUDA kernels per step from the profiler. Target: SAPT-15
  <= 1.05x LoRA.
- ``gen``: greedy generation, batch 8, 128-token prompts, 64 new tokens, on the same slice:
  plain backbone, peft LoRA, SAPT-15. Target: SAPT-15 >= 0.95x the plain backbone.
- ``graph``: the engine's graph mode (``train.compile=graphs``) against eager on a small
  SAPT model (4 layers, d 1024, 15 slots), ``BlockTraining`` as a run drives it (DeepSpeed
  ZeRO-0, the per-step snapshot included), steps after the compilation; losses of every
  step compared. Target: >= 1.5x steps/s, equal losses.
- ``zero3``: the same SAPT step on a >= 1B random LLaMA (d 2048, 22 layers) under the
  shipped ``zero3`` config in one process against ``zero0``, each in its own process.
  Target: ZeRO-3 <= 1.3x ZeRO-0.

``--dry`` runs every part on the CPU with tiny shapes (``trace`` instead of ``graphs``):
the paths, the table and the verdict logic, in seconds (``tests/test_bench_smoke.py``).
Its times mean nothing. Parts that need DeepSpeed (``graph``, ``zero3``) are skipped with
a note when it is not importable (see ``gpu_bench.sh`` for carrying it to a GPU machine).
Exit 0, or 1 when a part failed to run (``--strict``: also when a target is missed), 2
without CUDA (unless ``--dry``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_mixture import PaperLoop, Shapes, build_backbone  # noqa: E402


@dataclass
class Row:
    part: str
    case: str
    value: float | None = None  # the contender measured (unit in ``unit``)
    ref: float | None = None  # what it is compared with
    unit: str = "ms"
    ratio: float | None = None
    target: str = ""
    ok: bool | None = None  # None: information, no target
    note: str = ""


@dataclass
class Setup:
    device: torch.device
    dtype: torch.dtype
    dry: bool
    reps: int
    warmup: int


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def interleaved(fns: dict[str, Callable[[], object]], s: Setup) -> dict[str, float]:
    """Median ms of each callable, round robin (order reversed every other repetition)."""
    for _ in range(s.warmup):
        for fn in fns.values():
            fn()
    names, times = list(fns), {k: [] for k in fns}
    for i in range(s.reps):
        for k in names if i % 2 == 0 else names[::-1]:
            sync(s.device)
            t0 = time.perf_counter()
            fns[k]()
            sync(s.device)
            times[k].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


# --------------------------------------------------------------------------- op
def _fused_layer(loop: PaperLoop, rank: int, s: Setup):
    """``MixtureLoRALinear`` holding the loop's blocks (last slot trainable, cut gradient)
    on a zero base (only the mixture is timed), as ``bench_mixture.Fused``, in the dtype."""
    from bench.bench_mixture import ZeroBase
    from sapt_dist.method.lora import MixtureLoRALinear, RoutingContext

    slots = len(loop.prev_A) + 1
    d_in, d_out = loop.lora_A.in_features, loop.lora_B.out_features
    ctx = RoutingContext()
    base = ZeroBase(d_in, d_out, bias=False, device="meta")
    with torch.device(s.device):
        layer = MixtureLoRALinear(base, slots, rank, 32.0, 0.0, ctx, dtype=s.dtype)
    with torch.no_grad():
        layer.A_bank.copy_(torch.stack([a.weight for a in [*loop.prev_A, loop.lora_A]]))
        layer.B_bank.copy_(torch.stack([b.weight for b in [*loop.prev_B, loop.lora_B]]))
        layer.load_current(slots - 1)
    current = torch.arange(slots, device=s.device) == slots - 1
    ctx.current, ctx.x_grad_mask = current, current
    return layer, ctx


def bandwidth_gbs(s: Setup) -> float:
    """Bytes read + written per second by a device-to-device copy (GB/s)."""
    n = (16 if s.dry else 1024) * 2**20 // 4
    src = torch.empty(n, device=s.device)
    dst = torch.empty_like(src)
    ms = interleaved({"copy": lambda: dst.copy_(src)}, s)["copy"]
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


def part_op(s: Setup) -> list[Row]:
    from sapt_dist.method.ops import mixture_lora_train

    d, r = (64, 4) if s.dry else (4096, 4)
    token_counts = [64, 256] if s.dry else [1024, 16384]
    rows = []
    for tokens in token_counts:
        for slots in (1, 5, 15):
            torch.manual_seed(slots)
            with torch.device(s.device):
                loop = PaperLoop(d, r, slots, scaling=32.0 / r).to(s.dtype)
            with torch.no_grad():
                for lin in [*loop.prev_B, loop.lora_B]:
                    lin.weight.normal_(std=0.02)
            layer, ctx = _fused_layer(loop, r, s)
            x = torch.randn(1, tokens, d, device=s.device, dtype=s.dtype, requires_grad=True)
            w = torch.softmax(torch.randn(1, slots, device=s.device), -1).requires_grad_()
            gy = torch.randn(1, tokens, d, device=s.device, dtype=s.dtype)

            def fused(x=x, w=w, gy=gy, layer=layer, ctx=ctx):
                ctx.weights = w
                layer(x).backward(gy)

            def paper(x=x, w=w, gy=gy, loop=loop):
                loop(x, w.to(s.dtype)).backward(gy)

            t = interleaved({"fused": fused, "loop": paper}, s)
            rows.append(
                Row(
                    "op",
                    f"fwd+bwd {tokens} tok, {slots} slots",
                    t["fused"],
                    t["loop"],
                    ratio=t["loop"] / t["fused"],
                    target=">= 1x (loop / fused)",
                    ok=t["loop"] >= t["fused"],
                    note=f"loop {t['loop']:.3f} ms",
                )
            )
            if tokens == token_counts[-1] and slots == 15:
                ctx.weights = w.detach()
                plan = ctx.plan(layer.scaling, r, s.dtype, tokens)
                x2 = x.detach().reshape(tokens, d)
                y2 = torch.zeros(tokens, d, device=s.device, dtype=s.dtype)
                args = (layer.A_bank, layer.B_bank, layer.lora_A, layer.lora_B, plan)

                def forward(x2=x2, y2=y2, args=args):
                    with torch.no_grad():
                        mixture_lora_train(x2, y2, *args)

                fwd = interleaved({"fwd": forward}, s)["fwd"]
                bw = bandwidth_gbs(s)
                floor = 2 * tokens * d * x.element_size() / (bw * 1e9) * 1e3
                rows.append(
                    Row(
                        "op",
                        f"fused forward {tokens} tok, 15 slots vs memory floor",
                        fwd,
                        floor,
                        ratio=fwd / floor,
                        target="<= 3x (fused / floor)",
                        ok=fwd <= 3 * floor,
                        note=f"floor: read x + write out at {bw:.0f} GB/s (copy)",
                    )
                )
    return rows


# --------------------------------------------------------------------------- step, gen
def slice_shapes(s: Setup) -> Shapes:
    if s.dry:
        return Shapes(layers=2, hidden=64, intermediate=128, heads=4, vocab=256, lm_seq=32)
    return Shapes(
        layers=4, hidden=4096, intermediate=11008, heads=32, vocab=32000, lm_seq=512, lm_batch=4
    )


def build_slice(s: Setup):
    """The 7B-wide slice and its three adapted copies (sharing the frozen weights)."""
    from peft import LoraConfig, get_peft_model

    from bench.bench_mixture import build_sapt, shared_copy

    sh = slice_shapes(s)
    torch.manual_seed(0)
    with torch.device(s.device):
        base = build_backbone(sh).to(s.dtype)
    cfg = LoraConfig(r=4, lora_alpha=32, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    # adapters in the model's dtype (peft's default would keep them fp32 on a bf16 model)
    lora = get_peft_model(shared_copy(base), cfg, autocast_adapter_dtype=False).train()
    models = {"lora": lora, "sapt1": build_sapt(base, 1, 4), "sapt15": build_sapt(base, 15, 4)}
    return sh, base, models


def _kernels_per_step(step: Callable[[], None], s: Setup) -> int:
    """CUDA kernels launched by one step (profiler); on the CPU: aten ops dispatched."""
    if s.device.type != "cuda":
        from bench.bench_op_count import OpCounter

        with OpCounter() as c:
            step()
        return sum(c.ops.values())
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        sync(s.device)
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def part_step(s: Setup, built) -> list[Row]:
    from bench.bench_mixture import _no_cache

    sh, _, models = built
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, sh.vocab, (sh.lm_batch, sh.lm_seq), generator=g).to(s.device)
    mask = torch.ones_like(ids)
    labels = ids.clone()
    labels[:, : sh.lm_seq // 2] = -100

    def step(m) -> None:
        m.zero_grad(set_to_none=True)
        m(input_ids=ids, attention_mask=mask, labels=labels, **_no_cache(m)).loss.backward()

    t = interleaved({k: (lambda m=m: step(m)) for k, m in models.items()}, s)
    kernels = {k: _kernels_per_step(lambda m=m: step(m), s) for k, m in models.items()}
    what = "kernels" if s.device.type == "cuda" else "aten ops"
    shape = f"{sh.layers} x d {sh.hidden}, batch {sh.lm_batch} x {sh.lm_seq}"
    rows = [
        Row(
            "step",
            f"SAPT-{n} vs peft LoRA, {shape}",
            t[f"sapt{n}"],
            t["lora"],
            ratio=t[f"sapt{n}"] / t["lora"],
            target="<= 1.05x" if n == 15 else "",
            ok=(t["sapt15"] <= 1.05 * t["lora"]) if n == 15 else None,
            note=f"{what}/step {kernels[f'sapt{n}']} vs {kernels['lora']}",
        )
        for n in (15, 1)
    ]
    return rows


def part_gen(s: Setup, built) -> list[Row]:
    sh, base, models = built
    b, prompt, new = (2, 16, 8) if s.dry else (8, 128, 64)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, sh.vocab, (b, prompt), generator=g).to(s.device)
    mask = torch.ones_like(ids)
    kw = {"max_new_tokens": new, "min_new_tokens": new, "do_sample": False, "pad_token_id": 0}
    contenders = {"plain": base, "lora": models["lora"], "sapt15": models["sapt15"]}
    for m in contenders.values():
        m.eval()

    def gen(m) -> None:
        with torch.no_grad():
            out = m.generate(input_ids=ids, attention_mask=mask, **kw)
        assert out.shape[1] == prompt + new, out.shape

    t = interleaved({k: (lambda m=m: gen(m)) for k, m in contenders.items()}, s)
    for m in models.values():
        m.train()
    tok_s = {k: b * new / (v * 1e-3) for k, v in t.items()}
    return [
        Row(
            "gen",
            f"{name} vs plain backbone, batch {b}, {prompt}+{new} tokens",
            tok_s[name],
            tok_s["plain"],
            unit="tok/s",
            ratio=tok_s[name] / tok_s["plain"],
            target=">= 0.95x" if name == "sapt15" else "",
            ok=(tok_s[name] >= 0.95 * tok_s["plain"]) if name == "sapt15" else None,
        )
        for name in ("sapt15", "lora")
    ]


# --------------------------------------------------------------------------- graph
def _have_deepspeed() -> bool:
    try:
        import deepspeed  # noqa: F401
    except Exception:  # not installed, or its import fails
        return False
    return True


def part_graph(s: Setup) -> list[Row]:
    from sapt_dist import distributed
    from sapt_dist.config import AdapterConfig, TrainConfig
    from sapt_dist.data.tasks import EncodedExample
    from sapt_dist.method.model import SAPTModel
    from sapt_dist.train.block import BlockJob, BlockTraining

    if s.dry:
        shape, n_ex, seq, steps, skip = (256, 64, 2, 4, 4, 4 * 2), 8, 24, 3, 1
    else:
        shape, n_ex, seq, steps, skip = (32000, 1024, 4, 16, 16, 2752), 64, 256, 25, 5
    mode = "trace" if s.dry else "graphs"
    dtype = "float32" if s.dtype == torch.float32 else "bfloat16"
    g = torch.Generator().manual_seed(3)
    examples = []
    for _ in range(n_ex):
        ids = torch.randint(3, shape[0], (seq,), generator=g).tolist()
        examples.append(
            EncodedExample(
                input_ids=ids, labels=[-100] * (seq // 2) + ids[seq // 2 :], prompt_len=seq // 2
            )
        )
    results = {}
    for run in ("off", mode):
        from sapt_dist.backbone.load import random_llama

        torch._dynamo.reset()
        with torch.device(s.device):
            backbone = random_llama(*shape, 2 * seq, train=True).to(s.dtype)
        model = SAPTModel(backbone, AdapterConfig(), n_slots=15)
        for j in range(14):
            model.start_task(j)
            model.file_current()
        model.start_task(14)
        job = BlockJob(run, examples, model.named_adapter_params(), steps, seed=0, lr=1e-3)
        cfg = TrainConfig(micro_batch_size=4, grad_accum=1, max_grad_norm=1.0, compile=run)
        stamps = [time.perf_counter()]

        training = BlockTraining(model, job, cfg, dtype, 0)
        for _ in training.steps():
            sync(s.device)
            stamps.append(time.perf_counter())
        losses = training.losses
        distributed.finish()
        per_step = [b - a for a, b in zip(stamps, stamps[1:])]
        results[run] = (losses, statistics.median(per_step[skip:]), sum(per_step[:skip]))
    (l_eager, t_eager, _), (l_graph, t_graph, first) = results["off"], results[mode]
    diff = max(abs(a - b) / max(abs(b), 1e-6) for a, b in zip(l_graph, l_eager))
    tol = 1e-4 if dtype == "float32" else 3e-2
    speed = t_eager / t_graph
    return [
        Row(
            "graph",
            f"train.compile={mode} vs off, steps/s (after {skip} steps)",
            1 / t_graph,
            1 / t_eager,
            unit="steps/s",
            ratio=speed,
            target=">= 1.5x" if not s.dry else "(dry: trace, no speed-up)",
            ok=speed >= 1.5 if not s.dry else None,
            note=f"first {skip} steps {first:.1f} s (compilation)",
        ),
        Row(
            "graph",
            f"losses of {steps} steps, {mode} vs off ({dtype})",
            diff,
            tol,
            unit="max rel diff",
            target=f"<= {tol:g}",
            ok=diff <= tol,
        ),
    ]


# --------------------------------------------------------------------------- zero3
def zero3_step(stage: int, dry: bool, device: torch.device) -> dict:
    """SAPT-15 steps on a random LLaMA under the shipped ``zero{stage}`` config in this
    (started) process group: the median step time and the backbone's size."""
    from transformers import LlamaForCausalLM

    from sapt_dist import distributed
    from sapt_dist.backbone.load import llama_config
    from sapt_dist.config import AdapterConfig, resolve_ds_config
    from sapt_dist.method.model import SAPTModel

    dtype = "float32" if dry else "bfloat16"
    d, layers, ff, heads, vocab = (64, 2, 128, 4, 256) if dry else (2048, 22, 5632, 16, 32000)
    b, seq, steps, warm = (2, 32, 3, 1) if dry else (4, 512, 8, 3)
    config = distributed.engine_config(
        resolve_ds_config(f"zero{stage}"),
        micro_batch_size=b,
        grad_accum=1,
        max_grad_norm=1.0,
        dtype=dtype,
    )
    distributed.configure(config)
    torch.manual_seed(0)
    # no pad id: zero.Init cannot zero a padding row of a partitioned embedding
    cfg = llama_config(vocab, d, layers, heads, heads, ff, max_positions=2 * seq, pad_token_id=None)
    if stage == 3:
        import deepspeed

        with deepspeed.zero.Init(config_dict_or_path=config):
            backbone = LlamaForCausalLM(cfg)
    else:
        with torch.device(device):
            backbone = LlamaForCausalLM(cfg).to(getattr(torch, dtype))
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in backbone.parameters())
    model = SAPTModel(backbone, AdapterConfig(rank=4), n_slots=15)
    model.start_task(14)
    params = model.named_adapter_params()
    engine, _, _ = distributed.build_engine(
        model,
        list(params.values()),
        lr=1e-3,
        weight_decay=0.0,
        micro_batch_size=b,
        grad_accum=1,
        max_grad_norm=1.0,
        dtype=dtype,
    )
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (b, seq), generator=g).to(device)
    labels = ids.clone()
    labels[:, : seq // 2] = -100
    times = []
    for step in range(steps + warm):
        sync(device)
        t0 = time.perf_counter()
        out = engine(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)
        engine.backward(out.loss)
        engine.step()
        sync(device)
        if step >= warm:
            times.append(time.perf_counter() - t0)
    distributed.finish()
    return {"step_s": statistics.median(times), "params": n_params}


def zero3_worker(args: argparse.Namespace) -> None:
    """One process, one stage (the GPU measurement: each stage in a fresh process)."""
    from sapt_dist import distributed

    distributed.init()
    res = zero3_step(args.stage, args.dry, torch.device(args.device))
    Path(args.out).write_text(json.dumps(res))
    distributed.leave_together()


def part_zero3(s: Setup) -> list[Row]:
    if s.dry:  # the same steps in this process (CPU ZeRO-3 on one rank), to save seconds
        res = {stage: zero3_step(stage, True, s.device) for stage in (0, 3)}
    else:
        res = {stage: _zero3_in_own_process(stage, s) for stage in (0, 3)}
    ratio = res[3]["step_s"] / res[0]["step_s"]
    return [
        Row(
            "zero3",
            f"ZeRO-3 vs ZeRO-0, one process, {res[0]['params'] / 1e9:.2f}B random LLaMA, SAPT-15",
            res[3]["step_s"] * 1e3,
            res[0]["step_s"] * 1e3,
            ratio=ratio,
            target="<= 1.3x",
            ok=ratio <= 1.3 if not s.dry else None,
            note="shipped zero3.json vs zero0.json"
            + (", each in its own process" if not s.dry else " (dry: in this process)"),
        )
    ]


def _zero3_in_own_process(stage: int, s: Setup) -> dict:
    """``zero3_step`` in a fresh process (its own CUDA context, allocator and ZeRO state)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    with tempfile.TemporaryDirectory(prefix="gpu_bench_zero3_") as tmp:
        out = Path(tmp, "result.json")
        cmd = [sys.executable, __file__, "--worker-zero3", str(stage), "--worker-out", str(out)]
        proc = subprocess.run(
            [*cmd, "--device", str(s.device)], env=env, capture_output=True, text=True, timeout=600
        )
        if proc.returncode != 0:
            raise RuntimeError(f"zero{stage} worker failed: {proc.stderr[-2000:]}")
        return json.loads(out.read_text())


# --------------------------------------------------------------------------- main
PARTS = ("op", "step", "gen", "graph", "zero3")


def fmt(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry", action="store_true", help="CPU, tiny shapes, trace mode (seconds)")
    ap.add_argument("--device", default=None, help="default cuda (cpu with --dry)")
    ap.add_argument("--dtype", default=None, help="default bfloat16 (float32 with --dry)")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {PARTS}")
    ap.add_argument("--reps", type=int, default=None, help="timed calls (default 20, dry 2)")
    ap.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    ap.add_argument("--worker-zero3", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.device = args.device or ("cpu" if args.dry else "cuda")
    if args.worker_zero3 is not None:
        args.stage, args.out = args.worker_zero3, args.worker_out
        zero3_worker(args)
        return 0
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_bench: no CUDA here; `bash bench/gpu_bench.sh --dry` runs the CPU dry mode")
        return 2
    dtype = getattr(torch, args.dtype or ("float32" if args.dry else "bfloat16"))
    s = Setup(device, dtype, args.dry, args.reps or (1 if args.dry else 20), 1 if args.dry else 3)
    if args.dry:
        torch.set_num_threads(1)  # tiny shapes: a second OpenMP thread only waits
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        ap.error(f"unknown parts {unknown}; choose from {PARTS}")
    import transformers

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"# gpu_bench: {where}, torch {torch.__version__}, transformers "
        f"{transformers.__version__}, {str(dtype).replace('torch.', '')}, reps {s.reps}"
        f"{', DRY RUN (CPU, tiny shapes: times mean nothing)' if s.dry else ''}",
        flush=True,
    )
    rows: list[Row] = []
    failed: list[str] = []
    built = None
    t_all = time.perf_counter()
    for part in parts:
        t0 = time.perf_counter()
        try:
            if part in ("graph", "zero3") and not _have_deepspeed():
                rows.append(
                    Row(part, "skipped", note="deepspeed is not importable (see gpu_bench.sh)")
                )
                continue
            if part in ("step", "gen") and built is None:
                built = build_slice(s)
            if part == "op":
                rows += part_op(s)
            elif part == "step":
                rows += part_step(s, built)
            elif part == "gen":
                rows += part_gen(s, built)
            elif part == "graph":
                rows += part_graph(s)
            else:
                rows += part_zero3(s)
        except Exception as e:  # report and go on with the next part
            traceback.print_exc()
            failed.append(part)
            rows.append(Row(part, "FAILED", ok=False, note=f"{type(e).__name__}: {e}"[:160]))
        finally:
            if part == "gen" or (part == "step" and "gen" not in parts):
                built = None
            if device.type == "cuda":  # what a part left cached goes before the next one
                with contextlib.suppress(Exception):
                    torch.cuda.empty_cache()
        print(f"# {part}: {time.perf_counter() - t0:.1f} s", flush=True)
    if s.dry:  # tiny shapes on a CPU: no time says anything about a target
        for r in rows:
            if r.ok is not None and r.unit != "max rel diff" and r.case != "FAILED":
                r.ok = None
    print()
    print("| part | case | measured | reference | unit | ratio | target | ok | note |")
    print("|---|---|---:|---:|---|---:|---|---|---|")
    for r in rows:
        ok = "-" if r.ok is None else ("PASS" if r.ok else "FAIL")
        print(
            f"| {r.part} | {r.case} | {fmt(r.value)} | {fmt(r.ref)} | {r.unit} | "
            f"{fmt(r.ratio)}{'x' if r.ratio is not None else ''} | {r.target} | {ok} | {r.note} |"
        )
    missed = [f"{r.part}: {r.case}" for r in rows if r.ok is False and r.case != "FAILED"]
    print(
        f"\ngpu_bench: {time.perf_counter() - t_all:.0f} s; "
        f"{'parts failed: ' + ', '.join(failed) if failed else 'every part ran'}; "
        f"{len(missed)} target(s) missed"
    )
    return 1 if failed or (args.strict and missed) else 0


if __name__ == "__main__":
    sys.exit(main())
