"""Loading the frozen backbone and its tokenizer.

``pretrained``: any Hugging Face causal LM folder (LLaMA-2 7B/13B/70B, Mistral, Qwen2,
...) or encoder-decoder folder (T5-style: ``AutoModelForSeq2SeqLM`` when the config says
``is_encoder_decoder``), optionally quantized to 4-bit NF4 with bitsandbytes. Nothing is
fetched from a hub: the folder must hold the weights.

``demo``: a tiny LLaMA-family model (``model.demo_arch: llama``) or T5 encoder-decoder
(``t5``) and a byte-level BPE tokenizer built locally, deterministically, from the demo
data shipped in the package (no network). It is saved as an ordinary HF folder and then
loaded by the same ``pretrained`` code path. Its weights are random: it is never
pre-trained on the tasks' labelled text (that would leak the tasks into the frozen
backbone), so what it can learn in a CPU budget is each task's answer format and
vocabulary, and whatever a LoRA on a random network picks up.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from sapt_dist import distributed
from sapt_dist.backbone.checks import (  # noqa: F401  (re-exported)
    GGUF_ARCHITECTURES,
    REMOTE_CODE_FILES,
    _short,
    check_gguf,
    check_loaded,
    check_remote_code,
    read_gguf_header,
)
from sapt_dist.backbone.registry import cache_root
from sapt_dist.config import ConfigError, ModelConfig

__all__ = [
    "DEMO_SPEC",
    "DEMO_T5_SPEC",
    "GGUF_ARCHITECTURES",
    "build_demo_backbone",
    "llama_config",
    "model_class",
    "random_llama",
    "read_gguf_header",
    "random_t5",
    "t5_config",
    "check_gguf",
    "check_loaded",
    "check_model_files",
    "check_remote_code",
    "demo_spec",
    "gguf_as_folder",
    "load_backbone",
    "resolve_model_path",
    "startup_signals",
    "torch_dtype",
]

log = logging.getLogger(__name__)

#: The demo backbone's recipe; changing it changes the cache key.
DEMO_SPEC = {
    "vocab_size": 2048,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 512,
    # HF's default init (std 0.02) caps a d=128 model's logits near +-2.6 over 2k tokens:
    # nothing a LoRA does can make it confident. std 1/sqrt(d) gives it the range to.
    "initializer_range": 0.09,
    "seed": 1234,
}
#: The T5 demo backbone's recipe (``model.demo_arch: t5``), the LLaMA demo's size: T5 v1.0
#: layout as t5-large (ReLU MLP, input and output embeddings tied, the decoder's output
#: scaled by d^-0.5, which keeps random logits near unit scale), no dropout (the demo and
#: the multi-rank tests compare runs step by step). Changing it changes the cache key.
DEMO_T5_SPEC = {
    "arch": "t5",
    "vocab_size": 2048,
    "d_model": 128,
    "d_ff": 256,
    "d_kv": 32,
    "num_layers": 2,
    "num_decoder_layers": 2,
    "num_heads": 4,
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "dropout_rate": 0.0,
    "feed_forward_proj": "relu",
    "seed": 1234,
}
#: Markers of the pseudo-sample generator's format (kept whole by the demo tokenizer).
GEN_TOKENS = ["__gen__", "__inp__"]


def torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _demo_texts(data_dir: Path) -> list[str]:
    texts = []
    for f in sorted(data_dir.glob("*/*.json")):
        d = json.loads(f.read_text())
        texts.extend(d.get("Definition", []))
        for inst in d.get("Instances", []):
            texts.append(inst["input"])
            out = inst["output"]
            texts.extend(out if isinstance(out, list) else [out])
    return texts


def llama_config(
    vocab: int,
    hidden: int,
    layers: int,
    heads: int,
    kv_heads: int | None = None,
    intermediate: int | None = None,
    max_positions: int = 128,
    **extra: Any,
):
    """A LLaMA-architecture ``LlamaConfig`` by its shape (tests, benchmarks): MLP twice the
    width unless given, as many KV heads as heads unless given, pad id 0 unless given."""
    from transformers import LlamaConfig

    extra.setdefault("pad_token_id", 0)
    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate or 2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads or heads,
        max_position_embeddings=max_positions,
        **extra,
    )


def random_llama(*shape: int, seed: int | None = 0, train: bool = False, **kwargs: Any):
    """A randomly initialised model of :func:`llama_config` (``seed``: torch's seed first;
    ``None`` keeps the RNG as it is), in eval mode unless ``train``."""
    from transformers import LlamaForCausalLM

    if seed is not None:
        torch.manual_seed(seed)
    return LlamaForCausalLM(llama_config(*shape, **kwargs)).train(train)


def t5_config(vocab: int, d_model: int, layers: int, heads: int, **extra: Any):
    """A T5 ``T5Config`` by its shape (tests, benchmarks): ``layers`` encoder and as many
    decoder layers, MLP twice the width, ``d_kv = d_model / heads``, no dropout, pad 0 (the
    decoder's start token, as in T5) and EOS 2 unless given."""
    from transformers import T5Config

    extra.setdefault("pad_token_id", 0)
    extra.setdefault("eos_token_id", 2)
    extra.setdefault("decoder_start_token_id", extra["pad_token_id"])
    extra.setdefault("dropout_rate", 0.0)
    extra.setdefault("d_ff", 2 * d_model)
    extra.setdefault("num_decoder_layers", layers)
    return T5Config(
        vocab_size=vocab,
        d_model=d_model,
        d_kv=d_model // heads,
        num_layers=layers,
        num_heads=heads,
        **extra,
    )


def random_t5(*shape: int, seed: int | None = 0, train: bool = False, **kwargs: Any):
    """A randomly initialised ``T5ForConditionalGeneration`` of :func:`t5_config`
    (``seed``: torch's seed first), in eval mode unless ``train``."""
    from transformers import T5ForConditionalGeneration

    if seed is not None:
        torch.manual_seed(seed)
    return T5ForConditionalGeneration(t5_config(*shape, **kwargs)).train(train)


def model_class(config: Any):
    """The ``transformers`` auto class that loads a model of ``config``: sequence-to-sequence
    LM for an encoder-decoder (``is_encoder_decoder``, e.g. T5), else causal LM."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    if getattr(config, "is_encoder_decoder", False):
        return AutoModelForSeq2SeqLM
    return AutoModelForCausalLM


def demo_spec(
    hidden_size: int | None = None, layers: int | None = None, arch: str = "llama"
) -> dict:
    """:data:`DEMO_SPEC` (``arch`` ``llama``) or :data:`DEMO_T5_SPEC` (``t5``) with another
    width / depth (``model.demo_hidden_size`` / ``model.demo_layers``); the MLP stays twice
    the width, the heads stay 4."""
    if arch == "t5":
        spec = dict(DEMO_T5_SPEC)
        if hidden_size is not None and hidden_size != spec["d_model"]:
            spec.update(d_model=hidden_size, d_ff=2 * hidden_size, d_kv=hidden_size // 4)
        if layers is not None:
            spec.update(num_layers=layers, num_decoder_layers=layers)
        return spec
    if arch != "llama":
        raise ValueError(f"unknown demo architecture {arch!r} (llama or t5)")
    spec = dict(DEMO_SPEC)
    if hidden_size is not None and hidden_size != DEMO_SPEC["hidden_size"]:
        spec.update(
            hidden_size=hidden_size,
            intermediate_size=2 * hidden_size,
            initializer_range=round(hidden_size**-0.5, 4),
        )
    if layers is not None:
        spec["num_hidden_layers"] = layers
    return spec


def build_demo_backbone(
    data_dir: Path | None = None, cache: Path | None = None, spec: dict | None = None
) -> Path:
    """Build (once; cached) the demo backbone folder and return its path (``spec``: a
    :func:`demo_spec`, LLaMA or T5; default the LLaMA demo's)."""
    spec_in = DEMO_SPEC if spec is None else spec
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from sapt_dist.data.tasks import DEMO_DATA_DIR

    data_dir = Path(data_dir or DEMO_DATA_DIR)
    texts = _demo_texts(data_dir)
    key = hashlib.sha256(
        json.dumps([spec_in, GEN_TOKENS, len(texts), texts[:50]], sort_keys=True).encode()
    ).hexdigest()[:12]
    folder = (cache or cache_root()) / f"demo-backbone-{key}"
    if (folder / "config.json").is_file():
        return folder
    log.info("building the demo backbone in %s (once)", folder)
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<pad>", "<s>", "</s>"]
    trainer = trainers.BpeTrainer(
        vocab_size=DEMO_SPEC["vocab_size"] - len(GEN_TOKENS),
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.add_tokens(GEN_TOKENS)
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    torch.manual_seed(spec_in["seed"])
    spec = {k: v for k, v in spec_in.items() if k not in ("seed", "arch")}
    spec["vocab_size"] = len(hf_tok)
    if spec_in.get("arch", "llama") == "t5":
        from transformers import T5Config, T5ForConditionalGeneration

        # T5 starts decoding from the pad token; its tokenizer has no BOS
        cfg = T5Config(
            **spec,
            pad_token_id=hf_tok.pad_token_id,
            eos_token_id=hf_tok.eos_token_id,
            decoder_start_token_id=hf_tok.pad_token_id,
            tie_word_embeddings=True,
        )
        model = T5ForConditionalGeneration(cfg)
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(
            **spec,
            pad_token_id=hf_tok.pad_token_id,
            bos_token_id=hf_tok.bos_token_id,
            eos_token_id=hf_tok.eos_token_id,
            tie_word_embeddings=False,
        )
        model = LlamaForCausalLM(cfg)
    # several ranks (or jobs) may build it at once: each writes its own temporary folder
    # and renames it into place; a rename onto a finished folder fails and that copy is
    # dropped (the build is deterministic). A finished folder is never moved, so a rank
    # already loading it is never disturbed (atomic_dir's swap would move it).
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".tmp"))
    try:
        model.save_pretrained(tmp)
        hf_tok.save_pretrained(tmp)
        try:
            os.rename(tmp, folder)
        except OSError:
            if not (folder / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def load_backbone(cfg: ModelConfig, data_root: Path | None = None):
    """Return ``(model, tokenizer)``: the frozen HF causal LM (or encoder-decoder, e.g. T5:
    see :func:`model_class`) and its tokenizer.

    Nothing from the model's folder runs as code unless ``model.trust_remote_code`` says so
    (:func:`check_remote_code`); a GGUF file's header is checked against its tensors before
    anything is allocated (:func:`check_gguf`); the model loads whole or not at all
    (:func:`check_loaded`). A SIGTERM while it loads ends the process (:func:`startup_signals`).

    Raises:
        ConfigError: naming ``model.path`` (and the file) when the folder is missing or not a
            model, asks to run its own code, or its weights are incomplete or inconsistent.
    """
    with startup_signals():
        return _load_backbone(cfg)


def _load_backbone(cfg: ModelConfig):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    trust = bool(cfg.trust_remote_code)
    if cfg.builder == "demo":
        spec = demo_spec(cfg.demo_hidden_size, cfg.demo_layers, cfg.demo_arch)
        with distributed.rank0_first():  # one rank builds the cache, the others read it
            path = build_demo_backbone(spec=spec)
    else:
        path = resolve_model_path(cfg.path or "")
    tok_folder = Path(cfg.tokenizer) if cfg.tokenizer else None
    gguf = path.suffix == ".gguf"
    _check_files(path, tok_folder, trust)
    if gguf and (cfg.quantization != "none" or distributed.zero3_enabled()):
        # transformers reads a GGUF file whole (no 4-bit quantization, no ZeRO-3
        # partitioning while loading): such runs load a safetensors copy, converted
        # once per file into the model cache
        with distributed.rank0_first():
            path = gguf_as_folder(path)
        gguf = False
        check_remote_code([path], trust)  # the cache is a folder like any other
    tok_kwargs: dict = {"trust_remote_code": trust}
    if tok_folder is not None:
        tok_path = tok_folder
    elif gguf:  # the GGUF file carries its tokenizer
        tok_path = path.parent
        tok_kwargs["gguf_file"] = path.name
    else:
        tok_path = path
    where = tok_path / tok_kwargs["gguf_file"] if "gguf_file" in tok_kwargs else tok_path
    try:
        tokenizer = AutoTokenizer.from_pretrained(tok_path, **tok_kwargs)
    except (OSError, ValueError, KeyError, TypeError) as e:
        key = "model.tokenizer" if tok_folder is not None else "model.path"
        raise ConfigError(
            f"config key '{key}': no tokenizer could be loaded from {where} "
            f"({type(e).__name__}: {_short(e)})"
        ) from e
    if tokenizer.pad_token_id is None:
        # LLaMA ships without a pad token; padding is masked everywhere, so EOS serves
        tokenizer.pad_token = tokenizer.eos_token
    kwargs: dict = {
        "dtype": torch_dtype(cfg.dtype),
        "trust_remote_code": trust,
        "output_loading_info": True,
    }
    if cfg.quantization != "none":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=cfg.quantization,
            bnb_4bit_compute_dtype=torch_dtype(cfg.dtype),
            # equal to the training dtype, so ZeRO-3 can partition the quantized weights
            bnb_4bit_quant_storage=torch_dtype(cfg.dtype),
        )
    # Under ZeRO-3 (distributed.configure) this loads each rank's partition only; a 4-bit
    # model loads whole (4-bit) on each rank and is partitioned by deepspeed.initialize.
    source = path
    if gguf:
        # transformers dequantizes every GGUF tensor to ``dtype`` on the host, then loads
        # the result like any checkpoint (partitioned under ZeRO-3, quantized to 4 bits
        # again under model.quantization)
        kwargs["gguf_file"] = path.name
        path = path.parent
        log.info("loading GGUF %s (dequantized to %s)", source, cfg.dtype)
        auto = AutoModelForCausalLM  # a GGUF file holds a LLaMA-family decoder (check_gguf)
    else:  # a folder says what it holds
        try:
            hf_config = AutoConfig.from_pretrained(path, trust_remote_code=trust)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ConfigError(
                f"config key 'model.path': {path / 'config.json'} is not a model config "
                f"transformers can read ({type(e).__name__}: {_short(e)})"
            ) from e
        auto = model_class(hf_config)
    try:
        model, info = auto.from_pretrained(path, **kwargs)
    except torch.OutOfMemoryError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError, TypeError) as e:
        what = "a GGUF checkpoint" if gguf else "a model folder"
        raise ConfigError(
            f"config key 'model.path': {source} could not be loaded as {what} "
            f"({type(e).__name__}: {_short(e)})"
        ) from e
    check_loaded(model, info, source)
    model.eval()
    return model, tokenizer


def check_model_files(cfg: ModelConfig) -> None:
    """The backbone's checks that read no weights (seconds at most): the model path
    resolves, a GGUF header matches its tensors (:func:`check_gguf`), no folder names code
    of its own without ``model.trust_remote_code`` (:func:`check_remote_code`).
    :func:`load_backbone` runs them first; a caller can run them before it binds a run
    folder, so a bad model file fails the start without leaving anything behind.

    Raises:
        ConfigError: as :func:`load_backbone`.
    """
    if cfg.builder == "demo":
        return
    path = resolve_model_path(cfg.path or "")
    _check_files(path, Path(cfg.tokenizer) if cfg.tokenizer else None, cfg.trust_remote_code)


def _check_files(path: Path, tok_folder: Path | None, trust: bool) -> None:
    gguf = path.suffix == ".gguf"
    if gguf:
        # the header against the tensors, before any allocation (and before a conversion)
        check_gguf(path, need_tokenizer=tok_folder is None)
    # foreign code is refused before anything is read with transformers
    check_remote_code([p for p in (tok_folder, None if gguf else path) if p], trust)


@contextlib.contextmanager
def startup_signals() -> Iterator[None]:
    """While the backbone loads, a SIGTERM ends the process: exit 75 (preempted: run the
    same command again), after a line on stderr.

    ``sapt-train`` turns SIGTERM into a flag that the training loop polls at step
    boundaries (distributed/preemption.py); nothing polls it while a model loads, so a
    signal would wait for the end of the load. Python runs a signal handler between
    bytecodes, so it is acted on within a pure-Python loop (transformers' GGUF name
    mapping); a long call into C (one tensor read) finishes first. The exit is a
    ``SystemExit`` (``except Exception`` does not catch it; the run folder's lock is an
    flock the OS releases). A signal that came earlier in start-up (the flag is set) ends
    it on entry. Where SIGTERM has no Python handler (the default action ends the process;
    or it is ignored on purpose) or outside the main thread, nothing changes.
    """
    from sapt_dist.distributed import preemption

    def stop(when: str) -> None:
        print(
            f"sapt: SIGTERM {when} loading the backbone: stopped before training (nothing to "
            f"save); run the same command to start again (exit {preemption.EXIT_PREEMPTED})",
            file=sys.stderr,
            flush=True,
        )
        raise SystemExit(preemption.EXIT_PREEMPTED)

    prev = signal.getsignal(signal.SIGTERM)
    if threading.current_thread() is not threading.main_thread() or not callable(prev):
        yield
        return
    if preemption.requested_locally() == "SIGTERM":
        stop("before")

    def handler(signum: int, frame: Any) -> None:
        prev(signum, frame)  # the flag too, for whoever reads it
        stop("while")

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, prev)


def resolve_model_path(spec: str) -> Path:
    """``model.path`` as a local path: a Hugging Face model folder, a ``.gguf`` file, or
    the name of a model ``sapt-models`` knows (fetched into the cache on first use).

    Raises:
        ConfigError: naming ``model.path`` when it is none of these.
    """
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path
    if (path / "config.json").is_file():
        return path
    from sapt_dist.backbone import registry

    if spec in registry.KNOWN:
        with distributed.rank0_first():  # one rank downloads, the others find it cached
            return registry.ensure(spec)
    if path.is_dir():
        why = "a folder without config.json (not a Hugging Face model folder)"
    elif path.exists():
        why = "a file that is not a .gguf checkpoint"
    else:
        why = "no such file or folder"
    raise ConfigError(
        f"config key 'model.path': {spec!r} is {why}; give a Hugging Face model folder, a "
        f".gguf file, or a model name sapt-models knows ({', '.join(sorted(registry.KNOWN))})"
    )


def gguf_as_folder(path: Path) -> Path:
    """The GGUF file dequantized (fp32) into a safetensors model folder, made once and kept
    in the model cache, keyed by the file's name, size and modification time."""
    from sapt_dist.backbone.registry import cache_dir, convert

    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()
    out = cache_dir() / "converted" / f"{path.stem}-{key[:12]}"
    if not (out / "config.json").is_file():
        log.info("converting %s once to a safetensors folder %s", path, out)
        out.parent.mkdir(parents=True, exist_ok=True)
        convert(path, out)
    return out
