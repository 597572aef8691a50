"""``sapt-plan``'s figures against what DeepSpeed ZeRO-3 and autograd really hold, on CPU.

Tiny random LLaMA backbones are wrapped in ``SAPTModel`` and trained one step under
``deepspeed.initialize`` (ZeRO-3, a torch AdamW, gloo) in 1 and 2 processes. Per rank it
measures, from the tensors themselves:

- backbone shard: ``p.ds_tensor`` bytes of every frozen parameter (plus the whole
  ``p.data`` of persistent ones, plus bitsandbytes' quantization constants with nf4);
- gathered working set: the most full-parameter bytes of the backbone available at once,
  sampled before and after every module's forward in the second step (after DeepSpeed has
  its trace, so prefetching and reuse are on);
- block stack: the bytes of the bank buffers (``A_bank``, ``B_bank``, ``key_bank``,
  ``targets``, slot masks);
- trainable + optimizer: the distinct storages of the optimizer's low-precision and fp32
  partitions, its gradient partition and AdamW's ``exp_avg`` / ``exp_avg_sq`` after the
  step (plus the whole data of persistent trainable parameters);
- activations: the distinct storages autograd saves during the forward
  (``torch.autograd.graph.saved_tensors_hooks``; parameters excluded), with and without
  gradient checkpointing, against the planner's ``saved`` term.

Then it prints planner vs measured per component with the relative error. Run from the
repository root (about a minute on 2 cores)::

    PYTHONPATH=. python bench/bench_plan.py                 # 1 and 2 processes
    PYTHONPATH=. python bench/bench_plan.py --markdown docs/plan_check.md
    PYTHONPATH=. python bench/bench_plan.py --quick         # one case, 2 processes

The worker is started with ``torchrun --standalone --nproc_per_node W`` and
``DS_ACCELERATOR=cpu OMP_NUM_THREADS=1``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sapt_dist.cluster.plan import (  # noqa: E402 (after the path set-up above)
    DeepSpeedKnobs,
    PlanInputs,
    activation_bytes,
    plan,
    shape_from_dict,
)


@dataclass(frozen=True)
class Case:
    """One tiny model and run setting."""

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    dtype: str = "bf16"
    quant: str = "none"
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    slots: int = 4
    rank: int = 4
    batch: int = 2
    seq: int = 48
    #: ZeRO-3 knobs (small, so the tiny model is really partitioned and released)
    knobs: DeepSpeedKnobs = DeepSpeedKnobs(
        prefetch_bucket_size=0,
        max_live_parameters=10**9,
        max_reuse_distance=0,
        param_persistence_threshold=0,
    )


CASES = [
    # first: DeepSpeed's linear replacement, once on, stays on in the process
    Case(
        "F: d64 L2 memory_efficient_linear off",
        64,
        176,
        2,
        4,
        2,
        512,
        knobs=DeepSpeedKnobs(0, 10**9, 0, 0, memory_efficient_linear=False),
    ),
    Case("A: d64 L2 GQA bf16", 64, 176, 2, 4, 2, 512),
    Case("B: d128 L3 fp32", 128, 344, 3, 8, 8, 1024, dtype="fp32"),
    Case(
        "C: d96 L4 all linears bf16",
        96,
        256,
        4,
        6,
        3,
        768,
        targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    ),
    Case("D: d64 L2 DeepSpeed defaults", 64, 176, 2, 4, 2, 512, knobs=DeepSpeedKnobs()),
    Case("E: d128 L2 nf4", 128, 344, 2, 4, 4, 512, quant="nf4"),
    Case("P: d256 L4 15 slots, 2 x 256 tokens", 256, 688, 4, 8, 4, 8192, slots=15, seq=256),
    Case(
        "G: d128 L3 prefetch + reuse on",
        128,
        344,
        3,
        8,
        8,
        1024,
        knobs=DeepSpeedKnobs(
            prefetch_bucket_size=40_000,
            max_live_parameters=10**9,
            max_reuse_distance=100_000,
            param_persistence_threshold=0,
        ),
    ),
    Case(
        "H: d128 L3 prefetch + reuse, max live 200k",
        128,
        344,
        3,
        8,
        8,
        1024,
        knobs=DeepSpeedKnobs(
            prefetch_bucket_size=40_000,
            max_live_parameters=200_000,
            max_reuse_distance=100_000,
            param_persistence_threshold=0,
        ),
    ),
    Case(
        "I: d128 L3 prefetch only",
        128,
        344,
        3,
        8,
        8,
        1024,
        knobs=DeepSpeedKnobs(
            prefetch_bucket_size=40_000,
            max_live_parameters=10**9,
            max_reuse_distance=0,
            param_persistence_threshold=0,
        ),
    ),
    Case(
        "J: d128 L3 reuse only",
        128,
        344,
        3,
        8,
        8,
        1024,
        knobs=DeepSpeedKnobs(
            prefetch_bucket_size=0,
            max_live_parameters=10**9,
            max_reuse_distance=100_000,
            param_persistence_threshold=0,
        ),
    ),
]


def plan_inputs(case: Case, shape, world: int, grad_ckpt: bool) -> PlanInputs:
    return PlanInputs(
        shape=shape,
        gpus_per_node=world,
        nodes=1,
        dtype=case.dtype,
        quant=case.quant,
        micro_batch=case.batch,
        seq_len=case.seq,
        slots=case.slots,
        generator_slot=True,
        rank=case.rank,
        targets=case.targets,
        query_hidden=100,
        grad_ckpt=grad_ckpt,
        padded=True,
        knobs=case.knobs,
    )


# --------------------------------------------------------------------------- worker
def _build(case: Case, tmp: Path):
    import torch
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    from sapt_dist.config import AdapterConfig
    from sapt_dist.method.model import SAPTModel

    dt = torch.bfloat16 if case.dtype == "bf16" else torch.float32
    if case.quant == "none":
        torch.manual_seed(0)
        backbone = LlamaForCausalLM(_hf_config(case)).to(dt)
    else:
        from transformers import BitsAndBytesConfig

        backbone = AutoModelForCausalLM.from_pretrained(
            _folder(case, tmp),
            dtype=dt,
            quantization_config=BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type=case.quant,
                bnb_4bit_compute_dtype=dt,
                bnb_4bit_quant_storage=dt,
            ),
        )
    adapter = AdapterConfig(rank=case.rank, target_modules=list(case.targets))
    model = SAPTModel(backbone, adapter, n_slots=case.slots, dtype=dt, generator_slot=True)
    return model, dt


def _folder(case: Case, tmp: Path) -> Path:
    return tmp / f"tiny-{case.hidden}-{case.layers}"


def _hf_config(case: Case):
    from sapt_dist.backbone.load import llama_config

    shape = (case.vocab, case.hidden, case.layers, case.heads, case.kv_heads)
    return llama_config(*shape, case.intermediate, 256, tie_word_embeddings=False)


def save_quantized_sources(names: list[str], tmp: Path) -> None:
    """Write the HF folders the 4-bit cases load (once, before any process group: loading
    with a quantization config is what the real run does)."""
    import torch
    from transformers import LlamaForCausalLM

    for case in CASES:
        if case.name in names and case.quant != "none":
            torch.manual_seed(0)
            LlamaForCausalLM(_hf_config(case)).save_pretrained(_folder(case, tmp))


def _batch(case: Case, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, case.vocab, (case.batch, case.seq), generator=g)
    am = torch.ones_like(ids)
    am[0, -5:] = 0  # right padding: the masked attention path, as in training
    labels = ids.clone()
    labels[:, : case.seq // 2] = -100
    labels[am == 0] = -100
    ids[am == 0] = 0
    return {"input_ids": ids, "attention_mask": am, "labels": labels}


class SavedTensors:
    """Distinct storages autograd saves inside the ``with`` block (parameters, including
    ZeRO-3-gathered ones, and buffers left out)."""

    def __init__(self, model) -> None:
        import torch

        self.model = model
        self.seen: dict[int, int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t):
        import torch

        if isinstance(t, torch.nn.Parameter):
            return t
        st = t.untyped_storage()
        ptr = st.data_ptr()
        if ptr in self.seen:
            return t
        if ptr in {b.untyped_storage().data_ptr() for b in self.model.buffers()}:
            return t
        # a view of a parameter (torch's linear saves ``weight.t()``): nothing new on a
        # plain model, but under ZeRO-3 it keeps the *gathered* copy alive until backward
        params = {p.data.untyped_storage().data_ptr(): p for p in self.model.parameters()}
        owner = params.get(ptr)
        if owner is not None and (
            not hasattr(owner, "ds_id")  # a plain parameter
            or owner.ds_tensor.untyped_storage().data_ptr() == ptr  # one rank: the partition
        ):
            return t
        self.seen[ptr] = st.nbytes()
        return t

    @property
    def bytes(self) -> int:
        return sum(self.seen.values())

    def __enter__(self):
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        return self._hooks.__exit__(*exc)


def _storages_bytes(tensors) -> int:
    seen = {}
    for t in tensors:
        if t is not None and hasattr(t, "untyped_storage") and t.numel() > 0:
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


def measure(case: Case, tmp: Path) -> dict:
    """One case in this process group: the five components, measured."""
    import deepspeed
    import torch
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    model, dt = _build(case, tmp)
    shape = shape_from_dict(model.backbone.config.to_dict(), name=case.name)
    model.train()
    k = case.knobs
    config = {
        "train_micro_batch_size_per_gpu": case.batch,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {
            "stage": 3,
            "stage3_prefetch_bucket_size": k.prefetch_bucket_size,
            "stage3_max_live_parameters": k.max_live_parameters,
            "stage3_max_reuse_distance": k.max_reuse_distance,
            "stage3_param_persistence_threshold": k.param_persistence_threshold,
            "memory_efficient_linear": k.memory_efficient_linear,
        },
        "bf16": {"enabled": dt == torch.bfloat16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }
    opt = torch.optim.AdamW(model.adapter_params(), lr=1e-3)
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    trainable = {id(p) for p in model.adapter_params()}
    frozen = [p for p in model.backbone.parameters() if id(p) not in trainable]

    peak = {"v": 0}

    def sample(*_args, **_kw):
        live = 0
        for p in frozen:
            if not p.ds_persist and p.ds_status == ZeroParamStatus.AVAILABLE:
                st = p.data.untyped_storage()
                # one rank: the gathered tensor is the partition itself, nothing new
                if st.data_ptr() != p.ds_tensor.untyped_storage().data_ptr():
                    live += p.data.numel() * p.data.element_size()
        peak["v"] = max(peak["v"], live)

    handles = []
    for m in model.modules():
        handles.append(m.register_forward_pre_hook(sample))
        handles.append(m.register_forward_hook(sample))
        handles.append(m.register_full_backward_hook(sample))
    acts = {}
    # step 0 records DeepSpeed's trace; step 1 is measured; step 2 with checkpointing
    for step in range(3):
        if step == 1:
            peak["v"] = 0
        if step == 2:
            for h in handles:
                h.remove()
            model.gradient_checkpointing_enable()
        with SavedTensors(model) as saved:
            out = engine(**_batch(case, step + 1))
        acts[step] = saved.bytes
        engine.backward(out.loss)
        engine.step()
        if step == 1:
            # persistent parameters are gathered at their first use and stay so
            sizes = _component_sizes(model, optimizer, frozen)
    engine.destroy()
    return {
        "shape": shape.__dict__,
        **sizes,
        "gathered": peak["v"],
        "act_saved": acts[1],
        "act_saved_ckpt": acts[2],
    }


def _component_sizes(model, optimizer, frozen) -> dict:
    backbone = 0
    quant = 0
    for p in frozen:
        backbone += p.ds_tensor.numel() * p.ds_tensor.element_size()
        if p.ds_persist:
            backbone += p.data.numel() * p.data.element_size()
        qs = getattr(p, "quant_state", None)
        if qs is not None:
            quant += _storages_bytes([qs.absmax, qs.code])
            if getattr(qs, "state2", None) is not None:
                quant += _storages_bytes([qs.state2.absmax, qs.state2.code])
    # SAPT's buffers (the backbone's own, e.g. RoPE's inv_freq, are no part of the stack)
    blocks = sum(
        b.numel() * b.element_size()
        for n, b in model.named_buffers()
        if n.endswith(("A_bank", "B_bank")) or n.startswith("router.") or n == "layer_current"
    )

    o = optimizer
    parts = [*o.fp16_partitioned_groups_flat, *o.fp32_partitioned_groups_flat]
    parts.append(getattr(o, "grad_partitions_flat_buffer", None))
    for st in o.optimizer.state.values():
        parts += [st.get("exp_avg"), st.get("exp_avg_sq")]
    train = _storages_bytes(parts)
    train += sum(
        p.data.numel() * p.data.element_size() for p in model.adapter_params() if p.ds_persist
    )
    return {
        "backbone_shard": backbone + quant,
        "quant_constants": quant,
        "block_stack": blocks,
        "trainable_optimizer": train,
    }


def worker(out: Path, names: list[str], tmp: Path) -> None:
    import deepspeed
    import torch

    from sapt_dist import distributed

    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    results = []
    for case in CASES:
        if case.name not in names:
            continue
        m = measure(case, tmp)
        # the largest figure over ranks (ranks differ only by padding)
        keys = [k for k in m if k != "shape"]
        t = torch.tensor([float(m[k]) for k in keys], dtype=torch.float64)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        m.update({k: int(v) for k, v in zip(keys, t.tolist())})
        results.append({"case": case.name, "world": world, **m})
        if rank == 0:
            print(f"  measured {case.name} on {world} process(es)", flush=True)
    if rank == 0:
        out.write_text(json.dumps(results, indent=1))
    distributed.leave_together()  # no rank exits while another still works (SIGABRT)


# --------------------------------------------------------------------------- peak
#: cases whose activation peak is measured (the others repeat these shapes)
PEAK_CASES = "ABCEP"


def measure_peak(case: Case, tmp: Path, ckpt: bool) -> int:
    """Peak bytes allocated above the start during one forward + backward of the plain
    model (no DeepSpeed), from the profiler's allocation timeline (every tensor the CPU
    allocator creates and frees, intra-op temporaries included)."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action

    model, _ = _build(case, tmp)
    model.train()
    if ckpt:
        model.gradient_checkpointing_enable()
    batch = _batch(case, 0)

    def step():
        for p in model.parameters():
            p.grad = None
        out = model(**batch)  # held through backward, as the trainer does (its logits)
        out.loss.backward()

    step()  # one-time allocations (RoPE cache, ...) out of the way
    with profile(
        activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True
    ) as prof:
        step()
    cur = peak = 0
    for _t, action, _key, size in prof._memory_profile().timeline:
        if action == Action.CREATE:
            cur += size
        elif action == Action.DESTROY:
            cur -= size
        peak = max(peak, cur)
    return peak


def peak_rows(names: list[str], tmp: Path) -> list[dict]:
    """Planner's activation peak vs the profiler's, plain torch (DeepSpeed's linear
    replacement off: the planner's ``held_weights`` are then views of the weights, no
    new memory, and are left out)."""
    rows = []
    for case in CASES:
        if case.name not in names or case.name[0] not in PEAK_CASES:
            continue
        for ckpt in (False, True):
            meas = measure_peak(case, tmp, ckpt)
            model, _ = _build(case, tmp)
            shape = shape_from_dict(model.backbone.config.to_dict(), name=case.name)
            knobs = replace(case.knobs, memory_efficient_linear=False)
            a = activation_bytes(replace(plan_inputs(case, shape, 1, ckpt), knobs=knobs))
            pred = a["peak"] - a["held_weights"]
            label = f"activation peak, {'ckpt' if ckpt else 'no ckpt'} (plain torch)"
            rows.append(
                {
                    "case": case.name,
                    "world": 1,
                    "component": label,
                    "planner": pred,
                    "measured": meas,
                    "rel_error": (pred - meas) / meas,
                }
            )
            print(f"  peak of {case.name}, checkpointing {ckpt}: {meas:,} bytes", flush=True)
    return rows


# --------------------------------------------------------------------------- driver
COMPONENTS = [
    ("backbone_shard", "backbone shard"),
    ("gathered", "gathered working set"),
    ("block_stack", "block stack (replicated)"),
    ("trainable_optimizer", "trainable + optimizer"),
    ("act_saved", "activations saved, no ckpt"),
    ("act_saved_ckpt", "activations saved, ckpt"),
]


def predicted(case: Case, shape_dict: dict, world: int) -> dict:
    from sapt_dist.cluster.plan import ModelShape

    shape = ModelShape(**shape_dict)
    p = plan(plan_inputs(case, shape, world, grad_ckpt=False))
    a = activation_bytes(plan_inputs(case, shape, world, grad_ckpt=False))
    a_ck = activation_bytes(plan_inputs(case, shape, world, grad_ckpt=True))
    out = {
        k: p["bytes"][k]
        for k in ("backbone_shard", "gathered", "block_stack", "trainable_optimizer")
    }
    out["act_saved"] = a["saved"]
    out["act_saved_ckpt"] = a_ck["saved"]
    return out


def run_world(world: int, names: list[str], tmp: Path) -> list[dict]:
    out = tmp / f"measured-{world}.json"
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={world}",
        str(Path(__file__).resolve()),
        "--worker",
        str(out),
        "--cases",
        json.dumps(names),
    ]
    print(f"running {world} process(es): {len(names)} case(s)", flush=True)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0 or not out.is_file():
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"the {world}-process measurement failed (exit {proc.returncode})")
    return json.loads(out.read_text())


def compare(measured: list[dict]) -> list[dict]:
    by_name = {c.name: c for c in CASES}
    rows = []
    for m in measured:
        case = by_name[m["case"]]
        pred = predicted(case, m["shape"], m["world"])
        for key, label in COMPONENTS:
            meas, p = m[key], pred[key]
            err = (p - meas) / meas if meas else (0.0 if p == 0 else float("inf"))
            rows.append(
                {
                    "case": m["case"],
                    "world": m["world"],
                    "component": label,
                    "planner": p,
                    "measured": meas,
                    "rel_error": err,
                }
            )
    return rows


def to_markdown(rows: list[dict]) -> str:
    lines = [
        "| case | procs | component | planner (bytes) | measured (bytes) | error |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['world']} | {r['component']} | {r['planner']:,} | "
            f"{r['measured']:,} | {100 * r['rel_error']:+.2f}% |"
        )
    return "\n".join(lines)


def to_summary(rows: list[dict]) -> str:
    """One row per case, one column per component: the relative error per process count."""
    cases = list(dict.fromkeys(r["case"] for r in rows))
    worlds = sorted({r["world"] for r in rows})
    cell = {(r["case"], r["component"], r["world"]): r["rel_error"] for r in rows}
    labels = list(dict.fromkeys(r["component"] for r in rows))
    head = f"| case | {' | '.join(labels)} |"
    lines = [head, "|---" * (len(labels) + 1) + "|"]
    for c in cases:
        vals = []
        for lab in labels:
            errs = [cell.get((c, lab, w)) for w in worlds]
            vals.append(" / ".join("-" if e is None else f"{100 * e:+.1f}%" for e in errs))
        lines.append(f"| {c} | {' | '.join(vals)} |")
    procs = " / ".join(str(w) for w in worlds)
    return "\n".join(lines) + f"\n\n(planner - measured) / measured, for {procs} process(es)."


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--cases", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="case A only, 2 processes")
    ap.add_argument(
        "--only", help="run the cases whose name starts with one of these letters (e.g. GHI)"
    )
    ap.add_argument("--worlds", default="1,2", help="process counts (default 1,2)")
    ap.add_argument("--markdown", help="also write the comparison table here")
    ap.add_argument("--json", help="also write the rows as JSON here")
    args = ap.parse_args(argv)
    if args.worker:
        worker(Path(args.worker), json.loads(args.cases), Path(args.worker).parent)
        return 0
    names = [CASES[1].name] if args.quick else [c.name for c in CASES]
    if args.only:
        names = [n for n in names if n[0] in args.only]
    worlds = [2] if args.quick else [int(w) for w in args.worlds.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        save_quantized_sources(names, Path(tmp))
        measured = [m for w in worlds for m in run_world(w, names, Path(tmp))]
    rows = compare(measured)
    if not args.quick:
        with tempfile.TemporaryDirectory() as tmp:
            save_quantized_sources(names, Path(tmp))
            rows += peak_rows(names, Path(tmp))
    md = to_markdown(rows)
    print(md)
    worst = max(abs(r["rel_error"]) for r in rows)
    print(f"\nlargest relative error: {100 * worst:.2f}% (CPU, torch + DeepSpeed on gloo)")
    summary = to_summary(rows)
    print("\n" + summary)
    if args.markdown:
        Path(args.markdown).write_text(summary + "\n\n" + md + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
