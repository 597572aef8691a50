"""Write the demo subsets shipped in ``sapt_dist/data/demo`` from a SuperNI copy.

    python scripts/make_demo_data.py \\
        --source ../shared/data/CL_Benchmark/SuperNI --out sapt_dist/data/demo

Deterministic: the first N instances of each split in file order (no sampling), the
``Definition`` and at most 2 ``Positive Examples``; every other key is dropped.
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


def subset(src: dict, n: int) -> dict:
    """The demo version of one split object: definition, <= 2 positive examples, n instances."""
    return {
        "Definition": src["Definition"],
        "Positive Examples": src.get("Positive Examples", [])[:MAX_POSITIVE_EXAMPLES],
        "Instances": src["Instances"][:n],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--source", required=True, type=Path, help="a SuperNI folder holding one folder per task"
    )
    ap.add_argument("--out", required=True, type=Path, help="output folder (sapt_dist/data/demo)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

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
