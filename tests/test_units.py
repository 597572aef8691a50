"""Unit tests of the small pieces every run leans on, each against a plain reference:
the batch stream, step counts, the LR schedule, pseudo-sample selection, atomic writes."""

from __future__ import annotations

import math
import os

import pytest
import torch

from sapt_dist.checkpoint.atomic import atomic_dir, atomic_write_text, recover_dir
from sapt_dist.data.tasks import TaskData
from sapt_dist.train.block import batch_positions, lr_factor, num_steps
from sapt_dist.train.replay import INPUT_MARK, choose_pseudo, n_pseudo


# --------------------------------------------------------------------------- batch stream
def _stream(n: int, seed: int, epochs: int) -> list[int]:
    """The reference: each epoch a seeded permutation of the n examples, concatenated."""
    out: list[int] = []
    for e in range(epochs):
        g = torch.Generator().manual_seed(seed * 100_003 + e)
        out += torch.randperm(n, generator=g).tolist()
    return out


@pytest.mark.parametrize(("n", "b"), [(10, 4), (7, 7), (5, 3), (1, 2)])
def test_batch_positions_slice_the_seeded_epoch_stream(n, b):
    ref = _stream(n, seed=3, epochs=4)
    for k in range(len(ref) // b):
        assert batch_positions(n, b, k, 3) == ref[k * b : (k + 1) * b], k
    # every epoch visits every example once; another seed is another order
    assert sorted(ref[:n]) == list(range(n))
    if n > 2:
        assert _stream(n, seed=4, epochs=1) != ref[:n]


def test_batch_positions_are_a_function_of_the_global_micro_step():
    """Rank r of W reads global micro-step k*W + r: 2 ranks x micro 2 read exactly what
    one process reads with micro 4, micro-step by micro-step (the resume-on-M contract)."""
    n, seed = 9, 0
    for k in range(6):
        one = batch_positions(n, 4, k, seed)
        two = batch_positions(n, 2, 2 * k, seed) + batch_positions(n, 2, 2 * k + 1, seed)
        assert one == two


def test_num_steps():
    assert num_steps(100, 1, 2, 4, None) == 13  # ceil(100 / 8)
    assert num_steps(100, 3, 2, 4, None) == 38  # ceil(300 / 8)
    assert num_steps(100, 1, 2, 4, None, world=2) == 7  # the global batch is 16
    assert num_steps(3, 1, 8, 4, None) == 1
    assert num_steps(100, 5, 2, 4, max_steps=17) == 17


# --------------------------------------------------------------------------- LR schedule
@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_lr_factor_against_closed_forms(schedule):
    warmup, total = 4, 20
    f = lr_factor(schedule, warmup, total)
    for step in range(total + 1):
        if step < warmup:
            want = (step + 1) / warmup
        else:
            p = (step - warmup) / (total - warmup)
            want = {
                "constant": 1.0,
                "linear": 1.0 - p,
                "cosine": 0.5 * (1 + math.cos(math.pi * p)),
            }[schedule]
        assert f(step) == pytest.approx(want), (schedule, step)
    assert lr_factor("cosine", 0, 10)(10) == pytest.approx(0.0)
    assert lr_factor("linear", 0, 10)(15) == pytest.approx(0.0)  # clamped past the end


def test_engine_applies_the_schedule():
    """build_engine's scheduler follows lr_factor step by step (DeepSpeed steps it)."""
    from sapt_dist import distributed

    w = torch.nn.Parameter(torch.ones(3))

    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = w

        def forward(self, x):
            return (self.w * x).sum()

    engine, _, sched = distributed.build_engine(
        Toy(),
        [w],
        lr=0.1,
        weight_decay=0.0,
        micro_batch_size=1,
        grad_accum=1,
        max_grad_norm=None,
        lr_lambda=lr_factor("linear", 2, 6),
        dtype="float32",
    )
    seen = []
    for _ in range(6):
        engine.backward(engine(torch.ones(3)))
        engine.step()
        seen.append(sched.get_last_lr()[0])
    distributed.finish()
    f = lr_factor("linear", 2, 6)
    assert seen == pytest.approx([0.1 * f(k) for k in range(1, 7)])


# --------------------------------------------------------------------------- pseudo-samples
def _task() -> TaskData:
    return TaskData(
        name="t",
        definition="Classify it.",
        splits={"train": [{"input": "x", "outputs": ["y"]}] * 3, "dev": [], "test": []},
        metric="rouge",
        benchmark="superni",
    )


def test_n_pseudo_rounds_up_with_a_minimum():
    assert n_pseudo(1000, 0.02, 1) == 20
    assert n_pseudo(160, 0.02, 1) == 4  # 3.2 -> 4
    assert n_pseudo(100, 0.02, 1) == 2  # exactly 2, not 3 (float noise)
    assert n_pseudo(10, 0.02, 3) == 3


def test_choose_pseudo_well_formed_first_deduplicated_seeded_then_filled():
    good = [f"Def {k} {INPUT_MARK} input {k}" for k in range(4)]
    cands = [good[0], "no marker here", good[1], good[0], "  ", good[2], f"D {INPUT_MARK} "]
    chosen = choose_pseudo(cands, _task(), n=3, seed=7)
    assert len(chosen) == 3 and all(c["well_formed"] for c in chosen)
    assert sorted(c["input"] for c in chosen) == ["input 0", "input 1", "input 2"]
    assert chosen == choose_pseudo(cands, _task(), n=3, seed=7)  # seeded
    # too few well-formed: the rest are fill-ins with the real definition; blanks dropped
    chosen = choose_pseudo(cands, _task(), n=6, seed=7)
    assert [c["well_formed"] for c in chosen] == [True, True, True, False, False]
    fill = [c for c in chosen if not c["well_formed"]]
    assert {c["definition"] for c in fill} == {"Classify it."}
    assert sorted(c["input"] for c in fill) == sorted(["no marker here", f"D {INPUT_MARK}"])


def test_n_pseudo_rounds_down_as_released():
    """replay.count_rounding=down: the released scripts' ``int(len * 0.02)``, 0 -> 1."""
    assert n_pseudo(160, 0.02, 1, "down") == 3  # samsum: 3.2 -> 3 (up: 4)
    assert n_pseudo(975, 0.02, 1, "down") == 19  # commonsenseqa: 19.5 -> 19 (up: 20)
    assert n_pseudo(975, 0.02, 1, "up") == 20
    assert n_pseudo(1000, 0.02, 1, "down") == 20
    assert n_pseudo(20, 0.02, 1, "down") == 1  # 0.4 -> 0 -> at least 1
    assert n_pseudo(20, 0.02, 2, "down") == 2
    with pytest.raises(ValueError, match="'up' or 'down'"):
        n_pseudo(10, 0.02, 1, "nearest")


def test_choose_pseudo_one_definition_per_task():
    """replay.pseudo_definition=per_task: every kept sample, fill-ins too, carries one of
    the definitions the generations wrote; the task's own when none wrote one."""
    cands = [
        f"Def A {INPUT_MARK} input 0",
        f"Def B {INPUT_MARK} input 1",
        "no marker here",
        f"Def A {INPUT_MARK} input 2",
        f" {INPUT_MARK} input 3",  # no definition written: not a candidate definition
    ]
    own = choose_pseudo(cands, _task(), n=5, seed=3)
    assert sorted(c["definition"] for c in own) == [
        "Classify it.",  # the fill-in
        "Classify it.",  # the well-formed one without a written definition
        "Def A",
        "Def A",
        "Def B",
    ]
    one = choose_pseudo(cands, _task(), n=5, seed=3, definition="per_task")
    (d,) = {c["definition"] for c in one}
    assert d in {"Def A", "Def B"}
    # the same samples in the same order, only the definition differs
    assert [c["input"] for c in one] == [c["input"] for c in own]
    assert [c["well_formed"] for c in one] == [c["well_formed"] for c in own]
    # one distinct written definition: it is the one, fill-in included
    only_b = [f"Def B {INPUT_MARK} input 1", "no marker here"]
    got = choose_pseudo(only_b, _task(), n=2, seed=0, definition="per_task")
    assert [c["definition"] for c in got] == ["Def B", "Def B"]
    # none written: the task's own definition
    got = choose_pseudo(["no marker"], _task(), n=1, seed=0, definition="per_task")
    assert got == [{"definition": "Classify it.", "input": "no marker", "well_formed": False}]
    picks = {
        choose_pseudo(cands, _task(), n=2, seed=s, definition="per_task")[0]["definition"]
        for s in range(20)
    }
    assert picks == {"Def A", "Def B"}  # a seeded pick, not always the first


# --------------------------------------------------------------------------- atomic writes
def test_atomic_write_text_keeps_the_old_file_when_the_write_fails(tmp_path, monkeypatch):
    path = tmp_path / "f.json"
    atomic_write_text(path, "old\n")

    def boom(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError, match="No space"):
        atomic_write_text(path, "new\n")
    assert path.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.json"]  # no temporary left


def test_atomic_dir_swaps_whole_or_not_at_all(tmp_path):
    target = tmp_path / "blocks"
    with atomic_dir(target) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "a").write_text("2")
        raise RuntimeError("killed mid-write")
    assert (target / "a").read_text() == "1"
    assert [p.name for p in tmp_path.iterdir()] == ["blocks"]


def test_recover_dir_finishes_an_interrupted_swap(tmp_path):
    target, old = tmp_path / "blocks", tmp_path / "blocks.old"
    old.mkdir()
    (old / "a").write_text("1")  # killed between the two renames: only the old copy
    recover_dir(target)
    assert (target / "a").read_text() == "1" and not old.exists()
    old.mkdir()  # killed after the swap, before the old copy was removed
    recover_dir(target)
    assert not old.exists() and (target / "a").read_text() == "1"
    left = tmp_path / ".blocks.x1y2.tmp"
    left.mkdir()
    recover_dir(target)
    assert left.exists()  # only removed where no writer can be running
    recover_dir(target, clean_tmp=True)
    assert not left.exists()
