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

__all__ = ["gathered", "is_partitioned", "rank", "world_size", "is_main_process"]


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
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return rank() == 0


# --------------------------------------------------------------------------- process group
def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init() -> None:
    """Initialise torch.distributed through DeepSpeed (one process when not launched).

    A launcher (torchrun, srun, deepspeed) sets RANK / WORLD_SIZE / MASTER_ADDR; a plain
    ``python`` start gets a one-process group on a free local port.
    """
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return
    if "RANK" not in os.environ:
        os.environ.update(
            RANK="0",
            WORLD_SIZE="1",
            LOCAL_RANK="0",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(_free_port()),
        )
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
