"""Prompt-tuning blocks (``adapter.kind: prompt``), each behaviour against a reference:
a per-slot loop, peft's prompt tuning, step-by-step forwards, the save -> load round trip."""

from __future__ import annotations

import copy

import pytest
import torch

from sapt_dist.config import AdapterConfig
from sapt_dist.method.model import SAPTModel
from sapt_dist.method.prompt import PROMPT_BLOCK

from .conftest import file_random_blocks, nf4_tiny_llama, tiny_llama

L = 5


def _prompt_model(llama=None, n_slots: int = 3, **kw) -> SAPTModel:
    llama = llama if llama is not None else tiny_llama()
    return SAPTModel(llama, AdapterConfig(kind="prompt", prompt_length=L, **kw), n_slots=n_slots)


def _batch(b=2, n=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (b, n), generator=g)
    return ids, torch.ones_like(ids)


def test_mixed_prompt_equals_a_per_slot_loop():
    model = _prompt_model()
    file_random_blocks(model, 3, scale=1.0)
    w = torch.softmax(torch.randn(4, 3), -1)
    model._route(w)
    got = model.prompts(model.context.weights)
    want = torch.zeros(4, L, model.prompts.d)
    for j in range(3):  # the plain sum over slots
        want += w[:, j, None, None] * model.prompts.bank[j]
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_one_hot_weights_equal_peft_prompt_tuning_and_its_export(tmp_path):
    """SAPT with one-hot weights on slot 1 = peft's prompt tuning with slot 1's prompt,
    built by hand and loaded from the exported adapter folder."""
    from peft import PeftModel, PromptTuningConfig, TaskType, get_peft_model

    from sapt_dist.checkpoint.blocks import export_peft

    llama = tiny_llama()
    plain, plain2 = copy.deepcopy(llama), copy.deepcopy(llama)
    model = _prompt_model(llama)
    file_random_blocks(model, 3, scale=1.0)
    ids, am = _batch()
    labels = ids.clone()
    labels[:, :4] = -100
    one_hot = torch.tensor([[0.0, 1.0, 0.0]]).expand(2, 3)
    with torch.no_grad():
        sapt = model(ids, am, labels, weights=one_hot)

    cfg = PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=L)
    peft_model = get_peft_model(plain, cfg)
    with torch.no_grad():
        peft_model.prompt_encoder["default"].embedding.weight.copy_(model.prompts.bank[1])
        ref = peft_model(input_ids=ids, attention_mask=am, labels=labels)
    torch.testing.assert_close(sapt.logits, ref.logits[:, L:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sapt.task_loss, ref.loss, rtol=1e-5, atol=1e-6)

    export_peft(model, 1, tmp_path / "peft1")
    loaded = PeftModel.from_pretrained(plain2, tmp_path / "peft1").eval()
    with torch.no_grad():
        via_export = loaded(input_ids=ids, attention_mask=am).logits
    torch.testing.assert_close(sapt.logits, via_export[:, L:], rtol=1e-5, atol=1e-5)


def test_only_the_current_prompt_and_router_learn():
    model = _prompt_model()
    file_random_blocks(model, 2, scale=1.0)
    model.start_task(2)
    bank = model.prompts.bank.clone()
    ids, am = _batch()
    labels = ids.clone()
    out = model(ids, am, labels)
    out.loss.backward()
    assert model.prompts.prompt.grad is not None and model.prompts.prompt.grad.abs().sum() > 0
    assert model.router.key.grad is not None and model.router.key.grad.abs().sum() > 0
    assert not model.prompts.bank.requires_grad
    assert torch.equal(model.prompts.bank, bank)
    names = set(model.named_adapter_params())
    assert "prompts.prompt" in names and not any("lora" in n for n in names)


def test_generation_with_cache_equals_stepwise():
    model = _prompt_model()
    file_random_blocks(model, 3, scale=1.0)
    model.eval()
    ids = torch.tensor([[0, 0, 5, 9, 17, 33], [12, 44, 7, 90, 3, 61]])
    am = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    gen = model.generate(ids, am, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(gen[:, : ids.shape[1]], ids)  # the prompt ids, then the new tokens
    new = gen[:, ids.shape[1] :]
    # reference: full forwards without cache, weights pinned to the prompt's; the left
    # padding sits after the virtual tokens here, as in generate, and position ids are
    # counted over the unmasked tokens as HF generate counts them
    seq, mask = ids.clone(), am.clone()
    w = model.routing_weights(ids, am)
    with torch.no_grad():
        for _ in range(8):
            full_mask = torch.cat([torch.ones(2, L, dtype=mask.dtype), mask], 1)
            embeds = torch.cat([model.prompts(w), model.embed(seq)], 1)
            pos = (full_mask.cumsum(-1) - 1).clamp(min=0)
            logits = model.backbone(
                inputs_embeds=embeds, attention_mask=full_mask, position_ids=pos
            ).logits
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
            mask = torch.cat([mask, torch.ones_like(nxt)], 1)
    assert torch.equal(new, seq[:, ids.shape[1] :])


def test_generation_of_an_unpadded_batch_equals_the_training_forward():
    """No padding: greedy generation = argmax of the training forward's last logits."""
    model = _prompt_model()
    file_random_blocks(model, 2, scale=1.0)
    model.eval()
    ids, am = _batch(n=7)
    gen = model.generate(ids, am, max_new_tokens=1, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        logits = model(ids, am).logits
    assert logits.shape[:2] == ids.shape
    assert torch.equal(gen[:, -1], logits[:, -1].argmax(-1))


def test_save_load_round_trip_and_kind_mismatch(tmp_path):
    from sapt_dist.checkpoint.blocks import CheckpointMismatchError, load_blocks, save_blocks

    model = _prompt_model(n_slots=3)
    file_random_blocks(model, 2, scale=1.0)
    save_blocks(model, tmp_path / "blocks", ["t0", "t1"])
    fresh = _prompt_model(n_slots=3)
    assert load_blocks(fresh, tmp_path / "blocks") == ["t0", "t1"]
    torch.testing.assert_close(fresh.prompts.bank[:2], model.prompts.bank[:2], rtol=0, atol=0)
    ids, am = _batch()
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids, am).logits, model(ids, am).logits)
    lora = SAPTModel(tiny_llama(), AdapterConfig(), n_slots=3)
    with pytest.raises(CheckpointMismatchError, match="kind"):
        load_blocks(lora, tmp_path / "blocks")


def test_compiles_fullgraph_without_break():
    model = _prompt_model(n_slots=4)
    file_random_blocks(model, 2, scale=1.0)
    model.start_task(2)
    ids, am = _batch()
    labels = ids.clone()
    eager = model(ids, am, labels)
    eager.loss.backward()
    g_eager = [p.grad.clone() for p in model.adapter_params()]
    model.zero_grad()
    torch._dynamo.reset()
    out = torch.compile(model, fullgraph=True, backend="aot_eager")(ids, am, labels)
    out.loss.backward()
    torch.testing.assert_close(out.loss, eager.loss)
    for g, p in zip(g_eager, model.adapter_params()):
        torch.testing.assert_close(p.grad, g)


def test_config_refuses_olora_on_prompts():
    from sapt_dist.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="olora"):
        load_config(None, ["model.builder=demo", "method=olora", "adapter.kind=prompt"])
    cfg = load_config(
        None, ["model.builder=demo", "adapter.kind=prompt", "adapter.target_modules=[]"]
    )
    assert cfg.adapter.kind == "prompt" and PROMPT_BLOCK == "prompt"


def test_prompt_blocks_on_a_4bit_backbone(tmp_path):
    """NF4 backbone: one-hot weights equal the plain 4-bit model fed [P_j; E(x)] by hand,
    and the prompt learns through the quantized layers."""
    quant, plain = nf4_tiny_llama(tmp_path / "m")
    model = _prompt_model(quant, n_slots=2)
    file_random_blocks(model, 2, scale=1.0)
    ids, am = _batch()
    one_hot = torch.tensor([[1.0, 0.0]]).expand(2, 2)
    with torch.no_grad():
        got = model(ids, am, weights=one_hot).logits
        embeds = torch.cat(
            [model.prompts.bank[0].expand(2, L, -1), plain.model.embed_tokens(ids)], 1
        )
        want = plain(inputs_embeds=embeds, attention_mask=torch.ones(2, L + ids.shape[1])).logits
    torch.testing.assert_close(got, want[:, L:], rtol=1e-5, atol=1e-5)
    out = model(ids, am, ids)
    out.loss.backward()
    assert model.prompts.prompt.grad.abs().sum() > 0


# ------------------------------------------------------------------ end-to-end runs
#: prompt blocks on the tiny demo run (TINY of tests/test_distributed.py: 2 tasks, seconds)
PROMPT = ["adapter.kind=prompt", "adapter.prompt_length=4", "train.lr=3.0e-2"]


@pytest.mark.slow
def test_prompt_blocks_zero3_two_processes_equal_one_process_and_predict(tmp_path):
    """A 2-rank ZeRO-3 run with prompt blocks equals the one-process run (same global
    batch), and ``sapt-predict`` on it predicts what the run's evaluation predicted."""
    import json
    import subprocess
    import sys

    from .conftest import subprocess_env
    from .test_distributed import ZERO3, _assert_same_results, _run

    one, two = tmp_path / "one", tmp_path / "two"
    _run(1, one, *PROMPT, "train.grad_accum=2")
    _run(2, two, *PROMPT, "train.grad_accum=1", ZERO3)
    _assert_same_results(one, two, loss_tol=1e-5, block_rel=1e-4)
    manifest = json.loads((two / "blocks/manifest.json").read_text())
    assert manifest["model"]["kind"] == "prompt" and manifest["model"]["prompt_length"] == 4

    task = "task875_emotion_classification"
    out = tmp_path / "pred.jsonl"
    cmd = [sys.executable, "-m", "sapt_dist.cli.tools", "predict", str(two)]
    cmd += ["--task", task, "--split", "test", "--output", str(out)]
    res = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    evaluated = (two / "predictions" / f"after_01_{task}" / f"01_{task}.jsonl").read_text()
    want = [json.loads(line)["prediction"] for line in evaluated.splitlines()]
    got = [json.loads(line)["prediction"] for line in out.read_text().splitlines()]
    assert got == want


@pytest.mark.slow
def test_prompt_run_killed_and_resumed_equals_uninterrupted(tmp_path):
    import json
    import signal
    import subprocess

    from safetensors.torch import load_file

    from .conftest import cli_cmd, run_progress, subprocess_env, wait_for_step_checkpoint
    from .test_run import TINY

    env = subprocess_env()
    args = [*TINY, *PROMPT, "tracking.backend=none", "data.max_train=64"]
    ref = tmp_path / "ref"
    res = subprocess.run(
        cli_cmd(ref, *args, "train.checkpoint_every=0"),
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    out = tmp_path / "killed"
    cmd = cli_cmd(out, *args, "train.checkpoint_every=2")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_step_checkpoint(proc, out, 1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert run_progress(out)["completed"] == 1
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed at step" in res.stderr
    a = json.loads((ref / "metrics/accuracy_matrix.json").read_text())
    assert a == json.loads((out / "metrics/accuracy_matrix.json").read_text())
    for f in ("block_00.safetensors", "block_01.safetensors", "router.safetensors"):
        x, y = load_file(str(ref / "blocks" / f)), load_file(str(out / "blocks" / f))
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), f


@pytest.mark.slow
@pytest.mark.parametrize("method", ["seq_lora", "inc_lora", "mtl"])
def test_baselines_on_prompt_blocks(tmp_path, method):
    """The baselines on prompt blocks: sequential prompt tuning (``seq_lora``: one prompt
    that keeps training), a prompt per task summed (``inc_lora``), multi-task (``mtl``)."""
    from safetensors.torch import load_file

    from sapt_dist.train.run import run

    from .test_run import _cfg

    res = run(_cfg(tmp_path, f"method={method}", *PROMPT, "train.checkpoint_every=0"))
    out = tmp_path / "run"
    blocks = sorted(f.name for f in (out / "blocks").glob("block_*.safetensors"))
    assert all(v is not None for v in res["matrix"][-1])
    b0 = load_file(str(out / "blocks" / "block_00.safetensors"))
    assert set(b0) == {"prompt.P", "key"} and b0["prompt.P"].shape[0] == 4
    if method == "inc_lora":
        assert blocks == ["block_00.safetensors", "block_01.safetensors"]
    else:
        assert blocks == ["block_00.safetensors"]
    if method == "seq_lora":  # the second task trained the one prompt further
        t1 = "task363_sst2_polarity_classification"
        after1 = load_file(str(out / "blocks_per_task" / f"00_{t1}" / "block_00.safetensors"))
        assert not torch.equal(after1["prompt.P"], b0["prompt.P"])
