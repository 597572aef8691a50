"""InfLoRA (``method=inflora``): the input-subspace memory and the designed, frozen A,
against plain references written here (numpy loops, ``torch.linalg.svd`` of the raw
inputs)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sapt_dist.config import AdapterConfig, RunConfig
from sapt_dist.data.tasks import EncodedExample
from sapt_dist.method.model import SAPTModel
from sapt_dist.method.subspace import design_down, gpm_update, task_threshold, top_directions
from sapt_dist.train.subspace import design_task_blocks, new_memory, remember_task

from .conftest import run_progress, tiny_llama


def _released_gpm(basis, cov, threshold):
    """DualGPM's 'remove' update as the released code writes it (numpy, a Python loop)."""
    cov = cov.astype(np.float64)
    if basis is None:
        u, s, _ = np.linalg.svd(cov, full_matrices=False)
        ratio = s**2 / (s**2).sum()
        r = int(np.sum(np.cumsum(ratio) < threshold))
        return u[:, : max(r, 1)]
    s1 = np.linalg.svd(cov, compute_uv=False)
    total = (s1**2).sum()
    hat = cov - basis @ basis.T @ cov
    u, s, _ = np.linalg.svd(hat, full_matrices=False)
    ratio = s**2 / total
    acc = (total - (s**2).sum()) / total
    r = 0
    for x in ratio:
        if acc < threshold:
            acc += x
            r += 1
        else:
            break
    if r == 0:
        return basis
    out = np.hstack([basis, u[:, :r]])
    return out[:, : out.shape[0]]


def _span_gap(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a @ a.T - b @ b.T))


def _low_rank_cov(d, k, seed):
    g = np.random.default_rng(seed)
    x = g.normal(size=(200, k)) @ g.normal(size=(k, d)) + 0.01 * g.normal(size=(200, d))
    return x.T @ x / 200


def test_memory_update_equals_the_released_loop():
    """First task, a later task that adds directions, one that adds none, the d cap."""
    d = 12
    c1, c2 = _low_rank_cov(d, 3, 0), _low_rank_cov(d, 4, 1)
    ref = _released_gpm(None, c1, 0.99)
    got = gpm_update(None, torch.tensor(c1, dtype=torch.float32), 0.99).numpy()
    assert got.shape == ref.shape and _span_gap(got, ref) < 1e-4
    ref2 = _released_gpm(ref, c2, 0.995)
    got2 = gpm_update(torch.tensor(got), torch.tensor(c2, dtype=torch.float32), 0.995).numpy()
    assert got2.shape == ref2.shape and got2.shape[1] > got.shape[1]
    assert _span_gap(got2, ref2) < 1e-3
    np.testing.assert_allclose(got2.T @ got2, np.eye(got2.shape[1]), atol=1e-4)
    # the same task again: its energy is held already, nothing is added
    same = gpm_update(torch.tensor(got2), torch.tensor(c2, dtype=torch.float32), 0.99)
    assert same.shape == got2.shape
    full = gpm_update(torch.tensor(got2), torch.eye(d), 1.0)  # never more than d columns
    assert full.shape[1] == d
    assert task_threshold(0.995, 0, 15) == 0.995 and task_threshold(0.9, 15, 15) == 1.0


def test_designed_A_is_orthogonal_to_the_memory_even_when_rank_deficient():
    d, r = 10, 4
    basis = torch.linalg.qr(torch.randn(d, 8))[0]  # 8 of 10 dimensions taken
    cov = torch.tensor(_low_rank_cov(d, 6, 2), dtype=torch.float32)
    a = design_down(cov, basis, r)  # (I - MM^T) cov has rank 2 < r
    assert a.shape == (r, d)
    assert float((a @ basis).abs().max()) < 1e-6
    # the first task's A: the covariance's leading directions / sqrt(3)
    a0 = design_down(cov, None, r)
    u = torch.linalg.svd(cov)[0][:, :r]
    torch.testing.assert_close((a0.t() @ a0) * 3, u @ u.t(), atol=1e-5, rtol=0)


def _examples(lo: int, hi: int, n: int, seed: int) -> list[EncodedExample]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        prompt = torch.randint(lo, hi, (7,), generator=g).tolist()
        target = torch.randint(lo, hi, (2,), generator=g).tolist() + [2]
        out.append(EncodedExample(prompt + target, [-100] * 7 + target, 7))
    return out


def _train_B(model, examples, steps=5, lr=0.5):
    from sapt_dist.data.tasks import collate_train

    params = [p for p in model.adapter_params() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr)
    model.train()
    for k in range(steps):
        batch = collate_train(examples[(4 * k) % len(examples) :][:4], 0)
        opt.zero_grad()
        model(**batch).loss.backward()
        opt.step()
    return params


def _layer_inputs(model, examples) -> dict[str, torch.Tensor]:
    """Every token row each adapted layer sees, by a hook written here."""
    from sapt_dist.data.tasks import collate_train

    rows: dict[str, list] = {n: [] for n in model.layers}
    hooks = [
        m.register_forward_pre_hook(
            lambda mod, args, n=n: rows[n].append(args[0].detach().reshape(-1, args[0].shape[-1]))
        )
        for n, m in model.layers.items()
    ]
    model.eval()
    with torch.no_grad():
        for i in range(0, len(examples), 8):
            model(**collate_train(examples[i : i + 8], 0))
    for h in hooks:
        h.remove()
    return {n: torch.cat(v).double() for n, v in rows.items()}


def test_designed_directions_do_not_depend_on_the_svd_sign():
    """top_directions: the leading eigenvectors of a covariance with a known spectrum, each
    with its largest component positive. The SVD's own signs are not even equivariant
    under relabelling the coordinates (checked here: the raw signs change), so A designed
    from the relabelled covariance, labels put back, is A, signs included; and a
    covariance perturbed at rounding level (another sum order) designs the same A."""
    torch.manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(16, 16, dtype=torch.float64))
    spectrum = torch.linspace(3.0, 0.1, 16, dtype=torch.float64)
    cov = ((q * spectrum) @ q.t()).float()
    got = top_directions(cov, None, 4)
    want = q[:, :4] * torch.sign(q[q[:, :4].abs().argmax(0), torch.arange(4)])
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=0)
    assert (got.gather(0, got.abs().argmax(0, keepdim=True)) > 0).all()
    basis = q[:, 10:].float()
    a = design_down(cov, basis, 4)
    raw_flips = 0
    for seed in range(3):
        perm = torch.randperm(16, generator=torch.Generator().manual_seed(seed))
        p = torch.eye(16)[perm]
        u, up = torch.linalg.svd(cov)[0][:, :4], torch.linalg.svd(p @ cov @ p.t())[0][:, :4]
        raw_flips += int(((p.t() @ up) * u).sum(0).lt(0).sum())
        torch.testing.assert_close(p.t() @ top_directions(p @ cov @ p.t(), None, 4), got)
        torch.testing.assert_close(design_down(p @ cov @ p.t(), p @ basis, 4) @ p, a)
    assert raw_flips > 0  # what the fix is for: the SVD alone flips some of them
    noise = torch.randn(16, 16) * 1e-7
    again = design_down(cov + (noise + noise.t()) / 2, basis, 4)
    assert float((again - a).norm() / a.norm()) < 1e-4


def test_inflora_update_lies_off_the_old_tasks_inputs():
    """Task 1 trains, its inputs fill the memory; task 2's block, trained, changes W only
    off task 1's input subspace (computed here with ``torch.linalg.svd`` of the raw
    inputs): ||dW U_old|| ~ 0, while an ordinary LoRA update of the same size is not; only
    B trained (A is the designed one, frozen)."""
    torch.manual_seed(0)
    model = SAPTModel(tiny_llama(), AdapterConfig(rank=4, alpha=8.0), n_slots=2, routing="sum")
    cfg = RunConfig(method="inflora")
    cfg.subspace.threshold, cfg.train.micro_batch_size = 0.9, 8
    memory = new_memory(model)
    task1, task2 = _examples(3, 60, 24, 0), _examples(50, 128, 24, 1)
    model.start_task(0)
    design_task_blocks(model, memory, task1, 0, cfg)
    _train_B(model, task1)
    model.file_current()
    remember_task(model, memory, task1, 0, cfg, 0, 2)
    inputs = _layer_inputs(model, task1)  # the model as remember_task saw it

    model.start_task(1)
    design_task_blocks(model, memory, task2, 0, cfg)
    designed = {n: m.lora_A.detach().clone() for n, m in model.layers.items()}
    trained = _train_B(model, task2)
    assert {id(p) for p in trained} == {id(m.lora_B) for m in model.layers.values()}
    for name, m in model.layers.items():
        assert torch.equal(m.lora_A, designed[name])  # frozen
        x = inputs[name]
        u, s, _ = torch.linalg.svd(x.t() @ x / x.shape[0])
        ratio = s**2 / (s**2).sum()
        k = max(int((torch.cumsum(ratio, 0) < 0.9).sum()), 1)
        u_old = u[:, :k]
        assert memory.bases[name].shape[1] == k
        dw = (m.scaling * m.lora_B.double() @ m.lora_A.double()).detach()
        assert float(dw.norm()) > 1e-4, name  # B did train
        assert float((dw @ u_old).norm() / dw.norm()) < 1e-5, name
        # an ordinary LoRA update (Kaiming A): a large part of it acts on the old inputs
        a = torch.nn.init.kaiming_uniform_(torch.empty_like(m.lora_A), a=5**0.5).double()
        plain = m.lora_B.detach().double() @ a
        assert float((plain @ u_old).norm() / plain.norm()) > 0.1, name


@pytest.mark.slow
def test_inflora_run_files_its_memory(tmp_path):
    """A tiny 2-task run: both blocks filed with the memory (checksummed in the manifest);
    the second block's A is orthogonal to what the memory held after task 1 (the memory
    of a run of task 1 alone). Resuming from the memory: ``tests/test_distributed.py``."""
    from safetensors.torch import load_file

    from sapt_dist.checkpoint.blocks import load_extra_tensors
    from sapt_dist.config import load_config
    from sapt_dist.train.run import run

    from .test_run import ROOT, TINY

    def cfg(out, *extra):
        over = [f"output_dir={out}", *TINY, "method=inflora", "tracking.backend=none"]
        return load_config(ROOT / "sapt_dist/presets/demo.yaml", [*over, *extra])

    out = tmp_path / "run"
    res = run(cfg(out, "train.checkpoint_every=0"))
    assert all(v is not None for v in res["matrix"][1])
    manifest = json.loads((out / "blocks/manifest.json").read_text())
    assert "subspace.safetensors" in manifest["files"]
    mem = load_extra_tensors(out / "blocks", "subspace.safetensors")
    b0 = load_file(str(out / "blocks/block_00.safetensors"))
    b1 = load_file(str(out / "blocks/block_01.safetensors"))
    layers = [k.removesuffix(".basis") for k in mem]
    assert layers and all(f"{n}.A" in b0 for n in layers)
    # the run after one task only: its memory is what task 2 was designed against
    one = tmp_path / "one"
    run(cfg(one, "train.checkpoint_every=0", "data.tasks=[task363_sst2_polarity_classification]"))
    mem1 = load_extra_tensors(one / "blocks", "subspace.safetensors")
    for n in layers:
        u = mem1[f"{n}.basis"].double()
        a0, a1 = b0[f"{n}.A"].double(), b1[f"{n}.A"].double()
        # 1e-3: the one-task run has one slot fewer, so its sums round differently, and
        # the basis' weakest directions move with that; a Kaiming A gives 0.05 and more
        assert float((a1 @ u).norm() / a1.norm()) < 1e-3, n
        plain = torch.nn.init.kaiming_uniform_(torch.empty_like(a1), a=5**0.5)
        assert float((plain @ u).norm() / plain.norm()) > 0.05, n
        assert not torch.equal(a0, a1)
    assert run_progress(out)["completed"] == 2
