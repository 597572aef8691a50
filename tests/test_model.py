"""SAPTModel around real HF architectures, each behaviour against a reference."""

from __future__ import annotations

import copy

import pytest
import torch

from sapt_dist.config import AdapterConfig
from sapt_dist.method.model import SAPTModel

from .conftest import file_random_blocks, nf4_tiny_llama, tiny_llama


def _batch(vocab=128, b=2, n=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (b, n), generator=g)
    return ids, torch.ones_like(ids)


def test_zero_B_is_backbone(llama):
    plain = copy.deepcopy(llama)
    model = SAPTModel(llama, AdapterConfig(), n_slots=3)
    ids, am = _batch()
    with torch.no_grad():
        ref = plain(input_ids=ids, attention_mask=am).logits
        out = model(ids, am).logits
    assert torch.equal(out, ref)


def test_one_hot_weights_equal_single_lora_and_peft_export(llama, tmp_path):
    from peft import PeftModel

    from sapt_dist.checkpoint.blocks import export_peft

    plain = copy.deepcopy(llama)
    model = SAPTModel(llama, AdapterConfig(rank=4, alpha=8.0), n_slots=3)
    file_random_blocks(model, 3)
    ids, am = _batch()
    one_hot = torch.tensor([[0.0, 1.0, 0.0]]).expand(2, 3)
    with torch.no_grad():
        sapt = model(ids, am, weights=one_hot).logits

    # reference 1: a hand-written single LoRA on slot 1 (W0 h + s B_1 A_1 h) via hooks
    handles = []
    for name, layer in model.layers.items():
        base = plain.get_submodule(name)
        A, B, s = layer.A_bank[1].clone(), layer.B_bank[1].clone(), layer.scaling

        def hook(mod, inp, out, A=A, B=B, s=s):
            return out + s * (inp[0] @ A.t() @ B.t())

        handles.append(base.register_forward_hook(hook))
    with torch.no_grad():
        single = plain(input_ids=ids, attention_mask=am).logits
    for h in handles:
        h.remove()
    torch.testing.assert_close(sapt, single, rtol=1e-5, atol=1e-5)

    # reference 2: the exported peft adapter on the plain backbone
    export_peft(model, 1, tmp_path / "peft1")
    peft_model = PeftModel.from_pretrained(plain, tmp_path / "peft1").eval()
    with torch.no_grad():
        via_peft = peft_model(input_ids=ids, attention_mask=am).logits
    torch.testing.assert_close(sapt, via_peft, rtol=1e-5, atol=1e-5)


def test_inactive_slots_contribute_nothing(llama):
    model = SAPTModel(llama, AdapterConfig(), n_slots=4)
    file_random_blocks(model, 2)  # slots 0, 1 filed; slot 1 current; 2, 3 inactive
    ids, am = _batch()
    with torch.no_grad():
        before = model(ids, am)
        for layer in model.layers.values():
            layer.A_bank[2:].normal_(std=100.0)
            layer.B_bank[2:].normal_(std=100.0)
        model.router.key_bank[2:].normal_(std=100.0)
        after = model(ids, am)
    assert torch.equal(before.weights[:, 2:], torch.zeros(2, 2))
    assert torch.equal(before.logits, after.logits)


def test_only_current_block_learns(llama):
    """Frozen blocks, inactive slots and keys get no gradient; AdamW with weight decay
    over several steps leaves every bank (and the backbone) bit-identical."""
    model = SAPTModel(llama, AdapterConfig(), n_slots=4)
    file_random_blocks(model, 2)
    model.start_task(2)
    model.train()
    banks = {k: v.clone() for k, v in model.named_buffers()}
    frozen = {k: v.clone() for k, v in model.named_parameters() if not v.requires_grad}
    opt = torch.optim.AdamW(model.adapter_params(), lr=1e-2, weight_decay=0.1)
    ids, am = _batch()
    labels = ids.clone()
    labels[:, :4] = -100
    for _ in range(3):
        model(ids, am, labels).loss.backward()
        opt.step()
        opt.zero_grad()
    for k, v in model.named_buffers():
        if k.endswith(("A_bank", "B_bank", "key_bank")):
            assert torch.equal(v, banks[k]), k
    for k, v in model.named_parameters():
        if k in frozen:
            assert v.grad is None and torch.equal(v, frozen[k]), k
    trainable = {id(p) for p in model.adapter_params()}
    assert all(p.requires_grad == (id(p) in trainable) for p in model.parameters())
    # the current block did learn (B starts at zero and must have moved)
    assert all(layer.lora_B.abs().sum() > 0 for layer in model.layers.values())


def test_first_task_query_and_key_get_no_gradient(llama):
    """At t = 1 one slot is active, w = 1 exactly: g and k_1 receive no gradient."""
    model = SAPTModel(llama, AdapterConfig(), n_slots=3)
    ids, am = _batch()
    labels = ids.clone()
    labels[:, :4] = -100
    out = model(ids, am, labels)
    assert torch.equal(out.weights[:, 0], torch.ones(2))
    out.loss.backward()
    assert model.router.key.grad is None or torch.count_nonzero(model.router.key.grad) == 0
    for p in model.router.query.parameters():
        assert p.grad is None or torch.count_nonzero(p.grad) == 0


def test_file_current_keeps_tensors_in_place(llama):
    model = SAPTModel(llama, AdapterConfig(), n_slots=3)
    layer = next(iter(model.layers.values()))
    ptrs = (layer.A_bank.data_ptr(), layer.lora_A.data_ptr(), model.router.key_bank.data_ptr())
    shapes = (layer.A_bank.shape, layer.lora_A.shape)
    file_random_blocks(model, 3)
    assert (
        layer.A_bank.data_ptr(),
        layer.lora_A.data_ptr(),
        model.router.key_bank.data_ptr(),
    ) == ptrs
    assert (layer.A_bank.shape, layer.lora_A.shape) == shapes
    assert torch.equal(layer.A_bank[2], layer.lora_A.detach())


def test_padding_and_targets_do_not_change_weights(llama):
    model = SAPTModel(llama, AdapterConfig(), n_slots=3)
    file_random_blocks(model, 3)
    prompt = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(3))
    w_ref = model.routing_weights(prompt, torch.ones_like(prompt))
    assert w_ref[0].min() > 0.01  # a real mixture, not a degenerate one-hot
    # left padding, right padding, more padding, padding token differs
    for left, right, pad in [(3, 0, 0), (0, 4, 0), (5, 2, 0), (2, 2, 77)]:
        ids = torch.cat([torch.full((1, left), pad), prompt, torch.full((1, right), pad)], 1)
        mask = torch.cat([torch.zeros(1, left), torch.ones(1, 6), torch.zeros(1, right)], 1).long()
        torch.testing.assert_close(model.routing_weights(ids, mask), w_ref, rtol=0, atol=0)
    # target tokens (labels != -100) are excluded from the pool in forward
    target = torch.randint(3, 128, (1, 4))
    ids = torch.cat([prompt, target], 1)
    labels = torch.cat([torch.full((1, 6), -100), target], 1)
    out = model(ids, torch.ones_like(ids), labels)
    torch.testing.assert_close(out.weights, w_ref, rtol=0, atol=0)


def test_generation_with_cache_equals_stepwise(llama):
    model = SAPTModel(llama, AdapterConfig(), n_slots=3)
    file_random_blocks(model, 3)
    model.eval()
    # two left-padded prompts of different lengths
    ids = torch.tensor([[0, 0, 5, 9, 17, 33], [12, 44, 7, 90, 3, 61]])
    am = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    gen = model.generate(ids, am, max_new_tokens=8, do_sample=False, pad_token_id=0)
    new = gen[:, ids.shape[1] :]
    # reference: full forwards without cache, weights pinned to the prompt's
    seq, mask = ids.clone(), am.clone()
    w = model.routing_weights(ids, am)
    with torch.no_grad():
        for _ in range(8):
            logits = model(
                seq, mask, prompt_mask=torch.cat([am, torch.zeros_like(mask[:, am.shape[1] :])], 1)
            ).logits
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
            mask = torch.cat([mask, torch.ones_like(nxt)], 1)
            # the forward recomputes w from the prompt positions only: it must not move
            torch.testing.assert_close(model.context.weights, w, rtol=0, atol=0)
    assert torch.equal(new, seq[:, ids.shape[1] :])


def test_compiles_fullgraph_without_break(llama):
    """CUDA-graph friendliness, checked on the CPU: the SAPT forward + backward of a tiny
    LLaMA traces as one graph (any graph break raises under fullgraph=True)."""
    model = SAPTModel(llama, AdapterConfig(), n_slots=4)
    file_random_blocks(model, 2)
    model.start_task(2)
    ids, am = _batch()
    labels = ids.clone()
    labels[:, :4] = -100
    rep = torch.randint(3, 128, (4, 5))
    kw = dict(
        replay_input_ids=rep,
        replay_attention_mask=torch.ones_like(rep),
        replay_task=torch.tensor([0, 0, 1, 1]),
    )
    model.set_target(0, torch.tensor([1.0]))
    model.set_target(1, torch.tensor([0.3, 0.7]))
    eager = model(ids, am, labels, **kw)
    eager.loss.backward()
    g_eager = [p.grad.clone() for p in model.adapter_params()]
    model.zero_grad()
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(ids, am, labels, **kw)
    out.loss.backward()
    torch.testing.assert_close(out.loss, eager.loss)
    for g, p in zip(g_eager, model.adapter_params()):
        torch.testing.assert_close(p.grad, g)


def test_gradient_checkpointing_keeps_mixture(llama):
    model = SAPTModel(llama, AdapterConfig(gradient="exact"), n_slots=3)
    file_random_blocks(model, 2)
    model.train()
    ids, am = _batch()
    labels = ids.clone()
    out = model(ids, am, labels)
    out.loss.backward()
    ref = [p.grad.clone() for p in model.adapter_params()]
    model.zero_grad()
    model.gradient_checkpointing_enable()
    out2 = model(ids, am, labels)
    out2.loss.backward()
    torch.testing.assert_close(out2.loss, out.loss)
    for g, p in zip(ref, model.adapter_params()):
        torch.testing.assert_close(p.grad, g)


def _mistral():
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    return MistralForCausalLM(
        MistralConfig(
            vocab_size=128,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
        )
    ).eval()


def _qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    return Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=128,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
        )
    ).eval()


@pytest.mark.parametrize("make", [_mistral, _qwen2, tiny_llama], ids=["mistral", "qwen2", "llama"])
def test_other_architectures(make):
    backbone = make()
    plain = copy.deepcopy(backbone)
    model = SAPTModel(
        backbone, AdapterConfig(target_modules=["q_proj", "v_proj", "down_proj"]), n_slots=2
    )
    assert len(model.layers) == 3 * 2
    ids, am = _batch()
    with torch.no_grad():
        assert torch.equal(model(ids, am).logits, plain(input_ids=ids, attention_mask=am).logits)
    file_random_blocks(model, 2)
    out = model(ids, am, ids)
    out.loss.backward()
    assert all(
        p.grad is not None for layer in model.layers.values() for p in layer.adapter_params()
    )


def test_4bit_base(tmp_path):
    quant, plain = nf4_tiny_llama(tmp_path / "m")
    model = SAPTModel(quant, AdapterConfig(), n_slots=2, dtype=torch.float32)
    layer = next(iter(model.layers.values()))
    assert "Linear4bit" in type(layer.base).__name__
    ids, am = _batch()
    with torch.no_grad():
        assert torch.equal(model(ids, am).logits, plain(input_ids=ids, attention_mask=am).logits)
    # the no-grad eval forward above must not break training afterwards (bnb CPU packing)
    file_random_blocks(model, 2)
    out = model(ids, am, ids)
    out.loss.backward()
    assert all(lay.lora_A.grad.abs().sum() > 0 for lay in model.layers.values())


def test_missing_target_layers_named(llama):
    with pytest.raises(ValueError, match=r"no linear layer named \['c_attn'\].*q_proj"):
        SAPTModel(llama, AdapterConfig(target_modules=["c_attn"]), n_slots=2)


def test_slot_overflow(llama):
    model = SAPTModel(llama, AdapterConfig(), n_slots=2)
    with pytest.raises(ValueError, match="out of range: this model has 2 task slots"):
        model.start_task(2)


def test_layers_without_routing_refuse(llama):
    SAPTModel(llama, AdapterConfig(), n_slots=2)
    ids, am = _batch()
    with pytest.raises(RuntimeError, match="without routing weights"):
        llama(input_ids=ids, attention_mask=am)


@pytest.mark.parametrize("gradient", ["exact", "cut"])
def test_inc_lora_gradient_against_a_plain_sum_of_loras(llama, gradient):
    """IncLoRA (routing "sum") is plain LoRA with every block added: with the exact
    gradient (what the inc_lora method uses) loss and the current block's gradients equal a
    plain model whose target linears compute W0 x + s * sum_j B_j A_j x; SAPT's cut gradient
    (earlier blocks pass none to the hidden states) differs from it."""
    import torch.nn.functional as F

    plain = copy.deepcopy(llama)
    model = SAPTModel(llama, AdapterConfig(gradient=gradient), n_slots=2, routing="sum")
    file_random_blocks(model, 2)
    ids, am = _batch()
    out = model(ids, am, ids)
    out.loss.backward()
    current = {}
    for name, layer in model.layers.items():
        lin = plain.get_submodule(name)
        a0, b0 = layer.A_bank[0].clone(), layer.B_bank[0].clone()
        a1 = layer.lora_A.detach().clone().requires_grad_(True)
        b1 = layer.lora_B.detach().clone().requires_grad_(True)
        current[name] = (a1, b1)

        def forward(x, lin=lin, a0=a0, b0=b0, a1=a1, b1=b1, s=layer.scaling):
            return F.linear(x, lin.weight, lin.bias) + s * (x @ a0.T @ b0.T + x @ a1.T @ b1.T)

        lin.forward = forward
    ref = plain(input_ids=ids, attention_mask=am, labels=ids).loss
    ref.backward()
    torch.testing.assert_close(out.loss, ref)
    close = [
        torch.allclose(layer.lora_A.grad, current[name][0].grad, atol=1e-6, rtol=1e-4)
        and torch.allclose(layer.lora_B.grad, current[name][1].grad, atol=1e-6, rtol=1e-4)
        for name, layer in model.layers.items()
    ]
    assert all(close) if gradient == "exact" else not all(close)


def test_olora_terms_against_hand_computed_values():
    """O-LoRA's regularisers of one layer: sum |A_old A_new^T| over the blocks filed before
    the current slot (not the current slot's stale bank row, not later slots) and the new
    block's 2-norms; values computed by hand."""
    from sapt_dist.method.lora import MixtureLoRALinear, RoutingContext
    from sapt_dist.method.penalties import OLoRAPenalty

    layer = MixtureLoRALinear(torch.nn.Linear(2, 2), 4, 2, 2.0, 0.0, RoutingContext())
    with torch.no_grad():
        layer.A_bank[0] = torch.eye(2)
        layer.A_bank[1] = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
        layer.A_bank[2] = 100.0  # the current slot's row: never counted
        layer.A_bank[3] = 100.0  # a later slot: never counted
        layer.lora_A.copy_(torch.tensor([[1.0, 1.0], [0.0, 2.0]]))
        layer.lora_B.copy_(torch.tensor([[3.0, 0.0], [0.0, 4.0]]))
    current = torch.tensor([False, False, True, False])
    orth, l2 = OLoRAPenalty.terms(layer, current)
    # I A^T = [[1, 0], [1, 2]] (abs-sum 4); the swap permutes its rows (4 again)
    assert orth.item() == pytest.approx(8.0)
    assert l2.item() == pytest.approx(6**0.5 + 5.0)
    orth, _ = OLoRAPenalty.terms(layer, torch.tensor([False, True, False, False]))
    assert orth.item() == pytest.approx(4.0)
    orth.backward()
    assert layer.lora_A.grad is not None and layer.A_bank.grad is None


def test_olora_penalty_is_its_regularisers_outside_the_forward(llama):
    """O-LoRA's penalty, built from the method row and computed after the forward: lambda_1
    * sum over layers of the orthogonality term + lambda_2 * sum of the new block's norms
    (a plain loop as the reference), reaching the current block's gradient; the model's
    own loss is the task loss alone (SAPTModel.forward knows no baseline)."""
    from sapt_dist.config import RunConfig
    from sapt_dist.method.penalties import build_penalty
    from sapt_dist.methods import METHODS

    model = SAPTModel(llama, AdapterConfig(gradient="exact"), n_slots=2, routing="sum")
    file_random_blocks(model, 2)
    model.train()
    ids, am = _batch()
    plain = model(ids, am, ids).loss.detach()
    cfg = RunConfig(method="olora")
    cfg.olora.lambda_1, cfg.olora.lambda_2 = 0.5, 0.1
    penalty = build_penalty(METHODS["olora"].penalty, model, cfg)
    assert model.penalties["olora"] is penalty
    out = model(ids, am, ids)
    torch.testing.assert_close(out.loss.detach(), plain)
    orth = sum((layer.A_bank[0] @ layer.lora_A.t()).abs().sum() for layer in model.layers.values())
    l2 = sum(layer.lora_A.norm() + layer.lora_B.norm() for layer in model.layers.values())
    value = sum(penalty())
    torch.testing.assert_close(value.detach(), 0.5 * orth.detach() + 0.1 * l2.detach())
    value.backward()
    assert all(layer.lora_A.grad is not None for layer in model.layers.values())


@pytest.mark.parametrize("init", ["pytorch", "normal"])
def test_query_network_init(llama, init):
    """adapter.query_init: ``normal`` draws both of g's linears from N(0, 0.02) (the
    released model's _init_weights with LLaMA-2's initializer_range); ``pytorch`` keeps
    nn.Linear's Kaiming-uniform, |w| <= 1/sqrt(fan_in) (std = that / sqrt(3)). Checked on
    the 3,200 weights of each linear (d 32, h 100); LayerNorm starts at (1, 0) either way."""
    torch.manual_seed(0)
    model = SAPTModel(llama, AdapterConfig(query_init=init, query_hidden=100), n_slots=2)
    g = model.router.query
    for lin, fan_in in ((g.down, 32), (g.up, 100)):
        w = lin.weight.detach().flatten()
        assert w.numel() == 3200
        assert abs(float(w.mean())) < 0.004
        if init == "normal":
            assert float(w.std()) == pytest.approx(0.02, rel=0.05)
            assert float(w.abs().max()) < 0.02 * 5
        else:
            bound = fan_in**-0.5
            assert float(w.abs().max()) <= bound
            assert float(w.std()) == pytest.approx(bound / 3**0.5, rel=0.05)
    assert torch.equal(g.norm.weight, torch.ones(32)) and torch.equal(g.norm.bias, torch.zeros(32))


@pytest.mark.parametrize("gradient", ["cut", "exact"])
def test_training_step_equals_the_per_slot_loop(llama, gradient):
    """One SAPT training step (routing + every adapted layer through the shared plan and
    the fused op) against the same model whose adapted layers run the released code's
    loop: ``W0 x + sum_j s w_j B_j A_j x`` slot by slot, the trainable block in its slot,
    and with the cut gradient the frozen slots on a detached x. Loss and the gradients of
    every trainable parameter (blocks, key, query network) agree (float64; the router
    scores in fp32)."""
    from sapt_dist.method.ops import mixture_lora_reference

    model = SAPTModel(
        llama.double(), AdapterConfig(gradient=gradient), n_slots=4, dtype=torch.float64
    )
    file_random_blocks(model, 3)
    with torch.no_grad():
        for layer in model.layers.values():  # a non-zero trainable block
            layer.lora_B.normal_(std=0.3)
    model.train()
    ids, am = _batch()
    labels = ids.clone()
    labels[:, :4] = -100
    out = model(ids, am, labels)
    out.loss.backward()
    got = [p.grad.clone() for p in model.adapter_params()]
    model.zero_grad()

    def loop(layer, x):
        ctx, j = layer._context, model.current_slot
        y = layer.base(x)
        for k in range(layer.n_slots):
            a, b = (layer.lora_A, layer.lora_B) if k == j else (layer.A_bank[k], layer.B_bank[k])
            xk = x if (k == j or gradient == "exact") else x.detach()
            wk = ctx.weights[:, k : k + 1]
            y = y + mixture_lora_reference(xk, a[None], b[None], wk, layer.scaling)
        return y

    for layer in model.layers.values():
        layer.forward = lambda x, layer=layer: loop(layer, x)
    ref = model(ids, am, labels)
    ref.loss.backward()
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-12, atol=1e-12)
    names = {id(p): n for n, p in model.named_adapter_params().items()}
    for g, p in zip(got, model.adapter_params()):
        name = names[id(p)]
        assert p.grad is not None, name
        # the router computes its scores in fp32 (attention.py): its gradients are fp32's
        tol = (1e-5, 1e-8) if name.startswith("router.") else (1e-9, 1e-12)
        torch.testing.assert_close(
            g, p.grad, rtol=tol[0], atol=tol[1], msg=lambda m, name=name: f"{name}: {m}"
        )


def test_plan_is_prepared_once_per_forward(llama, monkeypatch):
    """The scales and masks every adapted layer shares are built once per forward (in
    ``_route``) and dropped when the weights change; the layers only read them."""
    import sapt_dist.method.lora as lora_mod

    model = SAPTModel(llama, AdapterConfig(), n_slots=3)
    file_random_blocks(model, 2)
    built = []
    real = lora_mod.plan_slots
    monkeypatch.setattr(lora_mod, "plan_slots", lambda *a, **k: built.append(1) or real(*a, **k))
    ids, am = _batch()
    model(ids, am, ids).loss.backward()
    assert len(built) == 1
    plans = dict(model.context._plans)
    model(ids, am, ids)
    assert len(built) == 2 and model.context._plans.keys() == plans.keys()
    assert all(model.context._plans[k] is not plans[k] for k in plans)


def _accumulator(loss: torch.Tensor, param: torch.Tensor):
    """The AccumulateGrad node of ``param`` in ``loss``'s graph."""
    seen, todo = set(), [loss.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if getattr(node, "variable", None) is param:
            return node
        todo.extend(n for n, _ in node.next_functions)
    raise AssertionError("parameter not in the graph")


def test_a_new_forward_does_not_reuse_the_last_steps_graph(llama):
    """Capture safety (issue 14's cudaErrorStreamCaptureImplicit): the routing context
    must not keep the previous step's autograd graph alive into the next forward, or
    the router's parameters get their old AccumulateGrad nodes back, which remember the
    (CUDA) stream of the step that made them. Checked on the CPU by marking the node."""
    model = SAPTModel(llama, AdapterConfig(), n_slots=3)
    file_random_blocks(model, 2)
    model.train()
    ids, am = _batch()
    out = model(ids, am, ids)
    _accumulator(out.loss, model.router.key).metadata["step"] = 1
    out.loss.backward()
    del out
    # the weights stay set through backward (checkpointed layers recompute with them)
    assert model.context.weights is not None
    out = model(ids, am, ids)
    assert "step" not in _accumulator(out.loss, model.router.key).metadata


@pytest.mark.parametrize("kind", ["lora", "prompt"])
def test_block_holders_satisfy_the_adapter_contract(llama, kind):
    """Every holder in SAPTModel.layers is a BlockHolder (the protocol the model, block
    files and sharding report use), for LoRA layers and for the prompt module; an object
    missing one method of the contract is not."""
    from sapt_dist.method.adapter import BlockHolder

    model = SAPTModel(llama, AdapterConfig(kind=kind, prompt_length=4), n_slots=2)
    assert model.layers and all(isinstance(h, BlockHolder) for h in model.layers.values())
    for h in model.layers.values():
        assert len(h.banks()) == len(h.stacked()) == len(h.BLOCK_PARTS)

    class Partial:
        BLOCK_PARTS = ("A",)

        def adapter_params(self):
            return []

    assert not isinstance(Partial(), BlockHolder)


def test_quantized_linears_are_recognised_by_type(tmp_path):
    """bitsandbytes' 4-bit linears are told apart by isinstance on its classes, not by the
    name of the module they come from: a look-alike class in a module named bitsandbytes
    is not one, a real Linear4bit is (and is adaptable: it subclasses nn.Linear)."""
    from sapt_dist.method.lora import is_adaptable_linear, is_quantized_linear

    quant, _ = nf4_tiny_llama(tmp_path / "nf4")
    layer = quant.model.layers[0].self_attn.q_proj
    assert is_quantized_linear(layer) and is_adaptable_linear(layer)
    plain = torch.nn.Linear(4, 4)
    assert not is_quantized_linear(plain) and is_adaptable_linear(plain)
    LookAlike = type("Linear4bit", (torch.nn.Module,), {"__module__": "bitsandbytes.nn.modules"})
    fake = LookAlike()
    fake.in_features, fake.out_features, fake.weight = 4, 4, torch.nn.Parameter(torch.zeros(4, 4))
    assert not is_quantized_linear(fake) and not is_adaptable_linear(fake)


def test_new_block_learning_mixture_changes_the_training_mixture_only(llama):
    """adapter.learning_mixture=new_block: the training forward mixes exactly one-hot on
    the new block (the loss is that of a forward given those weights), the attention gets
    no gradient from the task loss, and learns instead from the ARM's loss with a one-hot
    target on the task's own inputs (``-log w(x)[new]``, averaged, added to the ARM over
    pseudo-samples), checked against that formula on the paper's model; everything else
    is the paper's: weights and logits in eval mode (selection, generation, a*)."""
    from sapt_dist.config import ConfigError, load_config

    torch.manual_seed(0)
    paper = SAPTModel(llama, AdapterConfig(), n_slots=3)
    file_random_blocks(paper, 2)
    paper.start_task(2)
    with torch.no_grad():
        for p in paper.block_params():
            p.normal_(0, 0.3)
        paper.router.targets[0, 0] = 1.0
        paper.router.targets[1, :2] = torch.tensor([0.3, 0.7])
    onehot, given = copy.deepcopy(paper), copy.deepcopy(paper)
    onehot.adapter_config = AdapterConfig(learning_mixture="new_block")
    ids, am = _batch()
    replay = dict(
        replay_input_ids=ids.repeat(2, 1),
        replay_attention_mask=am.repeat(2, 1),
        replay_task=torch.tensor([0, 0, 1, 1]),
    )
    for m in (paper, onehot, given):
        m.train()
    ref = paper(ids, am, ids, prompt_mask=am, **replay)
    out = onehot(ids, am, ids, prompt_mask=am, **replay)
    one = torch.tensor([[0.0, 0.0, 1.0]] * 2)
    assert 0 < ref.weights[:, 2].min() < 1  # the paper's mixture reuses the earlier blocks
    assert torch.equal(out.weights, one)  # exactly one-hot on the new block
    # the task loss is that of the new block alone
    forced = given(ids, am, ids, prompt_mask=am, weights=one)
    torch.testing.assert_close(out.task_loss, forced.task_loss, rtol=0, atol=0)
    # the task loss reaches the new block, not the attention
    out.task_loss.backward(retain_graph=True)
    assert all(p.grad is None or not p.grad.any() for p in onehot.router.parameters())
    assert any(p.grad is not None and p.grad.any() for p in onehot.block_params())
    onehot.zero_grad(set_to_none=True)
    # the router's loss: the ARM plus -log w(x)[new] on these inputs, as written out on
    # the paper's model (whose attention weights are the same), value and gradient
    own = -ref.weights[:, 2].log().mean()
    torch.testing.assert_close(out.arm_loss, ref.arm_loss + own)
    out.arm_loss.backward()
    paper.zero_grad(set_to_none=True)
    (ref.arm_loss + own).backward()
    for (name, p), q in zip(
        onehot.router.named_parameters(), paper.router.parameters(), strict=True
    ):
        assert (p.grad is None) == (q.grad is None), name
        if q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, msg=name)
    assert onehot.router.key.grad is not None and onehot.router.key.grad.abs().sum() > 0
    # a few steps on that loss move the attention onto the block being trained
    w0 = onehot.routing_weights(ids, am)[:, 2].detach()
    opt = torch.optim.SGD(onehot.router.parameters(), lr=0.5)
    for _ in range(5):
        opt.zero_grad()
        onehot(ids, am, ids, prompt_mask=am, **replay).arm_loss.backward()
        opt.step()
    assert (onehot.routing_weights(ids, am)[:, 2] > w0).all()
    with torch.no_grad():
        onehot.router.load_state_dict(paper.router.state_dict())
    # eval mode (selection, generation, a*): the attention's weights, as the paper's
    paper.eval()
    onehot.eval()
    with torch.no_grad():
        a, b = paper(ids, am), onehot(ids, am)
    torch.testing.assert_close(b.weights, a.weights, rtol=0, atol=0)
    torch.testing.assert_close(b.logits, a.logits, rtol=0, atol=0)
    # a method without a learned attention mixture refuses it, naming the key
    with pytest.raises(ConfigError, match=r"'adapter.learning_mixture'.*inc_lora"):
        load_config(
            None, ["model.builder=demo", "method=inc_lora", "adapter.learning_mixture=new_block"]
        )
