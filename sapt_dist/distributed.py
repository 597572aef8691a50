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
