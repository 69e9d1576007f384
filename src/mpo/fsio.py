"""Atomic file output: write to a temporary sibling, fsync, then rename.

A reader (or a resumed run) therefore sees either the old file or the complete new one, never a torn one.
Folders are built the same way (:func:`staged_dir`, :func:`replace_dir`): written beside their final name, then
renamed into place.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_write_bytes", "atomic_write_text", "atomic_write_json", "atomic_write_jsonl", "replace_dir",
           "replaceable_dir", "staged_dir"]


def _umask() -> int:
    """The process umask. ``os.umask`` can only read it by setting it, and for that instant another thread creating
    a file would get the wrong mode; Linux shows it in /proc/self/status (since 4.7), so that is read first."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _file_mode(path: Path) -> int:
    """The mode the new ``path`` gets: the replaced file's own, else what ``open(path, "w")`` would give (mkstemp
    makes 0600, which would hide a run's config.yaml or manifest.json from a colleague who can read its
    metrics.jsonl)."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        return 0o666 & ~_umask()


@contextlib.contextmanager
def _atomic_file(path: Path, mode: str) -> Iterator[IO]:
    """Open a temporary sibling of ``path``; on success fsync it and rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, _file_mode(path))
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with _atomic_file(Path(path), "wb") as fh:
        fh.write(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any, indent: int | None = 2) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def atomic_write_jsonl(path: str | Path, rows: Iterable[Any]) -> int:
    """Write rows as JSON lines atomically; returns the number of rows."""
    n = 0
    with _atomic_file(Path(path), "w") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def replace_dir(tmp_dir: str | Path, final_dir: str | Path) -> None:
    """Move a fully written folder into place: rename is atomic on one filesystem.

    An existing ``final_dir`` is first renamed into a fresh hidden folder beside it (``.NAME.old-XXXXXXXX``,
    unique, so no folder of the user's is ever taken for it), then deleted once the new folder is in place. If
    the second rename fails, the old folder is put back. ``final_dir`` itself is replaced: if it is a symbolic
    link, the link (not its target) gives way to the folder; :func:`replaceable_dir` resolves links first for
    callers that mean the target. A ``final_dir`` that is a file is refused.
    """
    tmp_dir, final_dir = Path(tmp_dir), Path(final_dir)
    if not os.path.lexists(final_dir):
        os.replace(tmp_dir, final_dir)
        _fsync_dir(final_dir.parent)
        return
    if not final_dir.is_symlink() and not final_dir.is_dir():
        raise NotADirectoryError(f"{final_dir}: exists and is not a folder; refusing to replace it")
    trash = Path(tempfile.mkdtemp(prefix=f".{final_dir.name}.old-", dir=final_dir.parent))
    old = trash / final_dir.name
    try:
        os.replace(final_dir, old)
    except BaseException:
        trash.rmdir()
        raise
    try:
        os.replace(tmp_dir, final_dir)
    except BaseException:
        os.replace(old, final_dir)  # should this fail too, the old folder is still whole, in `trash`
        trash.rmdir()
        raise
    _fsync_dir(final_dir.parent)
    shutil.rmtree(trash)


def replaceable_dir(path: str | Path) -> Path:
    """The real folder that ``path`` names, checked before anything is built for :func:`staged_dir`.

    Symbolic links are followed: ``mpo data demo link`` where ``link`` points to an earlier demo replaces that demo
    and the link keeps pointing at it. Raises NotADirectoryError if ``path`` (or a folder on the way) is a file,
    FileExistsError if it is the current folder or one above it (renaming it away would leave the shell in a
    deleted folder). Whether an existing folder may be replaced (its marker file) is the caller's check.
    """
    path = Path(path)
    real = path.resolve()
    existing = next(p for p in (real, *real.parents) if p.exists())
    if not existing.is_dir():
        what = "exists and is not a folder" if existing == real else f"{existing} is not a folder"
        raise NotADirectoryError(f"{path}: {what}; choose another path")
    cwd = Path.cwd().resolve()
    if real == cwd or real in cwd.parents:
        raise FileExistsError(f"{path}: is the current folder or one above it; name a new folder instead")
    return real


@contextlib.contextmanager
def staged_dir(final_dir: Path) -> Iterator[Path]:
    """Yield an empty folder beside ``final_dir`` (a :func:`replaceable_dir`): when the block ends, it replaces
    ``final_dir`` (:func:`replace_dir`); when the block raises, it is deleted. A crash never leaves half a folder."""
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final_dir.name}.tmp-", dir=final_dir.parent))
    try:
        tmp.chmod(0o777 & ~_umask())  # mkdtemp makes 0700; the result should be as readable as any new folder
        yield tmp
        replace_dir(tmp, final_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
