"""sapt-sweep's schema and grid, sapt-report's table, against hand-written expectations
(no SLURM, no training: the report reads run folders written here)."""

from __future__ import annotations

import csv
import json
import shlex
from pathlib import Path

import pytest
import yaml

from sapt_dist.cluster import sweep
from sapt_dist.config import ConfigError, load_config
from sapt_dist.outputs import study

from .conftest import tiny_llama

ROOT = Path(__file__).resolve().parents[1]


def _write(tmp_path, **spec) -> Path:
    base = {
        "name": "s",
        "base": str(ROOT / "sapt_dist/presets/demo.yaml"),
        "output_root": str(tmp_path / "out"),
        "models": {"a": {"model.builder": "demo"}, "b": {"model.demo_hidden_size": 256}},
        "methods": ["sapt", "seq_lora"],
        "orders": ["demo"],
        "seeds": [1, 2],
    }
    base.update(spec)
    p = tmp_path / "sweep.yaml"
    p.write_text(yaml.safe_dump(base))
    return p


def test_grid_configs_and_sbatch_command(tmp_path):
    s = sweep.load_sweep(_write(tmp_path, slurm={"options": ["--time=1:00:00"], "max_parallel": 3}))
    runs = sweep.write_sweep(s)
    assert len(runs) == 2 * 2 * 1 * 2
    assert [r.name for r in runs[:3]] == ["a-sapt-demo-s1", "a-sapt-demo-s2", "a-seq_lora-demo-s1"]
    # each written config is the base + the run's overrides, fully resolved
    r = runs[6]  # b, seq_lora, demo, seed 1
    assert Path(r.config_file).name == "006.yaml"
    cfg = load_config(r.config_file)
    assert (cfg.method, cfg.train.seed, cfg.model.demo_hidden_size) == ("seq_lora", 1, 256)
    assert cfg.output_dir == str(tmp_path / "out/s/runs/b-seq_lora-demo-s1")
    # W&B: the sweep is the group, the method the job type, the run its own name
    assert (cfg.tracking.group, cfg.tracking.name) == ("s", "b-seq_lora-demo-s1")
    assert cfg.tracking.job_type in (None, "seq_lora")
    assert cfg.train.lr == load_config(ROOT / "sapt_dist/presets/demo.yaml").train.lr
    index = json.loads((tmp_path / "out/s/runs.json").read_text())
    assert [x["name"] for x in index["runs"]] == [r.name for r in runs]
    cmd = sweep.sbatch_command(s, len(runs))
    assert "--array=0-7%3" in cmd and "--time=1:00:00" in cmd
    assert cmd[-2:] == ["slurm/train.sbatch", str(tmp_path / "out/s/configs/%a.yaml")]
    # the batch script turns %a into the zero-padded index the configs are named by
    text = (ROOT / "slurm/train.sbatch").read_text()
    assert 'CONFIG=${CONFIG//%a/$(printf %03d "$SLURM_ARRAY_TASK_ID")}' in text
    assert shlex.join(cmd)  # printable


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"model": {}}, "sweep key 'model' is unknown"),
        ({"methods": "sapt"}, "sweep key 'methods' must list method names"),
        ({"seeds": [1, "x"]}, "sweep key 'seeds' must list integers"),
        (
            {"models": {"a": {"model.widht": 3}}},
            r"run 0 \(a-sapt-demo-s1\): .*: unknown config key 'model.widht'",
        ),
        (
            {"methods": ["sapt", "ewc"]},
            r"run 2 \(a-ewc-demo-s1\): .*config key 'method': 'ewc' is not one of",
        ),
        ({"slurm": {"partition": "x"}}, "sweep key 'slurm.partition' is unknown"),
        ({"overrides": ["train.lr"]}, "sweep key 'overrides' must list 'section.key=value'"),
        ({"base": "nowhere.yaml"}, "sweep key 'base' names no file"),
    ],
)
def test_bad_sweep_fails_naming_the_key(tmp_path, spec, message):
    p = _write(tmp_path, **spec)
    with pytest.raises(ConfigError, match=message) as e:
        sweep.write_sweep(sweep.load_sweep(p))
    assert str(p) in str(e.value)
    assert not (tmp_path / "out").exists()  # nothing written before every run is valid


def _fake_run(
    folder: Path, model_path: Path, method: str, matrix, metrics, finished=True, kind="lora"
):
    cfg = {"method": method, "model": {"builder": "pretrained", "path": str(model_path)}}
    cfg.update({"data": {"order": "demo"}, "train": {"seed": 1}, "adapter": {"kind": kind}})
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg))
    if finished:
        (folder / "metrics").mkdir()
        res = {"method": method, "tasks": ["t1", "t2"], "matrix": matrix, "metrics": metrics}
        (folder / "metrics/results.json").write_text(json.dumps(res))
        (folder / "state").mkdir()
        (folder / "state/finished.json").write_text("{}")
    else:
        (folder / "state/blocks").mkdir(parents=True)
        # what a run holds after its first task (the report reads it checked)
        prog = {
            "completed": 1,
            "tasks": ["t1", "t2"],
            "matrix": [[60.0, None]],
            "routing": [{}],
            "losses": {"t1": [1.0, 0.5]},
        }
        (folder / "state/blocks/progress.json").write_text(json.dumps(prog))


def test_report_table_and_plots(tmp_path):
    sizes = {}
    for name, hidden in (("small", 32), ("big", 64)):
        m = tiny_llama(hidden=hidden)
        m.save_pretrained(tmp_path / name)
        sizes[name] = sum(p.numel() for p in m.parameters())
    m1 = {"AP": 50.0, "F.Ra": 10.0, "FWT": None, "BWT": -10.0, "BWT_released": -5.0}
    m2 = {"AP": 70.0, "F.Ra": 0.0, "FWT": None, "BWT": 0.0}
    _fake_run(tmp_path / "r1", tmp_path / "small", "sapt", [[60, None], [50, 50]], m1)
    _fake_run(tmp_path / "r2", tmp_path / "big", "sapt", [[70, None], [70, 70]], m2)
    _fake_run(tmp_path / "r3", tmp_path / "big", "seq_lora", [], {}, finished=False)
    _fake_run(tmp_path / "r4", tmp_path / "big", "sapt", [[10, None], [10, 10]], m1, kind="prompt")
    assert (
        study.main(
            [str(tmp_path / f"r{i}") for i in (1, 2, 3, 4)] + ["--out", str(tmp_path / "rep")]
        )
        == 0
    )
    rows = list(csv.DictReader((tmp_path / "rep/summary.csv").open()))
    # prompt blocks are their own method row, never averaged with LoRA's
    assert rows.pop()["method"] == "sapt+prompt"
    assert [r["run"] for r in rows] == ["r1", "r2", "r3"]
    assert [int(r["params"]) for r in rows] == [sizes["small"], sizes["big"], sizes["big"]]
    assert [r["AP"] for r in rows] == ["50.00", "70.00", ""]
    # the released scorer's BWT where a run has it (runs written before it: blank)
    assert [r["BWT_released"] for r in rows] == ["-5.00", "", ""]
    assert rows[2]["status"] == "running: 1/2 tasks"
    md = (tmp_path / "rep/summary.md").read_text()
    assert "3 of 4 run(s) finished" in md
    assert f"| big | {sizes['big']} | sapt | 1 | 70.00 | 0.00 |" in md.replace(
        str(tmp_path / "big"), "big"
    )
    for f in ("metrics_vs_size.png", "accuracy_matrices.png"):
        assert (tmp_path / "rep" / f).stat().st_size > 0


def test_report_refuses_a_folder_that_is_no_run(tmp_path, capsys):
    assert study.main([str(tmp_path)]) == 2
    assert "neither a sapt-sweep folder" in capsys.readouterr().err


@pytest.mark.slow
def test_local_sweep_runs_and_reports(tmp_path, capsys):
    """--local: the runs one after another in this machine's Python, then the report."""
    from .test_run import TINY

    p = _write(
        tmp_path,
        models={"d128": {"model.builder": "demo"}},
        methods=["seq_lora"],
        seeds=[3],
        overrides=[*TINY, "train.max_steps=2", "eval.max_new_tokens=2"],
    )
    assert sweep.main([str(p), "--local"]) == 0
    run = tmp_path / "out/s/runs/d128-seq_lora-demo-s3"
    res = json.loads((run / "metrics/results.json").read_text())
    assert (run / "state/finished.json").is_file() and len(res["matrix"]) == 2
    assert study.main([str(tmp_path / "out/s")]) == 0
    row = next(csv.DictReader((tmp_path / "out/s/report/summary.csv").open()))
    assert row["status"] == "finished" and float(row["AP"]) == pytest.approx(
        res["metrics"]["AP"], abs=0.005
    )


def test_report_names_a_damaged_results_file_and_goes_on(tmp_path, capsys):
    """A results.json of another shape (a matrix of words) makes its row "damaged",
    naming the file and the key; the other runs are still reported."""
    m = tiny_llama(hidden=32)
    m.save_pretrained(tmp_path / "small")
    good = {"AP": 50.0, "F.Ra": 10.0, "FWT": None, "BWT": -10.0}
    _fake_run(tmp_path / "r1", tmp_path / "small", "sapt", [[60, None], [50, 50]], good)
    _fake_run(tmp_path / "r2", tmp_path / "small", "sapt", [["x", None], [50, 50]], good)
    assert (
        study.main([str(tmp_path / "r1"), str(tmp_path / "r2"), "--out", str(tmp_path / "rep")])
        == 0
    )
    rows = list(csv.DictReader((tmp_path / "rep/summary.csv").open()))
    assert rows[0]["status"] == "finished" and rows[0]["AP"] == "50.00"
    bad = rows[1]["status"]
    assert bad.startswith("damaged (") and "r2/metrics/results.json" in bad, bad
    assert "'matrix'[0][0] must be a number" in bad, bad
