"""Scores and continual-learning metrics against hand-computed values."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sapt_dist.outputs.metrics import (
    cl_metrics,
    exact_match,
    matrix_markdown,
    normalize_answer,
    released_metrics,
    rouge_l,
    routing_summary,
    save_heatmap,
    score_predictions,
)

# a[i][j]: score on task j after training task i
M3 = [
    [80.0, None, None],
    [70.0, 60.0, None],
    [50.0, 55.0, 90.0],
]


def test_cl_metrics_3x3() -> None:
    # AP   = (50 + 55 + 90) / 3                           = 65.0
    # F.Ra = ((max(80, 70) - 50) + (max(60) - 55)) / 2     = (30 + 5) / 2 = 17.5
    # BWT  = ((50 - 80) + (55 - 60)) / 2                   = -17.5
    m = cl_metrics(M3)
    assert m["AP"] == pytest.approx(65.0)
    assert m["F.Ra"] == pytest.approx(17.5)
    assert m["BWT"] == pytest.approx(-17.5)
    assert m["FWT"] is None


def test_released_metrics_3x3() -> None:
    """The released SAPT score.py's BWT and FWT of M3, by hand, and its own code run on
    the same matrix (zeros above the diagonal, as it pads)."""
    # BWT_released = ((50 - 80) + (55 - 60) + (90 - 90)) / 3 = -35 / 3
    # FWT_released = (80 + 60 + 90) / 3 - 50.94               = 76.666... - 50.94
    m = released_metrics(M3)
    assert m["BWT_released"] == pytest.approx(-35 / 3)
    assert m["FWT_released"] == pytest.approx(230 / 3 - 50.94)
    # ours is the released BWT x N / (N - 1)
    assert cl_metrics(M3)["BWT"] == pytest.approx(m["BWT_released"] * 3 / 2)

    def released(scores_array):  # score.py's cal_continue_learning_metrics, copied
        task_num = len(scores_array)
        fwt = sum([scores_array[i][i] for i in range(task_num)]) / task_num - 50.94
        bwt = sum([scores_array[-1][i] - scores_array[i][i] for i in range(task_num)]) / task_num
        return bwt, fwt

    padded = [[0.0 if v is None else v for v in row] for row in M3]
    assert (m["BWT_released"], m["FWT_released"]) == pytest.approx(released(padded))
    one = released_metrics([[42.0]])
    assert one["BWT_released"] is None and one["FWT_released"] == pytest.approx(42.0 - 50.94)


def test_cl_metrics_forgetting_uses_best_earlier_score() -> None:
    # task 0 peaks after task 1 (not on its own diagonal):
    # F.Ra = ((max(60, 75, 70) - 65) + (max(80, 85) - 85) + (max(50) - 40)) / 3
    #      = (10 + 0 + 10) / 3 = 6.666..
    # BWT  = ((65 - 60) + (85 - 80) + (40 - 50)) / 3 = 0
    # FWT  = ((60 - 50) + (80 - 90) + (50 - 40) + (30 - 30)) / 4 = 2.5
    # AP   = (65 + 85 + 40 + 30) / 4 = 55
    m4 = [
        [60.0, None, None, None],
        [75.0, 80.0, None, None],
        [70.0, 85.0, 50.0, None],
        [65.0, 85.0, 40.0, 30.0],
    ]
    m = cl_metrics(m4, single_task=[50.0, 90.0, 40.0, 30.0])
    assert m["AP"] == pytest.approx(55.0)
    assert m["F.Ra"] == pytest.approx(20 / 3)
    assert m["BWT"] == pytest.approx(0.0)
    assert m["FWT"] == pytest.approx(2.5)


def test_cl_metrics_fwt_3x3() -> None:
    # FWT = ((80 - 75) + (60 - 70) + (90 - 80)) / 3 = 5 / 3
    assert cl_metrics(M3, [75.0, 70.0, 80.0])["FWT"] == pytest.approx(5 / 3)


def test_cl_metrics_single_task() -> None:
    assert cl_metrics([[42.0]]) == {"AP": 42.0, "F.Ra": None, "FWT": None, "BWT": None}
    assert cl_metrics([[42.0]], [40.0])["FWT"] == pytest.approx(2.0)


def test_cl_metrics_ignores_upper_triangle() -> None:
    full = [[80.0, 1.0, 2.0], [70.0, 60.0, 3.0], [50.0, 55.0, 90.0]]
    assert cl_metrics(full) == cl_metrics(M3)


@pytest.mark.parametrize(
    ("matrix", "match"),
    [
        ([], "empty"),
        ([[1.0, None], [2.0, 3.0], [4.0, 5.0]], r"square: row 0 has 2 entries, expected 3"),
        ([[1.0, None], [None, 3.0]], r"a\[1\]\[0\] is None"),
        ([[float("nan")]], r"a\[0\]\[0\] is nan"),
    ],
)
def test_cl_metrics_bad_shape(matrix: list, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        cl_metrics(matrix)


def test_cl_metrics_bad_single_task() -> None:
    with pytest.raises(ValueError, match="2 single-task scores for 3 tasks"):
        cl_metrics(M3, [1.0, 2.0])


# ---------------------------------------------------------------------------- per example
def test_normalize_and_exact_match() -> None:
    assert normalize_answer("  'Sports.'\n") == "sports"
    assert normalize_answer("Science  &\tMathematics") == "science & mathematics"
    assert exact_match("POS.", ["pos"]) == 100.0
    assert exact_match("Business", ["World", "business "]) == 100.0
    assert exact_match("Sci/Tech", ["Sci Tech"]) == 0.0  # inner punctuation counts
    assert exact_match("the sports", ["sports"]) == 0.0  # articles are kept


def test_rouge_l() -> None:
    assert rouge_l("the cat sat", ["the cat sat"]) == pytest.approx(100.0)
    # LCS 3 of 3 predicted / 4 reference words: P = 1, R = 0.75, F = 2 * 0.75 / 1.75
    assert rouge_l("the cat sat", ["the cat sat down"]) == pytest.approx(100 * 1.5 / 1.75)
    # best reference wins; punctuation and case do not count
    assert rouge_l("The cat, sat!", ["dog", "the cat sat"]) == pytest.approx(100.0)
    assert rouge_l("completely different", ["the cat"]) == 0.0


def test_score_predictions() -> None:
    assert score_predictions(["a", "b"], [["a"], ["c"]], "exact") == pytest.approx(50.0)
    assert score_predictions(["x y"], [["x y"]], "rouge") == pytest.approx(100.0)
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        score_predictions(["a", "b"], [["a"]], "exact")
    with pytest.raises(ValueError, match="unknown metric 'bleu'"):
        score_predictions(["a"], [["a"]], "bleu")


# ---------------------------------------------------------------------------- reports
def test_matrix_markdown() -> None:
    text = matrix_markdown(M3, ["t0", "t1", "t2"])
    lines = text.splitlines()
    assert lines[0] == "| | t0 | t1 | t2 |"
    assert lines[1] == "|---|---|---|---|"
    assert lines[2] == "| after t0 | 80.0 |  |  |"
    assert lines[4] == "| after t2 | 50.0 | 55.0 | 90.0 |"
    head = matrix_markdown(M3[:2], ["t0", "t1", "t2"], metric_names=["rouge", "exact", "rouge"])
    assert head.splitlines()[0] == "| | t0 (rouge) | t1 (exact) | t2 (rouge) |"
    assert len(head.splitlines()) == 4  # a run in progress: 2 of 3 rows
    with pytest.raises(ValueError, match="row 0 has 1 entries for 3 tasks"):
        matrix_markdown([[1.0]], ["t0", "t1", "t2"])


def test_save_heatmap(tmp_path: Path) -> None:
    out = tmp_path / "sub" / "m.png"
    save_heatmap(M3, ["after t0", "after t1", "after t2"], ["t0", "t1", "t2"], out, "scores")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in out.parent.iterdir()] == ["m.png"]  # no temp file left
    save_heatmap([[None]], ["r"], ["c"], tmp_path / "empty.png", "all blank", vmin=0, vmax=1)
    assert (tmp_path / "empty.png").stat().st_size > 0
    with pytest.raises(ValueError, match="3 rows for 2 row labels"):
        save_heatmap(M3, ["a", "b"], ["t0", "t1", "t2"], tmp_path / "x.png", "bad")


def test_routing_summary() -> None:
    weights = {
        0: torch.tensor([[0.9, 0.1], [0.4, 0.6]]),  # 1 of 2 on slot 0
        1: torch.tensor([[0.2, 0.8], [0.3, 0.7], [0.1, 0.9]]),  # 3 of 3 on slot 1
    }
    s = routing_summary(weights)
    assert s["tasks"] == [0, 1]
    assert torch.allclose(torch.tensor(s["mean_weights"]), torch.tensor([[0.65, 0.35], [0.2, 0.8]]))
    assert s["routing_accuracy"] == {0: 0.5, 1: 1.0}
    assert s["overall_routing_accuracy"] == pytest.approx(4 / 5)  # pooled over inputs
    assert s["chance"] == 0.5 and s["n_active"] == 2 and s["n_inputs"] == {0: 2, 1: 3}
    with pytest.raises(ValueError, match="task 1 has 3 slots"):
        routing_summary({0: torch.ones(1, 2), 1: torch.ones(1, 3)})
    with pytest.raises(ValueError, match="task 2 has no slot"):
        routing_summary({2: torch.ones(1, 2)})


def test_scoring_best_of_references_or_the_released_codes_one():
    """``best`` (default): the best of an example's references, punctuation stripped only at
    the ends; ``released``: one reference per example (a seeded pick, the same every
    time) and every punctuation mark removed, as the released SAPT code scores."""
    import random

    from sapt_dist.outputs.metrics import score_predictions

    refs = [["Positive", "pos"], ["a, b"], ["x", "y", "z"]]
    preds = ["pos", "a b", "y"]
    assert score_predictions(preds, refs, "exact") == pytest.approx(200 / 3)  # "a b" != "a, b"
    picks = [r[random.Random(i).randrange(len(r))] for i, r in enumerate(refs)]
    want = [
        100.0
        if p.lower() == "".join(c for c in k.lower() if c not in ",").replace("  ", " ")
        else 0.0
        for p, k in zip(preds, picks)
    ]
    got = score_predictions(preds, refs, "exact", "released")
    assert got == pytest.approx(sum(want) / 3)
    assert want[1] == 100.0  # the released normalisation drops the inner comma
    assert score_predictions(preds, refs, "exact", "released") == got  # the same pick again
    with pytest.raises(ValueError, match="unknown scoring"):
        score_predictions(preds, refs, "exact", "first")


def test_plot_labels_are_wrapped_not_cut():
    """Task names in plot labels and titles stay whole (issue 24: truncated titles of the
    routing-trajectory plot): wrapped at '_' / '-' / spaces, every character kept."""
    from sapt_dist.outputs.metrics import wrap_label
    from sapt_dist.outputs.report import slot_labels

    name = "task1510_evalution_relation_extraction"
    text = f"dev inputs of {name}"
    wrapped = wrap_label(text, 20)
    assert "".join(wrapped.split()) == "".join(text.split())  # nothing cut
    assert all(len(line) <= 22 for line in wrapped.splitlines()) and "\n" in wrapped
    assert wrap_label("short") == "short"
    assert slot_labels(["a", "b"], 3) == ["block 1: a", "block 2: b", "slot 2"]
