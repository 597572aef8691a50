"""Hostile state files, configs and predict inputs (issue 23, cases 4-6 and 8-11).

Each case of the issue is reproduced and must end in a clear error naming the file (exit 2)
or, for a full disk, one line naming the file being written (exit 1), never a traceback.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sapt_dist.checkpoint.atomic import (
    UnreadableFileError,
    atomic_write_checked_json,
    check_shape,
    checksum_files,
    nonempty,
    verify_checksums,
)
from sapt_dist.checkpoint.blocks import CheckpointMismatchError, read_manifest, save_blocks
from sapt_dist.checkpoint.run_state import RunState, StateDamagedError
from sapt_dist.config import ConfigError, load_config

from .conftest import ROOT, subprocess_env
from .test_run_state import _state

DEMO = ["model.builder=demo"]


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


# ------------------------------------------------------------------ the schema helper
def test_check_shape_names_the_first_wrong_key(tmp_path) -> None:
    schema = {"a": int, "b?": [str], "c": {str: (float, None)}}
    assert check_shape({"a": 1, "c": {"x": 1, "y": None}}, schema, "f.json") is not None
    for data, said in [
        ([], "must be an object, not a list"),
        ({"c": {}}, "has no key 'a'"),
        ({"a": True, "c": {}}, "'a' must be an integer, not true/false"),
        ({"a": 1, "b": ["x", 2], "c": {}}, r"'b'\]\[1\] must be a string|'b'\[1\] must be"),
        ({"a": 1, "c": {"x": "1"}}, r"'c'\]?\['x'\] must be a number or null"),
    ]:
        with pytest.raises(UnreadableFileError, match=rf"f\.json: damaged, .*{said}"):
            check_shape(data, schema, "f.json")
    with pytest.raises(UnreadableFileError, match="is empty"):
        check_shape({}, nonempty({str: str}), "f.json")


@pytest.mark.parametrize("sums", [{}, [], None, "x", {"a": 3}, {"../x": "0" * 64}])
def test_a_malformed_checksum_list_is_damage(tmp_path, sums) -> None:
    """The one checked-folder helper: an empty or malformed list checks nothing, so it is
    damage naming the list, never 'nothing to check' or an AttributeError."""
    (tmp_path / "a").write_text("x")
    with pytest.raises(StateDamagedError, match=r"sums\.json: damaged"):
        verify_checksums(tmp_path, sums, StateDamagedError, listed_in=tmp_path / "sums.json")


def test_a_checksum_list_must_name_every_required_file(tmp_path) -> None:
    (tmp_path / "a").write_text("x")
    (tmp_path / "b").write_text("y")
    sums = checksum_files(tmp_path, ["a"])
    verify_checksums(tmp_path, sums, StateDamagedError, listed_in="l")
    with pytest.raises(StateDamagedError, match=r"l: damaged, .*/b is not in its checksum list"):
        verify_checksums(tmp_path, sums, StateDamagedError, listed_in="l", required=["a", "b"])


# ------------------------------------------------------------------ case 4: checksums.json
@pytest.mark.parametrize("content", ["{}", "[]", '{"meta.json": "%s"}', "null", '"x"'])
def test_step_checksums_replaced_are_refused(tmp_path, content) -> None:
    """checksums.json replaced by {} (and a byte of params.safetensors flipped): refused,
    naming the file; [] is no AttributeError; a list naming only meta.json lets no changed
    file through."""
    rs = RunState(tmp_path)
    rs.save_step(0, _state(5))
    step = tmp_path / "state" / "step"
    if "%s" in content:
        content = content % checksum_files(step, ["meta.json"])["meta.json"]
    (step / "checksums.json").write_text(content)
    _flip(step / "params.safetensors")
    with pytest.raises(StateDamagedError, match=r"checksums\.json: damaged.*delete .*state/step"):
        rs.load_step(0)


def test_step_meta_of_another_shape_is_refused(tmp_path) -> None:
    """meta.json rewritten with a shape the loader cannot use (checksums recomputed)."""
    rs = RunState(tmp_path)
    rs.save_step(0, _state(5))
    step = tmp_path / "state" / "step"
    for meta, said in [
        ([1, 2], "must be an object, not a list"),
        ({"task_index": "0", "step": 5, "losses": [], "state": {}}, "'task_index' must be"),
        ({"task_index": 0, "step": 5, "losses": [], "state": {"__tensor__": "s"}}, "'state'"),
    ]:
        (step / "meta.json").write_text(json.dumps(meta))
        sums = checksum_files(step, ["meta.json", "params.safetensors", "state.safetensors"])
        (step / "checksums.json").write_text(json.dumps(sums))
        with pytest.raises(StateDamagedError, match=rf"meta\.json: damaged.*{said}"):
            rs.load_step(0)


# ------------------------------------------------------------------ case 5: manifest.json
def _run_with_blocks(tmp_path: Path) -> RunState:
    from sapt_dist.config import AdapterConfig
    from sapt_dist.method.model import SAPTModel

    from .conftest import tiny_llama

    rs = RunState(tmp_path)
    rs.check_or_save_config(load_config(None, [*DEMO, f"output_dir={tmp_path}"]))
    model = SAPTModel(tiny_llama(), AdapterConfig(rank=2, alpha=4), n_slots=2)
    progress = rs.load_progress()
    progress.update(completed=1, tasks=["a", "b"], matrix=[[37.5, None]])
    save_blocks(model, rs.blocks, ["a"], extra_files=rs.progress_file(progress))
    return rs


@pytest.mark.parametrize("content", ["[]", "{}", "null", "3", '{"format": "sapt-dist-blocks"}'])
def test_blocks_manifest_replaced_is_refused(tmp_path, content, capsys) -> None:
    rs = _run_with_blocks(tmp_path)
    manifest = rs.blocks / "manifest.json"
    manifest.write_text(content)
    with pytest.raises(CheckpointMismatchError, match=r"state/blocks/manifest\.json"):
        rs.load_progress()
    with pytest.raises(CheckpointMismatchError, match=r"manifest\.json"):
        read_manifest(rs.blocks)
    from sapt_dist.cli.tools import blocks_main

    assert blocks_main(["list", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "manifest.json" in err and "Traceback" not in err


def test_a_manifest_of_the_right_digest_but_another_shape_is_refused(tmp_path) -> None:
    """A manifest rewritten with a recomputed digest (the digest is no signature): its
    shape is still checked, naming the key."""
    from sapt_dist.checkpoint.blocks import _manifest_text

    rs = _run_with_blocks(tmp_path)
    path = rs.blocks / "manifest.json"
    m = json.loads(path.read_text())
    m["files"] = {}
    path.write_text(_manifest_text(m))
    with pytest.raises(CheckpointMismatchError, match=r"manifest\.json: damaged, 'files' is empty"):
        read_manifest(rs.blocks)
    m["files"] = {"router.safetensors": checksum_files(rs.blocks)["router.safetensors"]}
    path.write_text(_manifest_text(m))
    from sapt_dist.checkpoint.blocks import check_files

    with pytest.raises(CheckpointMismatchError, match=r"block_00\.safetensors is not in its"):
        check_files(read_manifest(rs.blocks), rs.blocks)


def test_progress_layout_and_finished_of_another_shape_are_refused(tmp_path) -> None:
    rs = _run_with_blocks(tmp_path)
    cfg = load_config(None, [*DEMO, f"output_dir={tmp_path}"])
    # progress.json with a matrix row of the wrong width, written with its checksum
    from sapt_dist.config import AdapterConfig
    from sapt_dist.method.model import SAPTModel

    from .conftest import tiny_llama

    model = SAPTModel(tiny_llama(), AdapterConfig(rank=2, alpha=4), n_slots=2)
    bad = {"completed": 1, "tasks": ["a", "b"], "matrix": [[37.5]], "routing": [], "losses": {}}
    save_blocks(model, rs.blocks, ["a"], extra_files={"progress.json": json.dumps(bad)})
    with pytest.raises(StateDamagedError, match=r"progress\.json: damaged, matrix row 0"):
        rs.load_progress()
    bad["matrix"], bad["losses"] = [[37.5, None]], []
    save_blocks(model, rs.blocks, ["a"], extra_files={"progress.json": json.dumps(bad)})
    with pytest.raises(StateDamagedError, match=r"progress\.json: damaged, 'losses' must be an"):
        rs.load_progress()
    # layout.json: valid, self-checksummed, another shape
    atomic_write_checked_json(rs.state / "layout.json", {"world_size": 1, "global_batch": "8"})
    with pytest.raises(StateDamagedError, match=r"layout\.json: damaged .*'"):
        RunState(tmp_path).check_or_save_config(cfg)
    # finished.json
    for content in ["[]", '{"finished": false}', "{"]:
        (rs.state / "finished.json").write_text(content)
        with pytest.raises(StateDamagedError, match=r"finished\.json: damaged"):
            rs.is_finished()


def test_a_saved_config_nested_deep_is_damage(tmp_path) -> None:
    cfg = load_config(None, [*DEMO, f"output_dir={tmp_path}"])
    RunState(tmp_path).check_or_save_config(cfg)
    (tmp_path / "config.yaml").write_text("method: " + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(StateDamagedError, match=r"config\.yaml: this run folder's saved config"):
        RunState(tmp_path).check_or_save_config(cfg)


def test_damaged_pseudo_samples_and_trajectory(tmp_path, caplog) -> None:
    from sapt_dist.outputs.trajectory import RoutingTrajectory
    from sapt_dist.train.replay import load_jsonl

    pseudo = tmp_path / "00_t.jsonl"
    pseudo.write_text('{"definition": "d", "input": "x"}\n{"definition": 3, "input": "x"}\n')
    with pytest.raises(UnreadableFileError, match=r"00_t\.jsonl:2: damaged, 'definition'"):
        load_jsonl(pseudo)
    # a diagnostic file: started again, said naming it, never a crash
    traj = RoutingTrajectory(tmp_path, ["a"], [[[1, 2]]], 2)
    traj.path.parent.mkdir(parents=True)
    for content in ["[]", '{"a": []}', '{"a": {"x": {"global_step": 1, "mean": {}}}}']:
        traj.path.write_text(content)
        traj.write(0, 3, {"a": [1.0]}, 3, final=False)
        assert json.loads(traj.path.read_text()) == {
            "a": {"3": {"global_step": 3, "mean": {"a": [1.0]}}}
        }
    assert "routing_trajectory.json: damaged" in caplog.text


# ------------------------------------------------------------------ case 6: failed starts
def _bad_gguf(tmp_path: Path) -> Path:
    path = tmp_path / "bad.gguf"
    path.write_bytes(b"NOPE" + b"\0" * 64)
    return path


@pytest.mark.parametrize("case", ["nope", "gguf", "slots"])
def test_a_failed_start_leaves_the_folder_free(tmp_path, case) -> None:
    """model.path=/nope, a bad-magic .gguf, adapter.n_slots=1 for a 2-task run: exit 2
    before config.yaml is written, so the corrected command is not 'another config'."""
    from sapt_dist.train.run import run

    out = tmp_path / "run"
    tasks = [
        "data.order=custom",
        "data.tasks=[task363_sst2_polarity_classification,task875_emotion_classification]",
    ]
    bad = {
        "nope": ["model.builder=pretrained", "model.path=/nope"],
        "gguf": ["model.builder=pretrained", f"model.path={_bad_gguf(tmp_path)}"],
        "slots": [*DEMO, "adapter.n_slots=1"],
    }[case]
    cfg = load_config(ROOT / "sapt_dist/presets/demo.yaml", [f"output_dir={out}", *tasks, *bad])
    t0 = time.perf_counter()
    with pytest.raises(
        ConfigError, match={"nope": "model.path", "gguf": "bad.gguf", "slots": "slot"}[case]
    ):
        run(cfg)
    assert time.perf_counter() - t0 < 60
    assert not (out / "config.yaml").exists() and not (out / "state" / "layout.json").exists()
    fixed = load_config(ROOT / "sapt_dist/presets/demo.yaml", [f"output_dir={out}", *tasks])
    RunState(out).check_or_save_config(fixed)  # the corrected command binds the folder


@pytest.mark.parametrize(
    "overrides",
    [
        ["model.builder=pretrained", "model.path=~nouser/x"],
        ["distributed.deepspeed_config=~nouser/x"],
        ["data.instructions=~nouser/x"],
        ["model.builder=pretrained", "model.path=/dev/zero"],
        ["distributed.deepspeed_config=/dev/zero"],
        ["data.root=/etc/passwd"],
        ["data.template=a\0b"],
    ],
)
def test_hostile_paths_are_exit_2_before_the_folder_is_bound(tmp_path, overrides, capsys) -> None:
    """What the fuzz test (tests/test_fuzz.py) found: ``~user`` of no user was a
    RuntimeError traceback from pathlib."""
    from sapt_dist.cli.train import main

    out = tmp_path / "run"
    assert main([*DEMO, *overrides, f"output_dir={out}"]) == 2
    assert "Traceback" not in capsys.readouterr().err
    assert not (out / "config.yaml").exists()


# ------------------------------------------------------------------ case 8 + 11: configs
def _deep_yaml(tmp_path: Path, style: str, n: int = 100_000) -> Path:
    path = tmp_path / f"deep_{style}.yaml"
    body = "[" * n + "]" * n if style == "flow" else "\n    " + "- " * n + "x"
    path.write_text(
        f"method: sapt\nmodel:\n  builder: demo\ndata:\n  order: custom\n  tasks: {body}\n"
    )
    return path


@pytest.mark.parametrize("style", ["flow", "block"])
def test_deeply_nested_yaml_is_named(tmp_path, style, capsys) -> None:
    path = _deep_yaml(tmp_path, style)
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match=rf"deep_{style}\.yaml.* line [0-9]+.*nest"):
        load_config(path)
    assert time.perf_counter() - t0 < 5
    from sapt_dist.cli.train import main

    assert main(["--config", str(path), f"output_dir={tmp_path / 'r'}"]) == 2
    assert "deep_" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_deeply_nested_yaml_from_a_shell(tmp_path) -> None:
    from .conftest import cli_cmd

    path = _deep_yaml(tmp_path, "flow")
    res = subprocess.run(
        cli_cmd(tmp_path / "r", config=path),
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 2, res.stderr[-2000:]
    assert "deep_flow.yaml line 6" in res.stderr and "Traceback" not in res.stderr


def test_a_50_mb_config_is_refused_at_once(tmp_path) -> None:
    """Issue case 11: 179 s and 4.3 GB before; now refused unread (size bound) in ms, and a
    1 MiB config of many keys (the bound) parses in seconds through libyaml."""
    import resource

    path = tmp_path / "huge.yaml"
    line = "key_{:08d}: value\n"
    with path.open("w") as f:
        f.write("method: sapt\n")
        f.writelines(line.format(i) for i in range(50 * 2**20 // len(line.format(0))))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match=r"huge\.yaml: 50\.0 MiB, larger than a config"):
        load_config(path)
    assert time.perf_counter() - t0 < 1
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 50_000  # KiB
    small = tmp_path / "many.yaml"
    with small.open("w") as f:
        f.write("method: sapt\n")
        f.writelines(line.format(i) for i in range(2**20 // len(line.format(0)) - 1))
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match=r"unknown config key 'key_00000000'"):
        load_config(small)
    assert time.perf_counter() - t0 < 30


def test_huge_numbers_and_lone_surrogates_in_configs(tmp_path) -> None:
    path = tmp_path / "digits.yaml"
    path.write_text("method: sapt\ntrain:\n  seed: " + "9" * 100_000 + "\n")
    with pytest.raises(ConfigError, match=r"digits\.yaml line 3: a number of 100000"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"'train.epochs': 1000.* is out of range"):
        load_config(None, [*DEMO, "train.epochs=1" + "0" * 300])
    with pytest.raises(ConfigError, match=r"'train.lr': 1000.* is too large"):
        load_config(None, [*DEMO, "train.lr=1" + "0" * 350])
    with pytest.raises(ConfigError, match=r"override train.lr=\[ line 2 column 1: not valid YAML"):
        load_config(None, [*DEMO, "train.lr=["])
    surr = tmp_path / "surr.yaml"
    surr.write_text('data:\n  template: "a\\ud800b {definition} {input}"\n')
    with pytest.raises(ConfigError, match=r"surr\.yaml"):
        load_config(surr)
    # past the YAML reader (PyYAML's own loader takes the escape): the key is named
    with pytest.raises(ConfigError, match=r"override data.template=.*: not valid Unicode"):
        load_config(None, [*DEMO, "data.template=a\ud800b"])
    with pytest.raises(ConfigError, match=r"unknown config key '1'"):
        load_config(None, [*DEMO, "1=2"])


# ------------------------------------------------------------------ case 10: predict inputs
@pytest.fixture
def run_folder(tmp_path) -> Path:
    out = tmp_path / "run"
    RunState(out).check_or_save_config(load_config(None, [*DEMO, f"output_dir={out}"]))
    return out


def _predict_inputs(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    n = 200_000
    cases = {
        "deep.jsonl": (
            '{"input": "x", "definition": "d"}\n{"input": ' + "[" * n + "]" * n + "}\n",
            r"deep\.jsonl line 2: nested too deeply",
        ),
        "t/test.json": (
            '{"Definition": ["d"],\n"Instances": [{"input": ' + "[" * n + "]" * n + "}]}",
            r"test\.json: nested too deeply \(line 2\)",
        ),
        "id.jsonl": (
            '{"input": "x", "definition": "d", "id": ' + "1" * 100_000 + "}\n",
            r"id\.jsonl line 1: a number too long",
        ),
        "surrogate.jsonl": (
            '{"input": "a\\ud800b", "definition": "d"}\n',
            r"surrogate\.jsonl line 1: 'input': not valid Unicode",
        ),
        "t/dev.json": (
            '{"Definition": ["d"], "Instances": [{"input": "a\\ud800b", "output": "y"}]}',
            r"dev\.json: Instances\[0\]: 'input': not valid Unicode",
        ),
    }
    out = {}
    for name, (text, said) in cases.items():
        path = tmp_path / name
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
        out[name] = (path, said)
    return out


def test_hostile_predict_inputs_are_exit_2_before_the_model(
    tmp_path, run_folder, monkeypatch, capsys
) -> None:
    from sapt_dist.cli.tools import predict_main
    from sapt_dist.outputs import inference

    def no_model(*a, **k):
        raise AssertionError("the model must not load for bad inputs")

    monkeypatch.setattr(inference, "load_run", no_model)
    for name, (path, said) in _predict_inputs(tmp_path).items():
        assert predict_main([str(run_folder), "--input", str(path)]) == 2, name
        err = capsys.readouterr().err
        assert "Traceback" not in err
        import re

        assert re.search(said, err), (name, err[-500:])
    assert predict_main([str(run_folder), "--text", "a\udcffb", "--definition", "d"]) == 2
    assert "--text number 1: 'input': not valid Unicode" in capsys.readouterr().err


def test_hostile_predict_inputs_from_a_shell(tmp_path, run_folder) -> None:
    """The same as a user's shell runs it (one process for all, to keep it short)."""
    files = _predict_inputs(tmp_path)
    code = (
        "import sys; from sapt_dist.cli.tools import predict_main\n"
        "codes = [predict_main([sys.argv[1], '--input', f]) for f in sys.argv[2:]]\n"
        "print(codes); sys.exit(0 if set(codes) == {2} else 1)\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code, str(run_folder), *(str(p) for p, _ in files.values())],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stdout + res.stderr[-3000:]
    assert "Traceback" not in res.stderr


# ------------------------------------------------------------------ case 9: a full disk
def _disk_full(*a, **k):
    from safetensors import SafetensorError

    # what safetensors raises when the write fails for space (the traceback)
    raise SafetensorError(
        "Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "
        '"No space left on device" })'
    )


def test_a_full_disk_at_a_step_checkpoint_names_the_file(tmp_path, monkeypatch, capsys) -> None:
    import errno

    import safetensors.torch

    rs = RunState(tmp_path)
    rs.save_step(0, _state(3))
    before = {p.name: p.read_bytes() for p in (tmp_path / "state" / "step").iterdir()}
    monkeypatch.setattr(safetensors.torch, "save_file", _disk_full)
    with pytest.raises(OSError) as info:
        rs.save_step(0, _state(5))
    assert info.value.errno == errno.ENOSPC
    assert info.value.filename == str(tmp_path / "state" / "step" / "params.safetensors")
    # the state is intact: the last checkpoint, byte for byte, and no temporary folder left
    assert {p.name: p.read_bytes() for p in (tmp_path / "state" / "step").iterdir()} == before
    assert [p.name for p in (tmp_path / "state").iterdir()] == ["step"]
    got, _ = RunState(tmp_path).load_step(0)
    assert got.step == 3
    # from the command line: one line naming the file and how to resume, exit 1
    from sapt_dist.cli import train as cli
    from sapt_dist.train import run as run_module

    monkeypatch.setattr(
        run_module, "run", lambda cfg: RunState(cfg.output_dir).save_step(0, _state(5))
    )
    assert cli.main([*DEMO, f"output_dir={tmp_path}"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    line = [x for x in err.splitlines() if "no space left" in x]
    assert len(line) == 1 and "state/step/params.safetensors" in line[0]
    assert "run the same command" in line[0]


def test_a_full_disk_writing_json_names_it(tmp_path, monkeypatch) -> None:
    import errno
    import os

    from sapt_dist.checkpoint import atomic

    real = os.fsync

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic.os, "fsync", full)
    with pytest.raises(OSError) as info:
        atomic.atomic_write_json(tmp_path / "x.json", {"a": 1})
    monkeypatch.setattr(atomic.os, "fsync", real)
    assert info.value.filename == str(tmp_path / "x.json")
    assert list(tmp_path.iterdir()) == []
