"""Write the demo subsets shipped in ``sapt_dist/data/demo`` from a SuperNI copy, and the
Long Sequence subsets of the ``smollm2_long5`` benchmark from a Long Sequence copy.

    python scripts/make_demo_data.py \\
        --source ../shared/data/CL_Benchmark/SuperNI --out sapt_dist/data/demo
    python scripts/make_demo_data.py --long-sequence \\
        --source ../shared/data/CL_Benchmark/Long_Sequence --out sapt_dist/data/demo/Long_Sequence

Deterministic: the first N instances of each split in file order (no sampling), the
``Definition`` and at most 2 ``Positive Examples``; every other key is dropped. Long
Sequence: ``labels.json`` is copied; dev is the dev file's instances N..2N-1, so dev and
test are disjoint (the source's dev and test files are the same); a task without dev /
test files (imdb) takes them from the end of its train file, disjoint from the training
subset; instances whose label is not one of ``labels.json`` (MNLI's ``-``: no gold label)
are left out.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from sapt_dist.checkpoint.atomic import atomic_write_text

log = logging.getLogger("make_demo_data")

#: The demo tasks, in the demo order (``sapt_dist.data.tasks.ORDERS["demo"]``).
TASKS = [
    "task363_sst2_polarity_classification",
    "task875_emotion_classification",
    "task1510_evalution_relation_extraction",
]
#: Instances kept per split.
SIZES = {"train": 300, "dev": 40, "test": 40}
MAX_POSITIVE_EXAMPLES = 2
#: The Long Sequence tasks of ``smollm2_long5``, in its order, and instances kept per split.
LONG_TASKS = ["sst2", "agnews", "mnli", "imdb", "rte"]
LONG_SIZES = {"train": 200, "dev": 40, "test": 40}


def subset(src: dict, n: int) -> dict:
    """The demo version of one split object: definition, <= 2 positive examples, n instances."""
    return {
        "Definition": src["Definition"],
        "Positive Examples": src.get("Positive Examples", [])[:MAX_POSITIVE_EXAMPLES],
        "Instances": src["Instances"][:n],
    }


def long_sequence(source: Path, out: Path) -> int:
    """The Long Sequence subsets (module docstring), one folder per task."""
    for task in LONG_TASKS:
        folder = source / task
        labels = json.loads((folder / "labels.json").read_text(encoding="utf-8"))
        splits: dict[str, dict] = {}
        for split in ("train", "dev", "test"):
            path = folder / f"{split}.json"
            if path.is_file():
                src = json.loads(path.read_text(encoding="utf-8"))
                src["Instances"] = [x for x in src["Instances"] if x["output"] in labels]
                splits[split] = src
        if "train" not in splits:
            log.error("missing %s (is --source a Long_Sequence folder?)", folder / "train.json")
            return 1
        n_tr, n_dev, n_test = (LONG_SIZES[s] for s in ("train", "dev", "test"))
        train = splits["train"]
        if "test" in splits:
            test = splits["test"]["Instances"][:n_test]
            dev_src = splits.get("dev", splits["test"])["Instances"]
            dev = dev_src[n_test : n_test + n_dev]  # disjoint from test (same file in the source)
        else:  # the end of the train file, after the training subset
            rest = train["Instances"][n_tr:]
            test, dev = rest[-n_test:], rest[-n_test - n_dev : -n_test]
        subs = {
            "train": subset(train, n_tr),
            "dev": {**subset(train, 0), "Instances": dev},
            "test": {**subset(train, 0), "Instances": test},
        }
        for split, sub in subs.items():
            dst = out / task / f"{split}.json"
            atomic_write_text(dst, json.dumps(sub, indent=1, ensure_ascii=False) + "\n")
            log.info("%s: %d instances", dst, len(sub["Instances"]))
        atomic_write_text(out / task / "labels.json", json.dumps(labels, ensure_ascii=False) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--source", required=True, type=Path, help="a SuperNI folder holding one folder per task"
    )
    ap.add_argument("--out", required=True, type=Path, help="output folder (sapt_dist/data/demo)")
    ap.add_argument(
        "--long-sequence", action="store_true", help="the Long Sequence subsets of smollm2_long5"
    )
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.long_sequence:
        return long_sequence(args.source, args.out)

    for task in TASKS:
        for split, n in SIZES.items():
            path = args.source / task / f"{split}.json"
            if not path.is_file():
                log.error("missing %s (is --source a SuperNI folder?)", path)
                return 1
            src = json.loads(path.read_text(encoding="utf-8"))
            sub = subset(src, n)
            if len(sub["Instances"]) < n:
                log.warning("%s: only %d instances (wanted %d)", path, len(sub["Instances"]), n)
            dst = args.out / task / f"{split}.json"
            atomic_write_text(dst, json.dumps(sub, indent=1, ensure_ascii=False) + "\n")
            log.info("%s: %d instances", dst, len(sub["Instances"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
