"""Generation and routing read-outs of a ``SAPTModel``, used by training (evaluation,
pseudo-samples, attention targets, the router center) and by using a finished run
(``sapt-predict`` / ``sapt-route``): batched greedy generation with the KV cache (an
encoder-decoder's encoder output computed once), routing fixed from the prompt.

Prompts are sorted by length into left-padded batches (less padding, same results: every
sequence's weights and tokens depend only on itself) and the outputs put back in order.
"""

from __future__ import annotations

import logging

import torch
from tqdm.auto import tqdm

from sapt_dist import distributed
from sapt_dist.data.tasks import collate_prompts
from sapt_dist.method.model import SAPTModel

__all__ = [
    "attention_target",
    "generate_texts",
    "mean_pooled_prompt",
    "pooled_prompts",
    "routing_scores",
    "routing_weights",
]

log = logging.getLogger(__name__)


def _batches(prompts: list[list[int]], batch_size: int):
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    for s in range(0, len(order), batch_size):
        yield order[s : s + batch_size]


@torch.no_grad()
def generate_texts(
    model: SAPTModel,
    tokenizer,
    prompts: list[list[int]],
    batch_size: int,
    max_new_tokens: int,
    desc: str = "generate",
    weights: torch.Tensor | None = None,
    **gen_kwargs,
) -> list[str]:
    """Greedy (unless ``gen_kwargs`` say otherwise) continuations of token-id prompts.

    With several ranks, greedy decoding is shared out: rank r decodes batches r, r+W, ...
    (the same batches one process would form, so the same outputs) and the texts are
    gathered. Sampling is not shared out: every rank draws every batch from the same seeded
    stream, so the samples do not depend on the number of ranks. Under ZeRO-3 every forward
    is collective: ranks run the same number of ``generate`` calls (short ranks repeat a
    batch and drop its output) with ``synced_gpus``.

    Args:
        prompts: token ids of each prompt (no padding).
        weights: (n, slots) fixed mixture weights per prompt (e.g. the generator's);
            ``None``: SAPT's routing from each prompt.
    """
    model.eval()
    distributed.ready_for_inference(model)
    device = model.router.key.device
    out: list[str | None] = [None] * len(prompts)
    pad = tokenizer.pad_token_id
    batches = list(_batches(prompts, batch_size))
    world, rank = distributed.world_size(), distributed.rank()
    shared_out = world > 1 and not gen_kwargs.get("do_sample", False) and len(batches) > 0
    mine = batches
    if shared_out:
        per_rank = -(-len(batches) // world)
        mine = [batches[min(b, len(batches) - 1)] for b in range(rank, per_rank * world, world)]
        real = list(range(rank, len(batches), world))
    synced = world > 1 and distributed.zero3_enabled()
    texts_of: dict[int, str] = {}
    bar = tqdm(mine, desc=desc, disable=not distributed.is_main_process(), leave=False)
    for k, idx in enumerate(bar):
        batch = collate_prompts([prompts[i] for i in idx], pad)
        ids = batch["input_ids"].to(device)
        w = weights[idx].to(device) if weights is not None else None
        kwargs = {"do_sample": False, **gen_kwargs}
        if synced:
            kwargs["synced_gpus"] = True
        gen = model.generate(
            ids,
            batch["attention_mask"].to(device),
            weights=w,
            max_new_tokens=max_new_tokens,
            pad_token_id=pad,
            eos_token_id=tokenizer.eos_token_id,
            **kwargs,
        )
        if shared_out and k >= len(real):
            continue  # a repeated batch that only kept this rank in step
        # the new tokens only: a causal LM's output starts with the prompt, an
        # encoder-decoder's with the decoder start token
        texts = tokenizer.batch_decode(model.new_tokens(gen, ids), skip_special_tokens=True)
        for i, t in zip(idx, texts, strict=True):
            texts_of[i] = t.strip()
    if shared_out:
        for part in distributed.all_gather_objects(texts_of):
            for i, t in part.items():
                out[i] = t
    else:
        for i, t in texts_of.items():
            out[i] = t
    return out  # type: ignore[return-value]


@torch.no_grad()
def _per_prompt(model: SAPTModel, prompts: list[list[int]], pad_id: int, batch_size: int, fn):
    """(n, T) rows of ``fn(input_ids, prompt_mask)`` over length-sorted batches (every rank
    computes all: the prompt pass is cheap next to decoding)."""
    distributed.ready_for_inference(model)
    device = model.router.key.device
    rows = torch.empty(len(prompts), model.n_slots)
    for idx in _batches(prompts, batch_size):
        batch = collate_prompts([prompts[i] for i in idx], pad_id)
        rows[idx] = (
            fn(batch["input_ids"].to(device), batch["attention_mask"].to(device)).float().cpu()
        )
    return rows


def routing_weights(
    model: SAPTModel, prompts: list[list[int]], pad_id: int, batch_size: int
) -> torch.Tensor:
    """(n, T) the mixture weights SAPT gives each prompt."""
    return _per_prompt(model, prompts, pad_id, batch_size, model.routing_weights)


def routing_scores(
    model: SAPTModel, prompts: list[list[int]], pad_id: int, batch_size: int
) -> torch.Tensor:
    """(n, T) the key scores before the softmax (inactive slots included), batched exactly
    as :func:`routing_weights` so that ``softmax`` over the active slots gives its rows."""
    return _per_prompt(model, prompts, pad_id, batch_size, model.routing_scores)


@torch.no_grad()
def mean_pooled_prompt(
    model: SAPTModel, prompts: list[list[int]], pad_id: int, batch_size: int
) -> torch.Tensor:
    """(d,) the mean max-pooled prompt embedding of ``prompts`` (each counted once): a
    task's contribution to the router's input center (``adapter.router_center=tasks``)."""
    if not prompts:
        raise ValueError("mean_pooled_prompt: no prompts (a task without training examples?)")
    return pooled_prompts(model, prompts, pad_id, batch_size).double().mean(0).float()


@torch.no_grad()
def pooled_prompts(
    model: SAPTModel, prompts: list[list[int]], pad_id: int, batch_size: int
) -> torch.Tensor:
    """(n, d) fp32 max-pooled prompt embeddings (what the router reads before centering),
    on the CPU; collective under ZeRO-3 (the embedding is gathered): every rank calls it."""
    distributed.ready_for_inference(model)
    device = model.router.key.device
    rows = torch.empty(len(prompts), model.router.d)
    for idx in _batches(prompts, batch_size):
        batch = collate_prompts([prompts[i] for i in idx], pad_id)
        u = model.pooled_prompts(batch["input_ids"].to(device), batch["attention_mask"].to(device))
        rows[idx] = u.float().cpu()
    return rows


def attention_target(
    model: SAPTModel, prompts: list[list[int]], pad_id: int, batch_size: int, slot: int
) -> torch.Tensor:
    """``a_t*``: mean weights over the dev inputs (each counted once), over slots ``0..slot``."""
    w = routing_weights(model, prompts, pad_id, batch_size)[:, : slot + 1]
    return w.mean(dim=0)
