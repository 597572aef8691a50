"""Task data: loading, validation errors, carving, orders, tokenisation and collation."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from sapt_dist.config import DataConfig
from sapt_dist.data.tasks import (
    DEMO_DATA_DIR,
    IGNORE_INDEX,
    ORDERS,
    TaskDataError,
    TruncationStats,
    collate_prompts,
    collate_train,
    encode_prompt,
    encode_train,
    find_task_dir,
    format_prompt,
    load_task,
    log_truncation,
    resolve_data_root,
    resolve_order,
)
from tests.conftest import shared_data_or_skip

DEF = ["Answer the question."]


def _split(n: int, *, ids: bool = True, prefix: str = "q") -> dict:
    inst = [{"input": f"{prefix} {i}", "output": f"a {i}"} for i in range(n)]
    if ids:
        for i, x in enumerate(inst):
            x["id"] = f"t-{prefix}-{i}"
    return {"Definition": DEF, "Instances": inst}


def _write_task(root: Path, name: str, splits: dict[str, object], bench: str | None = None) -> Path:
    """Write ``root[/bench]/name/<split>.json``; str values are written verbatim."""
    folder = root / bench / name if bench else root / name
    folder.mkdir(parents=True, exist_ok=True)
    for split, obj in splits.items():
        text = obj if isinstance(obj, str) else json.dumps(obj)
        (folder / f"{split}.json").write_text(text)
    return folder


def _good(n_train: int = 20) -> dict:
    return {
        "train": _split(n_train, prefix="tr"),
        "dev": _split(4, prefix="dv"),
        "test": _split(4, prefix="te"),
    }


# ---------------------------------------------------------------------------- demo data
def test_demo_data_loads() -> None:
    root = resolve_data_root("demo")
    assert root == DEMO_DATA_DIR
    names, missing = resolve_order(DataConfig(), root)
    assert names == ORDERS["demo"] and missing == []
    for name in names:
        t = load_task(root, name, DataConfig(), seed=0)
        assert t.benchmark == "demo" and t.metric == "rouge"
        assert {s: len(d) for s, d in t.splits.items()} == {"train": 300, "dev": 40, "test": 40}
        assert t.splits["train"].column_names == ["id", "input", "outputs"]
        assert t.definition and t.definition == t.definition.strip()
        row = t.splits["train"][0]
        assert isinstance(row["outputs"], list) and all(isinstance(o, str) for o in row["outputs"])
        assert t.carved == {} and t.labels is None
        ex = t.examples("test")[0]
        assert ex.id == t.splits["test"][0]["id"] and ex.outputs == t.splits["test"][0]["outputs"]


def test_resolve_data_root_missing(tmp_path: Path) -> None:
    with pytest.raises(TaskDataError, match=r"data\.root.*nope"):
        resolve_data_root(str(tmp_path / "nope"))


def test_find_task_dir_both_layouts(tmp_path: Path) -> None:
    flat = _write_task(tmp_path / "flat", "t1", _good())
    nested = _write_task(tmp_path / "cl", "t2", _good(), bench="Bench")
    (tmp_path / "cl" / "Bench" / "labels_only").mkdir()
    (tmp_path / "cl" / "Bench" / "labels_only" / "labels.json").write_text('["a"]')
    assert find_task_dir(tmp_path / "flat", "t1") == flat
    assert find_task_dir(tmp_path / "cl", "t2") == nested
    assert find_task_dir(tmp_path / "cl" / "Bench", "t2") == nested
    assert find_task_dir(tmp_path / "cl", "labels_only") is None  # no split file: missing
    assert find_task_dir(tmp_path / "cl", "absent") is None


def test_long_sequence_ids_metric_labels_caps(tmp_path: Path) -> None:
    splits = {s: _split(6, ids=False, prefix=s) for s in ("train", "dev", "test")}
    splits["train"]["Instances"][0]["output"] = ["yes", "Yes"]
    folder = _write_task(tmp_path, "rte", splits, bench="Long_Sequence")
    (folder / "labels.json").write_text('["yes", "no"]')
    cfg = DataConfig(max_train=3, max_test=2)
    t = load_task(tmp_path, "rte", cfg, seed=0)
    assert t.benchmark == "Long_Sequence" and t.metric == "exact"
    assert t.labels == ["yes", "no"]
    assert t.splits["train"]["id"] == ["rte-train-0", "rte-train-1", "rte-train-2"]
    assert t.splits["train"]["outputs"][0] == ["yes", "Yes"]
    assert t.splits["train"]["outputs"][1] == ["a 1"]  # a string output -> 1-element list
    assert len(t.splits["dev"]) == 6 and len(t.splits["test"]) == 2
    assert t.splits["test"]["input"] == ["test 0", "test 1"]  # first N in file order
    assert load_task(tmp_path, "rte", DataConfig(metric="rouge"), 0).metric == "rouge"


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("train", "match"),
    [
        ('{"Definition": ["x"], "Instances": [', r"not valid JSON: .* line 1 column"),
        ("[1, 2]", r"must hold one JSON object"),
        ({"Definition": 3, "Instances": [{"input": "a", "output": "b"}]}, r"'Definition' must"),
        ({"Definition": DEF}, r"has no 'Instances' key"),
        ({"Definition": DEF, "Instances": {"input": "a"}}, r"'Instances' must be a list"),
        ({"Definition": DEF, "Instances": []}, r"'Instances' is empty \(an empty task\)"),
        ({"Definition": DEF, "Instances": [{"input": "a"}]}, r"Instances\[0\] has no 'output'"),
        ({"Definition": DEF, "Instances": [{"output": "a"}]}, r"Instances\[0\] has no 'input'"),
        (
            {"Definition": DEF, "Instances": [{"input": "a", "output": 3}]},
            r"'output' must be a string or a list of strings",
        ),
        (
            {"Definition": DEF, "Instances": [{"input": "a", "output": ["x", 1]}]},
            r"'output' must be a string or a list of strings",
        ),
        (
            {"Definition": DEF, "Instances": [{"input": "a", "output": []}]},
            r"'output' is an empty list",
        ),
    ],
)
def test_bad_split_file(tmp_path: Path, train: object, match: str) -> None:
    _write_task(tmp_path, "bad", {**_good(), "train": train})
    path = str(tmp_path / "bad" / "train.json")
    # every message names the task and the file
    with pytest.raises(TaskDataError, match=r"task bad: ") as err:
        load_task(tmp_path, "bad", DataConfig(), seed=0)
    assert path in str(err.value)
    with pytest.raises(TaskDataError, match=match):
        load_task(tmp_path, "bad", DataConfig(), seed=0)


def test_bad_labels_file(tmp_path: Path) -> None:
    folder = _write_task(tmp_path, "t", _good())
    (folder / "labels.json").write_text('{"a": 1}')
    with pytest.raises(TaskDataError, match=r"task t: .*labels\.json must hold a JSON list"):
        load_task(tmp_path, "t", DataConfig(), seed=0)


def test_missing_split_names_file(tmp_path: Path) -> None:
    good = _good()
    del good["dev"]
    _write_task(tmp_path, "t", good)
    dev = str(tmp_path / "t" / "dev.json")
    with pytest.raises(
        TaskDataError, match=r"task t: missing split file .*carve_missing_from"
    ) as e:
        load_task(tmp_path, "t", DataConfig(), seed=0)
    assert dev in str(e.value)
    # carving from a split that is itself missing
    with pytest.raises(TaskDataError, match=r"carve_missing_from is 'dev' but .*dev\.json"):
        load_task(tmp_path, "t", DataConfig(carve_missing_from="dev"), seed=0)


# ---------------------------------------------------------------------------- carving
def test_carve_missing_splits(tmp_path: Path) -> None:
    _write_task(tmp_path, "t", {"train": _split(50, prefix="tr")})
    cfg = DataConfig(carve_missing_from="train", carve_fraction=0.1)
    a = load_task(tmp_path, "t", cfg, seed=1)
    sizes = {s: len(d) for s, d in a.splits.items()}
    assert sizes == {"train": 40, "dev": 5, "test": 5}
    ids = {s: set(d["id"]) for s, d in a.splits.items()}
    assert not ids["train"] & ids["dev"] and not ids["train"] & ids["test"]
    assert not ids["dev"] & ids["test"]
    assert ids["train"] | ids["dev"] | ids["test"] == {f"t-tr-{i}" for i in range(50)}
    assert a.carved["dev"] == {
        "source": "train",
        "fraction": 0.1,
        "seed": 1,
        "size": 5,
        "source_size_before": 50,
        "source_size_after": 40,
    }
    assert set(a.carved) == {"dev", "test"}
    # the kept train examples stay in file order
    kept = [int(i.rsplit("-", 1)[1]) for i in a.splits["train"]["id"]]
    assert kept == sorted(kept)

    same = load_task(tmp_path, "t", cfg, seed=1)
    other = load_task(tmp_path, "t", cfg, seed=2)
    assert same.splits["dev"]["id"] == a.splits["dev"]["id"]
    assert same.splits["test"]["id"] == a.splits["test"]["id"]
    assert other.splits["dev"]["id"] != a.splits["dev"]["id"]


def test_carve_at_least_one_and_caps_after(tmp_path: Path) -> None:
    _write_task(tmp_path, "t", {"train": _split(5), "test": _split(3, prefix="te")})
    cfg = DataConfig(carve_missing_from="train", carve_fraction=0.01, max_train=2)
    t = load_task(tmp_path, "t", cfg, seed=0)
    assert len(t.splits["dev"]) == 1  # 1% of 5 rounds to 0: at least 1
    assert t.carved["dev"]["source_size_after"] == 4
    assert len(t.splits["train"]) == 2  # the cap applies after carving
    assert set(t.splits["train"]["id"]).isdisjoint(t.splits["dev"]["id"])


def test_carve_too_small(tmp_path: Path) -> None:
    _write_task(tmp_path, "t", {"train": _split(2)})
    cfg = DataConfig(carve_missing_from="train", carve_fraction=0.1)
    with pytest.raises(TaskDataError, match=r"task t: .*train\.json has 2 examples, too few"):
        load_task(tmp_path, "t", cfg, seed=0)


# ---------------------------------------------------------------------------- orders
def test_custom_order(tmp_path: Path) -> None:
    _write_task(tmp_path, "b", _good())
    _write_task(tmp_path, "a", _good(), bench="X")
    cfg = DataConfig(order="custom", tasks=["b", "a"])
    assert resolve_order(cfg, tmp_path) == (["b", "a"], [])
    cfg = DataConfig(order="custom", tasks=["b", "ghost"])
    with pytest.raises(TaskDataError, match=rf"no task folder for 'ghost' under {tmp_path}"):
        resolve_order(cfg, tmp_path)
    with pytest.raises(TaskDataError, match=r"'data.tasks' must list"):
        resolve_order(DataConfig(order="custom"), tmp_path)


def test_unknown_order_lists_known(tmp_path: Path) -> None:
    with pytest.raises(TaskDataError, match=r"unknown order 'superni_9'.*'long_3'.*'superni_1'"):
        resolve_order(DataConfig(order="superni_9"), tmp_path)


def test_named_order_subset_and_missing() -> None:
    root = DEMO_DATA_DIR
    cfg = DataConfig(
        tasks=["task875_emotion_classification", "task1510_evalution_relation_extraction"]
    )
    names, _ = resolve_order(cfg, root)
    # the order's sequence wins over the listed one
    assert names == [
        "task1510_evalution_relation_extraction",
        "task875_emotion_classification",
    ]
    with pytest.raises(TaskDataError, match=r"\['nope'\] not in order 'demo'"):
        resolve_order(DataConfig(tasks=["nope"]), root)
    # the shipped Long Sequence subsets (smollm2_long5) sit one folder down: a named Long
    # Sequence order finds them and skips the rest (strict: names the first it lacks)
    names, missing = resolve_order(DataConfig(order="long_3"), root)
    assert names == ["mnli", "rte", "imdb", "sst2", "agnews"] and "cb" in missing
    with pytest.raises(TaskDataError, match=r"holds none of the tasks of order 'demo'"):
        resolve_order(DataConfig(order="demo"), root / "Long_Sequence")
    with pytest.raises(TaskDataError, match=r"lacks task\(s\) .*'cb'.*skip_missing_tasks"):
        resolve_order(DataConfig(order="long_3", skip_missing_tasks=False), root)


@pytest.mark.shared_data
def test_orders_against_shared_data() -> None:
    root = shared_data_or_skip() / "CL_Benchmark"
    names, missing = resolve_order(DataConfig(order="long_3"), root)
    assert missing == ["cb", "wic", "copa", "boolq", "yahoo"]
    assert names == [t for t in ORDERS["long_3"] if t not in missing]
    for order in ("superni_1", "superni_2"):
        names, missing = resolve_order(DataConfig(order=order), root)
        assert names == ORDERS[order] and missing == []
        # a benchmark folder as the root works too
        assert resolve_order(DataConfig(order=order), root / "SuperNI")[0] == ORDERS[order]
    with pytest.raises(
        TaskDataError, match=r"lacks task\(s\) \['cb', 'wic', 'copa', 'boolq', 'yahoo'\]"
    ):
        resolve_order(DataConfig(order="long_3", skip_missing_tasks=False), root)


@pytest.mark.shared_data
def test_shared_dbpedia_missing_train() -> None:
    root = shared_data_or_skip() / "CL_Benchmark"
    with pytest.raises(
        TaskDataError, match=r"task dbpedia: missing split file .*dbpedia/train\.json"
    ):
        load_task(root, "dbpedia", DataConfig(), seed=0)


@pytest.mark.shared_data
def test_shared_long_sequence_rte() -> None:
    root = shared_data_or_skip() / "CL_Benchmark"
    t = load_task(root, "rte", DataConfig(max_train=5, max_dev=3, max_test=3), seed=0)
    assert t.benchmark == "Long_Sequence" and t.metric == "exact"
    assert t.labels and t.splits["train"]["id"][0] == "rte-train-0"


# ---------------------------------------------------------------------------- prompts
def test_format_prompt() -> None:
    cfg = DataConfig()
    p = format_prompt(cfg.template, "Do {this}.", "x {y}")
    assert p.startswith("Definition: Do {this}.") and p.endswith("Input: x {y}\nOutput: ")
    with pytest.raises(TaskDataError, match=r"data\.template.*'question'"):
        format_prompt("{definition} {question}", "d", "i")
    with pytest.raises(TaskDataError, match=r"data\.template"):
        format_prompt("{definition} {0}", "d", "i")


# ---------------------------------------------------------------------------- tokenising
@pytest.fixture(scope="module")
def tokenizer():
    """A word-level tokenizer built in memory (no files, no network)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<unk>", "</s>", "Output:", "Input:"] + [f"w{i}" for i in range(50)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="</s>"
    )


def _ids(n: int, start: int = 0) -> str:
    return " ".join(f"w{i}" for i in range(start, start + n))


def test_encode_train_labels_and_eos(tokenizer) -> None:
    eos = tokenizer.eos_token_id
    stats = TruncationStats()
    e = encode_train(tokenizer, "Input: w1 w2 Output: ", "w7 w8", 16, 8, stats)
    assert e.prompt_len == 4
    assert e.input_ids == [4, 6, 7, 3, 12, 13, eos]
    assert e.labels == [IGNORE_INDEX] * 4 + [12, 13, eos]
    assert stats == TruncationStats(source_truncated=0, target_truncated=0, total=1)
    assert tokenizer.bos_token_id is None or tokenizer.bos_token_id not in e.input_ids


def test_truncation(tokenizer) -> None:
    eos = tokenizer.eos_token_id
    stats = TruncationStats()
    # prompt of 10 tokens cut to its last 4 (the cue at the end survives)
    e = encode_train(tokenizer, _ids(9) + " Output:", _ids(6, 20), 4, 3, stats)
    assert tokenizer.convert_ids_to_tokens(e.input_ids[: e.prompt_len]) == [
        "w6",
        "w7",
        "w8",
        "Output:",
    ]
    # target cut to 3 tokens, EOS appended outside the limit
    assert tokenizer.convert_ids_to_tokens(e.input_ids[e.prompt_len :]) == [
        "w20",
        "w21",
        "w22",
        "</s>",
    ]
    assert e.labels[-1] == eos and len(e.input_ids) == 4 + 3 + 1
    encode_train(tokenizer, _ids(3), _ids(2), 4, 3, stats)  # nothing cut
    encode_train(tokenizer, _ids(3), _ids(5), 4, 3, stats)  # target cut
    assert stats == TruncationStats(source_truncated=1, target_truncated=2, total=3)

    p_stats = TruncationStats()
    assert encode_prompt(tokenizer, _ids(6), 4, p_stats) == tokenizer.convert_tokens_to_ids(
        ["w2", "w3", "w4", "w5"]
    )
    assert len(encode_prompt(tokenizer, _ids(3), 4, p_stats)) == 3
    assert p_stats == TruncationStats(source_truncated=1, target_truncated=0, total=2)


def test_target_eos_cut_with_target_as_released(tokenizer) -> None:
    """data.target_eos=cut_with_target: EOS is appended before the cut (the released
    collator tokenises ``label + eos`` and keeps ``max_target_length`` tokens), so a target
    of max_target_length tokens or more loses it. Hand-built ids (w20 is id 25)."""
    eos = tokenizer.eos_token_id
    w = {f"w{i}": 5 + i for i in range(50)}

    def target(e):
        return e.input_ids[e.prompt_len :]

    for n, appended, released in [
        (2, [w["w20"], w["w21"], eos], [w["w20"], w["w21"], eos]),
        (3, [w["w20"], w["w21"], w["w22"], eos], [w["w20"], w["w21"], w["w22"]]),
        (5, [w["w20"], w["w21"], w["w22"], eos], [w["w20"], w["w21"], w["w22"]]),
    ]:
        a, r = TruncationStats(), TruncationStats()
        e = encode_train(tokenizer, "w1 Output:", _ids(n, 20), 8, 3, a)
        assert target(e) == appended, n
        e = encode_train(tokenizer, "w1 Output:", _ids(n, 20), 8, 3, r, "cut_with_target")
        assert target(e) == released and e.labels[e.prompt_len :] == released, n
        assert e.input_ids[: e.prompt_len] == [w["w1"], 3]
        # counted as cut when a target token, or (released) its EOS, was dropped
        assert (a.target_truncated, r.target_truncated) == (int(n > 3), int(n >= 3)), n
    with pytest.raises(ValueError, match="'appended' or 'cut_with_target'"):
        encode_train(tokenizer, "w1", "w2", 8, 3, eos="none")


def test_log_truncation(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="sapt_dist.data.tasks"):
        log_truncation(
            "t", "train", TruncationStats(source_truncated=2, target_truncated=1, total=9)
        )
    assert "t/train: 2 of 9 prompts cut" in caplog.text and "1 targets cut" in caplog.text


def test_collate_train_right_pads() -> None:
    from sapt_dist.data.tasks import EncodedExample

    a = EncodedExample([5, 6, 7, 2], [IGNORE_INDEX, IGNORE_INDEX, 7, 2], 2)
    b = EncodedExample([5, 2], [IGNORE_INDEX, 2], 1)
    batch = collate_train([a, b], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 2], [5, 2, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, -100, 7, 2], [-100, 2, -100, -100]]
    assert all(v.dtype == torch.long for v in batch.values())


def test_collate_prompts_left_pads() -> None:
    batch = collate_prompts([[5, 6, 7], [8]], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        collate_prompts([[5], []], pad_id=0)


@pytest.mark.shared_data
def test_gpt2_tokenizer_roundtrip() -> None:
    path = shared_data_or_skip() / "tokenizers" / "gpt2" / "tokenizer.json"
    if not path.is_file():
        pytest.skip(f"no GPT-2 tokenizer at {path}")
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_file=str(path), eos_token="<|endoftext|>")
    prompt = format_prompt(DataConfig().template, "Classify.", "a fine film")
    e = encode_train(tok, prompt, "POS", 1024, 50)
    assert e.input_ids[-1] == tok.eos_token_id
    assert tok.decode(e.input_ids[e.prompt_len : -1]) == "POS"
    assert tok.decode(e.input_ids[: e.prompt_len]) == prompt


def test_truncation_keeps_definition_and_cue_by_default(tokenizer) -> None:
    """A prompt over max_source_length: ``input`` (the default) keeps the definition, the
    start of the input and the answer cue; ``right`` keeps its first tokens (the released
    code); ``left`` its last ones. References built by hand from the word ids."""
    template = "{definition} Input: {input} Output:"
    definition, inp = _ids(5), _ids(20, start=10)  # w0..w4, w10..w29
    ids = {f"w{i}": 5 + i for i in range(50)}
    d = [ids[f"w{i}"] for i in range(5)]
    x = [ids[f"w{i}"] for i in range(10, 30)]
    inp_id, out_id = tokenizer.convert_tokens_to_ids(["Input:", "Output:"])
    whole = d + [inp_id] + x + [out_id]
    assert encode_prompt(tokenizer, format_prompt(template, definition, inp), 64) == whole
    for mode, want in [
        ("input", d + [inp_id] + x[:5] + [out_id]),
        ("right", whole[:12]),
        ("left", whole[-12:]),
    ]:
        stats = TruncationStats()
        got = encode_prompt(tokenizer, format_prompt(template, definition, inp, mode), 12, stats)
        assert got == want, mode
        assert stats.source_truncated == 1
    # a definition longer than the budget: its start and the cue stay
    got = encode_prompt(tokenizer, format_prompt(template, _ids(30), inp), 8)
    assert got == [ids[f"w{i}"] for i in range(7)] + [out_id]
    # a prompt that fits is the whole string's tokens, whatever the mode
    short = format_prompt(template, definition, _ids(2, start=10), "input")
    assert encode_prompt(tokenizer, short, 64) == d + [inp_id, ids["w10"], ids["w11"], out_id]
    assert isinstance(short, str) and short == f"{definition} Input: w10 w11 Output:"
