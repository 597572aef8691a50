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


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
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
assert len(read_instructions("long_sequence").by_task) == 14
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


def test_the_model_layer_needs_only_the_gather_context() -> None:
    """method/ (ops, LoRA, attention, the wrapped model) reaches the distributed package
    for one thing: gathering ZeRO-3-partitioned parameters."""
    used = set()
    for f in (PKG / "method").glob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id == "distributed"
            ):
                used.add(node.attr)
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
                "sapt_dist.distributed"
            ):
                used |= {f"from-import {a.name}" for a in node.names}
    assert used == {"gathered"}
