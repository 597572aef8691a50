"""Task data in the SuperNI / Long Sequence JSON format, prompts and tokenisation.

A task folder holds ``train.json``, ``dev.json`` and ``test.json``, each one JSON object::

    {"Definition": ["<instruction>"],
     "Instances": [{"id": ..., "input": "<text>", "output": "<text>" | ["<text>", ...]}],
     ... other keys (Positive Examples, URL, ...) that are ignored}

``id`` is absent in Long Sequence, whose folders may also hold ``labels.json`` (the label
words). Every problem is a :class:`TaskDataError` naming the task and the file, raised
when the task loads, i.e. before any model does.

Tokenisation never adds special tokens: a training sequence is
``prompt tokens + target tokens + [EOS]`` with labels ``-100`` on the prompt. For an
encoder-decoder backbone (T5) :func:`collate_train` splits it: the prompt is the encoder
input, target + EOS the decoder's labels.
"""

from __future__ import annotations

import json
import logging
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from sapt_dist.config import DataConfig
from sapt_dist.data.instructions import Instructions, read_instructions

if TYPE_CHECKING:
    import datasets
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "DEMO_DATA_DIR",
    "IGNORE_INDEX",
    "ORDERS",
    "SPLITS",
    "EncodedExample",
    "Example",
    "TaskData",
    "TaskDataError",
    "TruncationStats",
    "collate_prompts",
    "collate_train",
    "encode_prompt",
    "encode_train",
    "find_task_dir",
    "format_prompt",
    "load_task",
    "log_truncation",
    "omits_definition",
    "resolve_data_root",
    "resolve_order",
    "split_sha256",
]

log = logging.getLogger(__name__)

#: The small data shipped inside the package (``data.root: demo``).
DEMO_DATA_DIR = Path(__file__).parent / "demo"
SPLITS = ("train", "dev", "test")
#: Label value ignored by the loss (PyTorch's cross-entropy default).
IGNORE_INDEX = -100

#: The published task orders (``../shared/data/README.md``) and the demo order.
ORDERS: dict[str, list[str]] = {
    "superni_1": [
        "task1572_samsum_summary",
        "task363_sst2_polarity_classification",
        "task1290_xsum_summarization",
        "task181_outcome_extraction",
        "task002_quoref_answer_generation",
        "task1510_evalution_relation_extraction",
        "task639_multi_woz_user_utterance_generation",
        "task1729_personachat_generate_next",
        "task073_commonsenseqa_answer_generation",
        "task1590_diplomacy_text_generation",
        "task748_glucose_reverse_cause_event_detection",
        "task511_reddit_tifu_long_text_summarization",
        "task591_sciq_answer_generation",
        "task1687_sentiment140_classification",
        "task875_emotion_classification",
    ],
    "superni_2": [
        "task748_glucose_reverse_cause_event_detection",
        "task073_commonsenseqa_answer_generation",
        "task1590_diplomacy_text_generation",
        "task639_multi_woz_user_utterance_generation",
        "task1572_samsum_summary",
        "task1687_sentiment140_classification",
        "task591_sciq_answer_generation",
        "task363_sst2_polarity_classification",
        "task1510_evalution_relation_extraction",
        "task1729_personachat_generate_next",
        "task181_outcome_extraction",
        "task511_reddit_tifu_long_text_summarization",
        "task002_quoref_answer_generation",
        "task1290_xsum_summarization",
        "task875_emotion_classification",
    ],
    "long_3": [
        "mnli",
        "cb",
        "wic",
        "copa",
        "qqp",
        "boolq",
        "rte",
        "imdb",
        "yelp",
        "amazon",
        "sst2",
        "dbpedia",
        "agnews",
        "multirc",
        "yahoo",
    ],
    "long_4": [
        "yelp",
        "amazon",
        "mnli",
        "cb",
        "copa",
        "qqp",
        "rte",
        "imdb",
        "sst2",
        "dbpedia",
        "agnews",
        "yahoo",
        "multirc",
        "boolq",
        "wic",
    ],
    # relation extraction first: sst2 and emotion both answer with one sentiment word, so
    # learned back to back the second mostly reuses the first's block (see BENCHMARKS.md)
    "demo": [
        "task1510_evalution_relation_extraction",
        "task363_sst2_polarity_classification",
        "task875_emotion_classification",
    ],
}


class TaskDataError(ValueError):
    """Bad or missing task data; the message names the task and the file (or the key)."""


# ---------------------------------------------------------------------------- locating
def resolve_data_root(root: str) -> Path:
    """The data folder of ``data.root``: ``"demo"`` -> :data:`DEMO_DATA_DIR`, else the path.

    Raises:
        TaskDataError: the folder does not exist.
    """
    if root == "demo":
        return DEMO_DATA_DIR
    path = Path(root).expanduser()
    if not path.is_dir():
        raise TaskDataError(f"config key 'data.root': data folder {str(path)!r} does not exist")
    return path


def _has_splits(path: Path) -> bool:
    return path.is_dir() and any((path / f"{s}.json").is_file() for s in SPLITS)


def find_task_dir(root: Path, task: str) -> Path | None:
    """The folder of ``task``: ``root/task``, else ``root/<Benchmark>/task``.

    A folder counts only if it holds at least one split file, so a task folder with only
    ``labels.json`` (e.g. ``yahoo`` in the shared data) is "missing". The two levels let
    ``data.root`` be a ``CL_Benchmark`` root, one benchmark folder, or the demo folder.
    """
    if _has_splits(root / task):
        return root / task
    if not root.is_dir():
        return None
    # sorted: the same benchmark wins on every machine if two hold the same task name
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        if _has_splits(sub / task):
            return sub / task
    return None


def resolve_order(cfg: DataConfig, root: Path) -> tuple[list[str], list[str]]:
    """The tasks to run, in order, and the tasks of a named order that ``root`` lacks.

    ``cfg.order == "custom"`` runs ``cfg.tasks`` (each must exist). With a named order,
    a non-empty ``cfg.tasks`` keeps only those tasks, in the order's sequence.

    Returns:
        (present task names in order, missing task names). The missing list is non-empty
        only with ``cfg.skip_missing_tasks``; the caller logs it.

    Raises:
        TaskDataError: unknown order, a listed task outside the order, an unknown task in
            a custom list, missing tasks without ``skip_missing_tasks``, or no task left.
    """
    if cfg.order == "custom":
        names = list(cfg.tasks)
        if not names:
            raise TaskDataError("config key 'data.tasks' must list the tasks of a custom order")
        dup = sorted({t for t in names if names.count(t) > 1})
        if dup:
            raise TaskDataError(f"config key 'data.tasks' lists {dup} more than once")
        for t in names:
            if find_task_dir(root, t) is None:
                raise TaskDataError(
                    f"data.tasks: no task folder for {t!r} under {root} (expected "
                    f"<root>/{t}/train.json or <root>/<Benchmark>/{t}/train.json)"
                )
        return names, []
    if cfg.order not in ORDERS:
        raise TaskDataError(
            f"config key 'data.order': unknown order {cfg.order!r}; "
            f"known: {sorted(ORDERS)} or 'custom' (with data.tasks)"
        )
    names = list(ORDERS[cfg.order])
    if cfg.tasks:
        outside = [t for t in cfg.tasks if t not in names]
        if outside:
            raise TaskDataError(
                f"data.tasks: {outside} not in order {cfg.order!r} ({', '.join(names)}); "
                f"use data.order=custom for another sequence"
            )
        names = [t for t in names if t in cfg.tasks]
    missing = [t for t in names if find_task_dir(root, t) is None]
    if missing and not cfg.skip_missing_tasks:
        raise TaskDataError(
            f"data folder {root} lacks task(s) {missing} of order {cfg.order!r} "
            f"(set data.skip_missing_tasks=true to run without them)"
        )
    present = [t for t in names if t not in missing]
    if not present:
        raise TaskDataError(
            f"data folder {root} holds none of the tasks of order {cfg.order!r} "
            f"(looked for {', '.join(names)})"
        )
    return present, missing


# ---------------------------------------------------------------------------- loading
@dataclass
class Example:
    """One instance. ``outputs``: the acceptable answers; ``outputs[0]`` is the training target."""

    id: str
    input: str
    outputs: list[str]


@dataclass
class TaskData:
    """One task, validated.

    ``splits`` maps ``"train"``, ``"dev"``, ``"test"`` to a ``datasets.Dataset`` with the
    columns ``id`` (str), ``input`` (str) and ``outputs`` (list of str).
    """

    name: str
    #: Parent folder name: ``SuperNI``, ``Long_Sequence``, ... or ``demo``.
    benchmark: str
    definition: str
    splits: dict[str, datasets.Dataset]
    metric: Literal["rouge", "exact"]
    #: The label words of ``labels.json`` (classification tasks), else ``None``.
    labels: list[str] | None = None
    #: Carved split -> {source, fraction, seed, size, source_size_before, source_size_after}.
    carved: dict[str, dict[str, Any]] = field(default_factory=dict)
    source_dir: Path | None = None
    #: Where ``definition`` came from: a task file, the instruction file, or ``""`` (none).
    definition_from: str = ""

    def examples(self, split: str) -> list[Example]:
        """The rows of ``split`` as :class:`Example` objects."""
        ds = self.splits[split]
        return [Example(r["id"], r["input"], list(r["outputs"])) for r in ds]


def loads_json(text: str) -> Any:
    """``json.loads`` with what it cannot hold said in words: a ``ValueError`` whose
    message names the line (bad JSON: its own; nesting deeper than the parser's
    recursion allows; a number of more than 4300 digits)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except RecursionError:
        raise ValueError(f"nested too deeply (line {_deep_line(text)})") from None
    except ValueError as e:  # a number past Python's digit limit for int()
        raise ValueError(f"a number too long to read ({str(e)[:100]})") from None


def _deep_line(text: str, limit: int = 200) -> int:
    """The line where ``text``'s JSON first nests ``limit`` levels deep (strings skipped)."""
    depth, line = 0, 1
    for m in re.finditer(r'"(?:[^"\\\n]|\\.)*"|[\[\]{}]|\n', text):
        tok = m.group()
        if tok == "\n":
            line += 1
        elif tok in "[{":
            depth += 1
            if depth >= limit:
                return line
        elif tok in "]}":
            depth -= 1
    return line


def check_text(value: str, where: str) -> str:
    """``value`` if it is text a tokenizer can take: a lone surrogate (``"\\ud800"`` in
    JSON decodes to one) is :class:`TaskDataError` naming ``where``."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise TaskDataError(
            f"{where}: not valid Unicode text ({e.reason} at character {e.start}: half of a "
            f"surrogate pair, e.g. the JSON escape \\ud800 alone, or bytes that are not UTF-8)"
        ) from None
    return value


def _read_json(task: str, path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise TaskDataError(f"task {task}: cannot read {path} ({e})") from e
    try:
        return loads_json(text)
    except ValueError as e:
        raise TaskDataError(f"task {task}: {path}: {e}") from e


def _read_split(task: str, split: str, path: Path) -> tuple[str, list[Example]]:
    """(definition, examples) of one split file, validated."""
    raw = _read_json(task, path)
    if not isinstance(raw, dict):
        raise TaskDataError(
            f"task {task}: {path} must hold one JSON object (with 'Definition' and "
            f"'Instances'), not a {type(raw).__name__}"
        )
    definition = raw.get("Definition")
    # the format stores a one-element list; a bare string is accepted too. A missing or
    # empty one is "" here (Long Sequence copa has []); load_task decides what that means
    if isinstance(definition, list):
        definition = definition[0] if definition else ""
    if definition is None:
        definition = ""
    if not isinstance(definition, str):
        raise TaskDataError(
            f"task {task}: {path}: 'Definition' must be a string or a list of strings, not "
            f"a {type(definition).__name__}"
        )
    if "Instances" not in raw:
        raise TaskDataError(f"task {task}: {path} has no 'Instances' key")
    instances = raw["Instances"]
    if not isinstance(instances, list):
        raise TaskDataError(
            f"task {task}: {path}: 'Instances' must be a list, not a {type(instances).__name__}"
        )
    if not instances:
        raise TaskDataError(f"task {task}: {path}: 'Instances' is empty (an empty task)")
    out = []
    for i, x in enumerate(instances):
        where = f"task {task}: {path}: Instances[{i}]"
        if not isinstance(x, dict):
            raise TaskDataError(f"{where} must be an object with 'input' and 'output'")
        for key in ("input", "output"):
            if key not in x:
                raise TaskDataError(f"{where} has no '{key}'")
        if not isinstance(x["input"], str):
            raise TaskDataError(f"{where}: 'input' must be a string")
        o = x["output"]
        outputs = [o] if isinstance(o, str) else o
        if not isinstance(outputs, list) or not all(isinstance(s, str) for s in outputs):
            raise TaskDataError(f"{where}: 'output' must be a string or a list of strings")
        if not outputs:
            raise TaskDataError(f"{where}: 'output' is an empty list (no answer to learn)")
        for k, text in enumerate([x["input"], *outputs]):
            check_text(text, f"{where}: '{'input' if k == 0 else 'output'}'")
        # Long Sequence has no ids: make stable ones from the position in the file
        ex_id = x.get("id")
        if ex_id is not None and (isinstance(ex_id, bool) or not isinstance(ex_id, (str, int))):
            raise TaskDataError(f"{where}: 'id' must be a string or an integer")
        ex_id = str(ex_id) if ex_id is not None else f"{task}-{split}-{i}"
        out.append(Example(check_text(ex_id, f"{where}: 'id'"), x["input"], list(outputs)))
    check_text(definition, f"task {task}: {path}: 'Definition'")
    return definition.strip(), out


def _carve(
    name: str,
    folder: Path,
    splits: dict[str, list[Example]],
    cfg: DataConfig,
    seed: int,
) -> dict[str, dict[str, Any]]:
    """Fill missing splits from ``cfg.carve_missing_from`` in place; return the record.

    Each missing split takes ``max(1, round(fraction * n))`` examples of the source's
    ``n``, drawn with one seeded permutation so that carved splits never overlap each
    other or what stays in the source. Kept examples stay in file order.
    """
    missing = [s for s in SPLITS if s not in splits]
    if not missing:
        return {}
    src = cfg.carve_missing_from
    if src is None or src not in splits:
        first = folder / f"{missing[0]}.json"
        hint = (
            "set data.carve_missing_from (e.g. 'train') to carve it from another split"
            if src is None
            else f"data.carve_missing_from is {src!r} but {folder / (src + '.json')} is missing too"
        )
        raise TaskDataError(f"task {name}: missing split file {first}; {hint}")
    pool = splits[src]
    sizes = {s: max(1, round(cfg.carve_fraction * len(pool))) for s in missing}
    if sum(sizes.values()) >= len(pool):
        raise TaskDataError(
            f"task {name}: {folder / (src + '.json')} has {len(pool)} examples, too few to "
            f"carve {', '.join(missing)} (fraction {cfg.carve_fraction}) and keep any"
        )
    # a string seed is hashed with SHA-512 by `random`: stable across runs and machines
    perm = list(range(len(pool)))
    random.Random(f"carve:{seed}:{name}:{src}").shuffle(perm)
    record: dict[str, dict[str, Any]] = {}
    start = 0
    taken: set[int] = set()
    for s in missing:
        idx = sorted(perm[start : start + sizes[s]])
        start += sizes[s]
        taken.update(idx)
        splits[s] = [pool[i] for i in idx]
        record[s] = {
            "source": src,
            "fraction": cfg.carve_fraction,
            "seed": seed,
            "size": len(idx),
            "source_size_before": len(pool),
        }
    splits[src] = [x for i, x in enumerate(pool) if i not in taken]
    for s in missing:
        record[s]["source_size_after"] = len(splits[src])
        log.info(
            "task %s: carved %s (%d examples) from %s (%d -> %d, seed %d)",
            name,
            s,
            record[s]["size"],
            src,
            len(pool),
            len(splits[src]),
            seed,
        )
    return record


def load_task(
    root: Path,
    name: str,
    cfg: DataConfig,
    seed: int,
    instructions: Instructions | None = None,
) -> TaskData:
    """Load and validate one task; carve missing splits when ``cfg`` asks for it.

    Args:
        root: the data folder (see :func:`find_task_dir`).
        name: the task folder name.
        cfg: ``data`` section of the config (caps, carving, metric, template, instructions).
        seed: seeds the carving (the run's ``train.seed``).
        instructions: ``cfg.instructions`` already read (else it is read here).

    Caps (``max_train`` ...) keep the first N examples in file order, after carving.
    The definition is the task files' ``Definition`` (the train file's, where it has
    one); without one, the instruction file's entry for the task; without that, none,
    if the template can leave its definition line out (:func:`omits_definition`).

    Raises:
        TaskDataError: naming the task and the file, for any bad or missing data; for a
            task with no instruction anywhere, naming its file and the instruction file.
        ConfigError: a bad instruction file, naming it.
    """
    import datasets

    folder = find_task_dir(root, name)
    if folder is None:
        raise TaskDataError(f"task {name}: no task folder with split files under {root}")
    definition, source = "", ""
    splits: dict[str, list[Example]] = {}
    files = []
    for s in SPLITS:
        p = folder / f"{s}.json"
        if p.is_file():
            d, splits[s] = _read_split(name, s, p)
            files.append(p)
            if d and not definition:  # the train file's, where it has one
                definition, source = d, str(p)
    if not definition:
        definition, source = _instruction(name, files, cfg, instructions)
    carved = _carve(name, folder, splits, cfg, seed)

    caps = {"train": cfg.max_train, "dev": cfg.max_dev, "test": cfg.max_test}
    for s, cap in caps.items():
        if cap is None:
            continue
        if cap < 1:
            raise TaskDataError(f"config key 'data.max_{s}' must be >= 1 or null (got {cap})")
        splits[s] = splits[s][:cap]

    same_as_demo = folder.parent.resolve() == DEMO_DATA_DIR.resolve()
    benchmark = "demo" if same_as_demo else folder.parent.name
    if cfg.metric != "auto":
        metric = cfg.metric
    else:
        metric, why = auto_metric(folder, benchmark)
        log.info("task %s: data.metric=auto -> %s (%s)", name, metric, why)

    labels = None
    lp = folder / "labels.json"
    if lp.is_file():
        labels = _read_json(name, lp)
        if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
            raise TaskDataError(f"task {name}: {lp} must hold a JSON list of label strings")

    features = datasets.Features(
        {
            "id": datasets.Value("string"),
            "input": datasets.Value("string"),
            "outputs": datasets.Sequence(datasets.Value("string")),
        }
    )
    ds = {
        s: datasets.Dataset.from_list(
            [{"id": x.id, "input": x.input, "outputs": x.outputs} for x in splits[s]],
            features=features,
        )
        for s in SPLITS
    }
    return TaskData(
        name=name,
        benchmark=benchmark,
        definition=definition,
        splits=ds,
        metric=metric,
        labels=labels,
        carved=carved,
        source_dir=folder,
        definition_from=source,
    )


def _instruction(
    name: str, files: list[Path], cfg: DataConfig, instructions: Instructions | None
) -> tuple[str, str]:
    """(instruction, the file it came from) of a task whose files have no ``Definition``:
    the instruction file's entry, else ``("", "")`` when the template can do without."""
    if instructions is None:
        instructions = read_instructions(cfg.instructions)
    if instructions is not None and name in instructions.by_task:
        log.info(
            "task %s: no 'Definition' in its files; instruction from %s",
            name,
            instructions.path,
        )
        return instructions.by_task[name], instructions.path
    where = (
        f"the instruction file {instructions.path} has no entry {name!r}"
        if instructions is not None
        else "no instruction file is set (config key 'data.instructions')"
    )
    if omits_definition(cfg.template):
        log.info(
            "task %s: no instruction (no 'Definition' in %s; %s): its prompts leave the "
            "definition line out, as the released Long Sequence loader does",
            name,
            files[0],
            where,
        )
        return "", ""
    raise TaskDataError(
        f"task {name}: no instruction: {', '.join(map(str, files))} "
        f"{'have' if len(files) > 1 else 'has'} a missing or empty 'Definition' and {where}. "
        f"Add the task to an instruction file (data.instructions), or use a data.template "
        f"with {{definition}} on a line of its own (left out when there is none)"
    )


def split_sha256(task: TaskData, split: str = "train") -> str:
    """sha256 of what a block learned from: the definition and the split's examples as
    used (after carving and caps), in order, as canonical JSON. Equal data, equal hash,
    on any machine; it does not depend on the file's formatting or unused keys."""
    import hashlib

    ds = task.splits[split]
    body = {
        "definition": task.definition,
        "examples": [
            [i, x, list(o)] for i, x, o in zip(ds["id"], ds["input"], ds["outputs"], strict=True)
        ],
    }
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


#: how a prompt longer than ``data.max_source_length`` is cut (``data.truncation``)
TRUNCATION_MODES = ("input", "right", "left")


class PromptText(str):
    """A formatted prompt (the string itself) that remembers its parts: the template
    before the input (with the definition), the input, and the template after it (the
    answer cue), so that a prompt too long for ``max_source_length`` can lose the end of
    its input instead of its definition or cue (``truncation``, see :func:`_prompt_ids`)."""

    prefix: str
    input: str
    suffix: str
    truncation: str

    def __new__(cls, prefix: str, input: str, suffix: str, truncation: str) -> PromptText:
        obj = super().__new__(cls, prefix + input + suffix)
        obj.prefix, obj.input, obj.suffix, obj.truncation = prefix, input, suffix, truncation
        return obj


#: a template line that holds only the definition: left out for a task without one
_DEFINITION_LINE = re.compile(r"^\{definition\}(?:\n|$)", re.MULTILINE)


def auto_metric(folder: Path, benchmark: str) -> tuple[str, str]:
    """What ``data.metric=auto`` scores a task folder with, and why in words: exact match
    for a Long Sequence task (a folder under ``Long_Sequence/``, or one holding
    ``labels.json``, the label words a Long Sequence classification task ships with,
    wherever it was copied), ROUGE-L otherwise (SuperNI's generation tasks)."""
    if benchmark == "Long_Sequence":
        return "exact", f"its folder is under {folder.parent}, a Long_Sequence benchmark folder"
    if (folder / "labels.json").is_file():
        return "exact", (
            f"{folder / 'labels.json'} lists its label words: a classification task in the "
            f"Long Sequence format"
        )
    return "rouge", (
        f"{folder} is not under Long_Sequence/ and has no labels.json; set data.metric=exact "
        f"for a task scored by exact match"
    )


def omits_definition(template: str) -> bool:
    """Whether ``template`` has a line holding only ``{definition}``, which a prompt
    without a definition leaves out (the released Long Sequence loader writes
    ``definition + "\\n"`` only for a task that has one)."""
    return _DEFINITION_LINE.search(template) is not None


def format_prompt(
    template: str, definition: str, input: str, truncation: str = "input"
) -> PromptText:
    """``template`` with ``{definition}`` and ``{input}`` filled in (``str.format``), as a
    :class:`PromptText` that knows where the input is (``truncation``: ``data.truncation``).
    An empty ``definition`` leaves out a line of the template that holds only
    ``{definition}`` (newline included).

    Raises:
        TaskDataError: naming ``data.template`` for an unknown or malformed placeholder.
    """
    if not definition.strip():
        template = _DEFINITION_LINE.sub("", template, count=1)
    try:
        full = template.format(definition=definition, input=input)
        before, mark, after = template.partition("{input}")
        parts = None
        if mark and "{input}" not in after:
            parts = (
                before.format(definition=definition),
                input,
                after.format(definition=definition),
            )
    except (KeyError, IndexError, ValueError) as e:
        raise TaskDataError(
            f"config key 'data.template': bad placeholder ({type(e).__name__}: {e}); "
            f"only {{definition}} and {{input}} are filled (write literal braces as {{{{ }}}})"
        ) from e
    if parts is None or "".join(parts) != full:  # no single {input}: nothing to cut by
        return PromptText(full, "", "", truncation)
    prefix, inp, suffix = parts
    # a space before the input belongs to its first word for a BPE tokenizer (" word")
    stripped = prefix.rstrip(" ")
    return PromptText(stripped, prefix[len(stripped) :] + inp, suffix, truncation)


# ---------------------------------------------------------------------------- tokenising
@dataclass
class EncodedExample:
    """One training sequence: ``input_ids`` = prompt + target + EOS, ``labels`` -100 on the prompt."""

    input_ids: list[int]
    labels: list[int]
    prompt_len: int


@dataclass
class TruncationStats:
    """How many encoded examples had their prompt / target cut (out of ``total``)."""

    source_truncated: int = 0
    target_truncated: int = 0
    total: int = 0


def _prompt_ids(
    tokenizer: PreTrainedTokenizerBase, prompt: str, max_len: int
) -> tuple[list[int], bool]:
    """Token ids of ``prompt`` cut to ``max_len``. A :class:`PromptText` is cut by its
    ``truncation``: ``input`` keeps the template around the input (definition and answer
    cue) and the start of the input; ``right`` keeps the first tokens (the released SAPT
    code); ``left`` the last ones. A plain string is cut from the left."""
    if max_len < 1:
        # ids[-0:] would silently keep everything
        raise ValueError(f"max_source_length must be >= 1 (got {max_len})")
    ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    if len(ids) <= max_len:
        return ids, False
    mode = getattr(prompt, "truncation", "left")
    if mode == "right":
        return ids[:max_len], True
    if mode == "input" and prompt.input:

        def tok(text: str) -> list[int]:
            return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []

        head, body, cue = tok(prompt.prefix), tok(prompt.input), tok(prompt.suffix)
        room = max_len - len(head) - len(cue)
        if room > 0:
            return head + body[:room] + cue, True
        if len(cue) < max_len:  # the definition alone is too long: keep its start and the cue
            return head[: max_len - len(cue)] + cue, True
    return ids[-max_len:], True


def encode_prompt(
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    max_source_length: int,
    stats: TruncationStats | None = None,
) -> list[int]:
    """Prompt token ids (no special tokens), cut to ``max_source_length`` (see
    :func:`_prompt_ids`)."""
    ids, cut = _prompt_ids(tokenizer, prompt, max_source_length)
    if stats is not None:
        stats.total += 1
        stats.source_truncated += int(cut)
    return ids


def encode_train(
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    target: str,
    max_source_length: int,
    max_target_length: int,
    stats: TruncationStats | None = None,
    eos: str = "appended",
) -> EncodedExample:
    """One training sequence: prompt (cut by :func:`_prompt_ids`) + target (right-cut) + EOS.

    The target is stripped and, when the prompt does not end in whitespace, tokenised
    with one leading space, so that it is tokenised as the continuation of the prompt it
    is generated after (BPE vocabularies fold the space into the next word). ``eos``
    (``data.target_eos``): ``appended`` keeps at most ``max_target_length`` target tokens
    and appends EOS after them, outside the limit, so a cut target still teaches the
    model to stop; ``cut_with_target`` appends EOS first and keeps at most
    ``max_target_length`` tokens of target + EOS (the released collator), so a target of
    that length or more has none.
    """
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token_id; training targets need one")
    if max_target_length < 1:
        raise ValueError(f"max_target_length must be >= 1 (got {max_target_length})")
    p, p_cut = _prompt_ids(tokenizer, prompt, max_source_length)
    text = target.strip()
    if prompt and not prompt[-1].isspace():
        text = " " + text
    t = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if eos == "appended":
        t_cut = len(t) > max_target_length
        t = t[:max_target_length] + [tokenizer.eos_token_id]
    elif eos == "cut_with_target":
        t = t + [tokenizer.eos_token_id]
        t_cut = len(t) > max_target_length
        t = t[:max_target_length]
    else:
        raise ValueError(f"eos must be 'appended' or 'cut_with_target' (got {eos!r})")
    if stats is not None:
        stats.total += 1
        stats.source_truncated += int(p_cut)
        stats.target_truncated += int(t_cut)
    return EncodedExample(input_ids=p + t, labels=[IGNORE_INDEX] * len(p) + t, prompt_len=len(p))


def collate_train(
    examples: list[EncodedExample], pad_id: int, seq2seq: bool = False
) -> dict[str, torch.Tensor]:
    """Right-padded batch, for a causal LM or (``seq2seq``) an encoder-decoder.

    One :class:`EncodedExample` serves both: its ``prompt_len`` splits it into the prompt
    and the target (+ EOS). A causal LM reads them as one sequence; an encoder-decoder
    (T5) reads the prompt in its encoder and learns the target in its decoder (the
    backbone shifts the labels right behind its decoder start token), no concatenation.

    Returns:
        ``input_ids`` (B, T) long, ``attention_mask`` (B, T) long (1 on real tokens),
        ``labels`` long, -100 on padding. Causal: T = longest prompt + target, labels
        (B, T) with -100 on the prompt too. ``seq2seq``: T = longest prompt (the encoder
        input), labels (B, U), U = longest target + EOS.
    """
    if not examples:
        raise ValueError("collate_train: empty batch")
    for i, e in enumerate(examples):
        if len(e.labels) != len(e.input_ids):
            raise ValueError(
                f"collate_train: example {i} has {len(e.input_ids)} ids but {len(e.labels)} labels"
            )
    if seq2seq:
        sources = [e.input_ids[: e.prompt_len] for e in examples]
        targets = [e.input_ids[e.prompt_len :] for e in examples]
    else:
        sources = [e.input_ids for e in examples]
        targets = [e.labels for e in examples]
    n = max(len(s) for s in sources)
    ids = torch.full((len(examples), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), n), dtype=torch.long)
    labels = torch.full(
        (len(examples), max(len(t) for t in targets)), IGNORE_INDEX, dtype=torch.long
    )
    for i, (src, tgt) in enumerate(zip(sources, targets, strict=True)):
        if seq2seq and not src:
            raise ValueError(f"collate_train: example {i} has an empty prompt (encoder input)")
        ids[i, : len(src)] = torch.tensor(src, dtype=torch.long)
        mask[i, : len(src)] = 1
        labels[i, : len(tgt)] = torch.tensor(tgt, dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def collate_prompts(prompts: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-padded batch of prompts, so every row's last token is at position T-1.

    Generation appends at the right end and routing reads the prompt's tokens; both need
    the real tokens right-aligned.

    Returns:
        ``input_ids`` (B, T) long and ``attention_mask`` (B, T) long (0 on the padding).
    """
    if not prompts:
        raise ValueError("collate_prompts: empty batch")
    n = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), n), dtype=torch.long)
    for i, p in enumerate(prompts):
        if not p:
            # an all-padding row would attend to nothing (NaN attention)
            raise ValueError(f"collate_prompts: prompt {i} is empty")
        ids[i, n - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[i, n - len(p) :] = 1
    return {"input_ids": ids, "attention_mask": mask}


def log_truncation(task: str, split: str, stats: TruncationStats) -> None:
    """Log how many examples of ``task``/``split`` were truncated (INFO when any, else DEBUG)."""
    level = logging.INFO if stats.source_truncated or stats.target_truncated else logging.DEBUG
    log.log(
        level,
        "task %s/%s: %d of %d prompts cut to max_source_length, %d targets cut to "
        "max_target_length",
        task,
        split,
        stats.source_truncated,
        stats.total,
        stats.target_truncated,
    )
