"""Where a run's time goes: phases nest without double counting, a restart adds to the
folder's file, the table sums its rows."""

from __future__ import annotations

import json

from sapt_dist.outputs import timing as timing_mod
from sapt_dist.outputs.timing import PHASES, RunTiming


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_nested_phases_count_once_and_a_restart_adds(tmp_path, monkeypatch):
    clock = Clock()
    monkeypatch.setattr(timing_mod.time, "perf_counter", clock)
    t = RunTiming(tmp_path)
    with t.phase("start_up"):
        clock.t += 2
    with t.phase("train", "a"):
        clock.t += 5
        with t.phase("checkpoint", "a"):  # a step checkpoint inside training
            clock.t += 1
        clock.t += 3
    with t.phase("evaluate", "a"):
        clock.t += 4
    t.write()
    data = json.loads((tmp_path / "metrics/timing.json").read_text())
    assert data["tasks"]["a"] == {"train": 8.0, "checkpoint": 1.0, "evaluate": 4.0}
    assert data["start_up"] == 2.0 and data["starts"] == 1
    again = RunTiming(tmp_path)  # the resumed run adds to what the folder holds
    with again.phase("train", "a"):
        clock.t += 1
    totals = again.totals()
    assert totals["train"] == 9.0 and totals["total"] == 16.0
    table = again.table()
    assert "over 2 starts" in table and "| a | 9.0 | 0.0 | 4.0 | 1.0 | 14.0 |" in table
    assert list(PHASES) == ["train", "pseudo_samples", "evaluate", "checkpoint"]


def test_a_damaged_timing_file_starts_again(tmp_path):
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics/timing.json").write_text("[1, 2")
    assert RunTiming(tmp_path).totals()["total"] == 0.0
