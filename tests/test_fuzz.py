"""A bounded property-based run (issue 23, point 7) over what a user hands the commands:
config overrides, task files and predict inputs.

Each example calls the command's ``main`` in-process on its validation-only path (what
runs before a model loads: config loading and checks, task files, the model-free checks
of ``train.run``, predict inputs), so an example costs milliseconds and the whole file
stays under a minute. Properties: the exit code is 0 or 2 (never an exception, so never
a traceback), nothing is written outside ``output_dir``, and an existing run folder's
``state/`` keeps every byte. ``tests/test_hostile_state.py`` runs the same inputs'
worst cases as a user's shell does (subprocesses).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from sapt_dist.checkpoint.run_state import RunState, flat_config
from sapt_dist.config import RunConfig, load_config, to_dict

# one budget for the file: under 10 s per property on 2 shared CPU cores (<= 60 s in all)
FUZZ = settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

KEYS = sorted(flat_config(to_dict(RunConfig())))
#: YAML that is hostile to a loader or a checker
NASTY = [
    "[",
    "{",
    "]",
    "null",
    "~",
    "1e999",
    "-.inf",
    ".nan",
    "&a [*a]",
    "*a",
    "!!python/object/apply:os.system [echo hi]",
    "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[x]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]",
    "'",
    '"\\ud800"',
    '"\\0"',
    "9" * 500,
    "-" + "9" * 30,
    "0x1F",
    "1_000",
    "yes",
    "{a: {b: {c: 1}}}",
    "? [a]\n: b",
    "\t",
    "../../x",
    "~nouser/x",
    "/dev/zero",
    "/",
]
values = st.one_of(
    st.sampled_from(NASTY),
    st.text(max_size=24),
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
)
DEFAULTS = flat_config(to_dict(RunConfig()))
keys = st.one_of(
    st.sampled_from(KEYS), st.text(alphabet="abcdefghijklmnopqrstuvwxyz._[]0", max_size=20)
)
#: a known key with a value near its default (so examples get past the first check)
plausible = st.sampled_from(KEYS).flatmap(
    lambda k: st.one_of(
        st.just(json.dumps(DEFAULTS[k])),
        st.integers(min_value=-1, max_value=4).map(str),
        st.sampled_from(["0.5", "true", "[]", "none", "demo", "custom", "pretrained"]),
        st.sampled_from(["~nouser/x", "/dev/zero", "/", "/etc/passwd", "zero3", "."]),
    ).map(lambda v, k=k: f"{k}={v}")
)
override = st.one_of(plausible, plausible, st.builds(lambda k, v: f"{k}={v}", keys, values))


def _snapshot(root: Path, skip: Path | None = None) -> dict[str, str]:
    """sha256 of every file under ``root`` (``skip`` and what lies under it left out)."""
    out = {}
    for p in sorted(root.rglob("*")):
        if skip is not None and (p == skip or skip in p.parents):
            continue
        if p.is_file():
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            out[str(p.relative_to(root))] = "dir"
    return out


def _validate_only(cfg: RunConfig) -> dict:
    """``train.run.run`` up to where the folder is bound, writing nothing."""
    from sapt_dist.config import resolve_batch
    from sapt_dist.train.run import ContinualRun
    from sapt_dist.train.setup import load_run_tasks

    tasks = load_run_tasks(cfg)
    resolve_batch(cfg, 1)
    ContinualRun(cfg)._check_before_binding(len(tasks))
    return {"report": ""}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """An empty working folder holding an existing run folder (config + state)."""
    root = tmp_path_factory.mktemp("fuzz")
    run = root / "existing"
    RunState(run).check_or_save_config(
        load_config(None, ["model.builder=demo", f"output_dir={run}"])
    )
    (run / "state" / "step").mkdir(parents=True)
    (run / "state" / "step" / "meta.json").write_text('{"task_index": 0}')
    return root


def _train_main(workdir: Path, args: list[str]) -> int:
    from sapt_dist.cli import train as cli
    from sapt_dist.train import run as run_module

    out = workdir / "out"
    before = _snapshot(workdir, skip=out)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(workdir)
        mp.setattr(run_module, "run", _validate_only)
        mp.setenv("SAPT_DIST_CACHE", str(out / "cache"))  # a model cache belongs to the run
        rc = cli.main([*args, f"output_dir={out}"])
    event(f"exit {rc}")  # --hypothesis-show-statistics: how many got through
    assert _snapshot(workdir, skip=out) == before, "wrote outside output_dir"
    return rc


@FUZZ
@given(st.lists(override, max_size=4))
def test_config_overrides(workdir, overrides) -> None:
    assert _train_main(workdir, ["model.builder=demo", *overrides]) in (0, 2)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
instance = st.fixed_dictionaries(
    {"input": st.text(max_size=20) | json_values, "output": st.text(max_size=8) | json_values},
    optional={"id": json_values},
)
split_file = st.one_of(
    st.fixed_dictionaries(
        {"Definition": st.lists(st.text(max_size=20), max_size=2) | json_values},
        optional={"Instances": st.lists(instance, max_size=3) | json_values},
    ).map(json.dumps),
    json_values.map(json.dumps),
    st.text(max_size=60),
    st.sampled_from(['{"Instances": [', "\ufeff{}", '{"a": 1, "a": 2}', "[" * 3000 + "]" * 3000]),
)


good_instance = st.fixed_dictionaries(
    {"input": st.text(min_size=1, max_size=20), "output": st.text(min_size=1, max_size=8)},
    optional={"id": st.text(max_size=6) | st.integers()},
)
good_split = st.builds(
    lambda d, xs: json.dumps({"Definition": [d], "Instances": xs}),
    st.text(min_size=1, max_size=20),
    st.lists(good_instance, min_size=3, max_size=5),
)


@FUZZ
@given(
    st.fixed_dictionaries({s: good_split for s in ("train", "dev", "test")}),
    st.dictionaries(st.sampled_from(["train", "dev", "test"]), split_file, max_size=1),
    st.sampled_from(["dev", "test", None]),
)
def test_task_files(workdir, files, hostile, missing) -> None:
    data = workdir / "out" / "data"
    task = data / "tfuzz"
    task.mkdir(parents=True, exist_ok=True)
    for p in task.iterdir():
        p.unlink()
    files = {**files, **hostile}
    if missing and missing not in hostile:
        files.pop(missing)  # carved from train
    for split, text in files.items():
        (task / f"{split}.json").write_text(text, encoding="utf-8", errors="surrogatepass")
    args = ["model.builder=demo", f"data.root={data}", "data.order=custom", "data.tasks=[tfuzz]"]
    assert _train_main(workdir, [*args, "data.carve_missing_from=train"]) in (0, 2)


class _Reached(Exception):
    """The inputs passed their checks: the model would load now."""


good_line = st.fixed_dictionaries(
    {"input": st.text(min_size=1, max_size=20)},
    optional={"definition": st.text(min_size=1, max_size=10), "id": st.text(max_size=5)},
).map(json.dumps)
line = st.one_of(
    good_line,
    good_line,
    st.fixed_dictionaries(
        {"input": st.text(max_size=20) | json_values},
        optional={
            "definition": st.text(max_size=10) | json_values,
            "id": json_values,
            "references": json_values,
        },
    ).map(json.dumps),
    json_values.map(json.dumps),
    st.text(max_size=30),
)


@FUZZ
@given(
    suffix=st.sampled_from([".jsonl", ".json", ".txt"]),
    lines=st.lists(line, max_size=4),
    texts=st.lists(st.text(max_size=12), max_size=2),
    definition=st.one_of(st.just("Say it."), st.none(), st.text(max_size=12)),
    batch=st.none() | st.integers(min_value=-2, max_value=3),
)
def test_predict_inputs(workdir, suffix, lines, texts, definition, batch) -> None:
    from sapt_dist.cli.tools import predict_main
    from sapt_dist.outputs import inference

    run = workdir / "existing"
    out = workdir / "out"
    out.mkdir(exist_ok=True)
    path = out / f"inputs{suffix}"
    path.write_text("\n".join(lines), encoding="utf-8", errors="surrogatepass")
    args = [str(run), "--input", str(path), "--output", str(out / "preds.jsonl")]
    for t in texts:  # "=": a text may start with "-", as a user would pass it
        args += [f"--text={t}"]
    if definition is not None:
        args += [f"--definition={definition}"]
    if batch is not None:
        args += ["--batch-size", str(batch)]
    before = _snapshot(workdir, skip=out)

    def reached(*a, **k):
        raise _Reached

    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(workdir)
        mp.setattr(inference, "load_run", reached)
        try:
            rc = predict_main(args)
        except _Reached:
            rc = 0
        except SystemExit as e:  # argparse's usage error: one line and exit 2
            rc = e.code
    event(f"exit {rc}")
    assert rc in (0, 2)
    assert _snapshot(workdir, skip=out) == before, "changed the run folder or wrote outside"
