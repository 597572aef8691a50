"""Shared fixtures: tiny random HF backbones, seeded."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# tests never go online, whatever key the machine has (tracking.mode=auto reads this)
os.environ["WANDB_MODE"] = "offline"

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
#: what a launcher sets: a subprocess started by a test must not inherit the test
#: process's own (in-process DeepSpeed tests set them) or a surrounding SLURM job's
LAUNCHER = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment of a run a test starts as a user's shell would: no launcher or
    SLURM variables, this checkout importable, one thread per process, CPU DeepSpeed."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER and not k.startswith("SLURM")}
    env.update({"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", **extra})
    return env


def cli_cmd(out: Path, *overrides: str, config: Path | None = None) -> list[str]:
    """``sapt-train`` as a user's shell runs it: the demo preset (or ``config``) into ``out``."""
    import sys

    config = config or ROOT / "sapt_dist" / "presets" / "demo.yaml"
    return [
        sys.executable,
        "-m",
        "sapt_dist.cli.train",
        "--config",
        str(config),
        f"output_dir={out}",
        *overrides,
    ]


def run_progress(out: Path) -> dict:
    """A run folder's progress as of its last finished task."""
    return json.loads((out / "state/blocks/progress.json").read_text())


def wait_for_step_checkpoint(proc, out: Path, task_index: int, timeout: float = 300, also=None):
    """Wait until the running ``proc`` has written a mid-task checkpoint of task
    ``task_index`` (and ``also()`` holds, when given); fail if it ends or times out first."""
    meta = out / "state" / "step" / "meta.json"
    deadline = time.time() + timeout
    while time.time() < deadline:
        at_task = meta.is_file() and json.loads(meta.read_text())["task_index"] == task_index
        if at_task and (also is None or also()):
            return
        assert proc.poll() is None, "run ended before it could be stopped"
        time.sleep(0.05)
    pytest.fail(f"no mid-task checkpoint of task {task_index + 1} appeared in {timeout:.0f} s")


def tiny_llama(vocab: int = 128, hidden: int = 32, layers: int = 2, seed: int = 0):
    from sapt_dist.backbone.load import random_llama

    return random_llama(vocab, hidden, layers, 4, 2, bos_token_id=1, eos_token_id=2, seed=seed)


@pytest.fixture
def llama():
    return tiny_llama()


def file_random_blocks(model, n_tasks: int, seed: int = 1, scale: float = 0.3) -> None:
    """File ``n_tasks`` random (non-zero) blocks of ``model`` (a SAPTModel; LoRA or prompt
    blocks, whatever ``block_params`` holds: ``scale`` x N(0, 1)) with random keys and a
    nudged query network; the last block stays current."""
    import torch

    g = torch.Generator().manual_seed(seed)
    for t in range(n_tasks):
        model.start_task(t)
        with torch.no_grad():
            for p in model.block_params():
                p.copy_(torch.randn(p.shape, generator=g) * scale)
            model.router.key.copy_(torch.randn(model.router.key.shape, generator=g))
            for p in model.router.query.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
        model.file_current()


def nf4_tiny_llama(folder: Path):
    """A tiny LLaMA (d 128: bnb's CPU kernels want d >= 64) saved to ``folder`` and loaded
    in NF4, and a deep copy of it as the plain reference on the same bnb CPU kernel that
    the wrapped layers keep (see method/lora.py). Skips without bitsandbytes."""
    pytest.importorskip("bitsandbytes")
    import copy

    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    tiny_llama(hidden=128).save_pretrained(folder)
    q = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    quant = AutoModelForCausalLM.from_pretrained(folder, quantization_config=q)
    plain = copy.deepcopy(quant)
    for m in plain.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    return quant, plain


def shared_data_or_skip() -> Path:
    if not (SHARED_DATA / "CL_Benchmark").is_dir():
        pytest.skip(f"needs the shared benchmarks at {SHARED_DATA} (absent on this machine)")
    return SHARED_DATA


#: lines a test wants in the CI log even when it passes (the 2-node SLURM jobs' hosts,
#: addresses and times): printed at the end of the run by pytest_terminal_summary
CI_REPORT: list[str] = []


def report(line: str) -> None:
    """Print ``line`` now (seen with -s) and again in the run's summary (always seen)."""
    print(line)
    CI_REPORT.append(line)


def pytest_terminal_summary(terminalreporter) -> None:
    if CI_REPORT:
        terminalreporter.section("multi-node SLURM jobs (tests/test_slurm_multinode.py)")
        for line in CI_REPORT:
            terminalreporter.write_line(line)
