"""``metrics/sharding.json``: what each rank holds of the model (ZeRO-3 partitions the
frozen backbone; the banks of filed blocks are replicated buffers), and its peak memory."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from sapt_dist import distributed
from sapt_dist.method.model import SAPTModel

__all__ = ["write_sharding"]

log = logging.getLogger(__name__)


def write_sharding(model: SAPTModel, out: Path) -> None:
    """Gather every rank's shard report (collective: every rank calls it) and, on rank 0,
    log one line per rank and write ``<out>/metrics/sharding.json``."""
    reports = distributed.all_gather_objects(distributed.shard_report(model))
    if not distributed.is_main_process():
        return
    names = list(reports[0]["params"])
    backbone = [n for n in names if not reports[0]["params"][n]["train"]]
    summary = []
    for r in reports:
        full = sum(r["params"][n]["full"] for n in backbone)
        local = sum(r["params"][n]["local"] for n in backbone)
        summary.append(
            {
                "rank": r["rank"],
                "frozen_elements_full": full,
                "frozen_elements_local": local,
                "frozen_bytes_local": sum(r["params"][n]["bytes"] for n in backbone),
                "trainable_bytes_local": sum(
                    r["params"][n]["bytes"] for n in names if r["params"][n]["train"]
                ),
                "replicated_buffer_bytes": r["buffer_bytes"],
                "peak_rss_mb": round(r["peak_rss_mb"], 1),
                **({"peak_gpu_mb": round(r["peak_gpu_mb"], 1)} if "peak_gpu_mb" in r else {}),
            }
        )
        log.info(
            "rank %d holds %d of %d frozen elements (%.1f%%), peak RSS %.0f MB",
            r["rank"],
            local,
            full,
            100 * local / max(1, full),
            r["peak_rss_mb"],
        )
    per_param = {n: [r["params"][n]["local"] for r in reports] for n in names}
    full = {n: reports[0]["params"][n]["full"] for n in names}
    trains = {n: reports[0]["params"][n]["train"] for n in names}
    data = {
        "world": reports[0]["world"],
        "zero_stage": reports[0]["zero_stage"],
        "ranks": summary,
        "params": {n: {"full": full[n], "local": per_param[n], "train": trains[n]} for n in names},
    }
    path = Path(out) / "metrics" / "sharding.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))
