"""Config loading: unknown keys, wrong types and bad values fail naming the key and file."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from sapt_dist.config import ConfigError, DataConfig, RunConfig, load_config, preset_path

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted((ROOT / "sapt_dist" / "presets").glob("*.yaml"))


def test_defaults_and_overrides():
    cfg = load_config(
        None,
        [
            "model.builder=demo",
            "train.lr=1e-4",
            "adapter.target_modules=[q_proj, k_proj]",
            "adapter.n_slots=null",
        ],
    )
    assert isinstance(cfg, RunConfig)
    assert cfg.train.lr == 1e-4 and isinstance(cfg.train.lr, float)
    assert cfg.adapter.target_modules == ["q_proj", "k_proj"] and cfg.adapter.n_slots is None
    assert (
        load_config(None, ["model.builder=demo", "train.lr=3"]).train.lr == 3.0
    )  # int widens to float


@pytest.mark.parametrize(
    "override, match",
    [
        ("train.lrr=1", r"unknown config key 'train.lrr'"),
        ("bogus=1", r"unknown config key 'bogus'"),
        ("train.epochs=two", r"'train.epochs': expected an integer, got 'two'"),
        ("train.epochs=1.5", r"'train.epochs': expected an integer"),
        ("model.quantization=nf8", r"'model.quantization'"),
        ("method=ewc", r"'method': 'ewc' is not one of"),
        ("adapter.target_modules=q_proj", r"'adapter.target_modules': expected a list"),
        ("train.lr=-1", r"'train.lr' must be > 0"),
        ("adapter.dropout=1.0", r"'adapter.dropout' must be in"),
        ("train.epochs", r"must look like key.sub=value"),
        ("train=3", r"'train': expected a mapping"),
    ],
)
def test_bad_overrides(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


def test_bad_file_named(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  micro_batch: 4\n")
    with pytest.raises(ConfigError, match=rf"{p}: unknown config key 'train.micro_batch'"):
        load_config(p)
    p.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize("preset", PRESETS, ids=[p.stem for p in PRESETS])
def test_presets_load_and_headers_are_commands(preset):
    first = preset.read_text().splitlines()[0]
    assert first.startswith("# sapt-train"), first
    if preset.stem.startswith("demo"):  # the CPU demos need nothing from the user
        cfg = load_config(preset)
        assert cfg.model.builder == "demo" and cfg.data.root == "demo"
        assert (cfg.adapter.kind == "prompt") == (preset.stem == "demo_prompt")
        # the LoRA demos route on the centered input (measured over seeds, in the header)
        centered = preset.stem in ("demo", "demo_t5")
        assert (cfg.adapter.router_center == "tasks") == centered
        return
    if preset.stem.startswith("smollm2"):
        # the real-model preset names a model sapt-models fetches on first use, keeps the
        # paper's routing selectable and documents its deviation
        cfg = load_config(preset)
        assert cfg.model.path == "smollm2-135m-instruct"
        assert cfg.adapter.router_center == "tasks"
        assert load_config(preset, ["adapter.router_center=none"]).adapter.router_center == "none"
        return
    # the LLaMA-2 presets keep the paper's routing input
    assert load_config(preset, ["model.path=/m"]).adapter.router_center == "none"
    # the paper presets need the model path, and say so
    with pytest.raises(ConfigError, match="'model.path' is required"):
        load_config(preset)
    cfg = load_config(preset, ["model.path=/models/m"])
    if preset.stem.endswith("_olora"):  # O-LoRA as released: test_olora_presets_*
        assert cfg.method == "olora" and cfg.adapter.alpha == 32
        return
    if preset.stem.endswith("_gainlora"):  # GainLoRA as released: test_gainlora_presets_*
        assert cfg.method == "gainlora" and cfg.adapter.alpha == 32
        return
    assert cfg.adapter.alpha == 32 and cfg.train.select_best
    if preset.stem.startswith("t5"):  # SAPT.md's T5 setting: q, v (encoder, decoder, cross)
        superni = "superni" in preset.stem
        assert cfg.adapter.target_modules == ["q", "v"] and cfg.train.lr == 3e-4
        assert cfg.data.max_source_length == 512 and cfg.train.global_batch == 32
        assert (cfg.adapter.rank, cfg.train.epochs, cfg.train.micro_batch_size) == (
            (4, 100, 8) if superni else (8, 10, 16)
        )
        assert cfg.replay.kl_ratio == (0.5 if superni else 0.1)
        return
    assert cfg.adapter.rank == 4 and cfg.train.lr == 5e-5
    assert cfg.model.dtype == "bfloat16"


#: O-LoRA's scripts/long.sh (github.com/cmnfriend/O-LoRA), task by task: (epochs,
#: lambda_1, lambda_2); the same order as Long Sequence order 4
OLORA_LONG = {
    "yelp": (1, 0.0, 0.0),
    "amazon": (1, 0.5, 0.0),
    "mnli": (2, 0.5, 0.0),
    "cb": (1, 0.5, 0.0),
    "copa": (1, 0.5, 0.1),
    "qqp": (1, 0.5, 0.1),
    "rte": (1, 0.5, 0.3),
    "imdb": (1, 0.5, 0.0),
    "sst2": (1, 0.5, 0.1),
    "dbpedia": (1, 5.0, 0.0),
    "agnews": (1, 5.0, 0.0),
    "yahoo": (1, 5.0, 0.1),
    "multirc": (1, 5.0, 0.0),
    "boolq": (1, 5.0, 0.1),
    "wic": (1, 5.0, 0.3),
}


@pytest.mark.parametrize("name", ["t5_large_long_order4_olora", "llama2_7b_long_order4_olora"])
def test_olora_presets_carry_the_released_long_sequence_script(name):
    """The O-LoRA presets: its released Long Sequence script's per-task epochs and
    lambdas (through RunConfig.for_task, what the penalty gets), r 8 / alpha 32 / dropout
    0.1, global batch 64, constant lr without warm-up, no dev-set selection."""
    from sapt_dist.data.tasks import ORDERS

    cfg = load_config(ROOT / "sapt_dist/presets" / f"{name}.yaml", ["model.path=/m"])
    assert cfg.method == "olora" and cfg.data.order == "long_4"
    assert list(OLORA_LONG) == ORDERS["long_4"]
    got = {
        t: (s.epochs, s.olora_lambda_1, s.olora_lambda_2)
        for t in OLORA_LONG
        for s in [cfg.for_task(t)]
    }
    assert got == OLORA_LONG
    a, t = cfg.adapter, cfg.train
    assert (a.rank, a.alpha, a.dropout) == (8, 32, 0.1)
    assert (t.global_batch, t.lr_schedule, t.warmup_steps, t.select_best) == (
        64,
        "constant",
        0,
        False,
    )
    assert (cfg.data.max_source_length, cfg.data.max_target_length) == (512, 50)
    lrs = {cfg.for_task(t).lr for t in OLORA_LONG if t != "yelp"}
    if name.startswith("t5"):  # scripts/long.sh: 1e-3 throughout, fp32, peft's T5 q, v
        assert cfg.for_task("yelp").lr == 1e-3 and lrs == {1e-3}
        assert cfg.model.dtype == "float32" and a.target_modules == ["q", "v"]
    else:  # scripts_llama/order_*.sh: 1e-3 for the first task, 1e-4 after; bf16
        assert cfg.for_task("yelp").lr == 1e-3 and lrs == {1e-4}
        assert cfg.model.dtype == "bfloat16" and a.target_modules == ["q_proj", "v_proj"]


def test_deepspeed_config_names_and_files(tmp_path):
    demo = ["model.builder=demo"]
    cfg = load_config(None, [*demo, "distributed.deepspeed_config=zero3"])
    assert cfg.distributed.deepspeed_config == "zero3"
    with pytest.raises(ConfigError, match=r"'distributed.deepspeed_config'.*'zero3'"):
        load_config(None, [*demo, "distributed.deepspeed_config=zero9"])
    bad = tmp_path / "ds.json"
    bad.write_text('{"zero_optimization": {"stage": 3,}}')
    with pytest.raises(ConfigError, match=rf"'distributed.deepspeed_config'.*{bad}.*JSON"):
        load_config(None, [*demo, f"distributed.deepspeed_config={bad}"])
    bad.write_text('{"zero_optimization": {"stage": 4}}')
    with pytest.raises(ConfigError, match=r"stage must be 0-3"):
        load_config(None, [*demo, f"distributed.deepspeed_config={bad}"])


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan", "1e400"])
def test_non_finite_numbers_refused(value):
    with pytest.raises(ConfigError, match=r"'train.lr' must be (a finite number|> 0)"):
        load_config(None, ["model.builder=demo", f"train.lr={value}"])
    with pytest.raises(ConfigError, match=r"'replay.kl_ratio'"):
        load_config(None, ["model.builder=demo", f"replay.kl_ratio={value}"])


@pytest.mark.parametrize(
    "name", ["../../elsewhere/t1", "a/b", "..", ".hidden", "~/t", "a\\b", " t", ""]
)
def test_task_names_cannot_leave_the_run_folder(name):
    with pytest.raises(ConfigError, match=r"data\.tasks\[1\]"):
        load_config(
            None, ["model.builder=demo", "data.order=custom", f"data.tasks=[good, '{name}']"]
        )


def test_global_batch_decides_the_accumulation():
    """train.global_batch: accumulation = global / (micro x processes) on any GPU count
    (the paper's 32 = 2 x 4 x 4 GPUs), an error naming the numbers when it does not
    divide; unset, grad_accum is what is given."""
    from sapt_dist.config import resolve_batch

    for world, accum in [(1, 16), (4, 4), (8, 2), (16, 1)]:
        cfg = load_config(None, ["model.builder=demo", "train.global_batch=32"])
        resolve_batch(cfg, world)
        assert cfg.train.grad_accum == accum, world
        assert cfg.train.micro_batch_size * cfg.train.grad_accum * world == 32
    cfg = load_config(None, ["model.builder=demo", "train.global_batch=32"])
    with pytest.raises(
        ConfigError,
        match=r"train.global_batch' is 32, not a multiple of "
        r"train.micro_batch_size 2 x 32 process\(es\) = 64; "
        r"train.micro_batch_size=1 divides it",
    ):
        resolve_batch(cfg, 32)
    with pytest.raises(ConfigError, match=r"cannot split 32 sequences evenly"):
        resolve_batch(cfg, 3)
    cfg = load_config(None, ["model.builder=demo", "train.grad_accum=3"])
    resolve_batch(cfg, 8)
    assert cfg.train.grad_accum == 3
    with pytest.raises(ConfigError, match="train.global_batch"):
        load_config(None, ["model.builder=demo", "train.global_batch=33"])  # micro 2
    for name in ("llama2_7b_superni_order1", "llama2_13b_long_order4"):
        preset = load_config(ROOT / "sapt_dist/presets" / f"{name}.yaml", ["model.path=/w"])
        assert preset.train.global_batch == 32, name


def test_per_task_settings_parse_and_are_checked():
    cfg = load_config(
        None,
        [
            "model.builder=demo",
            "per_task={cb: {max_steps: 100, reflection: false}, copa: {epochs: 3, lr: 1e-4}}",
        ],
    )
    assert cfg.per_task["cb"].max_steps == 100 and cfg.per_task["cb"].reflection is False
    assert cfg.per_task["copa"].epochs == 3 and cfg.per_task["copa"].lr == 1e-4
    with pytest.raises(ConfigError, match=r"unknown config key 'per_task.cb.steps'"):
        load_config(None, ["model.builder=demo", "per_task={cb: {steps: 1}}"])
    with pytest.raises(ConfigError, match=r"per_task.cb.max_steps' must be >= 1"):
        load_config(None, ["model.builder=demo", "per_task={cb: {max_steps: 0}}"])
    with pytest.raises(ConfigError, match=r"per_task.cb.lr' must be a finite number"):
        load_config(None, ["model.builder=demo", "per_task={cb: {lr: .inf}}"])
    with pytest.raises(ConfigError, match="do not apply to it"):
        load_config(None, ["model.builder=demo", "method=mtl", "per_task={cb: {epochs: 1}}"])
    for name in ("llama2_7b_long_order3", "llama2_13b_long_order4"):
        preset = load_config(ROOT / "sapt_dist/presets" / f"{name}.yaml", ["model.path=/w"])
        steps = {k: (v.max_steps, v.reflection) for k, v in preset.per_task.items()}
        assert steps == {
            "cb": (100, False),
            "copa": (200, False),
            "boolq": (500, False),
            "imdb": (250, False),
            "dbpedia": (200, False),
            "multirc": (500, False),
        }
    # a dotted override changes one field of a preset's per_task entry and keeps the rest
    # (the every-preset run test sets per_task.<task>.max_steps this way)
    preset = ROOT / "sapt_dist/presets/llama2_7b_long_order3.yaml"
    cfg = load_config(preset, ["model.path=/w", "per_task.imdb.max_steps=2"])
    assert (cfg.per_task["imdb"].max_steps, cfg.per_task["imdb"].reflection) == (2, False)
    assert cfg.per_task["cb"].max_steps == 100


def test_released_choices_line_in_reproduce_loads():
    """docs/REPRODUCE.md's one override line for the released code's choices is valid on
    a preset and sets what docs/PAPER_FIDELITY.md says it sets."""
    text = (ROOT / "docs" / "REPRODUCE.md").read_text()
    block = text.split("one override line selects the released\nchoices:\n\n```bash\n")[1]
    overrides = block.split("```")[0].replace("\\\n", " ").split()
    cfg = load_config(
        ROOT / "sapt_dist/presets/llama2_7b_long_order3.yaml", ["model.path=/w", *overrides]
    )
    got = (
        cfg.data.truncation,
        cfg.eval.scoring,
        cfg.replay.count_rounding,
        cfg.replay.pseudo_definition,
        cfg.adapter.query_init,
        cfg.data.target_eos,
    )
    assert got == ("right", "released", "down", "per_task", "normal", "cut_with_target")
    assert " ".join(overrides) in " ".join((ROOT / "docs/PAPER_FIDELITY.md").read_text().split())


def test_errors_name_where_the_key_came_from(tmp_path):
    """A key typed on the command line is the command line's error, not the preset's
    (issue 24: '.../presets/demo.yaml: unknown config key 'data.max_tran''); a key of
    the file is the file's."""
    demo = preset_path("demo")
    with pytest.raises(ConfigError) as err:
        load_config(demo, ["data.max_tran=5"])
    msg = str(err.value)
    assert msg.startswith("command line override 'data.max_tran=5': unknown config key")
    assert "demo.yaml" not in msg
    with pytest.raises(ConfigError, match=r"^command line override 'train\.lr=-1': .*train\.lr"):
        load_config(demo, ["train.lr=-1"])
    with pytest.raises(
        ConfigError, match=r"^command line override 'per_task=\{x: \{epochs: 0\}\}'"
    ):
        load_config(demo, ["per_task={x: {epochs: 0}}"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  max_tran: 5\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(bad))}: unknown config key"):
        load_config(bad, ["train.lr=1e-4"])


def test_template_by_name():
    """data.template=long_sequence instead of newlines on a command line; an unknown name
    is an error that lists the names."""
    from sapt_dist.config import TEMPLATES

    cfg = load_config(preset_path("demo"), ["data.template=long_sequence"])
    assert cfg.data.template == "{definition}\n{input}\nOutput: " == TEMPLATES["long_sequence"]
    assert (
        load_config(None, ["model.builder=demo", "data.template=superni"]).data.template
        == DataConfig().template
    )
    with pytest.raises(
        ConfigError, match=r"'data\.template': 'long_seq' is neither .*long_sequence"
    ):
        load_config(None, ["model.builder=demo", "data.template=long_seq"])


def test_train_threads_checked():
    assert load_config(None, ["model.builder=demo", "train.threads=2"]).train.threads == 2
    with pytest.raises(ConfigError, match=r"'train\.threads' must be >= 1"):
        load_config(None, ["model.builder=demo", "train.threads=0"])


#: liangyanshuo/gainlora's T5 scripts per preset: (script, this project's order, rank,
#: epochs). Its Long Sequence script names are swapped against ../shared/data/README.md's:
#: its order4 is order 3 (mnli first), its order3 is order 4 (yelp first).
GAINLORA = {
    "t5_large_long_order3_gainlora": ("gen_script_long_order4", "long_3", 8, 10),
    "t5_large_long_order4_gainlora": ("gen_script_long_order3", "long_4", 8, 10),
    "t5_large_superni_order1_gainlora": ("gen_script_superni_order1", "superni_1", 4, 100),
    "t5_large_superni_order2_gainlora": ("gen_script_superni_order2", "superni_2", 4, 100),
}


@pytest.mark.parametrize("name", list(GAINLORA))
def test_gainlora_presets_carry_the_released_t5_scripts(name):
    """The GainLoRA presets: its released T5 scripts' order, rank, epochs, lr 3e-4 constant,
    global batch 32, alpha 32 / dropout 0 on q, v, both thresholds 0.995, gate width 100,
    dev selection, no replay (cross-entropy only); method=inflora on the same file is
    InfLoRA's script (the same values)."""
    script, order, rank, epochs = GAINLORA[name]
    path = ROOT / "sapt_dist/presets" / f"{name}.yaml"
    assert script in path.read_text()  # the header names the script it reproduces
    cfg = load_config(path, ["model.path=/m"])
    a, t = cfg.adapter, cfg.train
    assert cfg.method == "gainlora" and cfg.data.order == order
    assert (a.rank, a.alpha, a.dropout, a.target_modules, a.query_hidden) == (
        rank,
        32,
        0.0,
        ["q", "v"],
        100,
    )
    assert (t.epochs, t.lr, t.lr_schedule, t.warmup_steps, t.global_batch) == (
        epochs,
        3e-4,
        "constant",
        0,
        32,
    )
    assert t.select_best and cfg.subspace.threshold == 0.995 and cfg.gate.threshold == 0.995
    assert (cfg.data.max_source_length, cfg.data.max_target_length) == (512, 50)
    assert cfg.data.metric == ("rouge" if "superni" in name else "exact")
    # its cl_dataset.py: Long Sequence "{definition}\n{input}\nOutput: " from the task file
    # alone, SuperNI the SuperNI template
    long_prompt = "{definition}\n{input}\nOutput: "
    assert (cfg.data.template == long_prompt) == ("long" in name)
    assert cfg.data.instructions is None
    from sapt_dist.methods import METHODS

    assert METHODS[cfg.method].replay == "none" and not METHODS[cfg.method].reflects
    assert load_config(path, ["model.path=/m", "method=inflora"]).method == "inflora"
