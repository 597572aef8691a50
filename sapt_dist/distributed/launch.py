"""Where this process sits in the job: rank, world size, the launcher's environment
(torchrun, the ``deepspeed`` launcher, ``srun`` or a plain start) and the collectives the
run uses between ranks. Nothing here imports DeepSpeed."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch

from sapt_dist.distributed import watchdog

#: ``distributed.timeout_s``'s default: torch's own default process-group timeout. On a
#: GPU cluster a rank may wait that long for a live peer (rank 0 filing a large block,
#: a slow file system); a lost peer is then noticed within 30 min instead of never.
DEFAULT_TIMEOUT_S = 1800.0


class _Collective:
    timeout_s: float = DEFAULT_TIMEOUT_S  # set from the run's config before init()


def set_timeout(seconds: float) -> None:
    """The collective timeout :func:`~sapt_dist.distributed.init` uses (seconds > 0)."""
    if not seconds > 0:
        raise ValueError(f"the collective timeout must be positive, not {seconds!r}")
    _Collective.timeout_s = float(seconds)


def collective_timeout() -> float:
    return _Collective.timeout_s


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


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slurm_hostnames(nodelist: str) -> list[str]:
    """Expand a SLURM node list the way ``scontrol show hostnames`` does, without calling
    it: top-level commas separate host expressions (commas inside brackets do not); each
    bracket group is a list of numbers and ranges whose zero padding is kept; several
    groups in one expression multiply out, left group outermost
    (``rack[1-2]-node[01-02]`` -> rack1-node01, rack1-node02, rack2-node01, rack2-node02).

    Raises:
        ValueError: naming the list, for unbalanced brackets or a range that is not numeric.
    """
    exprs, depth, cur = [], 0, ""
    for ch in nodelist.strip():
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if depth not in (0, 1):
            raise ValueError(f"SLURM node list {nodelist!r}: unbalanced brackets")
        if ch == "," and depth == 0:
            exprs.append(cur)
            cur = ""
        else:
            cur += ch
    if depth:
        raise ValueError(f"SLURM node list {nodelist!r}: unbalanced brackets")
    exprs.append(cur)
    hosts: list[str] = []
    for expr in exprs:
        if expr:
            hosts += _expand_host(expr, nodelist)
    return hosts


def _expand_host(expr: str, nodelist: str) -> list[str]:
    head, bracket, rest = expr.partition("[")
    if not bracket:
        return [expr]
    body, _, tail = rest.partition("]")
    values: list[str] = []
    for item in body.split(","):
        lo, dash, hi = item.strip().partition("-")
        if not lo.isdigit() or (dash and not hi.isdigit()):
            raise ValueError(f"SLURM node list {nodelist!r}: {item!r} is not a number or range")
        if not dash:
            values.append(lo)
        else:
            values += [str(i).zfill(len(lo)) for i in range(int(lo), int(hi) + 1)]
    tails = _expand_host(tail, nodelist)
    return [head + v + t for v in values for t in tails]


def launch_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The torch.distributed variables this process should run with.

    - torchrun and the ``deepspeed`` launcher set RANK / WORLD_SIZE / LOCAL_RANK /
      MASTER_ADDR / MASTER_PORT themselves: kept as they are.
    - ``srun`` (one task per process) sets SLURM_PROCID / SLURM_STEP_NUM_TASKS / SLURM_LOCALID:
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


def close() -> None:
    """Tear the process group down (registered at exit by :func:`init`).

    A process that exits with its gloo group alive can abort in the group's destructor
    ("terminate called without an active exception", SIGABRT) while its peer is still
    exiting: the launcher then reports a finished run as failed. No barrier here: a rank
    that exits on an error must not wait for the others."""
    watchdog.stop()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def leave_together(exit_code: int = 0) -> None:
    """End a successful multi-rank command. Every rank waits for the others (no rank exits
    while a peer still works: rank 0 writing a report or predictions), flushes its output
    and logs, shuts W&B's service down, and the process ends here with ``exit_code``
    (0; or 75 after a preemption stop, which every rank reaches together) through
    ``os._exit``.

    Why not a normal exit: the interpreter's teardown then runs the C++ destructors of
    gloo's, torch's and DeepSpeed's objects, and one of them can destroy a thread that was
    never joined: the process aborts ("terminate called without an active exception",
    SIGABRT) and the launcher fails a finished job. Seen twice in CI, once even after
    barrier + ``destroy_process_group``; ``_exit`` skips that teardown. Call it only when
    everything the command writes is done: files closed (atomic writes are fsynced), the
    W&B run finished, the run folder's lock released; atexit handlers do not run (W&B's,
    which waits for its service to write the run's last records, is called here).

    Only where every rank ends the same way: a rank leaving on an error must not wait for
    peers that may never come. One process has no peer: it returns and keeps its group, since a caller in the
    same process (a test, a notebook) may build more engines, and DeepSpeed caches groups
    made from it."""
    if world_size() <= 1:
        return
    barrier()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    _exit_now(exit_code)


def _exit_now(code: int) -> None:
    import logging
    import sys

    watchdog.stop()  # a planned exit: peers leaving now are not lost
    if "wandb" in sys.modules:
        # what wandb's atexit hook does: tell its service to finish writing the run's
        # files (the .wandb exit record comes a moment after run.finish()) and wait
        with contextlib.suppress(Exception):
            sys.modules["wandb"].teardown()
    logging.shutdown()  # flush and close every handler (run.log, the console)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable Python data of this run, never files), rank order."""
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def sum_over_ranks(values: torch.Tensor) -> list[float]:
    """Element-wise sum of a 1-D tensor across ranks, read to the host once (a training
    step's losses and flags: one collective and one host sync). The tensor stays where
    it is (a CUDA tensor under NCCL, a CPU one under gloo)."""
    if world_size() > 1:
        values = values.clone()
        torch.distributed.all_reduce(values)
    return values.tolist()


def sum_tensor_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """Element-wise sum of a tensor of any shape across ranks, on its device, never read
    to the host (a statistic summed over the ranks' batches). A copy: ``values`` stays."""
    values = values.clone()
    if world_size() > 1:
        torch.distributed.all_reduce(values)
    return values


@contextlib.contextmanager
def rank0_first() -> Iterator[None]:
    """Rank 0 runs the block first (e.g. builds a cache), the others after it finished."""
    if world_size() > 1 and rank() != 0:
        barrier()
    yield
    if world_size() > 1 and rank() == 0:
        barrier()


def peak_memory_mb() -> dict[str, float]:
    """This process's peak host memory (RSS) and, on a GPU, peak allocated device memory."""
    import resource

    out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.cuda.is_available():
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


watchdog.set_exit(_exit_now)
