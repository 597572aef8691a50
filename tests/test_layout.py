"""The package's shape: DeepSpeed behind one private module, no import cycles, and a wheel
(not an editable install) that carries every preset, DeepSpeed config and the demo data."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import subprocess_env

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "sapt_dist"


def _module(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[str]:
    """Every module ``path`` imports, at the top or inside a function."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    return out


def test_only_the_private_module_imports_deepspeed() -> None:
    importers = sorted(
        str(f.relative_to(PKG))
        for f in PKG.rglob("*.py")
        if any(m == "deepspeed" or m.startswith("deepspeed.") for m in _imports(f))
    )
    assert importers == ["distributed/_deepspeed.py"]


def test_no_import_cycles() -> None:
    """Module -> sapt_dist modules it imports (lazy imports too); no cycle anywhere. A
    submodule importing its own package (the re-exports of ``sapt_dist.distributed``) is
    not an edge."""
    mods = {_module(f): f for f in PKG.rglob("*.py")}
    graph = {
        m: {d for d in _imports(f) if d in mods and d != m and not m.startswith(d + ".")}
        for m, f in mods.items()
    }
    state: dict[str, int] = {}  # 1 on the stack, 2 done

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                pytest.fail("import cycle: " + " -> ".join(stack[stack.index(d) :] + [d]))
            if d not in state:
                visit(d, [*stack, d])
        state[m] = 2

    for m in sorted(mods):
        if m not in state:
            visit(m, [m])
    # the check can fail: the model layer imports the distributed package, not the reverse
    assert "sapt_dist.distributed" in graph["sapt_dist.method.lora"]


#: the package's layers, lowest first: a module may import from its own layer and the
#: layers below it, never from one above (docs/ARCHITECTURE.md, "Layers")
LAYERS: list[set[str]] = [
    {"sapt_dist", "sapt_dist.methods"},  # the version; the method table (imports nothing)
    {"sapt_dist.config"},  # the typed config tree (reads the table)
    {"sapt_dist.distributed"},  # where this process sits; DeepSpeed behind one module
    {"sapt_dist.data"},  # tasks, templates, tokenisation
    {"sapt_dist.backbone"},  # loading the frozen model
    {"sapt_dist.method"},  # SAPT itself: the fused op, blocks, attention, model, generation
    {"sapt_dist.checkpoint"},  # atomic files, blocks, run state, the run's model
    {"sapt_dist.outputs"},  # evaluation, metrics, reports, tracking, using a finished run
    {"sapt_dist.train"},  # the continual run and one block's training
    {"sapt_dist.cli", "sapt_dist.cluster"},  # how users start it
]


def _layer(module: str) -> int:
    """The layer of a module: its folder's (or its own, for a top-level module)."""
    parts = module.split(".")
    for name in (".".join(parts[:2]), parts[0]):
        for k, members in enumerate(LAYERS):
            if name in members:
                return k
    raise AssertionError(f"{module}: in no layer of tests/test_layout.py's LAYERS; add it")


def upward_imports(root: Path = PKG) -> list[str]:
    """Every import (lazy ones too) of a module from a higher layer than its own."""
    mods = {_module(f, root.parent): f for f in root.rglob("*.py")}
    out = []
    for m, f in sorted(mods.items()):
        for dep in _imports(f):
            if dep.startswith("sapt_dist") and dep in mods and _layer(dep) > _layer(m):
                out.append(f"{m} (layer {_layer(m)}) imports {dep} (layer {_layer(dep)})")
    return out


def test_folders_import_one_way() -> None:
    """No module imports from a layer above its own (config < distributed < data <
    backbone < method < checkpoint < outputs < train < cli/cluster); every module of the
    package belongs to a layer."""
    for f in PKG.rglob("*.py"):
        _layer(_module(f))
    assert upward_imports() == []


def test_the_folder_order_test_can_fail(tmp_path: Path) -> None:
    """A copy of the package with one upward import added (checkpoint -> train) fails."""
    copy = tmp_path / "sapt_dist"
    shutil.copytree(PKG, copy, ignore=shutil.ignore_patterns("__pycache__"))
    target = copy / "checkpoint" / "atomic.py"
    target.write_text(target.read_text() + "\nfrom sapt_dist.train.block import BlockJob\n")
    assert upward_imports(copy) == [
        "sapt_dist.checkpoint.atomic (layer 6) imports sapt_dist.train.block (layer 8)"
    ]


def method_name_tests(root: Path = PKG) -> list[str]:
    """Places outside the method table that test a method's name: a comparison with (or
    membership in) a literal method name, or the table indexed by a literal name."""
    from sapt_dist.methods import METHODS

    names = set(METHODS)

    def literal_names(node: ast.AST) -> bool:
        if isinstance(node, ast.Constant):
            return node.value in names
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            return any(literal_names(e) for e in node.elts)
        return False

    out = []
    for f in sorted(root.rglob("*.py")):
        if f.relative_to(root).as_posix() == "methods.py":
            continue
        for node in ast.walk(ast.parse(f.read_text())):
            hit = (
                isinstance(node, ast.Compare)
                and any(literal_names(x) for x in [node.left, *node.comparators])
            ) or (
                isinstance(node, ast.Subscript)
                and isinstance(node.value, ast.Name)
                and node.value.id == "METHODS"
                and literal_names(node.slice)
            )
            if hit:
                out.append(f"{f.relative_to(root)}:{node.lineno}")
    return out


def test_no_method_name_tests_outside_the_table(tmp_path: Path) -> None:
    """What a method does is read from its row (sapt_dist/methods.py), never from its
    name; the check fails on a copy with one name test added."""
    assert method_name_tests() == []
    copy = tmp_path / "sapt_dist"
    shutil.copytree(PKG, copy, ignore=shutil.ignore_patterns("__pycache__"))
    target = copy / "train" / "run.py"
    target.write_text(target.read_text() + '\nOLORA = METHODS["olora"]\n')
    lines = target.read_text().count("\n")
    assert method_name_tests(copy) == [f"train/run.py:{lines}"]


_IGNORE = shutil.ignore_patterns(
    ".git", ".venv", "build", "runs", "*.egg-info", "__pycache__", ".*_cache", "wandb"
)


@pytest.mark.slow
def test_wheel_carries_presets_configs_and_demo(tmp_path: Path) -> None:
    """Build the wheel from a copy of this checkout, install it (not editable) into a folder
    of its own and, from there: every preset loads with its DeepSpeed config, the shipped
    instruction file reads, and the demo trains and scores a one-task run."""
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=_IGNORE, symlinks=True)
    wheels, site = tmp_path / "wheels", tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    subprocess.run(
        [*pip, "wheel", str(src), "--no-deps", "--no-build-isolation", "-w", str(wheels)],
        check=True,
        capture_output=True,
    )
    (wheel,) = wheels.glob("sapt_dist-*.whl")
    subprocess.run(
        [*pip, "install", "--no-deps", "--target", str(site), str(wheel)],
        check=True,
        capture_output=True,
    )
    env = subprocess_env(PYTHONPATH=str(site))
    check = f"""
import sapt_dist
assert sapt_dist.__file__.startswith({str(site)!r}), sapt_dist.__file__
from importlib import resources
from sapt_dist.config import load_config, resolve_ds_config, shipped_ds_configs
from sapt_dist.distributed import run_engine_config
assert sorted(shipped_ds_configs()) == ["zero0", "zero2", "zero3", "zero3_offload"]
presets = sorted(p.name for p in (resources.files("sapt_dist") / "presets").iterdir())
for name in presets:
    cfg = load_config(str(resources.files("sapt_dist") / "presets" / name), ["model.path=/weights"])
    run_engine_config(cfg)
from sapt_dist.data.instructions import read_instructions
assert len(read_instructions("long_sequence").by_task) == 15  # the 15 Long Sequence tasks
print(len(presets), "presets")
"""
    proc = subprocess.run(
        [sys.executable, "-c", check], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert int(proc.stdout.split()[0]) >= 9
    out = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "sapt_dist.cli.train",
            "--preset",
            "demo",
            f"output_dir={out}",
            "method=seq_lora",
            "data.tasks=[task363_sst2_polarity_classification]",
            "data.max_train=16",
            "data.max_dev=4",
            "data.max_test=4",
            "train.max_steps=2",
            "eval.max_new_tokens=4",
            "tracking.backend=none",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "metrics" / "results.json").is_file()


#: what the model layer (method/) may use of the distributed package: gathering
#: partitioned parameters, and where this process sits (generation shares out batches)
MODEL_LAYER_DISTRIBUTED = {
    "gathered",
    "gather_in_forward",
    "ready_for_inference",
    "rank",
    "world_size",
    "zero3_enabled",
    "is_main_process",
    "all_gather_objects",
}


def test_the_model_layer_needs_only_the_gather_context() -> None:
    """method/ reaches the distributed package for gathering ZeRO-3-partitioned
    parameters and (generation) for where it sits among the ranks: never for engines,
    process groups or optimizer state. The core of the method (ops, LoRA, prompts, the
    attention, the wrapped model) for the gather context alone."""
    used: dict[str, set[str]] = {}
    for f in (PKG / "method").glob("*.py"):
        names = used.setdefault(f.stem, set())
        for node in ast.walk(ast.parse(f.read_text())):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id == "distributed"
            ):
                names.add(node.attr)
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
                "sapt_dist.distributed"
            ):
                names |= {f"from-import {a.name}" for a in node.names}
    everything = set().union(*used.values())
    assert everything <= MODEL_LAYER_DISTRIBUTED, everything - MODEL_LAYER_DISTRIBUTED
    core = set().union(*(used[m] for m in ("ops", "lora", "prompt", "attention", "model")))
    assert core == {"gathered"}
