#!/usr/bin/env python
"""One entry point for every launcher: the same ``sapt-train`` arguments everywhere.

    python launch/train.py --config run.yaml                      # one process
    torchrun --nproc_per_node 8 launch/train.py --config run.yaml  # one node
    deepspeed --num_gpus 8 launch/train.py --config run.yaml       # DeepSpeed's launcher
    srun python launch/train.py --config run.yaml                  # SLURM, any node count

Rank, world size, master address and port come from whichever launcher started the
process (``sapt_dist.distributed.launch_env``): torchrun's and deepspeed's variables as
they are; under ``srun`` from SLURM_PROCID / SLURM_STEP_NUM_TASKS / SLURM_LOCALID, the
job's first node and a port derived from the job id.
"""

import sys

from sapt_dist.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
