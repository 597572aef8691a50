"""Launch-environment handling and (below) multi-process ZeRO-3 runs on the CPU."""

from __future__ import annotations

from sapt_dist.distributed import launch_env, slurm_hostnames


def test_slurm_hostnames_expands_ranges_and_keeps_padding():
    assert slurm_hostnames("node[01-03,07],gpu5,a[8-10]") == [
        "node01",
        "node02",
        "node03",
        "node07",
        "gpu5",
        "a8",
        "a9",
        "a10",
    ]
    assert slurm_hostnames("solo") == ["solo"]


def test_launch_env_from_srun_variables():
    env = launch_env(
        {
            "SLURM_PROCID": "3",
            "SLURM_STEP_NUM_TASKS": "4",
            "SLURM_NTASKS": "8",
            "SLURM_LOCALID": "1",
            "SLURM_JOB_NODELIST": "n[3-4]",
            "SLURM_JOB_ID": "12345",
        }
    )
    assert env == {
        "RANK": "3",
        "WORLD_SIZE": "4",
        "LOCAL_RANK": "1",
        "MASTER_ADDR": "n3",
        "MASTER_PORT": str(20000 + 12345 % 20000),
    }
    # the batch script's own exports win
    env = launch_env(
        {
            "SLURM_PROCID": "0",
            "SLURM_STEP_NUM_TASKS": "2",
            "SLURM_JOB_NODELIST": "n1",
            "MASTER_ADDR": "head",
            "MASTER_PORT": "29999",
        }
    )
    assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("head", "29999")


def test_launch_env_keeps_torchrun_and_defaults_to_one_process():
    assert launch_env({"RANK": "1", "WORLD_SIZE": "2", "SLURM_PROCID": "0"}) == {}
    # inside an sbatch script but outside srun: one process, not the job's task count
    env = launch_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_ID": "5"})
    assert (env["RANK"], env["WORLD_SIZE"], env["MASTER_ADDR"]) == ("0", "1", "127.0.0.1")
