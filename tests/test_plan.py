"""sapt-plan: its counts against the tensors of a real SAPTModel, its CLI and its errors.

The DeepSpeed-side figures (per-rank shards, optimizer partitions, saved activations under
ZeRO-3) are checked against measurement by ``bench/bench_plan.py`` (slow test below)."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from sapt_dist.cluster.plan import (
    PRESETS,
    DeepSpeedKnobs,
    PlanError,
    PlanInputs,
    activation_bytes,
    backbone_tensors,
    main,
    plan,
    shape_from_config,
    shape_from_dict,
)
from sapt_dist.config import AdapterConfig
from sapt_dist.method.model import SAPTModel
from tests.conftest import tiny_llama

REPO = Path(__file__).resolve().parents[1]
NO_PERSIST = DeepSpeedKnobs(param_persistence_threshold=0)


def _sapt(targets=("q_proj", "v_proj"), slots=3, rank=4, dtype=torch.float32):
    backbone = tiny_llama(vocab=96, hidden=32, layers=2).to(dtype)
    adapter = AdapterConfig(rank=rank, target_modules=list(targets))
    model = SAPTModel(backbone, adapter, n_slots=slots, dtype=dtype, generator_slot=True)
    shape = shape_from_dict(backbone.config.to_dict(), name="tiny")
    return model, shape


def _inputs(shape, **kw) -> PlanInputs:
    base = dict(
        shape=shape,
        gpus_per_node=1,
        nodes=1,
        dtype="fp32",
        micro_batch=2,
        seq_len=16,
        slots=3,
        rank=4,
        targets=("q_proj", "v_proj"),
        knobs=NO_PERSIST,
    )
    base.update(kw)
    return PlanInputs(**base)


def test_backbone_tensors_match_the_hf_model():
    model, shape = _sapt()
    real = {
        n.replace(".base.", "."): tuple(p.shape)
        for n, p in model.backbone.named_parameters()
        if "lora_" not in n
    }
    planned = {t.name: t.shape for t in backbone_tensors(shape)}
    assert planned == real


@pytest.mark.parametrize("world", [1, 2, 3])
def test_backbone_shard_is_deepspeeds_partition(world):
    """world 1: every frozen byte; world W: ceil(numel / W) elements per tensor, which is
    what DeepSpeed's ``ds_tensor`` holds (padded to a multiple of W)."""
    model, shape = _sapt()
    frozen = [p for n, p in model.backbone.named_parameters() if "lora_" not in n]
    expect = sum(math.ceil(p.numel() / world) * p.element_size() for p in frozen)
    got = plan(_inputs(shape, gpus_per_node=world))["bytes"]["backbone_shard"]
    assert got == expect
    if world == 1:
        assert got == sum(p.numel() * p.element_size() for p in frozen)


@pytest.mark.parametrize("targets", [("q_proj", "v_proj"), ("q_proj", "k_proj", "down_proj")])
def test_block_stack_is_the_models_buffers(targets):
    model, shape = _sapt(targets=targets, dtype=torch.bfloat16)
    model.router.to(torch.bfloat16)
    sapt_buffers = sum(
        b.numel() * b.element_size()
        for n, b in model.named_buffers()
        if n.endswith(("A_bank", "B_bank")) or n.startswith("router.") or n == "layer_current"
    )
    p = plan(_inputs(shape, dtype="bf16", targets=targets, gpus_per_node=4))
    assert p["bytes"]["block_stack"] == sapt_buffers
    # replicated: the same on any number of GPUs
    assert (
        plan(_inputs(shape, dtype="bf16", targets=targets))["bytes"]["block_stack"] == sapt_buffers
    )


def test_trainable_count_and_optimizer_bytes():
    model, shape = _sapt()
    n_train = sum(p.numel() for p in model.adapter_params())
    p1 = plan(_inputs(shape))
    assert p1["detail"]["trainable_numel"] == n_train
    # fp32: param partition + grad partition + fp32 master + two AdamW moments = 20 B
    assert p1["bytes"]["trainable_optimizer"] == 20 * n_train
    p2 = plan(_inputs(shape, dtype="bf16", gpus_per_node=2))
    expect = sum(math.ceil(q.numel() / 2) for q in model.adapter_params()) * (2 * 2 + 12)
    assert p2["bytes"]["trainable_optimizer"] == expect


def test_prompt_blocks_trainables_banks_and_activations_are_the_models():
    """Prompt blocks: the trainable tensors, the bank buffers and the extra positions the
    planner counts are those of a real SAPTModel with ``adapter.kind: prompt``."""
    backbone = tiny_llama(vocab=96, hidden=32, layers=2)
    adapter = AdapterConfig(kind="prompt", prompt_length=6)
    model = SAPTModel(backbone, adapter, n_slots=3, generator_slot=True)
    shape = shape_from_dict(backbone.config.to_dict(), name="tiny")
    inp = _inputs(shape, prompt_length=6, targets=())
    p = plan(inp)
    assert p["detail"]["trainable_numel"] == sum(q.numel() for q in model.adapter_params())
    buffers = sum(
        b.numel() * b.element_size()
        for n, b in model.named_buffers()
        if n == "prompts.bank" or n.startswith("router.") or n == "layer_current"
    )
    assert p["bytes"]["block_stack"] == buffers
    # the backbone runs L more positions: a block-free layer on 16 + 6 tokens, plus the
    # mixed prompt (b, L, d) and its copy in the concatenated embeddings (fp32: 4 bytes)
    plain = activation_bytes(_inputs(shape, seq_len=16 + 6, targets=()))
    assert activation_bytes(inp)["layer"] == plain["layer"] + 2 * 4 * 2 * 6 * 32


def test_persistent_parameters_are_whole_on_every_rank():
    model, shape = _sapt()
    frozen = [p for n, p in model.backbone.named_parameters() if "lora_" not in n]
    knobs = DeepSpeedKnobs(param_persistence_threshold=100)  # the norms (32) persist
    got = plan(_inputs(shape, gpus_per_node=2, knobs=knobs))["bytes"]["backbone_shard"]
    expect = sum(
        math.ceil(p.numel() / 2) * 4 + (p.numel() * 4 if p.numel() <= 100 else 0) for p in frozen
    )
    assert got == expect


def test_nf4_shard_by_bytes_and_constants_replicated():
    shape = PRESETS["llama2-7b"]
    p8 = plan(_inputs(shape, dtype="bf16", quant="nf4", gpus_per_node=8))
    d = p8["detail"]
    linear = sum(t.numel for t in backbone_tensors(shape) if t.kind.endswith("_proj"))
    assert d["quant_constants_replicated"] == sum(
        4 * math.ceil(t.numel / 64) + 64
        for t in backbone_tensors(shape)
        if t.kind.endswith("_proj")
    )
    # 0.5 byte a weight, partitioned; embeddings / lm_head / norms in bf16
    rest = sum(t.numel for t in backbone_tensors(shape)) - linear
    approx = (linear * 0.5 + rest * 2) / 8 + d["quant_constants_replicated"]
    assert p8["bytes"]["backbone_shard"] == pytest.approx(approx, rel=1e-4)
    # the load peak is the whole quantized model
    assert d["load_peak"] == pytest.approx(
        linear * 0.5 + rest * 2 + d["quant_constants_replicated"], rel=1e-6
    )


def test_activations_match_saved_tensors_of_a_plain_forward():
    """Without DeepSpeed's linear replacement (``memory_efficient_linear`` off) the saved
    activations of the plain model are what the formula counts."""
    model, shape = _sapt(targets=("q_proj", "v_proj"), dtype=torch.bfloat16)
    model.router.to(torch.bfloat16)
    model.train()
    b, s = 2, 24
    ids = torch.randint(3, 96, (b, s))
    am = torch.ones_like(ids)
    am[0, -4:] = 0
    labels = ids.clone()
    labels[:, : s // 2] = -100
    skip = {t.untyped_storage().data_ptr() for t in [*model.buffers(), *model.parameters()]}
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if not isinstance(t, torch.nn.Parameter) and st.data_ptr() not in skip:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, attention_mask=am, labels=labels)
    knobs = replace(NO_PERSIST, memory_efficient_linear=False)
    inp = _inputs(shape, dtype="bf16", micro_batch=b, seq_len=s, grad_ckpt=False, knobs=knobs)
    a = activation_bytes(inp)
    # on a plain model torch's linear saves views of the weights themselves: no new memory
    predicted = a["saved"] - a["held_weights"]
    assert predicted == pytest.approx(sum(seen.values()), rel=0.001)


def test_components_scale_as_expected():
    shape = PRESETS["llama2-13b"]
    p1 = plan(_inputs(shape, dtype="bf16", gpus_per_node=1, knobs=DeepSpeedKnobs()))
    p16 = plan(_inputs(shape, dtype="bf16", gpus_per_node=8, nodes=2, knobs=DeepSpeedKnobs()))
    assert p16["bytes"]["backbone_shard"] == pytest.approx(
        p1["bytes"]["backbone_shard"] / 16, rel=1e-3
    )
    assert p16["bytes"]["block_stack"] == p1["bytes"]["block_stack"]
    assert p16["bytes"]["activations"] == p1["bytes"]["activations"]
    on = plan(_inputs(shape, dtype="bf16", grad_ckpt=True))["bytes"]["activations"]
    off = plan(_inputs(shape, dtype="bf16", grad_ckpt=False))["bytes"]["activations"]
    assert on < off
    # 13B in bf16 is ~26 GB of weights: a 1-GPU total above that, 16 GPUs well below
    assert p1["total"] > 13e9 * 2 and p16["total"] < p1["total"] / 4


def test_shape_from_config_file(tmp_path):
    cfg = tiny_llama(vocab=96, hidden=32, layers=2).config
    cfg.save_pretrained(tmp_path)
    s = shape_from_config(tmp_path)
    assert (s.hidden, s.layers, s.heads, s.kv_heads, s.vocab) == (32, 2, 4, 2, 96)
    assert shape_from_config(tmp_path / "config.json") == s


def test_cli_table_json_and_markdown(capsys):
    assert main(["--model", "llama2-7b", "--gpus-per-node", "8"]) == 0
    out = capsys.readouterr().out
    assert "llama2-7b bf16 x8" in out and "backbone shard" in out and "Not counted" in out
    assert main(["--model", "llama2-70b", "--quant", "nf4", "--format", "json"]) == 0
    j = json.loads(capsys.readouterr().out)
    assert j["inputs"]["quant"] == "nf4" and j["total"] == sum(j["bytes"].values())
    assert main(["--sweep", "--format", "markdown"]) == 0
    md = capsys.readouterr().out
    rows = [line for line in md.splitlines() if line.startswith("| llama2-")]
    assert len(rows) == 3 * 2 * 3  # 3 models x bf16/nf4 x 1/8/16 GPUs
    assert "| llama2-70b bf16 x1 |" in md and "NO (80)" in md


def _submission(out: str) -> tuple[list[str], list[str]]:
    """The printed sbatch command: its sbatch arguments and its sapt-train overrides."""
    lines = out[out.index("submit (from the repository root):") :].splitlines()[1:]
    lines = [x for x in lines if not x.startswith("#")]
    cmd = " ".join(x.rstrip("\\").strip() for x in lines if x.strip())
    words = re.findall(r"\S+=<[^>]*>|\S+", cmd)  # a placeholder is one word
    at = next(i for i, w in enumerate(words) if w.endswith(".sbatch"))
    return words[: at + 1], words[at + 1 :]


def test_cli_ends_with_the_sbatch_command_of_the_plan(capsys):
    """The table's last lines are the submission that runs the planned layout: the
    one-node or multi-node script, the GPU counts, the keys the run needs that the config
    does not give (named placeholders) and the overrides the estimate assumed; a plan that
    does not fit is commented out with what to change."""
    assert main(["--model", "llama2-13b", "--gpus-per-node", "8", "--nodes", "2"]) == 0
    out = capsys.readouterr().out
    tail = out.strip().splitlines()[-4:]
    assert (
        tail[0]
        == "# replace each <...>: keys the run needs that my.yaml (your run config) may not set"
    )
    assert tail[1] == ("sbatch --nodes=2 --gpus-per-node=8 slurm/train_multinode.sbatch my.yaml \\")
    assert tail[2] == "    model.path=<your model folder> data.root=<your CL_Benchmark folder> \\"
    assert tail[3].split() == [
        "model.dtype=bfloat16",
        "train.micro_batch_size=2",
        "model.gradient_checkpointing=true",
        "distributed.deepspeed_config=zero3",
    ]
    argv = ["--model", "llama2-7b", "--gpus-per-node", "4", "--quant", "nf4"]
    assert main([*argv, "--micro-batch", "4", "--run-config", "llama2_7b_superni_order1"]) == 0
    tail = capsys.readouterr().out.strip().splitlines()[-3:]
    assert tail[0].startswith("sbatch --ntasks-per-node=4 --gpus-per-task=1 slurm/train.sbatch")
    assert tail[0].split()[-2].endswith("presets/llama2_7b_superni_order1.yaml")
    assert "train.micro_batch_size=4" in tail[2] and "model.quantization=nf4" in tail[2]
    assert "deepspeed_config" not in tail[2]  # the run config keeps its own
    assert main(["--model", "llama2-70b", "--gpus-per-node", "1", "--gpu-mem", "24"]) == 0
    tail = capsys.readouterr().out.strip().splitlines()[-5:]
    assert tail[0].startswith("# does not fit 24 GiB per GPU")
    assert all(line.startswith("# ") for line in tail)


@pytest.mark.parametrize(
    "preset", ["llama2_13b_superni_order1", "llama2_7b_long_order3", "t5_large_superni_order1"]
)
def test_printed_submission_loads_once_its_placeholders_are_filled(
    preset, capsys, tmp_path, monkeypatch
):
    """What failed after queueing (issue 24): the printed command's overrides, applied to
    its config as the batch script's sapt-train does, are a complete config once each
    named placeholder is filled in, and each placeholder is needed (without it: exit 2's
    'is required' or a data folder that is not there)."""
    from sapt_dist.config import ConfigError, load_config

    monkeypatch.chdir(tmp_path)  # a login node: the presets' ../shared/data is not there
    argv = ["--model", "t5-large" if preset.startswith("t5") else "llama2-13b"]
    assert main([*argv, "--gpus-per-node", "8", "--nodes", "2", "--run-config", preset]) == 0
    sbatch, (config, *overrides) = _submission(capsys.readouterr().out)
    assert sbatch[-1] == "slurm/train_multinode.sbatch" and config.endswith(f"{preset}.yaml")
    holes = [o for o in overrides if "<" in o]
    assert {h.split("=")[0] for h in holes} == {"model.path", "data.root"}
    assert "model.path=<your model folder>" in holes
    (tmp_path / "CL_Benchmark").mkdir()
    filled = {"model.path": "/models/x", "data.root": str(tmp_path / "CL_Benchmark")}
    done = [f"{o.split('=')[0]}={filled[o.split('=')[0]]}" if "<" in o else o for o in overrides]
    cfg = load_config(config, done)
    assert cfg.model.path == "/models/x" and cfg.data.root == filled["data.root"]
    without = [o for o in done if not o.startswith("model.path=")]
    with pytest.raises(ConfigError, match=r"'model\.path' is required"):
        load_config(config, without)


def test_cli_reads_a_preset_and_a_ds_config(tmp_path, capsys):
    ds = tmp_path / "ds.json"
    ds.write_text(
        json.dumps(
            {
                "zero_optimization": {
                    "stage": 3,
                    "stage3_prefetch_bucket_size": 0,
                    "stage3_max_reuse_distance": 0,
                    "memory_efficient_linear": False,
                }
            }
        )
    )
    rc = main(
        [
            "--run-config",
            "llama2_13b_superni_order1",
            "--model",
            "llama2-13b",
            "--ds-config",
            str(ds),
            "--format",
            "json",
        ]
    )
    assert rc == 0
    j = json.loads(capsys.readouterr().out)
    i = j["inputs"]
    assert (i["micro_batch"], i["seq_len"], i["rank"], i["slots"]) == (2, 1074, 4, 15)
    assert i["grad_ckpt"] is True and i["dtype"] == "bf16"
    assert (
        i["knobs"]["prefetch_bucket_size"] == 0 and i["knobs"]["memory_efficient_linear"] is False
    )
    # no prefetch, no reuse: the largest module (embed / lm_head, 32000 x 5120) alone
    assert j["bytes"]["gathered"] == 32000 * 5120 * 2


def test_run_config_with_a_model_folder_takes_its_shape(tmp_path, capsys):
    folder = tmp_path / "model"
    tiny_llama(vocab=96, hidden=32, layers=2).config.save_pretrained(folder)
    run = tmp_path / "run.yaml"
    run.write_text(
        f"model: {{path: {folder}, dtype: float32, quantization: nf4}}\n"
        "adapter: {rank: 8, target_modules: [q_proj, k_proj], n_slots: 5}\n"
        "train: {micro_batch_size: 3}\n"
        "data: {max_source_length: 100, max_target_length: 20}\n"
    )
    assert main(["--run-config", str(run), "--format", "json", "--offload-param"]) == 0
    j = json.loads(capsys.readouterr().out)
    assert j["shape"]["hidden"] == 32 and j["shape"]["layers"] == 2
    i = j["inputs"]
    assert (i["dtype"], i["quant"], i["rank"], i["slots"], i["micro_batch"], i["seq_len"]) == (
        "fp32",
        "nf4",
        8,
        5,
        3,
        120,
    )
    assert i["targets"] == ["q_proj", "k_proj"]
    # offloaded: only the persistent tensors and the replicated 4-bit constants stay
    d = j["detail"]
    assert d["backbone_offloaded_to_cpu"] == d["backbone_partitions"] > 0
    assert j["bytes"]["backbone_shard"] == (
        d["backbone_persistent_full"] + d["quant_constants_replicated"]
    )


def test_double_quant_constants_are_smaller():
    shape = PRESETS["llama2-13b"]
    single = plan(_inputs(shape, dtype="bf16", quant="nf4"))["detail"]
    double = plan(_inputs(shape, dtype="bf16", quant="nf4", double_quant=True))["detail"]
    linear = sum(t.numel for t in backbone_tensors(shape) if t.kind.endswith("_proj"))
    assert single["quant_constants_replicated"] == pytest.approx(linear / 16, rel=1e-3)
    assert double["quant_constants_replicated"] == pytest.approx(
        linear / 64 * (1 + 4 / 256), rel=1e-2
    )


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--model", "llama3-8b"], "unknown model 'llama3-8b'"),
        (["--model", "llama2-7b", "--gpus-per-node", "0"], "--gpus-per-node must be"),
        (["--model", "llama2-7b", "--seq-len", "-5"], "--seq-len must be"),
        (["--model", "llama2-7b", "--targets", "q_proj,attn"], "['attn'] are not linear layers"),
        (["--config", "/nonexistent/config.json"], "no such file"),
        (
            ["--model", "llama2-7b", "--ds-config", "/nonexistent.json"],
            "--ds-config: no DeepSpeed config '/nonexistent.json'",
        ),
        (["--run-config", "no_such_preset"], "no preset 'no_such_preset'"),
        (
            ["--model", "llama2-7b", "--ds-config", str(REPO / "ds_configs/zero0.json")],
            "stage is 0",
        ),
        ([], "give the model"),
    ],
)
def test_bad_inputs_give_clear_errors(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err, err


def test_bad_config_json_names_the_key(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 64}))
    with pytest.raises(PlanError, match="key 'num_attention_heads' missing"):
        shape_from_config(tmp_path)
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "hidden_size": 64,
                "intermediate_size": 128,
                "num_hidden_layers": 2,
                "num_attention_heads": 6,
                "num_key_value_heads": 4,
                "vocab_size": 100,
            }
        )
    )
    with pytest.raises(PlanError, match="multiple of kv heads"):
        shape_from_config(tmp_path)


@pytest.mark.slow
def test_planner_matches_deepspeed_in_two_processes(tmp_path):
    """Planner vs DeepSpeed ZeRO-3's own per-rank tensors and autograd's saved tensors,
    2 CPU processes on gloo (bench/bench_plan.py --quick: one case)."""
    out = tmp_path / "rows.json"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "bench_plan.py"), "--quick", "--json", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert {r["world"] for r in rows} == {2}
    exact = {
        "backbone shard",
        "gathered working set",
        "block stack (replicated)",
        "trainable + optimizer",
    }
    for r in rows:
        if r["component"] in exact:
            assert r["planner"] == r["measured"], r
        else:  # saved activations: a few bytes of index tensors are not modelled
            assert abs(r["rel_error"]) < 0.01, r


@pytest.mark.slow
def test_gpu_plan_check_dry_run_on_cpu():
    """The prepared GPU check runs its CPU smoke path and agrees with the profiler."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "gpu_plan_check.py"), "--device", "cpu", "--dry-run"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("activation peak")]
    assert len(rows) == 2, proc.stdout
    # within 8%: the CPU profiler's peak with checkpointing varies from run to run of the
    # same code (measured -2.2%, -3.7%, -5.1%, -5.2% over 15 runs on one 2-core CPU; a CI
    # run failed the earlier 5% bound at -5.2%); without checkpointing it is -1.9% every time
    for line in rows:
        err = float(line.split()[-1].rstrip("%"))
        assert abs(err) < 8.0, line


# --------------------------------------------------------------------------- T5
def _t5_sapt(targets=("q", "v"), slots=3, gated=False, dtype=torch.float32):
    from sapt_dist.backbone.load import random_t5

    extra = {"feed_forward_proj": "gated-gelu"} if gated else {}
    backbone = random_t5(96, 32, 2, 4, num_decoder_layers=3, **extra).to(dtype)
    adapter = AdapterConfig(rank=4, target_modules=list(targets))
    model = SAPTModel(backbone, adapter, n_slots=slots, dtype=dtype, generator_slot=True)
    shape = shape_from_dict(backbone.config.to_dict(), name="tiny-t5")
    return model, shape


@pytest.mark.parametrize("gated", [False, True], ids=["relu", "gated"])
def test_t5_parameter_side_matches_a_real_t5_sapt_model(gated):
    """T5's tensors, the replicated block stack and the trainable count against a real
    T5 SAPTModel (2 encoder, 3 decoder layers): q, v are adapted in the encoder's
    self-attention and the decoder's self- and cross-attention."""
    targets = ("q", "v", "wo") + (("wi_0",) if gated else ("wi",))
    model, shape = _t5_sapt(targets, gated=gated)
    assert shape.is_t5 and shape.decoder_layers == 3 and shape.gated_ff == gated
    real = {
        n.replace(".base.", "."): tuple(p.shape)
        for n, p in model.backbone.named_parameters()
        if "lora_" not in n
    }
    assert {t.name: t.shape for t in backbone_tensors(shape)} == real
    p = plan(_inputs(shape, targets=targets, seq_len=24, target_len=8))
    sapt_buffers = sum(
        b.numel() * b.element_size()
        for n, b in model.named_buffers()
        if n.endswith(("A_bank", "B_bank")) or n.startswith("router.") or n == "layer_current"
    )
    assert p["bytes"]["block_stack"] == sapt_buffers
    assert p["detail"]["trainable_numel"] == sum(q.numel() for q in model.adapter_params())
    frozen = [q for n, q in model.backbone.named_parameters() if "lora_" not in n]
    assert p["bytes"]["backbone_shard"] == sum(q.numel() * 4 for q in frozen)


def test_t5_presets_and_configs_plan_and_say_what_is_estimated(tmp_path, capsys):
    from sapt_dist.backbone.load import load_backbone
    from sapt_dist.config import ModelConfig

    assert main(["--run-config", "t5_large_superni_order1", "--model", "t5-large"]) == 0
    out = capsys.readouterr().out
    assert "t5-large fp32 x8" in out and "(512 encoder + 50 decoder) tokens" in out
    assert "activations are an estimate, not measured" in out
    for preset in ("t5_large_superni_order2", "t5_large_long_order3", "t5_large_long_order4"):
        assert main(["--run-config", preset, "--model", "t5-large", "--format", "json"]) == 0
        j = json.loads(capsys.readouterr().out)
        assert j["shape"]["arch"] == "t5" and j["inputs"]["targets"] == ["q", "v"]
    # the demo preset's shape is the demo T5's own config
    assert main(["--run-config", "demo_t5", "--format", "json"]) == 0
    j = json.loads(capsys.readouterr().out)
    backbone, _ = load_backbone(ModelConfig(builder="demo", demo_arch="t5"))
    want = shape_from_dict(backbone.config.to_dict())
    assert {k: j["shape"][k] for k in ("hidden", "layers", "decoder_layers", "vocab")} == {
        "hidden": want.hidden,
        "layers": want.layers,
        "decoder_layers": want.decoder_layers,
        "vocab": want.vocab,
    }
    # a T5 config file, a checkpointed estimate below the plain one
    backbone.config.save_pretrained(tmp_path / "t5")
    shape = shape_from_config(tmp_path / "t5")
    plain = activation_bytes(
        _inputs(shape, targets=("q", "v"), seq_len=80, target_len=16, grad_ckpt=False)
    )
    ckpt = activation_bytes(
        _inputs(shape, targets=("q", "v"), seq_len=80, target_len=16, grad_ckpt=True)
    )
    assert 0 < ckpt["peak"] < plain["peak"]
    # errors name what a T5 has
    assert main(["--model", "t5-large", "--targets", "q_proj"]) == 2
    assert "not linear layers of a T5 model" in capsys.readouterr().err
    assert main(["--model", "t5-large", "--seq-len", "40", "--target-len", "50"]) == 2
    assert "--target-len (50) must be below --seq-len" in capsys.readouterr().err
    with pytest.raises(PlanError, match="'bart'.*LLaMA-style decoders and T5"):
        shape_from_dict({"model_type": "bart", "is_encoder_decoder": True, "d_model": 16})
