"""Before/after check of a change that must not change behaviour (a refactor).

    python scripts/compare_runs.py run OUT [METHOD ...]   # tiny 2-task runs, one per method
    python scripts/compare_runs.py diff A B               # compare two such folders

``run`` trains the demo preset on two demo tasks with tiny caps (seed 42, tracking off)
for every method of the table (or those named), one run folder per method under OUT.
Run it from a checkout before the change (``PYTHONPATH=<old checkout>``) and after.

``diff`` compares the two sets file by file: block files, step state, pseudo-samples and
predictions byte for byte; JSON files (metrics, progress, manifests) as data, leaving out
what differs between any two runs (timestamps, library versions, the peak memory of a
process, the checkout's and the run folder's own paths, and the digests that hash
them). Exit 1 when anything else differs, naming the file and the first keys.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
#: the tests' tiny 2-task settings (tests/test_run.py), without tracking
from tests.test_run import TINY as _TESTS_TINY  # noqa: E402

TINY = [*_TESTS_TINY, "tracking.backend=none"]
#: keys whose values differ between any two runs of the same config
VOLATILE = {"trained_at", "time", "versions", "peak_rss_mb", "peak_gpu_mb", "digest"}
#: keys holding paths of the checkout or the run folder
PATHS = {"output_dir", "folder", "definition_from"}


def run(out: Path, methods: list[str]) -> None:
    import sapt_dist
    from sapt_dist.config import load_config
    from sapt_dist.methods import METHODS
    from sapt_dist.train.run import run as train

    print("sapt_dist from", Path(sapt_dist.__file__).parent, flush=True)
    preset = Path(sapt_dist.__file__).parent / "presets" / "demo.yaml"
    for m in methods or list(METHODS):
        extra = ["train.select_best=true", "train.eval_every_epochs=1"] if m == "inc_lora" else []
        train(load_config(preset, [f"output_dir={out}/{m}", f"method={m}", *TINY, *extra]))
        print("done", m, flush=True)


def _clean(o):
    if isinstance(o, dict):
        return {
            k: ("<path>" if k in PATHS else _clean(v)) for k, v in o.items() if k not in VOLATILE
        }
    if isinstance(o, list):
        return [_clean(x) for x in o]
    return o


def _flat(o, p=""):
    if isinstance(o, dict):
        for k, v in o.items():
            yield from _flat(v, f"{p}.{k}")
    elif isinstance(o, list):
        for i, v in enumerate(o):
            yield from _flat(v, f"{p}[{i}]")
    else:
        yield p, o


def diff(a: Path, b: Path) -> int:
    bad, n = 0, 0
    files_a = {p.relative_to(a) for p in a.rglob("*") if p.is_file()}
    files_b = {p.relative_to(b) for p in b.rglob("*") if p.is_file()}
    # logs; peak memory and timing only; the machine and time of each start
    skip = {"run.log", "run.lock", "sharding.json", "environment.json"}
    for rel in sorted(files_a | files_b):
        if rel.name in skip or rel.suffix == ".png" or "wandb" in rel.parts:
            continue
        if rel not in files_a or rel not in files_b:
            print(f"only in {'B' if rel in files_b else 'A'}: {rel}")
            bad += 1
            continue
        n += 1
        x, y = a / rel, b / rel
        if rel.suffix == ".json":
            fx, fy = (
                dict(_flat(_clean(json.loads(x.read_text())))),
                dict(_flat(_clean(json.loads(y.read_text())))),
            )
            keys = [k for k in sorted(set(fx) | set(fy)) if fx.get(k) != fy.get(k)]
            # the sha256 list of files whose own content has paths or timestamps
            keys = [k for k in keys if not k.startswith(".files.progress.json")]
            if keys:
                print(f"differs: {rel}: {', '.join(keys[:4])}")
                bad += 1
        elif rel.suffix == ".yaml":
            same = x.read_text().replace(str(a), "") == y.read_text().replace(str(b), "")
            if not same:
                print(f"differs: {rel}")
                bad += 1
        elif x.read_bytes() != y.read_bytes():
            print(f"differs: {rel}")
            bad += 1
    print(f"{n} files compared, {bad} differ")
    return 1 if bad else 0


def main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[0] == "run":
        run(Path(argv[1]), argv[2:])
        return 0
    if len(argv) == 3 and argv[0] == "diff":
        return diff(Path(argv[1]), Path(argv[2]))
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
