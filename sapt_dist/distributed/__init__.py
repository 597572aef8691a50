"""Distributed execution: where this process sits in the job, and DeepSpeed.

The run's modules import this package only (``from sapt_dist import distributed``):
:mod:`~sapt_dist.distributed.launch` knows the launchers and the collectives between
ranks; ``_deepspeed`` (private, the one module that imports DeepSpeed) builds engines,
partitions the backbone under ZeRO-3 and reads / writes the optimizer state. The model
layer needs only :func:`gathered`, a context that gathers ZeRO-3-partitioned parameters
(a no-op otherwise), and :func:`gather_in_forward` (parameters a module reads but does
not own).
"""

from sapt_dist.distributed._deepspeed import (
    SHM_OP,
    build_engine,
    configure,
    engine_config,
    finish,
    full_master,
    full_optimizer_state,
    gather_in_forward,
    gathered,
    guard_op_build_lock,
    init,
    is_partitioned,
    load_full_optimizer_state,
    ready_for_inference,
    release_engine,
    run_engine_config,
    safe_get_fp32_mapping,
    set_full_master,
    shard_report,
    zero3_enabled,
    zero_stage,
)
from sapt_dist.distributed.launch import (
    all_gather_objects,
    any_rank,
    barrier,
    close,
    is_main_process,
    launch_env,
    leave_together,
    peak_memory_mb,
    rank,
    rank0_first,
    slurm_hostnames,
    sum_over_ranks,
    sum_tensor_over_ranks,
    world_size,
)

__all__ = [
    "SHM_OP",
    "all_gather_objects",
    "any_rank",
    "barrier",
    "build_engine",
    "close",
    "configure",
    "engine_config",
    "finish",
    "full_master",
    "full_optimizer_state",
    "gather_in_forward",
    "gathered",
    "guard_op_build_lock",
    "init",
    "is_main_process",
    "leave_together",
    "is_partitioned",
    "launch_env",
    "load_full_optimizer_state",
    "peak_memory_mb",
    "rank",
    "rank0_first",
    "ready_for_inference",
    "release_engine",
    "run_engine_config",
    "safe_get_fp32_mapping",
    "set_full_master",
    "shard_report",
    "slurm_hostnames",
    "sum_over_ranks",
    "sum_tensor_over_ranks",
    "world_size",
    "zero3_enabled",
    "zero_stage",
]
