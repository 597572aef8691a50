"""Atomic writes: a reader (or a killed job) sees the old file or the new one, never half."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

__all__ = [
    "CHECKSUMS",
    "NUMBER",
    "SHA256",
    "Match",
    "UnreadableFileError",
    "atomic_dir",
    "atomic_write_json",
    "atomic_write_jsonl",
    "atomic_write_text",
    "atomic_file",
    "atomic_write_checked_json",
    "check_shape",
    "checksum_files",
    "nonempty",
    "read_checked_json",
    "read_json",
    "recover_dir",
    "save_safetensors",
    "sha256_file",
    "verify_checksums",
    "writing",
]


class UnreadableFileError(ValueError):
    """A file the run wrote itself cannot be read back (truncated, not JSON / UTF-8);
    the message names it and what to do."""


# ------------------------------------------------------------------ shapes of JSON files
#: a JSON number (an int or a float; never true/false)
NUMBER = (int, float)


@dataclasses.dataclass(frozen=True)
class Match:
    """A string matching ``pattern`` (whole), described as ``what`` in an error."""

    pattern: str
    what: str


@dataclasses.dataclass(frozen=True)
class _NonEmpty:
    inner: Any


def nonempty(schema: Any) -> Any:
    """``schema``, and the list or object must hold at least one item."""
    return _NonEmpty(schema)


#: a sha256 as the run writes it
SHA256 = Match(r"[0-9a-f]{64}", "a sha256 (64 lowercase hex digits)")
#: the checksum list of a checked folder: ``{file name: sha256}``, never empty (an empty
#: list would check nothing)
CHECKSUMS = nonempty({str: SHA256})

_NAMES = {
    dict: "an object",
    list: "a list",
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "true/false",
    type(None): "null",
}


def _kind(value: Any) -> str:
    for tp in (bool, int, float, str, list, dict, type(None)):
        if isinstance(value, tp):
            return _NAMES[tp]
    return type(value).__name__


def _mismatch(data: Any, schema: Any, where: str) -> str | None:
    """What is wrong with ``data`` against ``schema`` (``None``: nothing).

    A schema is ``object`` (anything), a type or tuple of types (``float`` takes ints too,
    ``int`` never takes true/false, ``None`` is null), a :class:`Match`, ``[item]`` (a list
    of items), ``{str: value}`` (an object of any names), ``{"key": value, "opt?": value}``
    (an object with these keys, ``?`` marks an optional one; others are allowed), or
    :func:`nonempty` of one of these. Only as deep as the schema: data below an ``object``
    is not walked."""
    here = where or "the file's content"
    if schema is object:
        return None
    if isinstance(schema, _NonEmpty):
        problem = _mismatch(data, schema.inner, where)
        if problem is None and len(data) == 0:
            return f"{here} is empty"
        return problem
    if isinstance(schema, Match):
        if not isinstance(data, str) or not re.fullmatch(schema.pattern, data):
            return f"{here} must be {schema.what}, not {_short_repr(data)}"
        return None
    if isinstance(schema, tuple):
        alternatives = _flat(schema)
        if not all(a is None or isinstance(a, type) for a in alternatives):
            problems = [_mismatch(data, a, where) for a in alternatives]
            return None if None in problems else problems[0]
    if schema is None or isinstance(schema, (type, tuple)):
        types = _flat(schema) if isinstance(schema, tuple) else (schema,)
        types = tuple(type(None) if t is None else t for t in types)
        ok = any(
            isinstance(data, t) and not (isinstance(data, bool) and t is not bool)
            for t in types + ((int,) if float in types else ())
        )
        if not ok:
            want = " or ".join(_NAMES.get(t, t.__name__) for t in types)
            return f"{here} must be {want}, not {_kind(data)}"
        return None
    if isinstance(schema, list):
        if not isinstance(data, list):
            return f"{here} must be a list, not {_kind(data)}"
        for i, item in enumerate(data):
            problem = _mismatch(item, schema[0], f"{where}[{i}]")
            if problem:
                return problem
        return None
    if isinstance(schema, dict):
        if not isinstance(data, dict):
            return f"{here} must be an object, not {_kind(data)}"
        if list(schema) == [str]:
            for k, v in data.items():
                problem = _mismatch(v, schema[str], f"{where}[{k!r}]")
                if problem:
                    return problem
            return None
        for key, sub in schema.items():
            name = key.removesuffix("?")
            if name not in data:
                if key.endswith("?"):
                    continue
                return f"{here} has no key {name!r}"
            problem = _mismatch(data[name], sub, f"{where}[{name!r}]" if where else repr(name))
            if problem:
                return problem
        return None
    raise TypeError(f"not a schema: {schema!r}")


def _flat(alternatives: tuple) -> tuple:
    out: tuple = ()
    for a in alternatives:
        out += _flat(a) if isinstance(a, tuple) else (a,)
    return out


def _short_repr(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def check_shape(
    data: Any,
    schema: Any,
    path: str | Path,
    what_to_do: str = "",
    error: type[Exception] = UnreadableFileError,
) -> Any:
    """``data`` (read from ``path``) if it has the shape ``schema`` describes, else
    ``error`` naming the file and the first key that is wrong (see :func:`_mismatch` for
    the notation). Returns ``data``."""
    problem = _mismatch(data, schema, "")
    if problem:
        tail = f"; {what_to_do}" if what_to_do else ""
        raise error(f"{path}: damaged, {problem}{tail}")
    return data


def read_json(path: str | Path, what_to_do: str = "", schema: Any = object) -> Any:
    """``json.loads`` of a file the run wrote, checked against ``schema``
    (:func:`check_shape`), or :class:`UnreadableFileError` naming it."""
    path = Path(path)
    tail = f"; {what_to_do}" if what_to_do else ""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, huge ints
        raise UnreadableFileError(f"{path}: damaged, not valid JSON ({_short(e)}){tail}") from e
    return check_shape(data, schema, path, what_to_do)


def _short(e: BaseException, limit: int = 300) -> str:
    text = str(e) or type(e).__name__
    return text if len(text) <= limit else text[:limit] + " ..."


@contextlib.contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """Name ``path`` in a full disk's error raised inside the block: an ``OSError``
    (ENOSPC) without a file name, or a library's own error that says so (safetensors'
    ``SafetensorError ... No space left on device``), becomes
    ``OSError(ENOSPC, ..., path)``, which the command line reports in one line."""
    try:
        yield
    except OSError as e:
        if e.errno == errno.ENOSPC and not e.filename:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from e
        raise
    except Exception as e:
        text = str(e)
        if "No space left on device" in text or "os error 28" in text:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from e
        raise


def save_safetensors(tensors: dict[str, Any], path: str | Path, shown_as: str | Path = "") -> None:
    """``safetensors.torch.save_file`` with a full disk named (:func:`writing`):
    ``shown_as`` is the file the user knows (the final name of a file written into an
    :func:`atomic_dir` temporary folder)."""
    from safetensors.torch import save_file

    with writing(shown_as or path):
        save_file(tensors, str(path))


def _umask() -> int:
    """The process's umask (``/proc/self/status`` where there is one: setting the umask to
    read it would race with other threads' file creation)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    old = os.umask(0o022)
    os.umask(old)
    return old


def _as_created(path: str | Path, is_dir: bool = False) -> None:
    """Give a ``tempfile`` file (0600) or folder (0700) the mode ``open`` / ``mkdir`` would
    have given it under the umask (0644 / 0755 under 0022): a report written atomically is
    as readable as one written directly."""
    os.chmod(path, (0o777 if is_dir else 0o666) & ~_umask())


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "w") -> Iterator[IO]:
    """Open a temporary sibling of ``path`` for writing; when the block ends it is flushed,
    fsynced and renamed onto ``path`` (a reader sees the old file or the new one, never a
    part). On an error the temporary file is removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        _as_created(tmp)
        with writing(path), os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_file(path) as f:
        f.write(text)


def atomic_write_json(path: str | Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def _json_digest(body: dict) -> str:
    return hashlib.sha256(
        json.dumps(body, sort_keys=True, separators=(",", ":")).encode("utf-8")
    ).hexdigest()


def atomic_write_jsonl(path: str | Path, rows: list[dict]) -> None:
    """One JSON object per line (UTF-8, not ASCII-escaped), atomically."""
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def atomic_write_checked_json(path: str | Path, data: dict) -> None:
    """Write ``data`` atomically with a ``sha256`` key over the rest of it (canonical JSON),
    so :func:`read_checked_json` can tell an edited or damaged file from the one written."""
    body = {k: v for k, v in data.items() if k != "sha256"}
    atomic_write_json(path, {**body, "sha256": _json_digest(body)})


def read_checked_json(path: str | Path, what_to_do: str = "", schema: Any = object) -> dict:
    """A file of :func:`atomic_write_checked_json` without its ``sha256`` key, verified
    against it and then against ``schema`` (:func:`check_shape`);
    :class:`UnreadableFileError` naming the file when it is damaged, not a JSON object,
    does not match or has another shape. A file without the key (written by an older
    version) is read unverified (its shape still checked)."""
    path = Path(path)
    data = read_json(path, what_to_do)
    tail = f"; {what_to_do}" if what_to_do else ""
    if not isinstance(data, dict):
        raise UnreadableFileError(f"{path}: damaged, not a JSON object{tail}")
    want = data.pop("sha256", None)
    if want is not None and _json_digest(data) != want:
        raise UnreadableFileError(
            f"{path}: damaged, does not match the sha256 it was written with (edited?){tail}"
        )
    return check_shape(data, schema, path, what_to_do)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces ``path``.

    If the process dies inside the block, ``path`` is untouched. The swap keeps a
    complete copy at all times (``path`` or ``path.old``); :func:`recover_dir` on the next
    start puts ``path.old`` back if the swap itself was interrupted.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(path)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        _as_created(tmp, is_dir=True)
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = path.with_name(path.name + ".old")
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def recover_dir(path: str | Path, clean_tmp: bool = False) -> None:
    """Finish or undo an interrupted :func:`atomic_dir` swap of ``path``; with
    ``clean_tmp`` also remove temporary folders a killed writer left beside it (only where
    no writer can be running: a run folder's start, under its lock)."""
    path = Path(path)
    if clean_tmp and path.parent.is_dir():
        for tmp in path.parent.glob(f".{path.name}.*.tmp"):
            shutil.rmtree(tmp, ignore_errors=True)
    old = path.with_name(path.name + ".old")
    if old.exists():
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            # another rank of the same run may have repaired it first
            with contextlib.suppress(FileNotFoundError):
                os.replace(old, path)


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ------------------------------------------------------------------ checked folders
def checksum_files(folder: str | Path, names: list[str] | None = None) -> dict[str, str]:
    """``{file name: sha256}`` of ``names`` in ``folder`` (default: every file in it, in
    name order): the checksum list a checked folder (blocks, step checkpoint) carries."""
    folder = Path(folder)
    if names is None:
        names = sorted(f.name for f in folder.iterdir() if f.is_file())
    return {n: sha256_file(folder / n) for n in names}


def verify_checksums(
    folder: str | Path,
    sums: dict[str, str],
    error: type[Exception],
    listed_in: str | Path,
    advice: str = "",
    foreign_hint: bool = False,
    required: Iterable[str] = (),
) -> None:
    """Every file of ``sums`` exists in ``folder`` with its sha256, else ``error`` naming
    the file, the list it is checked against (``listed_in``) and ``advice`` (what to do).

    The list itself is checked first: an object of plain file names to sha256s, never
    empty (an empty or malformed list is damage, not "nothing to check"), naming every
    file of ``required``.

    ``foreign_hint``: when every one of several files mismatches, the list belongs to
    other files (a manifest copied from another run): one message says so."""
    folder = Path(folder)
    tail = f"; {advice}" if advice else ""
    problem = _mismatch(sums, CHECKSUMS, "its checksum list")
    if problem:
        raise error(f"{listed_in}: damaged, {problem} (it must list every file){tail}")
    for name in sums:
        if not name or "/" in name or "\\" in name or name in (".", ".."):
            raise error(f"{listed_in}: damaged, {name!r} is not a file name of {folder}{tail}")
    for name in required:
        if name not in sums:
            raise error(
                f"{listed_in}: damaged, {folder / name} is not in its checksum list (every "
                f"file of the folder must be){tail}"
            )
    wrong = []
    for name, digest in sums.items():
        path = folder / name
        if not path.is_file():
            raise error(f"{path}: missing (listed in {listed_in}){tail}")
        if sha256_file(path) != digest:
            wrong.append(path)
    if foreign_hint and wrong and len(wrong) == len(sums) > 1:
        raise error(
            f"{listed_in} does not belong to the files beside it: none of its {len(sums)} "
            f"checksums match (a manifest from another run?){tail}"
        )
    if wrong:
        raise error(
            f"{wrong[0]} does not match its sha256 in {listed_in} (checksum mismatch: the "
            f"file was changed or is damaged){tail}"
        )
