"""Graph mode of the training step (``train.compile``; issue 14).

``graphs`` compiles ``SAPTModel.forward`` with ``torch.compile(mode="reduce-overhead",
fullgraph=True, dynamic=False)``: dynamo traces forward and backward once per batch
shape (AOTAutograd), inductor generates the kernels and its CUDA-graph trees record
forward and backward as CUDA graphs that later steps replay, so a step costs a few graph
launches instead of one host dispatch per op. It is ``torch.compile`` rather than a
hand-made ``torch.cuda.graph`` capture of the step because DeepSpeed's ``backward`` /
``step`` run host logic (loss scaling, gradient hooks and reduction, clipping, the
optimizer) that must stay eager between the captured parts, and the CUDA-graph trees
already handle what a capture needs around them: static input buffers, one memory pool,
a recording per shape, and falling back to plain compiled code where a graph cannot
apply.

``trace`` is the same capture with ``backend="aot_eager"``: dynamo + AOTAutograd trace
the step into one forward and one backward graph (``fullgraph=True``: a graph break or a
host sync in the traced code is an error) and run them with eager kernels. It works on
any device and computes what eager computes, so it checks on a CPU that the training
step of a config traces as one graph, and the losses it gives against eager.

Static shapes: every micro-batch is right-padded to a length bucket
(:func:`bucket_length`: the smallest power of two >= 64 that holds its longest row,
capped at the longest sequence of the block's data), the ARM batch of pseudo-prompts is
left-padded to the longest pseudo-prompt of the task; padding changes no loss (labels
-100, masked attention, masked max-pool). A task therefore compiles at most
``log2(longest / 64) + 2`` shapes.

Refused (``ConfigError``, in ``RunConfig.validate``): ZeRO-3 (its parameter gather/release
hooks run inside forward and backward, outside what dynamo can trace or a graph can
replay), 4-bit backbones (bitsandbytes' kernels), gradient checkpointing, and ``graphs``
without CUDA.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from sapt_dist.config import ConfigError

__all__ = [
    "bucket_length",
    "check_device",
    "compiled_forward",
    "pad_left",
    "pad_right",
    "replay_length",
]

#: shortest padded length: shorter batches share one shape
MIN_BUCKET = 64
#: compiled shapes kept per forward (dynamo's recompile limit while compiled): buckets x
#: ARM shapes x the generator's forward over a run
RECOMPILE_LIMIT = 64


def check_device(mode: str, device: torch.device) -> None:
    """``graphs`` records CUDA graphs: refuse it (naming ``trace``) off CUDA."""
    if mode == "graphs" and device.type != "cuda":
        raise ConfigError(
            f"config key 'train.compile' is 'graphs' (CUDA graphs) but the model is on "
            f"{device.type}; on a CPU use train.compile=trace to check that the step "
            f"traces as one graph, or train.compile=off"
        )


def bucket_length(n: int, longest: int) -> int:
    """The padded length of a batch whose longest row has ``n`` tokens: the smallest power
    of two >= ``max(n, MIN_BUCKET)``, capped at ``longest`` (the longest row the data can
    give; ``n`` itself if it is longer)."""
    if n >= longest:
        return n
    b = MIN_BUCKET
    while b < n:
        b *= 2
    return min(b, longest)


def replay_length(n: int, longest: int | None) -> int:
    """The padded length of an ARM batch whose longest pseudo-prompt has ``n`` tokens: the
    longest pseudo-prompt of the task when known (one shape per task), else a bucket."""
    if longest is not None and n <= longest:
        return longest
    return bucket_length(n, 1 << 62)


def pad_right(batch: dict[str, torch.Tensor], length: int, pad_id: int) -> dict[str, torch.Tensor]:
    """A right-padded training batch (``collate_train``) padded further to ``length``."""
    extra = length - batch["input_ids"].shape[1]
    if extra <= 0:
        return batch
    fill = {"input_ids": pad_id, "attention_mask": 0, "labels": -100}
    pad = torch.nn.functional.pad
    return {k: pad(v, (0, extra), value=fill[k]) if k in fill else v for k, v in batch.items()}


def pad_left(batch: dict[str, torch.Tensor], length: int, pad_id: int) -> dict[str, torch.Tensor]:
    """An ARM batch (left-padded pseudo-prompts) padded further on the left to ``length``."""
    extra = length - batch["replay_input_ids"].shape[1]
    if extra <= 0:
        return batch
    fill = {"replay_input_ids": pad_id, "replay_attention_mask": 0}
    pad = torch.nn.functional.pad
    return {k: pad(v, (extra, 0), value=fill[k]) if k in fill else v for k, v in batch.items()}


@contextlib.contextmanager
def compiled_forward(model: torch.nn.Module, mode: str) -> Iterator[None]:
    """Inside: ``model.forward`` is compiled for ``mode`` (nothing for ``off``); the
    forward the model had (a class method or one set on the instance) comes back after."""
    if mode == "off":
        yield
        return
    check_device(mode, next(model.parameters()).device)
    kw = {"mode": "reduce-overhead"} if mode == "graphs" else {"backend": "aot_eager"}
    had = "forward" in vars(model)
    before = vars(model).get("forward")
    name = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else None
    limits = {name or "cache_size_limit": RECOMPILE_LIMIT}
    model.forward = torch.compile(model.forward, fullgraph=True, dynamic=False, **kw)
    try:
        with torch._dynamo.config.patch(limits):
            yield
    finally:
        if had:
            model.forward = before
        else:
            del model.forward
