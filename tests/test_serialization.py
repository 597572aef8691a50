"""Save / load of blocks and the manifest checks."""

from __future__ import annotations

import json

import pytest
import torch

from sapt_dist.checkpoint.blocks import CheckpointMismatchError, load_blocks, save_blocks
from sapt_dist.config import AdapterConfig
from sapt_dist.method.model import SAPTModel

from .conftest import file_random_blocks, tiny_llama
from .test_model import _batch


def test_roundtrip_gives_same_outputs(tmp_path):
    model = SAPTModel(tiny_llama(), AdapterConfig(), n_slots=4)
    file_random_blocks(model, 3)
    model.set_target(2, torch.tensor([0.2, 0.3, 0.5]))
    save_blocks(model, tmp_path / "blocks", ["a", "b", "c"])
    manifest = json.loads((tmp_path / "blocks" / "manifest.json").read_text())
    assert manifest["tasks"] == ["a", "b", "c"]
    assert set(manifest["files"]) == {
        "router.safetensors",
        *(f"block_{j:02d}.safetensors" for j in range(3)),
    }
    assert "torch" in manifest["versions"]

    fresh = SAPTModel(tiny_llama(), AdapterConfig(), n_slots=4)
    assert load_blocks(fresh, tmp_path / "blocks") == ["a", "b", "c"]
    ids, am = _batch()
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids, am).logits, model(ids, am).logits, rtol=0, atol=0)
    assert torch.equal(fresh.router.targets, model.router.targets)


def test_manifest_from_another_model_is_refused(tmp_path):
    model = SAPTModel(tiny_llama(hidden=32), AdapterConfig(), n_slots=2)
    file_random_blocks(model, 1)
    save_blocks(model, tmp_path / "blocks", ["a"])
    other = SAPTModel(tiny_llama(hidden=48), AdapterConfig(), n_slots=2)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(CheckpointMismatchError, match="hidden_size: saved 32, model has 48"):
        load_blocks(other, tmp_path / "blocks")
    # nothing was touched
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())
    with pytest.raises(CheckpointMismatchError, match="rank: saved 4, model has 8"):
        load_blocks(SAPTModel(tiny_llama(), AdapterConfig(rank=8), n_slots=2), tmp_path / "blocks")
    with pytest.raises(CheckpointMismatchError, match="n_slots"):
        load_blocks(SAPTModel(tiny_llama(), AdapterConfig(), n_slots=3), tmp_path / "blocks")


def test_corrupt_file_is_refused(tmp_path):
    model = SAPTModel(tiny_llama(), AdapterConfig(), n_slots=2)
    file_random_blocks(model, 1)
    save_blocks(model, tmp_path / "blocks", ["a"])
    p = tmp_path / "blocks" / "block_00.safetensors"
    data = bytearray(p.read_bytes())
    data[-1] ^= 0xFF
    p.write_bytes(bytes(data))
    with pytest.raises(CheckpointMismatchError, match="checksum mismatch"):
        load_blocks(SAPTModel(tiny_llama(), AdapterConfig(), n_slots=2), tmp_path / "blocks")


def test_not_a_blocks_folder(tmp_path):
    with pytest.raises(CheckpointMismatchError, match="no manifest.json"):
        load_blocks(SAPTModel(tiny_llama(), AdapterConfig(), n_slots=2), tmp_path)


def test_disabled_slot_is_masked_at_load_and_v1_manifests_still_load(tmp_path):
    from sapt_dist.checkpoint.blocks import set_block_enabled

    model = SAPTModel(tiny_llama(), AdapterConfig(), n_slots=4)
    file_random_blocks(model, 3)
    save_blocks(model, tmp_path / "blocks", ["a", "b", "c"])
    set_block_enabled(tmp_path / "blocks", "b", False, "test")
    fresh = SAPTModel(tiny_llama(), AdapterConfig(), n_slots=4)
    load_blocks(fresh, tmp_path / "blocks")
    assert fresh.router.active.tolist() == [True, False, True, False]
    ids, am = _batch()
    assert torch.all(fresh.routing_weights(ids, am)[:, 1] == 0)

    # a folder written before the mask existed (format 1, no digest) loads unchanged
    path = tmp_path / "blocks" / "manifest.json"
    m = json.loads(path.read_text())
    for k in ("digest", "disabled", "history", "provenance", "run_config"):
        m.pop(k)
    m["format_version"] = 1
    path.write_text(json.dumps(m))
    old = SAPTModel(tiny_llama(), AdapterConfig(), n_slots=4)
    assert load_blocks(old, tmp_path / "blocks") == ["a", "b", "c"]
    assert old.router.active.tolist() == [True, True, True, False]


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_atomic_writes_respect_the_umask(tmp_path, umask):
    """tempfile makes 0600 files and 0700 folders; an atomically written report or folder
    gets the mode open() / mkdir() would give it under the umask (issue 24: a routing
    report 0600 under umask 0022)."""
    import os

    from sapt_dist.checkpoint.atomic import atomic_dir, atomic_write_text

    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "r.html", "x")
        with atomic_dir(tmp_path / "blocks") as d:
            (d / "f").write_text("y")
        (tmp_path / "plain").write_text("z")
    finally:
        os.umask(old)
    assert (tmp_path / "r.html").stat().st_mode & 0o777 == 0o666 & ~umask
    assert (tmp_path / "r.html").stat().st_mode & 0o777 == (
        tmp_path / "plain"
    ).stat().st_mode & 0o777
    assert (tmp_path / "blocks").stat().st_mode & 0o777 == 0o777 & ~umask
