"""Atomic writes: a reader (or a killed job) sees the old file or the new one, never half."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

__all__ = [
    "UnreadableFileError",
    "atomic_dir",
    "atomic_write_json",
    "atomic_write_jsonl",
    "atomic_write_text",
    "atomic_file",
    "atomic_write_checked_json",
    "checksum_files",
    "read_checked_json",
    "read_json",
    "recover_dir",
    "sha256_file",
    "verify_checksums",
]


class UnreadableFileError(ValueError):
    """A file the run wrote itself cannot be read back (truncated, not JSON / UTF-8);
    the message names it and what to do."""


def read_json(path: str | Path, what_to_do: str = "") -> Any:
    """``json.loads`` of a file the run wrote, or :class:`UnreadableFileError` naming it."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        tail = f"; {what_to_do}" if what_to_do else ""
        raise UnreadableFileError(f"{path}: damaged, not valid JSON ({e}){tail}") from e


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
        with os.fdopen(fd, mode) as f:
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


def read_checked_json(path: str | Path, what_to_do: str = "") -> dict:
    """A file of :func:`atomic_write_checked_json` without its ``sha256`` key, verified
    against it; :class:`UnreadableFileError` naming the file when it is damaged, not a
    JSON object or does not match. A file without the key (written by an older version)
    is read unverified."""
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
    return data


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
) -> None:
    """Every file of ``sums`` exists in ``folder`` with its sha256, else ``error`` naming
    the file, the list it is checked against (``listed_in``) and ``advice`` (what to do).

    ``foreign_hint``: when every one of several files mismatches, the list belongs to
    other files (a manifest copied from another run): one message says so."""
    folder = Path(folder)
    tail = f"; {advice}" if advice else ""
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
