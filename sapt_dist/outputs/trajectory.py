"""The routing trajectory: how the shared attention's weights move while a task trains.

Every ``eval.routing_every`` optimizer steps (and at a task's last step) the mean routing
weights of every seen task's dev prompts, over the active slots, become one point of
``metrics/routing_trajectory.json`` (keyed by task and step, so a resumed run writes the
same points again, never twice) and of W&B's ``train/routing_own/<task>``; at a task's
end the plot ``metrics/routing_trajectory.png`` is drawn again.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch

from sapt_dist import distributed
from sapt_dist.checkpoint.atomic import (
    NUMBER,
    UnreadableFileError,
    atomic_write_json,
    read_json,
)
from sapt_dist.method.generation import pooled_prompts
from sapt_dist.method.model import SAPTModel
from sapt_dist.outputs.report import plot_trajectory

__all__ = ["TRAJECTORY", "RoutingTrajectory", "read_trajectory"]

log = logging.getLogger(__name__)

#: the shape of ``metrics/routing_trajectory.json``: task -> step -> point
TRAJECTORY = {str: {str: {"global_step": int, "mean": {str: [NUMBER]}}}}


def read_trajectory(path: Path) -> dict:
    """The trajectory file, its shape checked (steps are integers); :class:`UnreadableFileError`
    naming it otherwise."""
    data = read_json(path, schema=TRAJECTORY)
    for task, points in data.items():
        bad = [k for k in points if not re.fullmatch(r"\d{1,12}", k)]
        if bad:
            raise UnreadableFileError(
                f"{path}: damaged, step {bad[0][:40]!r} of task {task!r} is not a step number"
            )
    return data


class RoutingTrajectory:
    """Points of the trajectory for a run's tasks (``names``; ``dev_prompts[j]``: task j's
    encoded dev prompts)."""

    def __init__(
        self, out: Path, names: list[str], dev_prompts: list[list[list[int]]], batch_size: int
    ) -> None:
        self.path = Path(out) / "metrics" / "routing_trajectory.json"
        self.names = names
        self.dev_prompts = dev_prompts
        self.batch_size = batch_size
        self._pooled: dict[int, torch.Tensor] = {}  # the embedding is frozen: pool once

    def point(self, model: SAPTModel, i: int, pad_id: int) -> dict[str, list[float]]:
        """Mean routing weights (over slots ``0..i``) of each seen task's dev inputs.
        Collective under ZeRO-3 (the embedding and the router are gathered)."""
        was_training = model.training
        router = model.router
        device = router.key.device
        out = {}
        with torch.no_grad():
            for j in range(i + 1):
                if j not in self._pooled:
                    self._pooled[j] = pooled_prompts(
                        model, self.dev_prompts[j], pad_id, self.batch_size
                    )
                u = self._pooled[j].to(device=device, dtype=router.key.dtype)
                w = router(u).float()  # the module call: ZeRO-3 gathers g and the key
                out[self.names[j]] = [round(float(x), 5) for x in w[:, : i + 1].mean(0)]
        model.train(was_training)
        return out

    def write(self, i: int, global_step: int, point: dict, step: int, final: bool) -> None:
        """Add ``point`` (task ``i`` at ``step``) to the JSON file (rank 0); at the task's
        last step draw the ``.png``."""
        if not distributed.is_main_process():
            return
        try:
            data = read_trajectory(self.path) if self.path.is_file() else {}
        except (OSError, UnreadableFileError) as e:
            # a diagnostic file: a damaged one is started again (said, naming it)
            log.warning("%s; starting the routing trajectory again", e)
            data = {}
        name = self.names[i]
        data.setdefault(name, {})[str(step)] = {"global_step": global_step, "mean": point}
        data[name] = dict(sorted(data[name].items(), key=lambda kv: int(kv[0])))
        atomic_write_json(self.path, data)
        if final:
            plot_trajectory(data, self.names, self.path.with_suffix(".png"))

    def own_weights(self, i: int, point: dict) -> dict[str, float]:
        """The tracker's keys: each seen task's mean weight on its own block."""
        return {f"routing_own/{self.names[j]}": point[self.names[j]][j] for j in range(i + 1)}
