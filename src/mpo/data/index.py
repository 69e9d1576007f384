"""A byte-offset index of a JSONL annotation file, so that rows are read lazily and never all held in memory.

Building scans the file in 16 MiB binary chunks and finds newlines with numpy (about 1 s per GB from the page
cache); the three int64 arrays it keeps cost 24 bytes per row (24 MB for a million rows). The index is cached as
one ``.npz`` file under ``$MPO_CACHE_DIR/index/`` (default ``~/.cache/mpo/index/``), never beside the data, which
may be read-only, and is rebuilt when the file's size or modification time changes.

Blank lines (empty, or only whitespace) are not rows: they are skipped, not reported. A row keeps the 1-based line
number it has in the file, so every error names the line an editor shows. ``\\r\\n`` endings, a final line without a
newline and a UTF-8 byte-order mark at the start of the file are all accepted.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from mpo.fsio import atomic_write_bytes

__all__ = ["AnnotationIndex", "default_cache_dir"]

log = logging.getLogger(__name__)

_CHUNK = 16 << 20
_CACHE_VERSION = 2  # 2: whitespace-only lines of any length are not rows
_BOM = b"\xef\xbb\xbf"
_WHITESPACE = np.frombuffer(b" \t\r\x0b\x0c", dtype=np.uint8)  # what bytes.strip() removes, "\n" aside


def default_cache_dir() -> Path:
    """``$MPO_CACHE_DIR/index`` when the variable is set, else ``~/.cache/mpo/index``."""
    env = os.environ.get("MPO_CACHE_DIR")
    return (Path(env) if env else Path.home() / ".cache" / "mpo") / "index"


class AnnotationIndex:
    """Row ``i`` of a JSONL file, read on demand.

    Args:
        path: the annotation file.
        cache_dir: where the index is cached (default ``default_cache_dir()``).
        use_cache: set False to neither read nor write the cache.

    Attributes:
        from_cache: True when the index was loaded from the cache rather than built by a scan.
    """

    def __init__(self, path: str | Path, cache_dir: str | Path | None = None, *, use_cache: bool = True):
        self.path = Path(path).resolve()
        st = os.stat(self.path)
        self._size, self._mtime_ns = st.st_size, st.st_mtime_ns
        cache = _cache_file(self.path, Path(cache_dir) if cache_dir else default_cache_dir()) if use_cache else None
        arrays = _load_cache(cache, self.path, self._size, self._mtime_ns) if cache else None
        self.from_cache = arrays is not None
        if arrays is None:
            arrays = _scan(self.path)
            if cache:
                _save_cache(cache, self.path, self._size, self._mtime_ns, arrays)
        self._starts, self._ends, self._lines = arrays
        self._fd: int | None = None
        self._pid = -1

    def __len__(self) -> int:
        return len(self._starts)

    def raw(self, i: int) -> bytes:
        """The bytes of row ``i`` without its line ending."""
        start, end = int(self._starts[i]), int(self._ends[i])
        data = os.pread(self._handle(), end - start, start)
        return data[:-1] if data.endswith(b"\r") else data

    def line_number(self, i: int) -> int:
        """The 1-based line of row ``i`` in the file (blank lines count, as in an editor)."""
        return int(self._lines[i])

    def iter_rows(self, start: int, stop: int) -> Iterator[tuple[int, bytes]]:
        """Yield ``(line_number, raw)`` for rows ``start..stop-1`` with one read per ~16 MiB (fast sequential scan)."""
        i = start
        while i < stop:
            j = min(stop, int(np.searchsorted(self._starts, self._starts[i] + _CHUNK, side="left")), len(self))
            j = max(j, i + 1)
            base = int(self._starts[i])
            block = os.pread(self._handle(), int(self._ends[j - 1]) - base, base)
            for k in range(i, j):
                data = block[int(self._starts[k]) - base: int(self._ends[k]) - base]
                yield int(self._lines[k]), data[:-1] if data.endswith(b"\r") else data
            i = j

    def close(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def __getstate__(self) -> dict:
        # A file descriptor cannot travel to another process; the receiver opens its own.
        state = self.__dict__.copy()
        state["_fd"], state["_pid"] = None, -1
        return state

    def _handle(self) -> int:
        # After a fork (DataLoader workers) each process opens its own descriptor; pread keeps no shared offset anyway.
        if self._fd is None or self._pid != os.getpid():
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        return self._fd


# ----------------------------------------------------------------------------------------------------


def _scan(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return (starts, ends, line numbers) of the non-blank lines; ``ends`` exclude the ``\\n``."""
    newlines = []
    buf = bytearray(_CHUNK)
    offset = 0
    with open(path, "rb", buffering=0) as fh:
        while True:
            n = fh.readinto(buf)
            if not n:
                break
            chunk = np.frombuffer(buf, dtype=np.uint8, count=n)
            newlines.append(np.flatnonzero(chunk == 10) + offset)
            offset += n
    nl = np.concatenate(newlines) if newlines else np.zeros(0, dtype=np.int64)
    starts = np.concatenate(([0], nl + 1)).astype(np.int64)
    ends = np.concatenate((nl, [offset])).astype(np.int64)
    lines = np.arange(1, len(starts) + 1, dtype=np.int64)
    with open(path, "rb") as fh:
        if fh.read(3) == _BOM:
            starts[0] = min(3, int(ends[0]))
        keep = ends > starts
        if offset:
            # only a line that starts with whitespace can be blank: read those back (a row starts with "{")
            first = np.memmap(path, dtype=np.uint8, mode="r")[starts[keep]]
            for k in np.flatnonzero(keep)[np.isin(first, _WHITESPACE)]:
                fh.seek(int(starts[k]))
                if not fh.read(int(ends[k] - starts[k])).strip():
                    keep[k] = False
    return starts[keep], ends[keep], lines[keep]


def _cache_file(path: Path, cache_dir: Path) -> Path:
    digest = hashlib.sha256(str(path).encode()).hexdigest()[:20]
    return cache_dir / f"{path.stem[:40]}-{digest}.npz"


def _load_cache(cache: Path, path: Path, size: int, mtime_ns: int):
    try:
        with np.load(cache) as data:
            header = json.loads(bytes(data["header"]).decode())
            if header != _header(path, size, mtime_ns):
                return None
            return data["starts"], data["ends"], data["lines"]
    except FileNotFoundError:
        return None
    except Exception as exc:  # a torn or foreign file: rebuild rather than fail
        log.warning("ignoring unreadable index cache %s (%s)", cache, exc)
        return None


def _save_cache(cache: Path, path: Path, size: int, mtime_ns: int, arrays) -> None:
    buf = io.BytesIO()
    header = np.frombuffer(json.dumps(_header(path, size, mtime_ns)).encode(), dtype=np.uint8)
    np.savez(buf, header=header, starts=arrays[0], ends=arrays[1], lines=arrays[2])
    try:
        atomic_write_bytes(cache, buf.getvalue())
    except OSError as exc:  # a read-only home is no reason to stop; the next run scans again
        log.warning("cannot write the index cache %s (%s); set MPO_CACHE_DIR to a writable folder", cache, exc)


def _header(path: Path, size: int, mtime_ns: int) -> dict:
    return {"version": _CACHE_VERSION, "path": str(path), "size": size, "mtime_ns": mtime_ns}
