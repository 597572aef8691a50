"""Stopping cleanly when the cluster asks: SIGUSR1 (a time-limit warning, ``sbatch
--signal=B:USR1@<s>`` forwarded by the batch script) or SIGTERM (preemption, ``scontrol
requeue``, ``scancel``, the time limit itself).

A signal only sets a flag. The engine polls :func:`stop_requested` at every optimizer-step
boundary and after every task's end checkpoint; the poll is collective (any rank's flag
stops every rank), so all ranks stop after the same step. The engine then saves the
step checkpoint (the same ``state/step`` a ``checkpoint_every`` save writes) and raises
:class:`Preempted`; ``sapt-train`` turns that into exit code :data:`EXIT_PREEMPTED`. The
same command started again resumes at exactly that step: nothing is lost and no step is
trained twice.

A signal that arrives while a task is being evaluated or its pseudo-samples are made is
acted on after that task's checkpoint, before the next task starts.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
from pathlib import Path

from sapt_dist.distributed import launch

__all__ = [
    "EXIT_PREEMPTED",
    "Preempted",
    "install_handlers",
    "MARKER_ENV",
    "write_marker",
    "requested_locally",
    "reset",
    "stop_requested",
]

log = logging.getLogger(__name__)

#: ``sapt-train``'s exit code after a clean stop on a signal (75 = EX_TEMPFAIL: "try
#: again"); the batch scripts requeue the job on it.
EXIT_PREEMPTED = 75

#: Environment variable naming a file that rank 0 writes when the run stops on a signal.
#: The batch scripts set it: with ``srun --kill-on-bad-exit`` the step's exit code may be
#: a kill's rather than 75 when ranks leave a moment apart, the file is unambiguous.
MARKER_ENV = "SAPT_PREEMPT_MARKER"

_flag = threading.Event()
_signal_name: list[str] = []


class Preempted(Exception):
    """Raised once every rank has stopped at the same boundary and the checkpoint is saved."""


def _handler(signum: int, _frame) -> None:
    # only set a flag: the training loop decides where it is safe to stop
    name = signal.Signals(signum).name
    if not _flag.is_set():
        _signal_name.append(name)
    _flag.set()


def install_handlers(signals: tuple[int, ...] = (signal.SIGUSR1, signal.SIGTERM)) -> bool:
    """Turn ``signals`` into a stop request; False where handlers cannot be installed
    (not the main thread), in which case the signals keep their default action."""
    if threading.current_thread() is not threading.main_thread():
        return False
    for s in signals:
        signal.signal(s, _handler)
    return True


def requested_locally() -> str | None:
    """The signal this process got (``SIGUSR1``, ``SIGTERM``), or None."""
    if not _flag.is_set():
        return None
    return _signal_name[0] if _signal_name else "signal"


def reset() -> None:
    _flag.clear()
    _signal_name.clear()


def stop_requested() -> bool:
    """True on every rank when any rank got a stop signal (collective: call it at the
    same point on every rank)."""
    return launch.any_rank(_flag.is_set())


def write_marker(where: str, output_dir: str | Path) -> None:
    """Rank 0: record the clean stop in ``$SAPT_PREEMPT_MARKER`` (when set)."""
    path = os.environ.get(MARKER_ENV)
    if not path or not launch.is_main_process():
        return
    body = {"where": where, "signal": requested_locally(), "output_dir": str(output_dir)}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(body) + "\n")
