"""``sapt-train --config <yaml> [dotted.key=value ...]``.

With no ``--config`` it runs the CPU demo preset shipped in the package. Restarting the
same command resumes the run from its folder's last checkpoint; a finished run is not
trained again. ``--reevaluate`` scores the finished run again with its current block mask
(``sapt-blocks disable/enable``) instead of training.

Exit codes: 0 done, 2 bad config or data (nothing trained), 3 the loss became NaN or
infinite (that step is not saved; the last checkpoint stands), 75
(:data:`sapt_dist.distributed.preemption.EXIT_PREEMPTED`) stopped cleanly on SIGUSR1 / SIGTERM with a
checkpoint at a step boundary: run the same command again to resume (the SLURM batch
scripts requeue the job on it).
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
import time

from sapt_dist import distributed
from sapt_dist.config import preset_path
from sapt_dist.distributed import preemption

__all__ = ["main", "preset_path"]

log = logging.getLogger("sapt_dist")


def setup_logging(level: int = logging.INFO) -> None:
    """Console logging with the rank in every line (the run folder's run.log is the run's)."""
    rank = distributed.rank()
    fmt = f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s"
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    logging.basicConfig(
        level=level if rank == 0 else logging.WARNING,
        format=fmt,
        datefmt="%H:%M:%S",
        handlers=handlers,
        force=True,
    )
    for noisy in (
        "DeepSpeed",
        "deepspeed",
        "torch.distributed",
        "httpx",
        "urllib3",
        "absl",
        "bitsandbytes",
    ):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # bitsandbytes warns on every CPU start that an optional kernel package is absent
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="sapt-train",
        description="Continual learning of a frozen LLM with SAPT (or a baseline) on DeepSpeed.",
        epilog="Example: sapt-train --config sapt_dist/presets/demo.yaml train.epochs=2 method=seq_lora",
    )
    parser.add_argument("--config", help="YAML config (default: the CPU demo preset)")
    parser.add_argument("--preset", help="name of a preset shipped in the package, e.g. demo")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=1e-4")
    parser.add_argument(
        "--reevaluate",
        action="store_true",
        help="do not train: score every seen task of the run in output_dir with its current "
        "block mask (see sapt-blocks) and write metrics/accuracy_matrix_reevaluated.*",
    )
    # the `deepspeed` launcher appends --local_rank=N; LOCAL_RANK carries the same
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from sapt_dist.checkpoint.blocks import CheckpointMismatchError
    from sapt_dist.config import ConfigError, load_config
    from sapt_dist.data.tasks import TaskDataError

    config = args.config or str(preset_path(args.preset or "demo"))
    try:
        cfg = load_config(config, args.overrides)
    except ConfigError as e:
        print(f"sapt-train: {e}", file=sys.stderr)
        return 2
    setup_logging()
    # SIGUSR1 / SIGTERM: stop at the next step boundary with a checkpoint (preemption.py)
    preemption.install_handlers()
    log.info("config %s -> run folder %s (method %s)", config, cfg.output_dir, cfg.method)
    if args.reevaluate:
        from sapt_dist.outputs.inference import load_run, reevaluate

        try:
            # the run folder's own config.yaml (the given config names the folder), with
            # the command line's overrides (e.g. model.path on this machine)
            res = reevaluate(load_run(cfg.output_dir, overrides=args.overrides))
        except (ConfigError, TaskDataError, CheckpointMismatchError) as e:
            log.error("%s", e)
            return 2
        if distributed.is_main_process():
            print(res["report"])
        distributed.leave_together()  # several ranks: the process ends here (exit 0)
        return 0
    from sapt_dist.checkpoint.atomic import UnreadableFileError
    from sapt_dist.train.block import TrainingDiverged
    from sapt_dist.train.run import run

    t0 = time.time()
    try:
        results = run(cfg)
    except (ConfigError, TaskDataError, CheckpointMismatchError) as e:
        log.error("%s", e)
        return 2
    except TrainingDiverged as e:
        log.error("%s", e)
        return 3
    except UnreadableFileError as e:
        log.error("%s", e)
        return 2
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        log.error(
            "no space left on device%s: free some space and run the same command; what was "
            "saved before (blocks, step checkpoints: written atomically) is intact",
            f" writing {e.filename}" if e.filename else "",
        )
        return 1
    except preemption.Preempted as e:
        if distributed.is_main_process():
            print(
                f"preempted {e}: checkpoint saved in {cfg.output_dir}/state; "
                f"run the same command to resume (exit {preemption.EXIT_PREEMPTED})",
                file=sys.stderr,
            )
        # every rank stops at the same step (the stop is agreed by all): leave together
        distributed.leave_together(preemption.EXIT_PREEMPTED)
        return preemption.EXIT_PREEMPTED
    if distributed.is_main_process():
        print(results.get("report", ""))
        print(f"run folder: {cfg.output_dir}  ({time.time() - t0:.0f} s)")
    # a rank that exits while the others still write (rank 0's report) can abort in gloo's
    # destructor (SIGABRT) and the launcher then fails a finished job
    distributed.leave_together()
    return 0


if __name__ == "__main__":
    sys.exit(main())
