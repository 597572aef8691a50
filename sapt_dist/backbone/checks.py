"""Checks of a model's files that read no weights, and of a loaded model: no code of the
folder's own runs without ``model.trust_remote_code`` (:func:`check_remote_code`), a GGUF
header is checked against its tensors and the file's size before anything is allocated
(:func:`check_gguf`, with a reader of its own bounded by the file), and a loaded model holds
every weight its architecture expects (:func:`check_loaded`). Used by ``backbone.load``
and ``backbone.registry`` (which converts GGUF files)."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

from sapt_dist.config import ConfigError

log = logging.getLogger(__name__)


def _short(e: BaseException, limit: int = 400) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[:limit] + " ..."


#: The files of a model or tokenizer folder that can name code for transformers to import
REMOTE_CODE_FILES = ("config.json", "tokenizer_config.json")


def check_remote_code(folders: list[Path], trust: bool) -> None:
    """Refuse folders whose ``config.json`` / ``tokenizer_config.json`` name code of their
    own (an ``auto_map``) unless ``model.trust_remote_code`` is true.

    transformers asks "run the custom code? [y/N]" on such a folder unless told: whatever
    stdin holds would answer (a batch job's stdin is not the user). Every ``from_pretrained``
    of the backbone also passes ``trust_remote_code`` explicitly, so transformers never asks.

    Raises:
        ConfigError: naming the file and ``model.trust_remote_code``.
    """
    for folder in folders:
        for name in REMOTE_CODE_FILES:
            f = Path(folder) / name
            if not f.is_file():
                continue
            try:
                body = json.loads(f.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
                raise ConfigError(
                    f"config key 'model.path': {f} is not readable JSON ({type(e).__name__}: "
                    f"{_short(e, 200)})"
                ) from e
            auto_map = body.get("auto_map") if isinstance(body, dict) else None
            if not auto_map:
                continue
            if trust:
                log.warning(
                    "model.trust_remote_code is true: transformers may import and run the "
                    "code %s names (%s)",
                    f,
                    _short(ValueError(auto_map), 200),
                )
                continue
            raise ConfigError(
                f"config key 'model.trust_remote_code': {f} has an 'auto_map' (it names code "
                f"of its own to run: {_short(ValueError(auto_map), 200)}); sapt-train never runs "
                "a model folder's code unless told. Set model.trust_remote_code=true only for "
                "a folder whose code you have read and trust: it runs with your permissions"
            )


def check_loaded(model: Any, info: dict, source: Path) -> None:
    """A model loads whole or not at all: every weight the architecture expects came from
    ``source`` (``info``: transformers' ``output_loading_info``). The one exception is a
    tied weight (``tie_word_embeddings``: the output layer is the input embedding, saved
    once), which transformers ties instead of loading.

    Raises:
        ConfigError: naming the file and the first missing (or unexpected, or mismatched)
            weights.
    """
    tied = set(getattr(model, "all_tied_weights_keys", None) or ())
    missing = sorted(set(info.get("missing_keys") or ()) - tied)
    unexpected = sorted(info.get("unexpected_keys") or ())
    mismatched = sorted(str(k) for k in info.get("mismatched_keys") or ())
    errors = [str(e) for e in info.get("error_msgs") or ()]
    problems = []
    for what, keys in (
        ("lacks weights the model needs", missing),
        ("holds weights the model does not have", unexpected),
        ("holds weights of the wrong shape", mismatched),
        ("could not be loaded", errors),
    ):
        if keys:
            more = f" (and {len(keys) - 5} more)" if len(keys) > 5 else ""
            problems.append(f"{what}: {', '.join(keys[:5])}{more}")
    if problems:
        raise ConfigError(
            f"config key 'model.path': {source} {'; '.join(problems)}. A model is loaded whole "
            "or not at all (a missing weight would start random): the file is incomplete, "
            "damaged or of another architecture; fetch or convert it again"
        )


#: GGUF architectures this loader accepts: LLaMA-family decoders transformers dequantizes
GGUF_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")


class _GGUFArray:
    """A header array, skipped over: its item type and length only."""

    __slots__ = ("count", "item_type")

    def __init__(self, item_type: int, count: int) -> None:
        self.item_type, self.count = item_type, count


class _GGUFTensor:
    __slots__ = ("dims", "end", "name", "type")

    def __init__(self, name: str, dims: tuple[int, ...], type_: int, end: int) -> None:
        self.name, self.dims, self.type, self.end = name, dims, type_, end

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(reversed(self.dims))  # GGUF lists dimensions innermost first


#: GGUF value types: struct format of the scalar ones (8: string, 9: array)
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q"}
_GGUF_SCALARS.update({11: "q", 12: "d"})


def read_gguf_header(path: Path) -> tuple[dict[str, Any], dict[str, _GGUFTensor], int]:
    """A GGUF file's key-value header and tensor table, read without building anything:
    scalars are kept, arrays only as their item type and length (string arrays are walked,
    not kept), each tensor as its name, dimensions, type and end offset. Every length is
    checked against the file's size before it is used, so a lying count or length is an
    error, never an allocation. Memory: one small record per key and per tensor (each takes
    at least 24 bytes of the file), so at most a few times the file's header size.

    Returns ``(keys, tensors, file_size)``.

    Raises:
        ValueError: the file is not a GGUF file, or its header runs past its end.
    """
    import mmap
    import struct

    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size < 24:
            raise ValueError(f"{size} bytes: too short for a GGUF header")
        buf = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        if buf[:4] != b"GGUF":
            raise ValueError("GGUF magic invalid")
        order = "<"
        (version,) = struct.unpack_from("<I", buf, 4)
        if version & 0xFFFF == 0:  # written on a machine of the other byte order
            order = ">"
            (version,) = struct.unpack_from(">I", buf, 4)
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} is not supported")
        pos = 8

        def take(fmt: str) -> Any:
            nonlocal pos
            n = struct.calcsize(order + fmt)
            if pos + n > size:
                raise ValueError(f"header runs past the end of the file at byte {pos}")
            (v,) = struct.unpack_from(order + fmt, buf, pos)
            pos += n
            return v

        def skip_string() -> int:
            """Past a length-prefixed string, checked against the file's end; its start."""
            nonlocal pos
            n = take("Q")
            if n > size - pos:
                raise ValueError(f"a string of {n} bytes at byte {pos} runs past the file's end")
            pos += n
            return pos - n

        def string() -> str:
            start = skip_string()
            return bytes(buf[start:pos]).decode("utf-8", errors="replace")

        def value(vtype: int) -> Any:
            nonlocal pos
            if vtype in _GGUF_SCALARS:
                return take(_GGUF_SCALARS[vtype])
            if vtype == 8:
                return string()
            if vtype != 9:
                raise ValueError(f"unknown value type {vtype} at byte {pos}")
            item, count = take("I"), take("Q")
            if item in _GGUF_SCALARS:
                n = struct.calcsize(_GGUF_SCALARS[item]) * count
                if n > size - pos:
                    raise ValueError(f"an array of {count} items runs past the file's end")
                pos += n
            elif item == 8:
                if 8 * count > size - pos:
                    raise ValueError(f"an array of {count} strings runs past the file's end")
                for _ in range(count):
                    skip_string()
            elif item == 9:
                if 12 * count > size - pos:
                    raise ValueError(f"an array of {count} arrays runs past the file's end")
                for _ in range(count):
                    value(9)
            else:
                raise ValueError(f"unknown array item type {item} at byte {pos}")
            return _GGUFArray(item, count)

        n_tensors, n_keys = take("Q"), take("Q")
        # each key takes >= 12 bytes, each tensor's record >= 24: a count the file cannot
        # hold is refused before a loop runs on it
        if 12 * n_keys + 24 * n_tensors > size - pos:
            raise ValueError(
                f"the header claims {n_keys} keys and {n_tensors} tensors, more "
                f"than {size} bytes can hold"
            )
        keys: dict[str, Any] = {}
        for _ in range(n_keys):
            key = string()
            keys[key] = value(take("I"))
        infos = []
        for _ in range(n_tensors):
            name = string()
            n_dims = take("I")
            if n_dims > 8:
                raise ValueError(f"tensor {name}: {n_dims} dimensions")
            dims = tuple(take("Q") for _ in range(n_dims))
            infos.append((name, dims, take("I"), take("Q")))
        align = keys.get("general.alignment", 32)
        if not isinstance(align, int) or align < 1 or align & (align - 1):
            raise ValueError(f"general.alignment {align!r} is not a power of two")
        data_start = -(-pos // align) * align
        tensors: dict[str, _GGUFTensor] = {}
        for name, dims, type_, offset in infos:
            try:
                block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(type_)]
            except (ValueError, KeyError):
                raise ValueError(f"tensor {name}: unknown type {type_}") from None
            n = math.prod(dims)
            if n % block:
                raise ValueError(f"tensor {name}: {n} elements are not whole blocks of {block}")
            if name in tensors:
                raise ValueError(f"tensor {name} is listed twice")
            tensors[name] = _GGUFTensor(
                name, dims, type_, data_start + offset + n // block * type_size
            )
        return keys, tensors, size
    finally:
        buf.close()


def check_gguf(path: Path, need_tokenizer: bool = False) -> str:
    """Check a GGUF file before anything is built from it and return its architecture.

    The header's claims are checked against the tensors the file holds: every tensor lies
    inside the file; ``block_count`` is the number of ``blk.N`` blocks present; every
    tensor the header implies (embedding, output norm, each block's attention, MLP and
    norms) is present with the shape the header's width, MLP width, heads and vocabulary
    give (``output.weight`` may be absent: the tied-embedding case, which transformers
    ties). So the model transformers then builds is exactly as large as the weights in the
    file, and a lying header (a 4096-block claim, an 8192-wide model in a 3 MB file, a 4M
    vocabulary) is refused here. It reads the header only (:func:`read_gguf_header`): the
    time and memory it takes are bounded by the file's header, never by what it claims.

    ``need_tokenizer``: the run reads its tokenizer from the file, which must hold one.

    Raises:
        ConfigError: naming the file (and the claim or tensor) when it is not a readable
            GGUF file, holds an architecture other than :data:`GGUF_ARCHITECTURES`, lacks a
            tensor or a tokenizer, or its header does not match its tensors.
    """
    bad = f"config key 'model.path': {path}"
    try:
        keys, tensors, size = read_gguf_header(path)
    except (OSError, ValueError, OverflowError, ImportError) as e:
        raise ConfigError(
            f"{bad} is not a readable GGUF file ({type(e).__name__}: {_short(e, 200)}); "
            "fetch it again"
        ) from e
    arch = keys.get("general.architecture")
    if not isinstance(arch, str):
        raise ConfigError(f"{bad} is not a readable GGUF file (no general.architecture)")
    if arch not in GGUF_ARCHITECTURES:
        raise ConfigError(
            f"{bad} holds a {arch!r} model; GGUF loading supports "
            f"the LLaMA-family decoders {list(GGUF_ARCHITECTURES)}"
        )
    for t in tensors.values():
        if t.end > size:
            raise ConfigError(
                f"{bad}: tensor {t.name} ends at byte {t.end}, past the file's end ({size} "
                "bytes): the file is cut short or its header lies; fetch it again"
            )

    def number(key: str, default: int | None = None) -> int:
        v = keys.get(key, default)
        if v is None:
            raise ConfigError(f"{bad} has no {key!r} in its header")
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"{bad}: header key {key!r} is {v!r}, not a positive integer")
        return v

    # the block count first: transformers' GGUF name mapping is quadratic in it
    n_blocks = number(f"{arch}.block_count")
    present = set()
    for name in tensors:
        parts = name.split(".")
        if parts[0] == "blk" and len(parts) > 2 and parts[1].isdigit():
            present.add(int(parts[1]))
    if present != set(range(n_blocks)):
        have = f"blocks {min(present)}-{max(present)} ({len(present)})" if present else "none"
        raise ConfigError(
            f"{bad}: the header says {arch}.block_count={n_blocks}, the file holds tensors of "
            f"{have}: the header does not match the weights (a damaged or forged file)"
        )
    tokens = keys.get("tokenizer.ggml.tokens")
    if need_tokenizer:
        for key in ("tokenizer.ggml.model", "tokenizer.ggml.tokens"):
            if key not in keys:
                raise ConfigError(
                    f"{bad} holds no tokenizer (no {key!r} key): give the model's tokenizer "
                    "folder with model.tokenizer=<folder>"
                )
        if not isinstance(tokens, _GGUFArray) or tokens.item_type != 8:
            raise ConfigError(f"{bad}: tokenizer.ggml.tokens is not a list of strings")
    # the dimensions as transformers' GGUF config mapping reads them
    e = number(f"{arch}.embedding_length")
    f = number(f"{arch}.feed_forward_length")
    h = number(f"{arch}.attention.head_count")
    kv = number(f"{arch}.attention.head_count_kv", h)
    if f"{arch}.vocab_size" in keys:
        vocab, vocab_from = number(f"{arch}.vocab_size"), f"{arch}.vocab_size"
    elif isinstance(tokens, _GGUFArray):
        vocab, vocab_from = tokens.count, "the length of tokenizer.ggml.tokens"
    else:
        raise ConfigError(
            f"{bad}: the header gives no vocabulary size ({arch}.vocab_size or a token list)"
        )
    if isinstance(tokens, _GGUFArray) and need_tokenizer and tokens.count > vocab:
        raise ConfigError(
            f"{bad}: its tokenizer has {tokens.count} tokens, the model's vocabulary "
            f"({vocab_from}) {vocab}: the header does not match the weights"
        )
    if h % kv:
        raise ConfigError(f"{bad}: {h} attention heads is not a multiple of {kv} KV heads")
    if arch in ("llama", "mistral") and f"{arch}.rope.dimension_count" in keys:
        head_dim = number(f"{arch}.rope.dimension_count")  # transformers' head_dim
    elif arch == "qwen3":
        from transformers import Qwen3Config

        head_dim = int(Qwen3Config().head_dim)  # transformers keeps its default
    elif e % h:
        raise ConfigError(f"{bad}: embedding_length {e} is not a multiple of {h} heads")
    else:
        head_dim = e // h
    claims = (
        f"embedding_length={e}, feed_forward_length={f}, head_count={h}, head_count_kv={kv}, "
        f"head_dim={head_dim}, vocabulary {vocab} from {vocab_from}"
    )
    expected: dict[str, tuple[int, ...]] = {
        "token_embd.weight": (vocab, e),
        "output_norm.weight": (e,),
        "output.weight": (vocab, e),
    }
    optional = {"output.weight"}  # absent: tied to token_embd (transformers ties it)
    q, k = h * head_dim, kv * head_dim
    block = {
        "attn_norm.weight": (e,),
        "ffn_norm.weight": (e,),
        "attn_q.weight": (q, e),
        "attn_k.weight": (k, e),
        "attn_v.weight": (k, e),
        "attn_output.weight": (e, q),
        "ffn_gate.weight": (f, e),
        "ffn_up.weight": (f, e),
        "ffn_down.weight": (e, f),
    }
    if arch == "qwen2":
        block.update({"attn_q.bias": (q,), "attn_k.bias": (k,), "attn_v.bias": (k,)})
    if arch == "qwen3":
        block.update({"attn_q_norm.weight": (head_dim,), "attn_k_norm.weight": (head_dim,)})
    for i in range(n_blocks):
        expected.update({f"blk.{i}.{n}": shape for n, shape in block.items()})
    missing = [n for n in expected if n not in tensors and n not in optional]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise ConfigError(
            f"{bad} lacks tensors the model needs: {', '.join(missing[:5])}{more}. A model "
            "is loaded whole or not at all (a missing weight would start random): the file "
            "is incomplete or damaged; fetch it again"
        )
    for name, shape in expected.items():
        if name in tensors and tensors[name].shape != shape:
            raise ConfigError(
                f"{bad}: tensor {name} has shape {list(tensors[name].shape)}, the header "
                f"({claims}) implies {list(shape)}: the header does not match the weights "
                "(a damaged or forged file)"
            )
    return arch
