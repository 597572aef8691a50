"""``sapt-sweep``: one YAML (models x methods x task orders x seeds) -> one SLURM job array.

::

    sapt-sweep study.yaml             # validate every run's config, write them, print the plan
    sapt-sweep study.yaml --submit    # ... and submit the job array (sbatch --array=0-(N-1))
    sapt-sweep study.yaml --local     # ... or run them one after another here, no SLURM

The sweep file::

    name: tiny_scaling                     # the sweep folder: <output_root>/<name>
    base: sapt_dist/presets/demo.yaml      # the config every run starts from
    output_root: runs/sweeps               # (default runs/sweeps)
    overrides: [train.epochs=2]            # applied to every run (dotted, as on sapt-train)
    models:                                # name -> overrides
      d128: {model.builder: demo}
      d256: {model.builder: demo, model.demo_hidden_size: 256, model.demo_layers: 4}
    methods: [sapt, seq_lora]
    orders: [demo]                         # data.order names, or name -> overrides
    seeds: [42, 43]                        # train.seed
    slurm:                                 # how the array is submitted
      script: slurm/train.sbatch           # (default) any script taking <config> [overrides]
      options: [--time=02:00:00]           # extra sbatch options
      max_parallel: 4                      # at most this many array tasks at once

Every run's config is loaded and validated here (unknown keys, wrong types, bad values fail
now, naming the sweep file, the run and the key), then written resolved to
``<sweep>/configs/NNN.yaml``; array task N reads ``configs/NNN.yaml`` (the batch script
replaces ``%a`` in its config argument by the zero-padded array index). ``runs.json``
lists the runs for ``sapt-report``. Paths in the sweep file are relative to the directory
``sapt-sweep`` runs in (the one the job is submitted from). Writing the same sweep again
keeps finished runs: each run folder resumes or reports as ``sapt-train`` does.
"""

from __future__ import annotations

import argparse
import itertools
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sapt_dist.checkpoint.atomic import atomic_write_json, atomic_write_text
from sapt_dist.config import ConfigError, load_config, to_dict

__all__ = ["Sweep", "SweepRun", "expand", "load_sweep", "main", "sbatch_command", "write_sweep"]

_KEYS = {
    "name",
    "base",
    "output_root",
    "overrides",
    "models",
    "methods",
    "orders",
    "seeds",
    "slurm",
}
_SLURM_KEYS = {"script", "options", "max_parallel"}


@dataclass
class SweepRun:
    index: int
    name: str
    model: str
    method: str
    order: str
    seed: int
    overrides: list[str]
    output_dir: str
    config_file: str = ""


@dataclass
class Sweep:
    name: str
    base: str
    output_root: str
    overrides: list[str]
    models: dict[str, dict[str, Any]]
    methods: list[str]
    orders: dict[str, dict[str, Any]]
    seeds: list[int]
    slurm: dict[str, Any] = field(default_factory=dict)
    source: str = ""

    @property
    def folder(self) -> Path:
        return Path(self.output_root) / self.name


def _fail(source: str, key: str, msg: str) -> ConfigError:
    return ConfigError(f"{source}: sweep key '{key}' {msg}")


def _named(value: Any, key: str, source: str, as_key: str | None) -> dict[str, dict[str, Any]]:
    """``[a, b]`` (each name sets ``as_key``) or ``{name: {dotted.key: value}}``."""
    if isinstance(value, list) and as_key is not None:
        if not all(isinstance(v, str) for v in value):
            raise _fail(source, key, f"must list names (strings), got {value!r}")
        return {v: {as_key: v} for v in value}
    if not isinstance(value, dict) or not value:
        raise _fail(source, key, f"must be a non-empty mapping of name -> overrides, got {value!r}")
    out = {}
    for name, ov in value.items():
        ov = {} if ov is None else ov
        if not isinstance(ov, dict) or not all(isinstance(k, str) for k in ov):
            raise _fail(
                source, f"{key}.{name}", f"must map dotted config keys to values, got {ov!r}"
            )
        out[str(name)] = ov
    return out


def load_sweep(path: str | Path) -> Sweep:
    """Read and check a sweep file; errors name the file and the key."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"sweep file not found: {p}")
    src = str(p)
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{src}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{src}: a sweep file is a mapping of {sorted(_KEYS)}")
    unknown = sorted(set(data) - _KEYS)
    if unknown:
        raise _fail(src, unknown[0], f"is unknown (known keys: {sorted(_KEYS)})")
    for req in ("name", "models", "methods"):
        if req not in data:
            raise _fail(src, req, "is required")
    name = data["name"]
    if not isinstance(name, str) or not name or "/" in name:
        raise _fail(src, "name", f"must be a folder name, got {name!r}")
    methods = data["methods"]
    if not isinstance(methods, list) or not methods or not all(isinstance(m, str) for m in methods):
        raise _fail(src, "methods", f"must list method names, got {methods!r}")
    seeds = data.get("seeds", [42])
    if not isinstance(seeds, list) or not seeds or not all(type(s) is int for s in seeds):
        raise _fail(src, "seeds", f"must list integers, got {seeds!r}")
    overrides = data.get("overrides", [])
    if not isinstance(overrides, list) or not all(
        isinstance(o, str) and "=" in o for o in overrides
    ):
        raise _fail(src, "overrides", f"must list 'section.key=value' strings, got {overrides!r}")
    slurm = data.get("slurm") or {}
    if not isinstance(slurm, dict):
        raise _fail(src, "slurm", f"must be a mapping, got {slurm!r}")
    bad = sorted(set(slurm) - _SLURM_KEYS)
    if bad:
        raise _fail(src, f"slurm.{bad[0]}", f"is unknown (known: {sorted(_SLURM_KEYS)})")
    opts = slurm.get("options", [])
    if not isinstance(opts, list) or not all(isinstance(o, str) for o in opts):
        raise _fail(src, "slurm.options", f"must list sbatch options, got {opts!r}")
    mp = slurm.get("max_parallel")
    if mp is not None and (type(mp) is not int or mp < 1):
        raise _fail(src, "slurm.max_parallel", f"must be an integer >= 1, got {mp!r}")
    base = data.get("base")
    if base is not None and not Path(base).is_file():
        raise _fail(src, "base", f"names no file: {base!r}")
    return Sweep(
        name=name,
        base=base or "",
        output_root=str(data.get("output_root", "runs/sweeps")),
        overrides=overrides,
        models=_named(data["models"], "models", src, None),
        methods=methods,
        orders=_named(
            data.get("orders", {"demo": {"data.order": "demo"}}), "orders", src, "data.order"
        ),
        seeds=seeds,
        slurm=slurm,
        source=src,
    )


def _value(v: Any) -> str:
    """A YAML scalar / list as a command-line override value."""
    if isinstance(v, str):
        return v
    return yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("...").strip()


def expand(sweep: Sweep) -> list[SweepRun]:
    """The grid, in a fixed order: models x methods x orders x seeds."""
    runs = []
    grid = itertools.product(sweep.models.items(), sweep.methods, sweep.orders.items(), sweep.seeds)
    for i, ((mname, mov), method, (oname, oov), seed) in enumerate(grid):
        name = f"{mname}-{method}-{oname}-s{seed}"
        out = str(sweep.folder / "runs" / name)
        ov = [
            # one W&B group per sweep (the job type defaults to the method), one run per
            # config; the sweep's own overrides may still change them
            f"tracking.group={sweep.name}",
            f"tracking.name={name}",
            *sweep.overrides,
            *(f"{k}={_value(v)}" for k, v in mov.items()),
            *(f"{k}={_value(v)}" for k, v in oov.items()),
            f"method={method}",
            f"train.seed={seed}",
            f"output_dir={out}",
        ]
        runs.append(SweepRun(i, name, mname, method, oname, seed, ov, out))
    return runs


def write_sweep(sweep: Sweep) -> list[SweepRun]:
    """Validate every run's config (before anything is written), then write the resolved
    configs and ``runs.json`` into the sweep folder."""
    runs = expand(sweep)
    resolved = []
    for r in runs:
        try:
            cfg = load_config(sweep.base or None, r.overrides)
        except ConfigError as e:
            raise ConfigError(f"{sweep.source}: run {r.index} ({r.name}): {e}") from e
        resolved.append(to_dict(cfg))
    folder = sweep.folder
    for r, cfg in zip(runs, resolved):
        path = folder / "configs" / f"{r.index:03d}.yaml"
        atomic_write_text(path, yaml.safe_dump(cfg, sort_keys=False))
        r.config_file = str(path)
    atomic_write_json(
        folder / "runs.json",
        {"sweep": sweep.name, "source": sweep.source, "runs": [r.__dict__ for r in runs]},
    )
    return runs


def sbatch_command(sweep: Sweep, n: int) -> list[str]:
    """``sbatch --array=0-(n-1) ... <script> <sweep>/configs/%a.yaml``."""
    s = sweep.slurm
    array = f"0-{n - 1}" + (f"%{s['max_parallel']}" if s.get("max_parallel") else "")
    logs = sweep.folder / "logs"
    return [
        "sbatch",
        "--parsable",
        f"--array={array}",
        f"--job-name=sapt-{sweep.name}",
        f"--output={logs}/%A_%a.out",
        *s.get("options", []),
        s.get("script", "slurm/train.sbatch"),
        str(sweep.folder / "configs" / "%a.yaml"),
    ]


#: a process-group's variables: never handed on to the runs (each is its own job / group)
_LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def _child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_VARS}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _print_plan(sweep: Sweep, runs: list[SweepRun]) -> None:
    print(f"sweep {sweep.name}: {len(runs)} run(s) -> {sweep.folder}")
    w = max(len(r.name) for r in runs)
    for r in runs:
        print(f"  [{r.index:3d}] {r.name:<{w}}  {r.config_file}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="sapt-sweep",
        description="Expand a scaling-study YAML into run configs and one SLURM job array.",
        epilog="Then: sapt-report <output_root>/<name>",
    )
    parser.add_argument("sweep", help="the sweep YAML")
    how = parser.add_mutually_exclusive_group()
    how.add_argument("--submit", action="store_true", help="submit the job array with sbatch")
    how.add_argument(
        "--local", action="store_true", help="run every config here, one after another"
    )
    args = parser.parse_args(argv)
    try:
        sweep = load_sweep(args.sweep)
        runs = write_sweep(sweep)
    except ConfigError as e:
        print(f"sapt-sweep: {e}", file=sys.stderr)
        return 2
    _print_plan(sweep, runs)
    cmd = sbatch_command(sweep, len(runs))
    if args.local:
        env = _child_env()
        failed = []
        for r in runs:
            print(f"[{r.index + 1}/{len(runs)}] {r.name}", flush=True)
            rc = subprocess.call(
                [sys.executable, "-m", "sapt_dist.cli.train", "--config", r.config_file], env=env
            )
            if rc != 0:
                failed.append(f"{r.name} (exit {rc})")
        if failed:
            print(f"sapt-sweep: {len(failed)} run(s) failed: {', '.join(failed)}", file=sys.stderr)
            return 1
        print(f"done; summarise with: sapt-report {sweep.folder}")
        return 0
    print("submit with:\n  " + shlex.join(cmd))
    if not args.submit:
        return 0
    (sweep.folder / "logs").mkdir(parents=True, exist_ok=True)
    # sbatch hands its environment to the job (--export=ALL)
    res = subprocess.run(cmd, capture_output=True, text=True, env=_child_env())
    if res.returncode != 0:
        print(f"sapt-sweep: sbatch failed: {res.stderr.strip()}", file=sys.stderr)
        return 1
    job = res.stdout.strip().split(";")[0]
    atomic_write_json(sweep.folder / "job.json", {"job_id": job, "command": cmd})
    print(f"submitted job array {job} ({len(runs)} tasks); logs in {sweep.folder / 'logs'}")
    print(f"when done: sapt-report {sweep.folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
