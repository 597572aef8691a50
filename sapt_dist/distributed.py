"""Everything that knows about DeepSpeed and torch.distributed lives here.

Model code calls :func:`gathered` around reads or writes of parameters that ZeRO-3 may
have partitioned; it does nothing when DeepSpeed is not in use, and deepspeed is imported
only when a partitioned parameter is actually seen.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator

import torch

__all__ = [
    "any_rank",
    "barrier",
    "gathered",
    "init",
    "is_main_process",
    "is_partitioned",
    "launch_env",
    "rank",
    "slurm_hostnames",
    "world_size",
]


def is_partitioned(p: torch.Tensor) -> bool:
    """True for a parameter that ZeRO-3 has partitioned across ranks."""
    return hasattr(p, "ds_id")


@contextlib.contextmanager
def gathered(params: Iterable[torch.Tensor], modify: bool = False) -> Iterator[None]:
    """Gather ZeRO-3-partitioned ``params`` for the block; no-op otherwise.

    With ``modify=True`` rank 0's in-place changes are scattered back to every rank
    afterwards (so all ranks must run the same code, which they do in this project).
    """
    params = [p for p in params if is_partitioned(p)]
    if not params:
        yield
        return
    import deepspeed  # only reached under ZeRO-3

    with deepspeed.zero.GatheredParameters(params, modifier_rank=0 if modify else None):
        yield


def rank() -> int:
    """This process's rank (before :func:`init` too, from the launcher's variables)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK") or launch_env().get("RANK", "0"))


def world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return int(os.environ.get("WORLD_SIZE") or launch_env().get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return rank() == 0


def any_rank(flag: bool) -> bool:
    """True on every rank if ``flag`` is true on any rank (collective when several ranks
    run: every rank must call it at the same point). Lets all ranks agree to stop after
    the same step when a signal reached only some of them."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    # NCCL reduces only CUDA tensors; gloo (CPU) only CPU ones
    device = (
        torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    )
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def barrier() -> None:
    """Wait for every rank (no-op in one process)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        # an all-reduce: the same device choice as any_rank on gloo and NCCL alike
        any_rank(False)


# --------------------------------------------------------------------------- process group
def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slurm_hostnames(nodelist: str) -> list[str]:
    """Expand a SLURM node list (``node[01-03,07],gpu5``) without calling ``scontrol``."""
    import re

    hosts: list[str] = []
    for m in re.finditer(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist):
        prefix, ranges = m.group(1), m.group(2)
        if ranges is None:
            hosts.append(prefix)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            if not hi:
                hosts.append(prefix + lo)
            else:
                hosts += [prefix + str(i).zfill(len(lo)) for i in range(int(lo), int(hi) + 1)]
    return hosts


def launch_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The torch.distributed variables this process should run with.

    - torchrun and the ``deepspeed`` launcher set RANK / WORLD_SIZE / LOCAL_RANK /
      MASTER_ADDR / MASTER_PORT themselves: kept as they are.
    - ``srun`` (one task per process) sets SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID:
      they become RANK / WORLD_SIZE / LOCAL_RANK; MASTER_ADDR is the job's first node and
      MASTER_PORT is derived from the job id (same on every node, no rendezvous file),
      unless the batch script exported them.
    - a plain ``python`` start: one process on a free local port.
    """
    env = dict(os.environ if environ is None else environ)
    if "RANK" in env and "WORLD_SIZE" in env:
        return {}
    # SLURM_STEP_NUM_TASKS is set inside an ``srun`` step, not in the batch script itself
    if "SLURM_PROCID" in env and "SLURM_STEP_NUM_TASKS" in env:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "127.0.0.1")
        job = int(env.get("SLURM_JOB_ID", "0") or 0)
        return {
            "RANK": env["SLURM_PROCID"],
            "WORLD_SIZE": env["SLURM_STEP_NUM_TASKS"],
            "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
            "MASTER_ADDR": env.get("MASTER_ADDR") or slurm_hostnames(nodelist)[0],
            "MASTER_PORT": env.get("MASTER_PORT") or str(20000 + job % 20000),
        }
    return {
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
    }


def init() -> None:
    """Initialise torch.distributed through DeepSpeed, from whichever launcher started us
    (see :func:`launch_env`: torchrun, ``deepspeed``, ``srun`` or none)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return
    os.environ.update(launch_env())
    # several CPU ranks on one machine: one thread each unless told otherwise
    # (the deepspeed launcher does not set OMP_NUM_THREADS; torchrun does)
    cpu_ranks = int(os.environ["WORLD_SIZE"]) > 1 and not torch.cuda.is_available()
    if cpu_ranks and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)
    import deepspeed

    deepspeed.init_distributed(verbose=False)


def _lr_lambda(schedule: str, warmup: int, total: int):
    import math

    def f(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


def build_engine(
    model: torch.nn.Module,
    params: list[torch.nn.Parameter] | list[dict],
    *,
    lr: float,
    weight_decay: float,
    micro_batch_size: int,
    grad_accum: int,
    max_grad_norm: float | None,
    schedule: str,
    warmup_steps: int,
    total_steps: int,
    dtype: str,
    zero_stage: int = 0,
    ds_config: dict | None = None,
):
    """A DeepSpeed engine training ``params`` of ``model`` (one per block trained).

    ``params`` is a list of parameters or of torch param groups (``{"params", "lr"}``).

    DeepSpeed does the gradient accumulation (it scales the loss by 1/grad_accum in
    ``backward`` and steps on the boundaries), clipping and bf16. A torch AdamW is passed
    in (``zero_allow_untested_optimizer``) so no CPU Adam extension has to be compiled.
    """
    import deepspeed

    init()
    config = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": float(max_grad_norm or 0.0),
        "zero_optimization": {"stage": zero_stage},
        "bf16": {"enabled": dtype == "bfloat16"},
        "fp16": {"enabled": dtype == "float16"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if ds_config:
        config.update({k: v for k, v in ds_config.items() if k not in ("optimizer", "scheduler")})
        config["train_micro_batch_size_per_gpu"] = micro_batch_size
        config["gradient_accumulation_steps"] = grad_accum
        config.pop("train_batch_size", None)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(schedule, warmup_steps, total_steps))
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=opt, lr_scheduler=sched, config=config
    )
    return engine, optimizer, scheduler


# --------------------------------------------------------------------------- state files
def flatten_state(obj, prefix: str = "s") -> tuple[object, dict[str, torch.Tensor]]:
    """Split a nested state (dicts, lists, tensors, JSON scalars) into a JSON skeleton and
    a flat dict of tensors, so optimizer / RNG state is stored with safetensors + JSON and
    read back without unpickling anything."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(o, key):
        if isinstance(o, torch.Tensor):
            tensors[key] = o.detach().cpu().contiguous()
            return {"__tensor__": key}
        if isinstance(o, dict):
            return {
                "__dict__": [
                    [walk(k, f"{key}.k{i}"), walk(v, f"{key}.{i}")]
                    for i, (k, v) in enumerate(o.items())
                ]
            }
        if isinstance(o, (list, tuple)):
            return {
                "__list__": [walk(v, f"{key}.{i}") for i, v in enumerate(o)],
                "tuple": isinstance(o, tuple),
            }
        if o is None or isinstance(o, (bool, int, float, str)):
            return o
        raise TypeError(f"cannot store {type(o).__name__} at {key} in a checkpoint")

    return walk(obj, prefix), tensors


def unflatten_state(skeleton, tensors: dict[str, torch.Tensor]):
    def walk(o):
        if isinstance(o, dict):
            if "__tensor__" in o:
                return tensors[o["__tensor__"]]
            if "__dict__" in o:
                return {walk(k): walk(v) for k, v in o["__dict__"]}
            if "__list__" in o:
                items = [walk(v) for v in o["__list__"]]
                return tuple(items) if o.get("tuple") else items
        return o

    return walk(skeleton)


def release_engine(engine) -> None:
    """Detach a finished block's engine from the model: each ``deepspeed.initialize``
    registers forward hooks on the module, and one engine per block would pile them up."""
    for name in ("module_forward_pre_hook", "module_forward_post_hook"):
        handle = getattr(engine, name, None)
        if handle is not None:
            handle.remove()
            setattr(engine, name, None)
    engine.destroy()
