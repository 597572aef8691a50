"""The released Long Sequence prompt and instructions from an instruction file.

References are written by hand: the prompt strings of the released loader
(circle-hit/SAPT ``src/cl_dataset.py``: ``Definition[0].strip() + "\\n"`` when the task
file has one, then ``"{0}\\nOutput: "``) and the texts of the released
``configs/instruction_config.json`` (cmnfriend/O-LoRA; identical in SAPT's ``pseudo_data/``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sapt_dist.config import ConfigError, DataConfig, load_config
from sapt_dist.data.instructions import read_instructions, shipped_instructions
from sapt_dist.data.tasks import (
    ORDERS,
    TaskDataError,
    encode_prompt,
    format_prompt,
    load_task,
    omits_definition,
)

from .conftest import shared_data_or_skip

ROOT = Path(__file__).resolve().parents[1]
LONG_PRESETS = sorted((ROOT / "sapt_dist" / "presets").glob("llama2_*_long_order*.yaml"))
LONG = "{definition}\n{input}\nOutput: "

#: the released instruction_config.json, by task type, copied from the file
RELEASED = {
    "NLI": 'What is the logical relationship between the "sentence 1" and the "sentence 2"? '
    "Choose one from the option.",
    "QQP": 'Whether the "first sentence" and the "second sentence" have the same meaning? '
    "Choose one from the option.",
    "SC": "What is the sentiment of the following paragraph? Choose one from the option.",
    "TC": "What is the topic of the following paragraph? Choose one from the option.",
    "BoolQA": "According to the following passage, is the question true or false? Choose one "
    "from the option.",
    "MultiRC": "According to the following passage and question, is the candidate answer true "
    "or false? Choose one from the option.",
    "WiC": "Given a word and two sentences, whether the word is used with the same sense in "
    "both sentence? Choose one from the option.",
}
#: ours (docs: sapt_dist/data/instruction_files/README.md): no release has one for COPA
COPA = (
    "Which option is the more plausible cause or effect of the premise, as the question asks? "
    "Choose one from the option."
)
#: each Long Sequence task's type in O-LoRA's configs/long_configs/<task>/train_tasks.json
TYPES = {
    "mnli": "NLI",
    "cb": "NLI",
    "rte": "NLI",
    "qqp": "QQP",
    "imdb": "SC",
    "yelp": "SC",
    "amazon": "SC",
    "sst2": "SC",
    "dbpedia": "TC",
    "agnews": "TC",
    "yahoo": "TC",
    "boolq": "BoolQA",
    "multirc": "MultiRC",
    "wic": "WiC",
}


def _task(root: Path, name: str, definition: list, n: int = 3) -> Path:
    folder = root / "Long_Sequence" / name
    folder.mkdir(parents=True)
    for split in ("train", "dev", "test"):
        inst = [{"input": f"{name} {split} {i}\nA: x\nB: y", "output": "A"} for i in range(n)]
        (folder / f"{split}.json").write_text(
            json.dumps({"Definition": definition, "Instances": inst})
        )
    return folder


# ---------------------------------------------------------------------------- the prompt
@pytest.mark.parametrize("preset", LONG_PRESETS, ids=[p.stem for p in LONG_PRESETS])
def test_long_presets_use_the_released_prompt(preset: Path) -> None:
    cfg = load_config(preset, ["model.path=/m"])
    assert cfg.data.template == LONG and cfg.data.instructions == "long_sequence"
    assert cfg.data.truncation == "input"
    # cl_dataset.py: definition.strip() + "\n" + input + "\n" + "Output: "
    p = format_prompt(cfg.data.template, "Classify the text.", "Text: a fine film")
    assert p == "Classify the text.\nText: a fine film\nOutput: "
    # a task file without a Definition: no definition line at all (not a blank first line)
    assert format_prompt(cfg.data.template, "", "Text: x") == "Text: x\nOutput: "
    assert format_prompt(cfg.data.template, "  ", "Text: x") == "Text: x\nOutput: "


SUPERNI_PRESETS = sorted((ROOT / "sapt_dist" / "presets").glob("llama2_*_superni_order*.yaml"))


@pytest.mark.parametrize("preset", SUPERNI_PRESETS, ids=[p.stem for p in SUPERNI_PRESETS])
def test_superni_presets_use_the_released_prompt(preset: Path) -> None:
    """cl_dataset.py's SuperNI loader: "Definition: " + Definition[0].strip() + "\n\n" +
    "Now complete the following example -\n" + "Input: {0}" + "\n" + "Output: "."""
    cfg = load_config(preset, ["model.path=/m"])
    p = format_prompt(cfg.data.template, "Summarize the text.", "A long text.")
    assert p == (
        "Definition: Summarize the text.\n\nNow complete the following example -\n"
        "Input: A long text.\nOutput: "
    )


def test_only_a_line_of_its_own_is_left_out() -> None:
    assert omits_definition(LONG) and omits_definition("Task:\n{definition}")
    assert not omits_definition(DataConfig().template)
    assert not omits_definition("{definition} {input}")
    assert format_prompt("Task:\n{definition}", "", "i") == "Task:\n"
    assert format_prompt("{definition} {input}", "", "i") == " i"  # nothing left out


@pytest.mark.shared_data
def test_released_prompt_on_the_shared_long_sequence_files() -> None:
    """The released formula applied to the real files (sst2's Definition ends in a newline,
    rte's does not) gives the same strings as the preset's template."""
    root = shared_data_or_skip() / "CL_Benchmark"
    for name in ("sst2", "rte"):
        raw = json.loads((root / "Long_Sequence" / name / "train.json").read_text())
        task = load_task(root, name, DataConfig(template=LONG, max_train=5), seed=0)
        for x in raw["Instances"][:5]:
            released = raw["Definition"][0].strip() + "\n" + x["input"] + "\n" + "Output: "
            assert format_prompt(LONG, task.definition, x["input"]) == released


def test_truncation_keeps_definition_and_cue_in_the_long_template() -> None:
    """A Long Sequence prompt over max_source_length loses the end of its input; the
    definition and ``Output:`` stay, with and without a definition line. Hand-built ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<unk>", "</s>", "Output:"] + [f"w{i}" for i in range(40)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>")
    ids = {w: i for i, w in enumerate(words)}
    definition = "w0 w1 w2"
    inp = " ".join(f"w{i}" for i in range(10, 30))
    cue = ids["Output:"]
    got = encode_prompt(tokenizer, format_prompt(LONG, definition, inp), 10)
    assert got == [ids["w0"], ids["w1"], ids["w2"]] + [ids[f"w{i}"] for i in range(10, 16)] + [cue]
    got = encode_prompt(tokenizer, format_prompt(LONG, "", inp), 10)
    assert got == [ids[f"w{i}"] for i in range(10, 19)] + [cue]
    # the released behaviour (data.truncation=right): the first tokens, the cue goes
    got = encode_prompt(tokenizer, format_prompt(LONG, definition, inp, "right"), 10)
    assert got == [ids["w0"], ids["w1"], ids["w2"]] + [ids[f"w{i}"] for i in range(10, 17)]


# ---------------------------------------------------------------------------- instructions
def test_shipped_file_has_the_released_texts() -> None:
    assert shipped_instructions() == ["long_sequence"]
    got = read_instructions("long_sequence")
    assert got is not None and "shipped" in got.path
    # neither release has an instruction for COPA: ours, in the released texts' form
    assert got.by_task == {**{task: RELEASED[kind] for task, kind in TYPES.items()}, "copa": COPA}
    # every task of the Long Sequence benchmark (the orders' 15) has its instruction
    assert set(ORDERS["long_3"]) == set(ORDERS["long_4"]) == set(got.by_task)


def test_task_without_definition(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A task of one's own without a definition (``"Definition": []``): the instruction file's entry, else no definition
    line under a template that can leave it out, else an error naming both files."""
    train = _task(tmp_path, "piqa", []) / "train.json"
    _task(tmp_path, "cb", [])
    _task(tmp_path, "rte", ["Does sentence 1 entail sentence 2?\n"])
    long_ = DataConfig(template=LONG, instructions="long_sequence")

    cb = load_task(tmp_path, "cb", long_, seed=0)
    assert cb.definition == RELEASED["NLI"] and "long_sequence" in cb.definition_from
    x = cb.splits["train"]["input"][0]
    assert format_prompt(long_.template, cb.definition, x) == f"{RELEASED['NLI']}\n{x}\nOutput: "
    # the task file's own Definition wins
    rte = load_task(tmp_path, "rte", long_, seed=0)
    assert rte.definition == "Does sentence 1 entail sentence 2?"
    assert rte.definition_from.endswith("rte/train.json")

    with caplog.at_level("INFO", logger="sapt_dist.data.tasks"):
        piqa = load_task(tmp_path, "piqa", long_, seed=0)
    assert piqa.definition == "" and piqa.definition_from == ""
    assert "leave the definition line out" in caplog.text
    x = piqa.splits["test"]["input"][0]
    assert format_prompt(long_.template, piqa.definition, x) == x + "\nOutput: "

    # a template that needs a definition: the error names the task file and the instruction file
    with pytest.raises(TaskDataError, match=r"task piqa: no instruction") as err:
        load_task(tmp_path, "piqa", DataConfig(instructions="long_sequence"), seed=0)
    msg = str(err.value)
    assert str(train) in msg and "missing or empty 'Definition'" in msg
    assert "sapt_dist/data/instruction_files/long_sequence.json" in msg
    assert "has no entry 'piqa'" in msg
    with pytest.raises(TaskDataError, match=r"no instruction file is set .*data\.instructions"):
        load_task(tmp_path, "piqa", DataConfig(), seed=0)

    # an instruction file of one's own, by path
    own = tmp_path / "mine.json"
    own.write_text(
        json.dumps(
            {
                "piqa": [
                    {"instruction_type": "few-shot", "instruction": "not this one"},
                    {"instruction_type": "zero-shot", "instruction": " Pick A or B.\n"},
                    {"instruction_type": "zero-shot", "instruction": "nor this one"},
                ]
            }
        )
    )
    piqa = load_task(tmp_path, "piqa", DataConfig(instructions=str(own)), seed=0)
    assert piqa.definition == "Pick A or B." and piqa.definition_from == str(own)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("{", r"is not valid JSON: .* line 1 column 2"),
        ("[]", r"must hold one non-empty JSON object"),
        ('{"copa": "Pick."}', r"key 'copa' must be a non-empty list"),
        ('{"copa": []}', r"key 'copa' must be a non-empty list"),
        ('{"copa": ["Pick."]}', r"key 'copa'\[0\] must be an object, not str"),
        ('{"copa": [{"instruction": "Pick."}]}', r"key 'copa'\[0\]: 'instruction_type' must"),
        (
            '{"copa": [{"instruction_type": "zero-shot", "instruction": " "}]}',
            r"key 'copa'\[0\]: 'instruction' must be a non-empty string",
        ),
        (
            '{"copa": [{"instruction_type": "few-shot", "instruction": "Pick."}]}',
            r"key 'copa' has no 'zero-shot' instruction",
        ),
    ],
)
def test_bad_instruction_file(tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / "inst.json"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match) as err:
        read_instructions(str(path))
    assert f"config key 'data.instructions': {path}" in str(err.value)


def test_unknown_instruction_file_named() -> None:
    with pytest.raises(ConfigError, match=r"no instruction file 'nope' .*\['long_sequence'\]"):
        read_instructions("nope")


def test_bad_instruction_file_stops_the_run_before_any_model(tmp_path: Path) -> None:
    """The run reads the file once, with the tasks, before the backbone loads."""
    from sapt_dist.train.setup import load_run_tasks

    bad = tmp_path / "inst.json"
    bad.write_text('{"cb": [{"instruction_type": "one-shot", "instruction": "x"}]}')
    cfg = load_config(
        ROOT / "sapt_dist/presets/demo.yaml",
        [f"output_dir={tmp_path}/run", f"data.instructions={bad}"],
    )
    with pytest.raises(ConfigError, match=r"inst\.json: key 'cb'\[0\]: 'instruction_type'"):
        load_run_tasks(cfg)


def test_metric_auto_says_what_it_chose_and_why(tmp_path: Path, caplog) -> None:
    """A Long Sequence task copied outside a Long_Sequence/ folder keeps exact match when
    it carries its labels.json; the log says which metric and why."""
    folder = _task(tmp_path, "cb", ["Which?"])
    mine = tmp_path / "my_tasks" / "cb"
    mine.parent.mkdir()
    folder.rename(mine)
    long_ = DataConfig(template=LONG)
    with caplog.at_level("INFO", logger="sapt_dist.data.tasks"):
        assert load_task(mine.parent, "cb", long_, seed=0).metric == "rouge"
    assert "data.metric=auto -> rouge" in caplog.text and "no labels.json" in caplog.text
    (mine / "labels.json").write_text('["A", "B"]')
    caplog.clear()
    with caplog.at_level("INFO", logger="sapt_dist.data.tasks"):
        assert load_task(mine.parent, "cb", long_, seed=0).metric == "exact"
    assert "data.metric=auto -> exact" in caplog.text and "labels.json lists" in caplog.text
    assert load_task(mine.parent, "cb", DataConfig(metric="rouge"), seed=0).metric == "rouge"
