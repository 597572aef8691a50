"""Shared fixtures: tiny random HF backbones, seeded."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# tests never go online, whatever key the machine has (tracking.mode=auto reads this)
os.environ["WANDB_MODE"] = "offline"

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def tiny_llama(vocab: int = 128, hidden: int = 32, layers: int = 2, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture
def llama():
    return tiny_llama()


def shared_data_or_skip() -> Path:
    if not (SHARED_DATA / "CL_Benchmark").is_dir():
        pytest.skip(f"needs the shared benchmarks at {SHARED_DATA} (absent on this machine)")
    return SHARED_DATA
