"""Using a run folder: predictions, routing explanations, the block mask, provenance.

One tiny 3-task SAPT run (module fixture, ~15 s on 2 CPU cores) is the subject of every
test here; tests that change a run work on a copy. References: the run's own
evaluation files and routing diagnostics, a model built without the disabled slot, the
training run's accuracy matrix, hashes recomputed from the data files.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from sapt_dist.checkpoint.blocks import (
    BlockStateError,
    CheckpointMismatchError,
    read_manifest,
    set_block_enabled,
)
from sapt_dist.config import load_config
from sapt_dist.data.tasks import collate_prompts
from sapt_dist.method.generation import generate_texts, pooled_prompts, routing_weights
from sapt_dist.outputs.inference import (
    InputError,
    encode_inputs,
    explain_routing,
    judge_routing,
    load_run,
    predict,
    read_inputs,
    reevaluate,
    routing_verdict,
    task_inputs,
)

ROOT = Path(__file__).resolve().parents[1]
TASKS = [
    "task1510_evalution_relation_extraction",
    "task363_sst2_polarity_classification",
    "task875_emotion_classification",
]
#: enough training that predictions and routing differ between inputs, still seconds
SMALL = [
    "data.max_train=64",
    "data.max_dev=8",
    "data.max_test=8",
    "data.max_source_length=96",
    "train.epochs=3",
    "train.micro_batch_size=8",
    "train.checkpoint_every=0",
    "replay.gen_max_steps=3",
    "replay.gen_max_new_tokens=24",
    "eval.max_new_tokens=6",
]


def _train(out: Path, *extra: str) -> Path:
    from sapt_dist.train.run import run

    run(load_config(ROOT / "sapt_dist/presets/demo.yaml", [f"output_dir={out}", *SMALL, *extra]))
    return out


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return _train(tmp_path_factory.mktemp("inference") / "run")


@pytest.fixture
def run_copy(run_dir, tmp_path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(run_dir, dst)
    return dst


def _engine_rows(run: Path, j: int) -> list[dict]:
    path = run / "predictions/after_02_task875_emotion_classification" / f"{j:02d}_{TASKS[j]}.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_predictions_equal_the_engines_evaluation(run_dir, tmp_path, capsys):
    loaded = load_run(run_dir)
    assert loaded.finished and loaded.blocks == TASKS
    some_text = False
    for j, name in enumerate(TASKS):
        rows = predict(loaded, task_inputs(loaded.cfg, name, "test"))
        ref = _engine_rows(run_dir, j)
        assert [r["id"] for r in rows] == [r["id"] for r in ref]
        assert [r["prediction"] for r in rows] == [r["prediction"] for r in ref]
        assert [r["references"] for r in rows] == [r["references"] for r in ref]
        # the run stores the routing weights rounded to 5 places
        for r, e in zip(rows, ref, strict=True):
            assert [round(w, 5) for w in r["routing"]["weights"].values()] == e["weights"]
        some_text |= any(r["prediction"] for r in rows)
    assert some_text, "every prediction is empty: the test would not see a difference"

    # the console script gives the same rows (JSONL) from a JSONL file of the same inputs
    task = task_inputs(loaded.cfg, TASKS[1], "test")
    src = tmp_path / "in.jsonl"
    src.write_text(
        "".join(
            json.dumps({"id": r.id, "input": r.input, "definition": r.definition}) + "\n"
            for r in task
        )
    )
    from sapt_dist.cli.tools import predict_main

    out = tmp_path / "out.jsonl"
    assert predict_main([str(run_dir), "--input", str(src), "--output", str(out)]) == 0
    cli = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["prediction"] for r in cli] == [r["prediction"] for r in _engine_rows(run_dir, 1)]


@pytest.mark.slow
def test_routing_explanation_equals_engine_diagnostics(run_dir, tmp_path):
    loaded = load_run(run_dir)
    model, tok = loaded.model, loaded.tokenizer
    records = [r for name in TASKS for r in task_inputs(loaded.cfg, name, "test")]
    prompts = encode_inputs(loaded, records)
    expl = explain_routing(loaded, prompts, top_k=2)
    ref_w = routing_weights(model, prompts, tok.pad_token_id, loaded.cfg.eval.batch_size)
    assert [list(e["weights"].values()) for e in expl] == ref_w.tolist()  # exactly
    # inputs of different tasks are routed differently (else the check above is weak)
    assert len({round(e["weights"][TASKS[0]], 3) for e in expl}) > 1
    r = model.router
    for k in (0, 9, 23):
        e = expl[k]
        w = torch.tensor(list(e["weights"].values()), dtype=torch.float64)
        # key scores: the paper's formula, computed plainly for one unpadded prompt, with
        # the router input's center (adapter.router_center=tasks: the mean of the seen
        # tasks' mean pooled prompts, from the saved task means; 0 with the paper's input)
        emb = model.embed(torch.tensor([prompts[k]]))[0]
        u = emb.max(dim=0).values
        assert loaded.cfg.adapter.router_center == "tasks"  # the demo preset's setting
        u = u - r.task_means[r.has_mean.bool()].mean(dim=0)
        with torch.no_grad():
            q = r.query(u)
            z_ref = (q @ r.key_bank.t() / r.tau).double()
        z = torch.tensor(list(e["scores"].values()), dtype=torch.float64)
        torch.testing.assert_close(z, z_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(torch.softmax(z, -1), w, rtol=1e-5, atol=1e-6)
        assert e["entropy"] == pytest.approx(float(-(w * w.log()).sum()), rel=1e-9)
        assert [t["block"] for t in e["top"]] == [TASKS[i] for i in w.argsort(descending=True)[:2]]
        assert e["disabled"] == []

    # sapt-route: the same weights, no generation, and a report for people who look
    from sapt_dist.cli.tools import route_main

    src = tmp_path / "inputs.txt"
    src.write_text("the film was a joy\n\nsad and slow\n")
    out, html = tmp_path / "route.jsonl", tmp_path / "route.html"
    args = [str(run_dir), "--input", str(src), "--definition", "Classify the sentiment."]
    assert route_main([*args, "--output", str(out), "--report", str(html)]) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 2 and "prediction" not in rows[0]
    recs = read_inputs(path=src, definition="Classify the sentiment.")
    again = explain_routing(loaded, encode_inputs(loaded, recs))
    again = [judge_routing(e, None, loaded.blocks) for e in again]
    assert [r["routing"] for r in rows] == json.loads(json.dumps(again))
    assert all(r["routing"]["own_block"] is None for r in rows)  # no task known
    page = html.read_text()
    assert page.count("<tr>") == 3 and all(t in page for t in TASKS)
    # a report that explains itself: each input in full (wrapped, not cut to 40
    # characters), no empty prediction column for routing only, readable as any file
    # written under the umask (the conftest's 0022 or the user's)
    assert "the film was a joy</td>" in page and "<th>prediction</th>" not in page
    assert "routing only (sapt-route)" in page
    umask = os.umask(0)
    os.umask(umask)
    assert html.stat().st_mode & 0o777 == 0o666 & ~umask
    # beside the key scores: the input's distance to each task's centre (the run's saved
    # mean pooled training prompts under router_center=tasks), the nearest one named
    u = pooled_prompts(model, encode_inputs(loaded, recs), tok.pad_token_id, 8)
    centres = r.task_means[: len(TASKS)]
    for row, ui in zip(rows, u, strict=True):
        d = row["routing"]["distances"]
        ref = torch.linalg.vector_norm(ui - centres, dim=1).tolist()
        assert list(d.values()) == pytest.approx(ref, rel=1e-5)
        assert row["routing"]["nearest_task"] == TASKS[min(range(3), key=ref.__getitem__)]
        assert "kept by the run" in row["routing"]["centre_source"]
    assert page.count("d ") >= 6 and "nearest task centre" in page
    png = tmp_path / "route.png"
    assert route_main([*args, "--output", str(tmp_path / "x.jsonl"), "--report", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _model_without(loaded, drop: int):
    """A reference SAPTModel that never had slot ``drop``: the other slots' saved tensors
    loaded into a fresh model with one slot fewer."""
    from safetensors.torch import load_file

    from sapt_dist.backbone.load import load_backbone, torch_dtype
    from sapt_dist.method.model import SAPTModel

    cfg, folder = loaded.cfg, loaded.blocks_dir
    backbone, _ = load_backbone(cfg.model)
    keep = [j for j in range(len(TASKS)) if j != drop]
    ref = SAPTModel(
        backbone,
        cfg.adapter,
        n_slots=len(keep),
        dtype=torch_dtype(cfg.model.dtype),
        generator_slot=True,
    )
    router = load_file(str(folder / "router.safetensors"))
    with torch.no_grad():
        ref.router.query.load_state_dict(
            {k.removeprefix("query."): v for k, v in router.items() if k.startswith("query.")}
        )
        for new, old in enumerate(keep):
            block = load_file(str(folder / f"block_{old:02d}.safetensors"))
            for name, layer in ref.layers.items():
                layer.A_bank[new].copy_(block[f"{name}.A"])
                layer.B_bank[new].copy_(block[f"{name}.B"])
            ref.router.key_bank[new].copy_(block["key"])
    ref.start_task(len(keep) - 1, fresh=False)
    if cfg.adapter.router_center == "tasks":
        # the router's input center is the data's, not a block's: the run's (every seen
        # task's mean pooled prompt, the dropped one's too) stays
        seen = router["has_mean"].bool()
        ref.router.center.copy_(router["task_means"][seen].mean(dim=0))
    return ref.eval(), keep


@pytest.mark.slow
def test_disable_is_the_model_without_the_slot_and_enable_restores(run_copy):
    blocks = run_copy / "blocks"
    files = {f.name: _sha(f) for f in blocks.glob("*.safetensors")}
    set_block_enabled(blocks, TASKS[1], False, "suspected of hurting emotion", now="T1")
    m = read_manifest(blocks)
    assert m["disabled"] == [1]
    assert m["history"] == [
        {
            "time": "T1",
            "action": "disable",
            "slot": 1,
            "task": TASKS[1],
            "reason": "suspected of hurting emotion",
        }
    ]
    assert {f.name: _sha(f) for f in blocks.glob("*.safetensors")} == files  # files kept

    masked = load_run(run_copy)
    ref, keep = _model_without(masked, drop=1)
    tok, bs = masked.tokenizer, masked.cfg.eval.batch_size
    records = [r for name in TASKS for r in task_inputs(masked.cfg, name, "test")]
    prompts = encode_inputs(masked, records)
    w = routing_weights(masked.model, prompts, tok.pad_token_id, bs)
    w_ref = routing_weights(ref, prompts, tok.pad_token_id, bs)
    assert torch.all(w[:, 1] == 0)
    torch.testing.assert_close(w[:, keep], w_ref, rtol=0, atol=0)
    batch = collate_prompts(prompts[:8], tok.pad_token_id)
    with torch.no_grad():
        a = masked.model(batch["input_ids"], batch["attention_mask"]).logits
        b = ref(batch["input_ids"], batch["attention_mask"]).logits
    # the mixture's matmul sums over one block fewer (zero-weighted terms): bit-identical
    # on the CPU this was written on; the tolerance leaves room for a BLAS that orders the
    # additions differently
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    mnt = masked.cfg.eval.max_new_tokens
    preds = generate_texts(masked.model, tok, prompts, bs, mnt)
    assert preds == generate_texts(ref, tok, prompts, bs, mnt)
    expl = explain_routing(masked, prompts[:3])
    assert expl[0]["disabled"] == [TASKS[1]] and TASKS[1] not in [
        t["block"] for t in expl[0]["top"]
    ]
    # the original model scores the inputs differently: the mask did something
    original = [p for j in range(3) for p in (r["prediction"] for r in _engine_rows(run_copy, j))]
    saved_w = [r["weights"] for j in range(3) for r in _engine_rows(run_copy, j)]
    w_orig = torch.tensor(saved_w)
    assert not torch.allclose(w_orig, w, atol=1e-3)

    set_block_enabled(blocks, 1, True, "false alarm", now="T2")
    m = read_manifest(blocks)
    assert m["disabled"] == [] and [h["action"] for h in m["history"]] == ["disable", "enable"]
    restored = load_run(run_copy)
    assert generate_texts(restored.model, tok, prompts, bs, mnt) == original
    w_back = routing_weights(restored.model, prompts, tok.pad_token_id, bs)
    assert [[round(x, 5) for x in row] for row in w_back.tolist()] == saved_w


@pytest.mark.slow
def test_mask_edits_are_validated(run_copy, capsys):
    blocks = run_copy / "blocks"
    before = (blocks / "manifest.json").read_text()
    with pytest.raises(BlockStateError, match="no block named 'nope'; the blocks are 0: task1510"):
        set_block_enabled(blocks, "nope", False, "x")
    with pytest.raises(BlockStateError, match=r"slot 3 out of range: blocks are slots 0..2"):
        set_block_enabled(blocks, 3, False, "x")
    with pytest.raises(BlockStateError, match="give a reason"):
        set_block_enabled(blocks, 0, False, "  ")
    with pytest.raises(BlockStateError, match="is already enabled"):
        set_block_enabled(blocks, 0, True, "x")
    assert (blocks / "manifest.json").read_text() == before  # refused edits wrote nothing
    set_block_enabled(blocks, 0, False, "a")
    set_block_enabled(blocks, 2, False, "b")
    with pytest.raises(BlockStateError, match="last enabled block"):
        set_block_enabled(blocks, 1, False, "c")
    with pytest.raises(BlockStateError, match="already disabled"):
        set_block_enabled(blocks, 2, False, "c")

    from sapt_dist.cli.tools import blocks_main

    assert blocks_main(["enable", str(run_copy), "2", "--reason", "back"]) == 0
    assert blocks_main(["history", str(run_copy)]) == 0
    out = capsys.readouterr().out
    assert (
        "disable   0 task1510" in out and "enable    2 task875_emotion_classification  back" in out
    )
    # an unfinished run's blocks are not masked (training would rewrite them)
    (run_copy / "state/finished.json").unlink()
    assert blocks_main(["disable", str(run_copy), "1", "--reason", "x"]) == 2
    assert "not finished" in capsys.readouterr().err


@pytest.mark.slow
def test_hand_edited_or_foreign_manifest_is_refused(run_copy, tmp_path, capsys):
    blocks = run_copy / "blocks"
    path = blocks / "manifest.json"
    original = path.read_text()
    # a mask switched by hand (no history, no new digest)
    m = json.loads(original)
    m["disabled"] = [1]
    path.write_text(json.dumps(m, indent=2))
    with pytest.raises(CheckpointMismatchError, match="changed after sapt-dist wrote it"):
        load_run(run_copy)
    from sapt_dist.cli.tools import blocks_main, predict_main

    assert predict_main([str(run_copy), "--text", "hi", "--definition", "d"]) == 2
    assert "edited by hand" in capsys.readouterr().err
    assert blocks_main(["enable", str(run_copy), "1", "--reason", "x"]) == 2
    # a mask with a valid digest but no history behind it (edited and re-hashed)
    from sapt_dist.checkpoint.blocks import manifest_digest

    m["digest"] = manifest_digest(m)
    path.write_text(json.dumps(m))
    with pytest.raises(CheckpointMismatchError, match=r"'disabled' \[1\] is not what its history"):
        read_manifest(blocks)

    # the manifest of another run (same tasks, another seed) copied over this one's
    other = _train(tmp_path / "other", "train.seed=7", "train.epochs=1")
    shutil.copy(other / "blocks/manifest.json", path)
    with pytest.raises(CheckpointMismatchError, match="written by another run"):
        load_run(run_copy)
    # ... and with its config.yaml too: the block files then give it away
    shutil.copy(other / "config.yaml", run_copy / "config.yaml")
    with pytest.raises(
        CheckpointMismatchError, match="manifest.json does not belong to the files beside it"
    ):
        load_run(run_copy)


def test_bad_input_files_get_clear_errors(tmp_path, capsys):
    def write(name: str, text: str) -> Path:
        p = tmp_path / name
        p.write_text(text)
        return p

    cases = [
        (write("empty.jsonl", ""), r"empty\.jsonl: no inputs in the file \(it is empty\)"),
        (write("blank.txt", "\n  \n"), r"blank\.txt: no inputs"),
        (
            write("bad.jsonl", '{"input": "a", "definition": "d"}\n{"input": "b",\n'),
            r"bad\.jsonl line 2: not valid JSON",
        ),
        (write("nofield.jsonl", '{"text": "a", "definition": "d"}\n'), r"line 1: no 'input' field"),
        (write("list.jsonl", '["a"]\n'), r"line 1: expected a JSON object"),
        (write("nodef.jsonl", '{"input": "a"}\n'), r"nodef\.jsonl line 1: no definition"),
        (write("int.jsonl", '{"input": 3, "definition": "d"}\n'), r"'input' must be a string"),
        (write("split.json", '{"Definition": ["d"]}'), r"split\.json has no 'Instances' key"),
        (
            write("nodef.json", '{"Definition": [], "Instances": [{"input": "a", "output": "b"}]}'),
            r"nodef\.json has a missing or empty 'Definition'; use --task",
        ),
        (tmp_path / "missing.jsonl", r"input file not found: .*missing\.jsonl"),
    ]
    for path, msg in cases:
        with pytest.raises(InputError, match=msg):
            read_inputs(path=path)
    with pytest.raises(InputError, match="--text: no definition"):
        read_inputs(texts=["hello"])
    ok = read_inputs(path=write("ok.jsonl", '{"input": "a", "definition": "d", "id": 5}\n\n'))
    assert [(r.id, r.input, r.definition) for r in ok] == [("5", "a", "d")]

    # the console script: status 2 and the message, before any run or model is touched
    from sapt_dist.cli.tools import predict_main

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(
        yaml.safe_dump({"model": {"builder": "demo"}, "output_dir": str(run)})
    )
    assert predict_main([str(run), "--input", str(cases[2][0])]) == 2
    assert "bad.jsonl line 2: not valid JSON" in capsys.readouterr().err
    assert predict_main([str(run), "--text", "x", "--definition", "d", "--report", "r.pdf"]) == 2
    assert "the report is .html or .png" in capsys.readouterr().err
    assert predict_main([str(tmp_path / "nowhere"), "--text", "x", "--definition", "d"]) == 2
    assert "no config.yaml" in capsys.readouterr().err


@pytest.mark.slow
def test_provenance_recorded_per_block(run_dir, capsys):
    m = read_manifest(run_dir / "blocks")
    progress = json.loads((run_dir / "state/blocks/progress.json").read_text())
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert [p["slot"] for p in m["provenance"]] == [0, 1, 2]
    for j, p in enumerate(m["provenance"]):
        assert p["task"] == TASKS[j] and p["method"] == "sapt"
        (d,) = p["data"]
        assert d["split_sizes"] == {"train": 64, "dev": 8, "test": 8}
        # the hash of what the block learned from, recomputed from the data file
        raw = json.loads((Path(d["folder"]) / "train.json").read_text())
        ex = [
            [
                str(x["id"]),
                x["input"],
                x["output"] if isinstance(x["output"], list) else [x["output"]],
            ]
            for x in raw["Instances"][:64]
        ]
        body = {"definition": raw["Definition"][0].strip(), "examples": ex}
        text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        assert d["train_sha256"] == hashlib.sha256(text.encode()).hexdigest()
        # its scores on every task at the time: row j of the accuracy matrix
        assert list(p["scores_after"].values()) == progress["matrix"][j]
        assert p["config"] == config and p["versions"]["torch"] == torch.__version__
        assert p["trained_at"].endswith("+00:00")
    assert m["run_config"] == config

    from sapt_dist.cli.tools import blocks_main

    assert blocks_main(["list", str(run_dir)]) == 0
    table = capsys.readouterr().out
    assert table.count("| enabled |") == 3 and d["train_sha256"][:12] in table
    assert blocks_main(["provenance", str(run_dir), TASKS[1]]) == 0
    (rec,) = json.loads(capsys.readouterr().out)
    assert rec == m["provenance"][1]


@pytest.mark.slow
def test_reevaluate_with_the_mask(run_copy):
    metrics = run_copy / "metrics"
    kept = {f.name: _sha(f) for f in metrics.iterdir()}
    training = json.loads((metrics / "accuracy_matrix.json").read_text())["matrix"]
    # no mask: the last row of the training matrix, exactly
    res = reevaluate(load_run(run_copy))
    assert res["row"] == training[-1] and res["difference"] == [0.0, 0.0, 0.0]
    # a block off: the new row is written beside the training matrix, which is untouched
    set_block_enabled(run_copy / "blocks", 0, False, "try without it")
    from sapt_dist.cli.train import main

    assert (
        main(["--config", str(run_copy / "config.yaml"), f"output_dir={run_copy}", "--reevaluate"])
        == 0
    )
    saved = json.loads((metrics / "accuracy_matrix_reevaluated.json").read_text())
    assert saved["disabled"] == [TASKS[0]] and saved["training_row"] == training[-1]
    assert saved["difference"] == [b - a for a, b in zip(training[-1], saved["row"], strict=True)]
    assert {f.name: _sha(f) for f in metrics.iterdir() if f.name in kept} == kept
    preds = run_copy / "predictions/reevaluated/00_task1510_evalution_relation_extraction.jsonl"
    rows = [json.loads(x) for x in preds.read_text().splitlines()]
    assert len(rows) == 8 and all(r["weights"][0] == 0.0 for r in rows)


@pytest.mark.slow
def test_partly_finished_run_predicts_from_state(run_copy):
    """A run stopped after its tasks' blocks were saved but before the final copy:
    prediction reads state/blocks; the mask cannot be changed there."""
    shutil.rmtree(run_copy / "blocks")
    (run_copy / "state/finished.json").unlink()
    loaded = load_run(run_copy)
    assert not loaded.finished and loaded.blocks_dir == run_copy / "state/blocks"
    rows = predict(loaded, task_inputs(loaded.cfg, TASKS[2], "test"))
    assert [r["prediction"] for r in rows] == [r["prediction"] for r in _engine_rows(run_copy, 2)]


def _expl(weights: dict[str, float], scores: dict[str, float] | None = None) -> dict:
    import math

    top = sorted(weights, key=lambda b: -weights[b])
    ent = -sum(w * math.log(w) for w in weights.values() if w > 0)
    return {
        "weights": weights,
        "top": [{"block": b, "slot": list(weights).index(b), "weight": weights[b]} for b in top],
        "scores": scores,
        "entropy": ent,
        "max_entropy": math.log(len(weights)),
        "disabled": [],
    }


def test_routing_verdict_in_words() -> None:
    """Own-task checks, weak routing and the summary, against hand-built explanations."""
    blocks = ["cb", "wic", "boolq"]
    right = judge_routing(_expl({"cb": 0.05, "wic": 0.9, "boolq": 0.05}), "wic", blocks)
    assert right["own_block"] is True and not right["weak"]
    assert right["note"] == "routes to its own task's block wic (weight 0.90)"
    wrong = judge_routing(_expl({"cb": 0.8, "wic": 0.1, "boolq": 0.1}), "boolq", blocks)
    assert wrong["own_block"] is False
    assert "not to its own task's block boolq (0.10)" in wrong["note"]
    flat = judge_routing(_expl({"cb": 0.34, "wic": 0.33, "boolq": 0.33}), None, blocks)
    assert flat["weak"] and flat["own_block"] is None and "weak routing" in flat["note"]
    other = judge_routing(_expl({"cb": 0.9, "wic": 0.05, "boolq": 0.05}), "rte", blocks)
    assert other["own_block"] is None and "rte has no block" in other["note"]
    v = routing_verdict([{"routing": x} for x in (right, wrong, flat, other)])
    assert (v["inputs"], v["known_task"], v["own_block"], v["weak"]) == (4, 2, 1, 1)
    assert v["per_task"] == {
        "wic": {"own_block": 1, "inputs": 1},
        "boolq": {"own_block": 0, "inputs": 1},
    }
    assert "1 of 2 with a known task went to their own task's block (50.0%)" in v["text"]


def test_routing_report_shows_inputs_and_predictions_in_full(tmp_path) -> None:
    """No model needed: an input far longer than 40 characters is in the page whole (its
    HTML-escaped text), a predicting report has its prediction column filled, and the
    PNG's labels come from the inputs."""
    from sapt_dist.outputs.inference import routing_report

    long_input = "A review: " + "the plot <thickens> & " * 8 + "the end."
    blocks = ["task_a", "task_b"]
    rows = [
        {
            "id": "7",
            "input": long_input,
            "prediction": "POS",
            "routing": judge_routing(
                {
                    "weights": {"task_a": 0.9, "task_b": 0.1},
                    "top": [{"block": "task_a", "slot": 0, "weight": 0.9}],
                    "scores": {"task_a": 1.5, "task_b": -0.7},
                    "entropy": 0.33,
                    "max_entropy": 0.69,
                    "disabled": [],
                    "distances": {"task_a": 1.25, "task_b": 3.5},
                    "nearest_task": "task_a",
                    "centre_source": "test centres",
                },
                "task_a",
                blocks,
            ),
        }
    ]
    page = routing_report(tmp_path / "r.html", rows, blocks).read_text()
    import html as html_mod

    assert html_mod.escape(long_input) in page
    assert "<th>prediction</th>" in page and '<td class="text">POS</td>' in page
    assert "d 1.25 &#9679;" in page and "nearest task centre: task_a" in page
    assert "test centres" in page
    png = routing_report(tmp_path / "r.png", rows, blocks)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
