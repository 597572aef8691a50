"""Hostile model files (issue 23): a folder that names code of its own, a model file with a
weight missing, a GGUF header that lies about the model's size, a GGUF without a tokenizer,
and a SIGTERM while the backbone loads.

Each case is built here, tiny: a folder of a few-KB LLaMA, GGUF files written with the
``gguf`` package's writer (as tests/test_real_model.py writes them). The refusals are
``ConfigError``s, which ``sapt-train`` turns into exit 2; the command-line tests run it.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from sapt_dist.backbone import load as backbone
from sapt_dist.backbone.load import check_gguf, load_backbone
from sapt_dist.config import ConfigError, ModelConfig
from tests.conftest import ROOT, cli_cmd, subprocess_env, tiny_llama
from tests.test_real_model import write_tiny_gguf

VOCAB = 64


def write_gguf(path: Path, model=None, **claims) -> Path:
    """A tiny LLaMA (``model``; default a 2-layer d=32 one) as an fp32 GGUF file, written
    as tests/test_real_model.py writes them; ``claims``: ``drop`` (GGUF tensor names left
    out), ``tokenizer`` and the header numbers that replace the truth."""
    return write_tiny_gguf(path, model or _model(), **claims)


def _model():
    model = tiny_llama(vocab=VOCAB, hidden=32, layers=2, seed=3)
    model.config.tie_word_embeddings = False
    return model


def _folder(path: Path, tied: bool = False) -> Path:
    """A tiny LLaMA saved as a Hugging Face folder, with a small tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    model = tiny_llama(vocab=VOCAB, hidden=32, layers=2, seed=3)
    model.config.tie_word_embeddings = tied
    if tied:
        model.tie_weights()
    model.save_pretrained(path)
    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", *"abcdefghij"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    ).save_pretrained(path)
    return path


def _drop_weight(folder: Path, name: str) -> None:
    from safetensors.torch import load_file, save_file

    f = folder / "model.safetensors"
    sd = load_file(f)
    del sd[name]
    save_file(sd, str(f), metadata={"format": "pt"})


# ------------------------------------------------------------------------- foreign code
EVIL = """\
import pathlib
pathlib.Path({marker!r}).write_text("the folder's code ran")
from transformers import PretrainedConfig


class EvilConfig(PretrainedConfig):
    model_type = "evilnet"
"""


def _evil_folder(tmp_path: Path) -> tuple[Path, Path]:
    """A model folder whose config.json names its own code (evil.py writes a marker)."""
    folder, marker = tmp_path / "evil_model", tmp_path / "MARKER"
    folder.mkdir()
    (folder / "evil.py").write_text(EVIL.format(marker=str(marker)))
    (folder / "config.json").write_text(
        json.dumps(
            {
                "model_type": "evilnet",
                "architectures": ["EvilForCausalLM"],
                "auto_map": {
                    "AutoConfig": "evil.EvilConfig",
                    "AutoModelForCausalLM": "evil.EvilForCausalLM",
                },
            }
        )
    )
    return folder, marker


def test_the_evil_folder_does_run_code_when_trusted(tmp_path) -> None:
    """The case is real: told to trust it, transformers imports evil.py (the marker)."""
    folder, marker = _evil_folder(tmp_path)
    code = f"from transformers import AutoConfig; AutoConfig.from_pretrained({str(folder)!r}, trust_remote_code=True)"
    env = subprocess_env(HF_HOME=str(tmp_path / "hf"))
    subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=300)
    assert marker.is_file()


def test_foreign_code_never_runs_even_with_yes_on_stdin(tmp_path) -> None:
    """``sapt-train`` on the folder with ``y`` on stdin (what a batch job's stdin may hold):
    exit 2 naming config.json and model.trust_remote_code; evil.py never ran."""
    folder, marker = _evil_folder(tmp_path)
    env = subprocess_env(HF_HOME=str(tmp_path / "hf"), SAPT_DIST_CACHE=str(tmp_path / "cache"))
    cmd = cli_cmd(tmp_path / "run", "model.builder=pretrained", f"model.path={folder}")
    res = subprocess.run(cmd, input="y\ny\n", env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 2, res.stderr[-3000:]
    assert not marker.exists()
    assert f"{folder / 'config.json'}" in res.stderr
    assert "model.trust_remote_code" in res.stderr and "auto_map" in res.stderr
    assert "Traceback" not in res.stderr


def test_a_tokenizer_that_names_its_code_is_refused(tmp_path) -> None:
    folder = _folder(tmp_path / "m")
    cfg_file = folder / "tokenizer_config.json"
    body = json.loads(cfg_file.read_text())
    body["auto_map"] = {"AutoTokenizer": ["evil_tok.EvilTokenizer", None]}
    cfg_file.write_text(json.dumps(body))
    with pytest.raises(ConfigError, match=r"model\.trust_remote_code.*tokenizer_config\.json"):
        load_backbone(ModelConfig(path=str(folder)))
    # a separate tokenizer folder is checked as well
    plain = _folder(tmp_path / "plain")
    with pytest.raises(ConfigError, match=r"model\.trust_remote_code.*m/tokenizer_config\.json"):
        load_backbone(ModelConfig(path=str(plain), tokenizer=str(folder)))


@pytest.mark.parametrize("trust", [False, True])
def test_every_from_pretrained_says_whether_to_trust(tmp_path, monkeypatch, trust) -> None:
    """Model, config and tokenizer loads all pass ``trust_remote_code`` explicitly (None
    would make transformers ask on stdin)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = _folder(tmp_path / "m")
    seen: list[tuple[str, object]] = []
    for cls in (AutoConfig, AutoModelForCausalLM, AutoTokenizer):
        real = cls.from_pretrained

        def spy(*a, _real=real, _name=cls.__name__, **kw):
            seen.append((_name, kw.get("trust_remote_code", "not passed")))
            return _real(*a, **kw)

        monkeypatch.setattr(cls, "from_pretrained", spy)
    load_backbone(ModelConfig(path=str(folder), trust_remote_code=trust))
    names = {n for n, _ in seen}
    assert {"AutoConfig", "AutoModelForCausalLM", "AutoTokenizer"} <= names
    assert all(v is trust for _, v in seen), seen


def test_trust_remote_code_is_a_checked_config_key() -> None:
    from sapt_dist.config import load_config

    demo = ["model.builder=demo"]
    assert load_config(None, demo).model.trust_remote_code is False
    assert load_config(None, [*demo, "model.trust_remote_code=true"]).model.trust_remote_code
    with pytest.raises(ConfigError, match=r"model\.trust_remote_code.*true/false"):
        load_config(None, [*demo, "model.trust_remote_code=maybe"])


# ------------------------------------------------------------------- whole or not at all
def test_a_folder_missing_one_weight_is_refused(tmp_path) -> None:
    folder = _folder(tmp_path / "m")
    _drop_weight(folder, "model.layers.1.self_attn.q_proj.weight")
    with pytest.raises(ConfigError) as e:
        load_backbone(ModelConfig(path=str(folder)))
    msg = str(e.value)
    assert str(folder) in msg and "model.layers.1.self_attn.q_proj.weight" in msg
    assert "lacks weights" in msg


def test_a_folder_with_a_foreign_weight_is_refused(tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    folder = _folder(tmp_path / "m")
    f = folder / "model.safetensors"
    sd = load_file(f)
    sd["model.layers.7.self_attn.q_proj.weight"] = torch.zeros(32, 32)
    save_file(sd, str(f), metadata={"format": "pt"})
    with pytest.raises(ConfigError, match=r"does not have: model\.layers\.7"):
        load_backbone(ModelConfig(path=str(folder)))


def test_tied_embeddings_are_the_one_exception(tmp_path) -> None:
    """A tied model saves its embedding once (no lm_head.weight in the file): it loads."""
    from safetensors import safe_open

    folder = _folder(tmp_path / "tied", tied=True)
    with safe_open(folder / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in set(f.keys())
    model, _ = load_backbone(ModelConfig(path=str(folder)))
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_a_gguf_missing_one_tensor_is_refused_before_loading(tmp_path) -> None:
    path = write_gguf(tmp_path / "holed.gguf", drop=("blk.1.attn_q.weight",))
    with pytest.raises(ConfigError, match=r"holed\.gguf lacks tensors.*blk\.1\.attn_q\.weight"):
        check_gguf(path)
    with pytest.raises(ConfigError, match=r"holed\.gguf lacks tensors.*blk\.1\.attn_q\.weight"):
        load_backbone(ModelConfig(path=str(path)))
    # the same check without loading anything (for a caller about to bind a run folder)
    with pytest.raises(ConfigError, match=r"holed\.gguf lacks tensors"):
        backbone.check_model_files(ModelConfig(path=str(path)))


def test_the_load_itself_is_checked_too(tmp_path, monkeypatch) -> None:
    """Past the header check (turned off here), transformers' own loading report stops a
    GGUF load with a weight missing: the second line of defence names the HF weight."""
    path = write_gguf(tmp_path / "holed.gguf", drop=("blk.1.attn_q.weight",))
    monkeypatch.setattr(backbone, "check_gguf", lambda *a, **k: "llama")
    with pytest.raises(
        ConfigError, match=r"holed\.gguf lacks weights.*layers\.1\.self_attn\.q_proj"
    ):
        load_backbone(ModelConfig(path=str(path)))


def test_a_damaged_converted_cache_is_refused(tmp_path, monkeypatch) -> None:
    """ZeRO-3 / 4-bit runs load the GGUF's safetensors copy: a copy that lost a weight is
    refused like any folder (and the conversion itself checks what it wrote from)."""
    from sapt_dist import distributed

    monkeypatch.setenv("SAPT_DIST_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(distributed, "zero3_enabled", lambda: True)
    path = write_gguf(tmp_path / "good.gguf")
    load_backbone(ModelConfig(path=str(path)))  # converts once
    (converted,) = (tmp_path / "cache" / "models" / "converted").iterdir()
    _drop_weight(converted, "model.layers.0.mlp.up_proj.weight")
    with pytest.raises(ConfigError, match=r"converted.*lacks weights.*layers\.0\.mlp\.up_proj"):
        load_backbone(ModelConfig(path=str(path)))


def test_a_zero3_load_reports_a_missing_weight(tmp_path) -> None:
    """Under ZeRO-3 (zero.Init, partitioned as it loads) transformers reports the missing
    weight too. One CPU process with a gloo group, in a subprocess (DeepSpeed's state)."""
    folder = _folder(tmp_path / "m")
    _drop_weight(folder, "model.layers.1.mlp.down_proj.weight")
    script = textwrap.dedent(
        f"""
        import os, sys
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(29500 + os.getpid() % 1000))
        from sapt_dist import distributed
        from sapt_dist.backbone.load import load_backbone
        from sapt_dist.config import ConfigError, ModelConfig
        distributed.init()
        distributed.configure({{"train_micro_batch_size_per_gpu": 1,
                               "zero_optimization": {{"stage": 3}}}})
        assert distributed.zero3_enabled()
        try:
            load_backbone(ModelConfig(path={str(folder)!r}))
        except ConfigError as e:
            print("REFUSED", e)
            sys.exit(0)
        print("LOADED")
        """
    )
    res = subprocess.run(
        [sys.executable, "-c", script],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert "REFUSED" in res.stdout, res.stdout + res.stderr[-3000:]
    assert "model.layers.1.mlp.down_proj.weight" in res.stdout


# ---------------------------------------------------------------------- lying headers
LIARS = {
    # the cases: >11 min in get_gguf_hf_weights_map; 6.9 GB; 4.7 GB
    "blocks4096": (
        {"block_count": 4096},
        r"block_count=4096, the file holds tensors of blocks 0-1",
    ),
    "wide": (
        {"embedding_length": 8192, "feed_forward_length": 32768},
        r"token_embd\.weight has shape \[64, 32\].*implies \[64, 8192\]",
    ),
    "vocab4m": ({"vocab_size": 4_000_000}, r"token_embd\.weight.*implies \[4000000, 32\]"),
}


@pytest.mark.parametrize("case", sorted(LIARS))
def test_a_lying_gguf_header_is_refused_at_once(tmp_path, case) -> None:
    claims, message = LIARS[case]
    path = write_gguf(tmp_path / f"{case}.gguf", **claims)
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match=message):
        load_backbone(ModelConfig(path=str(path)))
    assert time.perf_counter() - t0 < 10


def test_lying_headers_are_checked_in_bounded_time_and_memory(tmp_path) -> None:
    """The check's peak memory (RSS, in a fresh process) stays within a few MB, whatever
    the header claims: it never builds what the header describes. Bound asserted: 32 MB
    above the process's peak before the check (the files are ~20 KB)."""
    files = {case: write_gguf(tmp_path / f"{case}.gguf", **c) for case, (c, _) in LIARS.items()}
    script = textwrap.dedent(
        f"""
        import json, resource, time
        from pathlib import Path
        from sapt_dist.backbone.load import check_gguf
        from sapt_dist.config import ConfigError
        import transformers  # what the run has imported by then
        out = {{}}
        for case, path in {json.dumps({k: str(v) for k, v in files.items()})}.items():
            before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            t0 = time.perf_counter()
            try:
                check_gguf(Path(path), need_tokenizer=True)
                refused = False
            except ConfigError:
                refused = True
            out[case] = dict(refused=refused, s=time.perf_counter() - t0,
                             rss_kb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before,
                             size=Path(path).stat().st_size)
        print(json.dumps(out))
        """
    )
    res = subprocess.run(
        [sys.executable, "-c", script],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    for case, r in got.items():
        assert r["refused"], case
        assert r["s"] < 2.0, (case, r)
        assert r["rss_kb"] < 32 * 1024, (case, r)


def _raw_gguf(path: Path, tensors: int, keys: int) -> Path:
    """A header-only GGUF claiming ``tensors`` tensors and ``keys`` keys it does not hold."""
    import struct

    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, tensors, keys) + b"\0" * 64)
    return path


def test_impossible_counts_and_lengths_are_refused(tmp_path) -> None:
    for tensors, keys in ((10**12, 0), (0, 10**12), (2**63, 2**63)):
        path = _raw_gguf(tmp_path / "counts.gguf", tensors, keys)
        with pytest.raises(ConfigError, match=r"counts\.gguf is not a readable GGUF.*more than"):
            check_gguf(path)
    # a string claiming more bytes than the file has
    import struct

    path = tmp_path / "string.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<IQQQ", 3, 0, 1, 2**40) + b"\0" * 64)
    with pytest.raises(ConfigError, match=r"string\.gguf is not a readable.*past the file's end"):
        check_gguf(path)
    # a tensor whose data lies past the end (the file cut short)
    good = write_gguf(tmp_path / "good.gguf")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(ConfigError, match=r"cut\.gguf: tensor .* past the file's end"):
        check_gguf(cut)


def test_a_good_gguf_passes_the_check(tmp_path) -> None:
    """The check accepts what it should: a whole file, and the tied case (no output.weight)."""
    assert check_gguf(write_gguf(tmp_path / "good.gguf"), need_tokenizer=True) == "llama"
    tied = tiny_llama(vocab=VOCAB, hidden=32, layers=2, seed=3)
    tied.config.tie_word_embeddings = True
    path = write_gguf(tmp_path / "tied.gguf", tied, drop=("output.weight",))
    assert check_gguf(path) == "llama"
    model, _ = load_backbone(ModelConfig(path=str(path)))
    assert model.config.tie_word_embeddings


def test_the_real_smollm2_file_passes_the_check() -> None:
    """The check on the registry's real file (when fetched): no false alarm, fast."""
    from sapt_dist.backbone.registry import model_file

    f = model_file("smollm2-135m-instruct")
    if not f.is_file():
        pytest.skip(f"{f} is not fetched (sapt-models fetch smollm2-135m-instruct)")
    t0 = time.perf_counter()
    assert check_gguf(f, need_tokenizer=True) == "llama"
    assert time.perf_counter() - t0 < 5


def test_a_lying_gguf_is_exit_2_from_the_command_line(tmp_path) -> None:
    path = write_gguf(tmp_path / "blocks4096.gguf", block_count=4096)
    cmd = cli_cmd(tmp_path / "run", "model.builder=pretrained", f"model.path={path}")
    env = subprocess_env(SAPT_DIST_CACHE=str(tmp_path / "cache"))
    t0 = time.perf_counter()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 2, res.stderr[-3000:]
    assert "blocks4096.gguf" in res.stderr and "block_count=4096" in res.stderr
    assert "Traceback" not in res.stderr
    assert time.perf_counter() - t0 < 120  # the process's start-up included


# --------------------------------------------------------------------- no tokenizer keys
def test_a_gguf_without_a_tokenizer_is_named(tmp_path, monkeypatch) -> None:
    path = write_gguf(tmp_path / "notok.gguf", tokenizer=False, vocab_size=VOCAB)
    with pytest.raises(ConfigError, match=r"notok\.gguf holds no tokenizer.*model\.tokenizer"):
        load_backbone(ModelConfig(path=str(path)))
    # with a tokenizer folder it loads, also through the converted copy (ZeRO-3 / 4-bit)
    tok = _folder(tmp_path / "tok")
    model, tokenizer = load_backbone(ModelConfig(path=str(path), tokenizer=str(tok)))
    assert tokenizer.eos_token == "</s>"
    from sapt_dist import distributed

    monkeypatch.setenv("SAPT_DIST_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(distributed, "zero3_enabled", lambda: True)
    load_backbone(ModelConfig(path=str(path), tokenizer=str(tok)))


# -------------------------------------------------------------------- SIGTERM at start-up
def test_sigterm_before_the_load_stops_it(tmp_path) -> None:
    """A SIGTERM earlier in start-up set the preemption flag: the load does not start."""
    from sapt_dist.distributed import preemption

    old = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR1)
    try:
        preemption.install_handlers()
        signal.raise_signal(signal.SIGTERM)
        with pytest.raises(SystemExit) as e:
            load_backbone(ModelConfig(path=str(write_gguf(tmp_path / "good.gguf"))))
        assert e.value.code == preemption.EXIT_PREEMPTED
    finally:
        signal.signal(signal.SIGTERM, old[0])
        signal.signal(signal.SIGUSR1, old[1])
        preemption.reset()


#: runs sapt-train with transformers' GGUF name mapping instrumented: a file is written when
#: it starts (the >11 min pure-Python loop of the issue's 4096-block file), then it runs
WRAPPER = """\
import pathlib, sys
import transformers.modeling_gguf_pytorch_utils as g
from sapt_dist.backbone import load
load.check_gguf = lambda *a, **k: "llama"   # let the lying file through, as before the fix
real = g.get_gguf_hf_weights_map
def mapping(*a, **k):
    pathlib.Path({ready!r}).touch()
    return real(*a, **k)
g.get_gguf_hf_weights_map = mapping
from sapt_dist.cli.train import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigterm_while_transformers_hangs_on_a_lying_file_ends_the_start(tmp_path) -> None:
    """The issue's hang: the 4096-block file in transformers' name mapping, a SIGTERM sent
    there. Before, the preemption handler only set a flag that nothing polls at start-up;
    now the process ends with exit 75 within seconds (a pure-Python loop lets Python run
    the handler)."""
    path = write_gguf(tmp_path / "blocks4096.gguf", block_count=4096)
    ready = tmp_path / "in_mapping"
    script = tmp_path / "wrapper.py"
    script.write_text(WRAPPER.format(ready=str(ready)))
    cmd = cli_cmd(tmp_path / "run", "model.builder=pretrained", f"model.path={path}")
    cmd = [sys.executable, str(script), *cmd[3:]]  # the same arguments
    env = subprocess_env(SAPT_DIST_CACHE=str(tmp_path / "cache"))
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        deadline = time.time() + 300
        while not ready.exists():
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.time() < deadline, "the load never reached the name mapping"
            time.sleep(0.1)
        time.sleep(1.0)  # well inside the mapping loop
        t0 = time.time()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        took = time.time() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 75, err[-3000:]
    assert "SIGTERM while loading the backbone" in err
    assert took < 30, took
