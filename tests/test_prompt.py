"""Prompt-tuning blocks (``adapter.kind: prompt``), each behaviour against a reference:
a per-slot loop, peft's prompt tuning, step-by-step forwards, the save -> load round trip."""

from __future__ import annotations

import copy

import pytest
import torch

from sapt_dist.config import AdapterConfig
from sapt_dist.method.model import SAPTModel
from sapt_dist.method.prompt import PROMPT_BLOCK

from .conftest import tiny_llama

L = 5


def _prompt_model(llama=None, n_slots: int = 3, **kw) -> SAPTModel:
    llama = llama if llama is not None else tiny_llama()
    return SAPTModel(llama, AdapterConfig(kind="prompt", prompt_length=L, **kw), n_slots=n_slots)


def _random_prompts(model: SAPTModel, n_tasks: int, seed: int = 1) -> None:
    """File ``n_tasks`` random prompts and keys, leaving the last one current."""
    g = torch.Generator().manual_seed(seed)
    for t in range(n_tasks):
        model.start_task(t)
        with torch.no_grad():
            model.prompts.prompt.copy_(torch.randn(model.prompts.prompt.shape, generator=g))
            model.router.key.copy_(torch.randn(model.router.key.shape, generator=g))
            for p in model.router.query.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
        model.file_current()


def _batch(b=2, n=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (b, n), generator=g)
    return ids, torch.ones_like(ids)


def test_mixed_prompt_equals_a_per_slot_loop():
    model = _prompt_model()
    _random_prompts(model, 3)
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
    _random_prompts(model, 3)
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
    _random_prompts(model, 2)
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
    _random_prompts(model, 3)
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
    _random_prompts(model, 2)
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
    _random_prompts(model, 2)
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
    _random_prompts(model, 2)
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
