"""What training does with a bad row: ``on_bad_row: skip`` (default) logs and drops it, ``error`` stops the run.

InternVL replaces a failing row by a random other one and prints a message, which skews the mix and hides bad data.
Here every dropped row is written as one JSON line to ``<output_dir>/rejected_rows.jsonl``::

    {"dataset": "shape_colour", "line": 17, "field": "image", "message": "file not found: ...", "kind": "image"}

and counted by kind (``row``, ``image``, ``too_long``), so the count can go into the training log. The first
:data:`LOGGED_ROWS` rows of each process are also logged as warnings (``mpo.data``), the last of them saying where
the rest go: a run over broken data says so while it runs, not only in a file nobody opens.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from pathlib import Path
from typing import Literal

from mpo.data.errors import RowError

__all__ = ["BAD_ROW_POLICIES", "RejectedRowLog", "handle_bad_row"]

BAD_ROW_POLICIES = ("skip", "error")
LOGGED_ROWS = 10

log = logging.getLogger("mpo.data")


class RejectedRowLog:
    """Append-only log of dropped rows; one ``write`` call per line, flushed at once.

    The file is opened with ``O_APPEND`` and every record is a single ``os.write``, so DataLoader worker processes
    may share one path without tearing lines. ``counts`` only covers the rows this object wrote.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.counts: Counter[str] = Counter()
        self._logged = 0  # rows this object warned about (counts may start from a resumed run's)
        self._fd: int | None = None
        self._pid = -1

    def write(self, err: RowError) -> None:
        record = {"dataset": err.dataset, "line": err.line, "field": err.field, "message": err.message,
                  "kind": err.kind}
        os.write(self._handle(), (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
        self.counts[err.kind] += 1
        if self._logged < LOGGED_ROWS:
            self._logged += 1
            more = f"; further skipped rows are only written to {self.path}" if self._logged == LOGGED_ROWS else ""
            log.warning("skipped row %s (written to %s)%s", err, self.path.name, more)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def close(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = None

    def __enter__(self) -> RejectedRowLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_fd"], state["_pid"] = None, -1
        return state

    def _handle(self) -> int:
        if self._fd is None or self._pid != os.getpid():
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            self._pid = os.getpid()
        return self._fd


def handle_bad_row(err: RowError, policy: Literal["skip", "error"], log: RejectedRowLog | None) -> None:
    """Apply ``on_bad_row``: ``error`` re-raises ``err``; ``skip`` writes it to ``log`` (required, so that nothing
    is dropped silently) and returns, and the caller moves on to the next row."""
    if policy not in BAD_ROW_POLICIES:
        raise ValueError(f"on_bad_row must be one of {', '.join(BAD_ROW_POLICIES)}, got {policy!r}")
    if policy == "error":
        raise err
    if log is None:
        raise ValueError("on_bad_row=skip needs a RejectedRowLog: rows are never dropped silently")
    log.write(err)
