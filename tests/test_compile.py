"""Graph mode of the training step (``train.compile``), checked on the CPU: the padding to
static shapes changes no loss, ``trace`` (dynamo + AOTAutograd, eager kernels) traces the
whole step as one graph and gives eager's losses, and configs it cannot serve are
refused by name."""

from __future__ import annotations

import pytest
import torch

from sapt_dist.config import AdapterConfig, ConfigError, RunConfig, TrainConfig
from sapt_dist.data.tasks import EncodedExample, collate_prompts, collate_train
from sapt_dist.method.model import SAPTModel
from sapt_dist.train.compile import (
    bucket_length,
    compiled_forward,
    pad_left,
    pad_right,
    replay_length,
)

from .conftest import tiny_llama


def _examples(seed: int = 0, n: int = 6) -> list[EncodedExample]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        p = int(torch.randint(3, 9, (1,), generator=g))
        t = int(torch.randint(1, 6, (1,), generator=g))
        ids = torch.randint(3, 128, (p + t,), generator=g).tolist()
        out.append(EncodedExample(input_ids=ids, labels=[-100] * p + ids[p:], prompt_len=p))
    return out


class _Replay:
    """An ARM batch source like ``ReplayBatches``: two pseudo-prompts of task 0."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(5)
        self.prompts = [torch.randint(3, 128, (k,), generator=g).tolist() for k in (3, 5, 7)]
        self.longest = 7

    def __call__(self, micro: int) -> dict[str, torch.Tensor]:
        rows = [self.prompts[micro % 3], self.prompts[(micro + 1) % 3]]
        b = collate_prompts(rows, 0)
        return {
            "replay_input_ids": b["input_ids"],
            "replay_attention_mask": b["attention_mask"],
            "replay_task": torch.zeros(2, dtype=torch.long),
        }


def _model() -> SAPTModel:
    model = SAPTModel(tiny_llama(), AdapterConfig(rank=2, alpha=4), n_slots=3)
    g = torch.Generator().manual_seed(1)
    model.start_task(0)
    with torch.no_grad():
        for layer in model.layers.values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.1)
    model.file_current()
    model.set_target(0, torch.tensor([1.0]))
    model.start_task(1)
    return model


def test_buckets():
    assert [bucket_length(n, 1000) for n in (1, 64, 65, 200, 999, 1000, 1200)] == [
        64,
        64,
        128,
        256,
        1000,
        1000,
        1200,
    ]
    assert bucket_length(10, 30) == 30  # capped at the longest row the data can give
    assert replay_length(5, 7) == 7 and replay_length(9, 7) == 64 and replay_length(3, None) == 64


def test_padding_to_a_bucket_changes_no_loss():
    """Right-padding the training batch and left-padding the ARM batch (what graph mode
    does for static shapes) leaves the task and ARM losses and the gradients as they were
    (reference: the same step on the unpadded batches)."""
    model = _model().train()
    batch = collate_train(_examples()[:3], 0)
    replay = _Replay()(0)
    kw = {"kl_ratio": 0.5}
    ref = model(**batch, **replay, **kw)
    ref.loss.backward()
    want = [p.grad.clone() for p in model.adapter_params()]
    model.zero_grad()
    out = model(**pad_right(batch, 64, 0), **pad_left(replay, 16, 0), **kw)
    out.loss.backward()
    assert out.logits.shape[1] == 64
    torch.testing.assert_close(out.task_loss, ref.task_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.arm_loss, ref.arm_loss, rtol=1e-5, atol=1e-7)
    for g, p in zip(want, model.adapter_params()):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)


def test_trace_mode_trains_as_eager():
    """``train.compile=trace`` on the CPU: DeepSpeed's engine runs the compiled forward
    (dynamo, fullgraph: any graph break or host sync in SAPT's step is an error) and its
    compiled backward; losses and the trained block equal eager's over a few steps with
    variable-length batches and an ARM batch; the model's own forward comes back after."""
    from torch._dynamo.utils import counters

    from sapt_dist import distributed
    from sapt_dist.train.block import BlockJob, train_block

    results = {}
    for mode in ("off", "trace"):
        torch._dynamo.reset()
        model = _model()
        job = BlockJob(
            name=mode,
            examples=_examples(),
            params=model.named_adapter_params(),
            steps=3,
            seed=0,
            lr=1e-2,
            replay=_Replay(),
            kl_ratio=0.5,
        )
        cfg = TrainConfig(micro_batch_size=2, grad_accum=1, max_grad_norm=1.0, compile=mode)
        counters.clear()
        losses = train_block(model, job, cfg, "float32", 0)
        distributed.finish()
        # trace: one graph (every batch padded to one shape), compiled once, no break
        graphs = counters["stats"]["unique_graphs"]
        assert (graphs, sum(counters["graph_break"].values())) == (
            (1, 0) if mode == "trace" else (0, 0)
        )
        assert "forward" not in vars(model)
        results[mode] = (losses, {n: p.detach().clone() for n, p in job.params.items()})
    (l_off, p_off), (l_tr, p_tr) = results["off"], results["trace"]
    assert len(l_tr) == 3 and all(v is not None for v in l_tr)
    torch.testing.assert_close(torch.tensor(l_tr), torch.tensor(l_off), rtol=1e-5, atol=1e-6)
    for name in p_off:
        torch.testing.assert_close(p_tr[name], p_off[name], rtol=1e-4, atol=1e-6, msg=name)


def test_compiled_forward_puts_back_the_instance_forward():
    model = _model()
    wrapped = model.forward
    model.forward = lambda *a, **k: wrapped(*a, **k)  # e.g. a test's wrapper
    mine = vars(model)["forward"]
    with compiled_forward(model, "trace"):
        assert vars(model)["forward"] is not mine
    assert vars(model)["forward"] is mine
    with compiled_forward(model, "off"):
        assert vars(model)["forward"] is mine


def test_graphs_off_cuda_is_refused():
    with (
        pytest.raises(ConfigError, match="'graphs' .* model is on cpu; .* train.compile=trace"),
        compiled_forward(_model(), "graphs"),
    ):
        pass


@pytest.mark.parametrize(
    "override, needle",
    [
        ("distributed.deepspeed_config=zero3", "ZeRO-3 gathers and releases"),
        ("model.quantization=nf4", "4-bit backbones"),
        ("model.gradient_checkpointing=true", "gradient checkpointing recomputes"),
    ],
)
@pytest.mark.parametrize("mode", ["graphs", "trace"])
def test_graph_mode_refuses_what_it_cannot_capture(mode, override, needle):
    from sapt_dist.config import load_config

    with pytest.raises(ConfigError, match=f"'train.compile' is '{mode}': {needle}"):
        load_config(None, ["model.builder=demo", f"train.compile={mode}", override])
    load_config(None, ["model.builder=demo", override])  # fine without graph mode
    assert RunConfig().train.compile == "off"
