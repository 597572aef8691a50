"""The one module that imports DeepSpeed (private: use :mod:`sapt_dist.distributed`).

Model code calls :func:`gathered` around reads or writes of parameters that ZeRO-3 may
have partitioned; it does nothing when DeepSpeed is not in use, and deepspeed is imported
only when a partitioned parameter is actually seen.

Under ZeRO-3 (:func:`configure` with a stage-3 config, before the backbone loads):

- the frozen backbone is partitioned as it loads (``HfDeepSpeedConfig`` makes
  ``from_pretrained`` run under ``zero.Init``; a 4-bit backbone is loaded whole, 4-bit, on
  each rank and partitioned by ``deepspeed.initialize``, the QLoRA + ZeRO-3 recipe);
- the trainable tensors (the current block, the key, the query network) are *partitioned*
  too: DeepSpeed shards their fp32 master copies, gradients and AdamW moments like any
  trainable parameter, and :func:`full_optimizer_state` reassembles them world-size
  independently for checkpoints;
- the banks of filed blocks, the stored keys and the ARM targets are *buffers, replicated*
  on every rank on purpose: every forward reads all of them (the mixture runs over every
  slot), they are small next to one layer of the backbone (15 slots of rank-4 q/v blocks
  on LLaMA-2 13B: 0.2 GB in bf16), and replicating them keeps the fused mixture a plain
  local matmul with no gather in its path;
- forward passes outside training (evaluation, pseudo-samples, routing) need DeepSpeed's
  parameter hooks: the last training engine keeps them installed until the next one is
  built, and :func:`ready_for_inference` installs them (an engine without optimizer)
  when no engine has been built yet.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from sapt_dist.config import ConfigError, resolve_ds_config
from sapt_dist.distributed import watchdog
from sapt_dist.distributed.launch import (
    close,
    collective_timeout,
    launch_env,
    peak_memory_mb,
    rank,
    set_timeout,
    world_size,
)

log = logging.getLogger(__name__)

#: torch's own F.linear: ZeRO-3 (memory_efficient_linear) swaps in its own for the process
_TORCH_LINEAR = torch.nn.functional.linear


class _Zero:
    """Process-wide DeepSpeed state (DeepSpeed's own ZeRO-3 machinery is process-wide too)."""

    config: dict | None = None  # the engine config of this run (set by configure())
    hf_config: Any = None  # HfDeepSpeedConfig: transformers holds only a weak reference
    active: Any = None  # the engine whose ZeRO-3 hooks are on the model


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


def gather_in_forward(module: torch.nn.Module, params: Iterable[torch.nn.Parameter]) -> None:
    """Under ZeRO-3, have ``module``'s forward and backward gather ``params`` although
    another module owns them (DeepSpeed's external parameters): a loss term computed from
    parameters after the model's forward (``method.penalties``) needs their full values
    and their gradients. A no-op otherwise."""
    if not zero3_enabled():
        return
    import deepspeed

    for p in params:
        deepspeed.zero.register_external_parameter(module, p)


def init(timeout_s: float | None = None) -> None:
    """Initialise torch.distributed through DeepSpeed, from whichever launcher started us
    (see :func:`launch_env`: torchrun, ``deepspeed``, ``srun`` or none).

    ``timeout_s`` (default: the run's ``distributed.timeout_s``, recorded by
    :func:`run_engine_config`): the process group's collective timeout, and how long the
    heartbeat :mod:`~sapt_dist.distributed.watchdog` waits for a silent peer before it
    ends this rank with a message naming the peer (exit 69)."""
    if timeout_s is not None:
        set_timeout(timeout_s)
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return
    os.environ.update(launch_env())
    if torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR") != "cpu":
        # each rank its own GPU before anything allocates: a 4-bit backbone loads onto
        # the current device (transformers skips zero.Init for it), and NCCL collectives
        # before the first engine (barriers) need distinct devices
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    # several CPU ranks on one machine: one thread each unless told otherwise
    # (the deepspeed launcher does not set OMP_NUM_THREADS; torchrun does)
    cpu_ranks = int(os.environ["WORLD_SIZE"]) > 1 and not torch.cuda.is_available()
    if cpu_ranks and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)
    guard_op_build_lock()
    import sys

    import deepspeed

    timeout = collective_timeout()
    # DeepSpeed print()s its op build; stdout is for results (sapt-predict writes JSONL there)
    with contextlib.redirect_stdout(sys.stderr):
        deepspeed.init_distributed(verbose=False, timeout=timedelta(seconds=timeout))
    atexit.register(close)
    world = torch.distributed.get_world_size()
    if world > 1:
        addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
        watchdog.start(torch.distributed.get_rank(), world, addr, port, timeout)
        # where every rank runs, in one line of rank 0's log (a collective: every rank is here)
        hosts: list[str | None] = [None] * world
        torch.distributed.all_gather_object(hosts, _host_and_address(addr, port))
        log.info(
            "%d ranks: %s; master %s:%d; collective timeout %g s (distributed.timeout_s)",
            world,
            ", ".join(f"rank {r} on {h}" for r, h in enumerate(hosts)),
            addr,
            port,
            timeout,
        )


def _host_and_address(master: str, port: int) -> str:
    import socket

    from sapt_dist.distributed.watchdog import _own_address

    return f"{socket.gethostname()} ({_own_address(master, port)})"


#: DeepSpeed's CPU communication op, built (once per machine) when the process group starts
SHM_OP = "deepspeed_shm_comm"


def guard_op_build_lock(stale_after: float | None = None, poll: float = 2.0) -> None:
    """Never hang on a dead build's lock.

    DeepSpeed builds (or checks) its CPU ``deepspeed_shm_comm`` op under torch's file lock
    ``<torch extensions folder>/deepspeed_shm_comm/lock``, and torch waits for that file to
    go away forever. A process killed during the build (about a minute on a first start)
    leaves it behind, and every later start on the machine would hang. A live build holds
    it for a minute or two: here a lock is waited for (with a message) while it is younger
    than ``stale_after`` seconds (``SAPT_OP_LOCK_STALE_S``, default 600), then removed as a
    dead build's, with a warning naming it. No-op on GPU machines (the op is CPU-only).
    """
    if torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR") != "cpu":
        return

    from torch.utils.cpp_extension import _get_build_directory

    if stale_after is None:
        stale_after = float(os.environ.get("SAPT_OP_LOCK_STALE_S", "600"))
    lock = Path(_get_build_directory(SHM_OP, verbose=False)) / "lock"
    told = 0.0
    while True:
        try:
            age = time.time() - lock.stat().st_mtime
        except FileNotFoundError:
            return
        if age >= stale_after:
            log.warning(
                "removing %s: a lock %.0f s old is left by a DeepSpeed op build that was "
                "killed (a build takes about a minute); the op is built again",
                lock,
                age,
            )
            lock.unlink(missing_ok=True)
            return
        from sapt_dist.distributed import preemption

        if preemption.requested_locally():  # SIGTERM / SIGUSR1 while waiting: leave now
            raise preemption.Preempted(f"while waiting for {lock}")
        if time.time() - told >= 30:
            log.warning(
                "waiting for %s (another process is building DeepSpeed's CPU op, %.0f s so "
                "far); a lock older than %.0f s is treated as a dead build's and removed",
                lock,
                age,
                stale_after,
            )
            told = time.time()
        time.sleep(poll)


def zero_stage(ds_config: dict | None = None) -> int:
    """ZeRO stage of ``ds_config`` (default: the configured run's)."""
    cfg = ds_config if ds_config is not None else (_Zero.config or {})
    return int(cfg.get("zero_optimization", {}).get("stage", 0))


def zero3_enabled() -> bool:
    return zero_stage() == 3


def engine_config(
    ds_config: dict | None,
    *,
    micro_batch_size: int,
    grad_accum: int,
    max_grad_norm: float | None,
    dtype: str,
) -> dict:
    """The run's DeepSpeed config: the file's keys over defaults derived from the run config.

    The batch sizes always come from ``train.*``; ``optimizer`` / ``scheduler`` are dropped
    (the trainer passes its own torch AdamW and schedule, so no DeepSpeed CPU-Adam extension
    is compiled, and so ZeRO-Offload of the *optimizer*, which needs DeepSpeed's own
    optimizer, is refused with a clear message rather than half-applied).
    """
    config: dict = {
        "gradient_clipping": float(max_grad_norm or 0.0),
        "zero_optimization": {"stage": 0},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    for k, v in (ds_config or {}).items():
        if k not in ("optimizer", "scheduler", "train_batch_size"):
            config[k] = v
    config["train_micro_batch_size_per_gpu"] = micro_batch_size
    config["gradient_accumulation_steps"] = grad_accum
    config["bf16"] = {**config.get("bf16", {}), "enabled": dtype == "bfloat16"}
    config["fp16"] = {**config.get("fp16", {}), "enabled": dtype == "float16"}
    if dtype == "bfloat16" and zero_stage(config) == 0:
        # DeepSpeed 0.19 wraps a client optimizer at stage 0 + bf16 in its fp16 "unfused"
        # optimizer, whose steps differ from AdamW on fp32 masters (measured: 2% loss apart
        # after one step on a toy model, while stages 1-3 match a plain fp32-master AdamW
        # exactly). ZeRO-2 keeps fp32 masters the standard way (stage 1 + bf16 goes to
        # DeepSpeed's BF16_Optimizer, whose per-parameter optimizer-state view is missing
        # after a step); on one process it shards nothing, on several only the (tiny)
        # optimizer state and gradients of the trained block.
        config["zero_optimization"] = {**config["zero_optimization"], "stage": 2}
    offload = config["zero_optimization"].get("offload_optimizer", {}).get("device", "none")
    if offload not in (None, "none"):
        raise ValueError(
            "offload_optimizer needs DeepSpeed's own optimizer, which this trainer does not "
            "use (its optimizer state is tiny: one LoRA block); offload the frozen backbone "
            "with zero_optimization.offload_param instead (ds_configs/zero3_offload.json)"
        )
    return config


def run_engine_config(cfg) -> dict:
    """:func:`engine_config` of a :class:`~sapt_dist.config.RunConfig` (``ConfigError``
    naming ``distributed.deepspeed_config`` when its file is unusable).

    Also records ``distributed.timeout_s`` for :func:`init`: the run reads its
    distributed settings here, once, before the process group starts."""
    timeout = getattr(cfg.distributed, "timeout_s", None)
    if timeout is not None:
        try:
            set_timeout(timeout)
        except ValueError as e:
            raise ConfigError(f"config key 'distributed.timeout_s': {e}") from e
    t = cfg.train
    try:
        return engine_config(
            resolve_ds_config(cfg.distributed.deepspeed_config),
            micro_batch_size=t.micro_batch_size,
            grad_accum=t.grad_accum,
            max_grad_norm=t.max_grad_norm,
            dtype=cfg.model.dtype,
        )
    except ValueError as e:
        raise ConfigError(f"config key 'distributed.deepspeed_config': {e}") from e


def configure(config: dict) -> None:
    """Fix the run's engine config (from :func:`engine_config`) before the backbone loads.

    Under ZeRO-3 this makes ``from_pretrained`` partition the weights as they load.
    """
    _Zero.config = config
    if zero_stage(config) == 3:
        from transformers.integrations import HfDeepSpeedConfig

        _Zero.hf_config = HfDeepSpeedConfig(config)
    else:
        _Zero.hf_config = None


def _activate(engine) -> None:
    """Make ``engine`` the one whose hooks are on the model (retiring the previous one)."""
    if _Zero.active is not None and _Zero.active is not engine:
        _Zero.active.destroy()
    _Zero.active = engine


def build_engine(
    model: torch.nn.Module,
    params: list[torch.nn.Parameter] | list[dict],
    *,
    lr: float,
    weight_decay: float,
    micro_batch_size: int,
    grad_accum: int,
    max_grad_norm: float | None,
    lr_lambda: Callable[[int], float] | None = None,
    dtype: str,
    ds_config: dict | None = None,
):
    """A DeepSpeed engine training ``params`` of ``model`` (one per block trained).

    ``params`` is a list of parameters or of torch param groups (``{"params", "lr"}``);
    ``ds_config``: the run's file (see :func:`engine_config`; default: the configured one).

    DeepSpeed does the gradient accumulation (it scales the loss by 1/grad_accum in
    ``backward`` and steps on the boundaries), clipping, bf16 and ZeRO partitioning. A
    torch AdamW is passed in (``zero_allow_untested_optimizer``) so no CPU Adam extension
    has to be compiled.
    """
    import deepspeed

    init()
    if ds_config is None and _Zero.config is not None:
        ds_config = _Zero.config
    config = engine_config(
        ds_config,
        micro_batch_size=micro_batch_size,
        grad_accum=grad_accum,
        max_grad_norm=max_grad_norm,
        dtype=dtype,
    )
    if zero_stage(config) == 3 and not zero3_enabled():
        configure(config)
    # the previous block's engine (kept for its ZeRO-3 hooks) goes before a new one hooks in
    _activate(None)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    # the schedule is the trainer's (``lr_lambda``: step -> factor); constant when None
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda or (lambda step: 1.0))
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=opt, lr_scheduler=sched, config=config
    )
    _activate(engine)
    return engine, optimizer, scheduler


def ready_for_inference(model: torch.nn.Module) -> None:
    """Under ZeRO-3, make sure DeepSpeed's parameter hooks are on ``model`` so that plain
    forward / ``generate`` calls gather the partitioned weights (no-op otherwise)."""
    if not zero3_enabled():
        return
    active = _Zero.active
    if active is not None and active.module is model:
        return
    import deepspeed

    config = dict(_Zero.config or {})
    config.setdefault("train_micro_batch_size_per_gpu", 1)
    _activate(None)
    engine, *_ = deepspeed.initialize(model=model, config=config)
    _activate(engine)


def finish() -> None:
    """Retire the last engine and forget the run's DeepSpeed config (end of a run), so a
    later model in the same process does not load under ZeRO-3 by accident."""
    _activate(None)
    _Zero.config = None
    _Zero.hf_config = None
    # ZeRO-3 replaced F.linear process-wide with a version that saves every input for
    # backward; with no ZeRO-3 engine left, later models in this process get torch's back
    torch.nn.functional.linear = _TORCH_LINEAR


def shard_report(module: torch.nn.Module) -> dict:
    """What this rank holds of ``module``: per parameter, its full and local element count
    from DeepSpeed's own bookkeeping (``ds_numel`` / ``ds_tensor``), whether it trains, and
    the bytes of replicated buffers (the block banks)."""
    params = {}
    for name, p in module.named_parameters():
        if is_partitioned(p):
            full, local = int(p.ds_numel), int(p.ds_tensor.numel())
            size = p.ds_tensor.element_size()
        else:
            full = local = p.numel()
            size = p.element_size()
        params[name] = {
            "full": full,
            "local": local,
            "bytes": local * size,
            "train": p.requires_grad,
        }
    buffers = sum(b.numel() * b.element_size() for b in module.buffers())
    return {
        "rank": rank(),
        "world": world_size(),
        "zero_stage": zero_stage(),
        "params": params,
        "buffer_bytes": buffers,
        **peak_memory_mb(),
    }


def _inner_torch_optimizer(optimizer) -> torch.optim.Optimizer:
    """The torch AdamW doing the update, inside DeepSpeed's wrappers (ZeRO, bf16)."""
    inner = optimizer
    while not isinstance(inner, torch.optim.AdamW) and hasattr(inner, "optimizer"):
        inner = inner.optimizer
    return inner


def full_optimizer_state(
    optimizer, params: dict[str, torch.nn.Parameter]
) -> tuple[dict[str, torch.Tensor], dict]:
    """World-size-independent training state of ``params``: full fp32 master values and
    AdamW moments per parameter name (``None`` for a parameter that has had no gradient
    yet, e.g. the router while only one slot is active), and the step count. Collective
    under ZeRO-3.

    The same form comes out of ZeRO 0-3 and bf16, so a run saved by N ranks resumes on M.
    """
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    inner = _inner_torch_optimizer(optimizer)
    steps = [float(st["step"]) for st in inner.state.values() if "step" in st]
    masters: dict[str, torch.Tensor] = {}
    moments: dict[str, dict[str, torch.Tensor | None]] = {"exp_avg": {}, "exp_avg_sq": {}}
    for name, p in params.items():
        master = safe_get_full_fp32_param(p)
        if master is None:  # plain fp32 stage 0: the torch optimizer updates p itself
            st = inner.state.get(p, {})
            masters[name] = p.detach().float().cpu().clone()
            for k in moments:
                moments[k][name] = st[k].detach().float().cpu().clone() if k in st else None
            continue
        masters[name] = master.detach().float().cpu().clone()
        for k in moments:
            if not steps:  # before the first step there are no moments (same on every rank)
                moments[k][name] = None
                continue
            try:
                m = safe_get_full_optimizer_state(p, k)
            except ValueError:  # ZeRO-1/2 link no state to a parameter never stepped
                m = None
            moments[k][name] = None if m is None else m.detach().float().cpu().clone()
    return masters, {"step": int(max(steps)) if steps else 0, **moments}


def load_full_optimizer_state(
    optimizer,
    params: dict[str, torch.nn.Parameter],
    masters: dict[str, torch.Tensor],
    state: dict,
) -> None:
    """Put :func:`full_optimizer_state`'s output back (every rank; collective under ZeRO-3)."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    # the model's (possibly low-precision, possibly partitioned) weights first ...
    with torch.no_grad(), gathered(list(params.values()), modify=True):
        for name, p in params.items():
            p.copy_(masters[name].to(p))
    inner = _inner_torch_optimizer(optimizer)
    # torch's AdamW creates its state lazily at the first step: create it now, for the
    # tensors it will step (DeepSpeed's flat fp32 partitions under ZeRO / bf16); a tensor
    # that gets no gradient is skipped by AdamW whatever its state says
    for q in _stepped_tensors(optimizer, inner):
        st = inner.state[q]
        st["step"] = torch.tensor(float(state["step"]))
        for k in ("exp_avg", "exp_avg_sq"):
            if k not in st:
                st[k] = torch.zeros_like(q, memory_format=torch.preserve_format)
    link = getattr(optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if link is not None:  # ZeRO-1/2 and bf16 map each parameter onto that state lazily
        link()
    for name, p in params.items():
        if safe_get_fp32_mapping(p):
            # ... then the fp32 master copies and moments DeepSpeed keeps (exact fp32)
            safe_set_full_fp32_param(p, masters[name].to(torch.float32))
            for k in ("exp_avg", "exp_avg_sq"):
                m = state[k][name]
                # None: no gradient yet, i.e. zero moments (a rollback must clear them)
                m = (
                    torch.zeros(p.ds_shape if hasattr(p, "ds_shape") else p.shape)
                    if m is None
                    else m
                )
                # ZeRO-1/2 link no state to a parameter never stepped
                with contextlib.suppress(ValueError):
                    safe_set_full_optimizer_state(p, m.to(torch.float32), k)
        else:
            st = inner.state[p]
            for k in ("exp_avg", "exp_avg_sq"):
                if k not in st:
                    continue
                if state[k][name] is None:
                    st[k].zero_()
                else:
                    st[k].copy_(state[k][name].to(st[k]))


def _stepped_tensors(optimizer, inner: torch.optim.Optimizer) -> list[torch.Tensor]:
    found = [q for g in inner.param_groups for q in g["params"]]
    for attr in (
        "fp32_partitioned_groups_flat",  # ZeRO-3
        "single_partition_of_fp32_groups",  # ZeRO-1/2
        "fp32_groups_flat_partition",  # bf16 without ZeRO
    ):
        found += [t for t in (getattr(optimizer, attr, None) or []) if isinstance(t, torch.Tensor)]
    unique: dict[int, torch.Tensor] = {}
    for t in found:
        unique.setdefault(id(t), t)
    return list(unique.values())


def full_master(p: torch.nn.Parameter) -> torch.Tensor:
    """The full fp32 value the optimizer steps of a trained ``p`` (DeepSpeed's master copy
    under ZeRO 1-3 / bf16, else ``p``), on the device, a copy. Collective under ZeRO-3."""
    from deepspeed.utils import safe_get_full_fp32_param

    master = safe_get_full_fp32_param(p) if safe_get_fp32_mapping(p) else None
    if master is None:
        with gathered([p]):
            return p.detach().float().clone()
    return master.detach().float().clone()


@torch.no_grad()
def set_full_master(p: torch.nn.Parameter, value: torch.Tensor) -> None:
    """Set a trained ``p`` to the full fp32 ``value``: the model's (low-precision,
    possibly partitioned) weight and DeepSpeed's fp32 master alike, on the device (every
    rank, the same value; collective under ZeRO-3)."""
    from deepspeed.utils import safe_set_full_fp32_param

    with gathered([p], modify=True):
        p.copy_(value.to(p))
    if safe_get_fp32_mapping(p):
        safe_set_full_fp32_param(p, value.to(torch.float32))


def safe_get_fp32_mapping(p: torch.Tensor) -> bool:
    """True when DeepSpeed keeps a separate fp32 master of ``p`` (ZeRO 1-3, bf16)."""
    return hasattr(p, "ds_id") or getattr(p, "_hp_mapping", None) is not None


def release_engine(engine) -> None:
    """Detach a finished block's engine from the model: each ``deepspeed.initialize``
    registers forward hooks on the module, and one engine per block would pile them up.

    Under ZeRO-3 the engine's parameter hooks stay until the next engine is built (or
    :func:`finish`): evaluation and pseudo-sample generation run through them.
    """
    for name in ("module_forward_pre_hook", "module_forward_post_hook"):
        handle = getattr(engine, name, None)
        if handle is not None:
            handle.remove()
            setattr(engine, name, None)
    if zero3_enabled() and _Zero.active is engine:
        return
    if _Zero.active is engine:
        _Zero.active = None
    engine.destroy()
