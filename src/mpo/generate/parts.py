"""Part files and settings of a sharded generation output: what a restart reads to resume.

What lives here, and why it is its own module: everything ``mpo.generate.sharding.run_job`` keeps on disk
between runs, and the rules for reading it back. ``OutputLayout`` names the files; ``scan_parts`` indexes every
part file (whatever world size wrote it), ignores a torn last line and cuts it off the rank's own file;
``PartWriter`` appends whole lines with flush + fsync; ``check_settings``/``record_settings`` keep a started
output from being continued with other settings (or from another prompt file with the same basename). The loop
that generates and merges stays in ``mpo.generate.sharding``, which re-exports the public names.

An output is *started* once a part file holds a whole line (a sample or a marker). Settings are recorded just
before the first batch and bind only a started output, so a run that failed before its first sample (a model that
did not load, a wrong flag) locks nothing.
"""

from __future__ import annotations

import glob
import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mpo.fsio import atomic_write_json

__all__ = [
    "MARKER",
    "REFUSED",
    "OutputLayout",
    "PartFileError",
    "PartState",
    "PartWriter",
    "ResumeError",
    "check_settings",
    "item_error_marker",
    "output_started",
    "record_settings",
    "scan_parts",
]

log = logging.getLogger("mpo.generate")
MARKER = "_mpo"


class PartFileError(ValueError):
    """A part file is damaged in the middle (not just a torn last line); the message names file and line."""


class ResumeError(ValueError):
    """The output was started with other sampling settings (or another prompt file); the message names it."""


@dataclass(frozen=True)
class OutputLayout:
    """Where the merged output, the part files and the reports of one prompt file go."""

    final: Path

    @property
    def parts_dir(self) -> Path:
        return self.final.parent / "parts"

    def part(self, rank: int, world: int) -> Path:
        return self.parts_dir / f"{self.final.name}.rank{rank}-of-{world}.jsonl"

    def part_files(self) -> list[Path]:
        """Every part file of this output, whatever world size wrote it, in a fixed (sorted) order."""
        return sorted(self.parts_dir.glob(f"{glob.escape(self.final.name)}.rank*-of-*.jsonl"))

    @property
    def settings(self) -> Path:
        return self.parts_dir / f"{self.final.name}.settings.json"

    @property
    def rejected_prompts(self) -> Path:
        return self.final.parent / "reports" / f"{Path(self.final.name).stem}.rejected_prompts.jsonl"

    @property
    def summary(self) -> Path:
        return self.final.parent / "reports" / f"{Path(self.final.name).stem}.summary.json"

    def files(self) -> list[Path]:
        """Every file a run of this output may write (part files: those that exist; a new one goes beside them)."""
        return [self.final, self.settings, self.rejected_prompts, self.summary, *self.part_files()]


# ----------------------------------------------------------------------------------------------------
# Part files


REFUSED = "refused"
"""``kind`` of an item error where the model's processor refused the row; any other kind is an image that could
not be decoded (``"decode"``)."""


def item_error_marker(item_id: str, error: dict[str, Any], kind: str, attempt: int,
                      images: list[list[int]] | None) -> dict[str, Any]:
    """The part-file line that settles an item that could not be sampled, until its image files change.
    ``attempt`` counts the runs that tried it (the highest stands: part files of several world sizes have no
    common order); ``images`` is the ``(size, mtime_ns)`` of its image files, by which a rerun knows the row
    unchanged (``PartState.retries``). ``kind`` (``REFUSED`` or ``"decode"``) is for the reader: both are retried
    by the same rule."""
    return {MARKER: "item_error", "item_id": item_id, "error": error, "kind": kind, "attempt": attempt,
            "images": images}


@dataclass
class PartState:
    """What the part files of an output hold. ``samples`` maps (item_id, sample_idx) to (file, byte offset);
    ``item_errors`` maps an item id to its latest ``item_error`` marker (``item_error_marker``)."""

    files: list[Path] = field(default_factory=list)
    samples: dict[tuple[str, int], tuple[int, int]] = field(default_factory=dict)
    dropped: dict[tuple[str, int], str] = field(default_factory=dict)
    item_errors: dict[str, dict[str, Any]] = field(default_factory=dict)
    torn: int = 0
    duplicates: int = 0

    def has(self, item: str, idx: int) -> bool:
        return (item, idx) in self.samples or (item, idx) in self.dropped

    def missing(self, item: str, n: int) -> list[int]:
        """Sample indices of ``item`` still to generate, also when its last attempt ended in an item error: a
        rerun tries such an item again (``retries``), since its image may have been repaired."""
        return [i for i in range(n) if not self.has(item, i)]

    def error(self, item: str, n: int) -> dict[str, Any] | None:
        """The error that stands for ``item``: its latest marker while samples are still missing (an item made
        whole by a later attempt has none), else ``None``."""
        marker = self.item_errors.get(item)
        return marker["error"] if marker is not None and self.missing(item, n) else None

    def settled(self, item: str, n: int, images: Callable[[], list[list[int]] | None]) -> bool:
        """Whether ``item`` needs nothing more from any run: all its samples, or an item error that stands, one
        that no run tries again (``retries``; ``images`` reads the stamps of its image files, called only for an
        item with a marker and missing samples). ``run_job`` picks a rank's work by the same rule, so an item that
        some rank retries is settled for no rank until that retry's outcome (samples, or a marker with the
        current stamps) is in the part files: no rank merges without it. (Settled used to count any marker, so
        a rank with no work merged while a peer was still sampling a repaired row, and its merge could land
        after, and replace, the complete one.)"""
        if not self.missing(item, n):
            return True
        return item in self.item_errors and not self.retries(item, images())

    def retries(self, item: str, images: list[list[int]] | None) -> bool:
        """Whether a run tries ``item`` again after an item error: once its image files changed since the failed
        attempt (``images``: their ``[size, mtime_ns]`` now, against those in the marker). Unchanged files would
        fail again: an image that could not be decoded the same way, a row the processor refused at the price
        of loading the model. Markers written before the stamps were kept have none: such a row is tried once
        more. A retried image is decoded before any model is built, so a row still broken costs no model load."""
        marker = self.item_errors.get(item)
        return marker is None or marker.get("images") != images

    def next_attempt(self, item: str) -> int:
        marker = self.item_errors.get(item)
        return 1 if marker is None else int(marker.get("attempt", 1)) + 1


def scan_parts(layout: OutputLayout, repair: Path | None = None) -> PartState:
    """Index every part file of ``layout``. ``repair``: this rank's own file, whose torn tail is cut off."""
    state = PartState(files=layout.part_files())
    for f, path in enumerate(state.files):
        for offset, rec in _read_part(path, repair=(repair is not None and path == repair), state=state):
            key = (rec.get("item_id"), rec.get("sample_idx"))
            kind = rec.get(MARKER)
            if kind == "item_error":
                old = state.item_errors.get(rec["item_id"])
                if old is None or rec.get("attempt", 1) > old.get("attempt", 1):
                    state.item_errors[rec["item_id"]] = rec
            elif state.has(*key):
                state.duplicates += 1  # only possible if two runs wrote the same output at once
            elif kind == "dropped":
                state.dropped[key] = rec["reason"]
            else:
                state.samples[key] = (f, offset)
    return state


def _read_part(path: Path, *, repair: bool, state: PartState) -> Iterator[tuple[int, dict[str, Any]]]:
    with open(path, "rb") as fh:
        offset = 0
        for line_no, raw in enumerate(fh, start=1):
            rec = _parse_line(raw)
            if rec is None:
                if fh.read(1):
                    raise PartFileError(f"{path}:{line_no}: not a JSON object, and not the last line: the part "
                                        "file was damaged by something other than a kill; move it away to "
                                        "regenerate its samples")
                state.torn += 1
                if repair:  # cut the torn tail so that the next append starts on a fresh line
                    with open(path, "r+b") as out:
                        out.truncate(offset)
                        os.fsync(out.fileno())
                    log.warning("%s:%d: removed a torn last line (%d bytes) left by an interrupted run",
                                path, line_no, len(raw))
                return
            yield offset, rec
            offset += len(raw)


def _parse_line(raw: bytes) -> dict[str, Any] | None:
    """The record of one whole line, or None for a line cut short (no newline) or not a JSON object."""
    if not raw.endswith(b"\n"):
        return None
    try:
        rec = json.loads(raw)
    except ValueError:
        return None
    return rec if isinstance(rec, dict) else None


class PartWriter:
    """Appends whole JSON lines to one part file; ``append`` flushes and fsyncs, so a batch is on disk after it."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._fh = open(path, "a", encoding="utf-8")

    def append(self, records: Iterable[dict[str, Any]]) -> None:
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        if text:
            self._fh.write(text)
            self._fh.flush()
            os.fsync(self._fh.fileno())

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> PartWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ----------------------------------------------------------------------------------------------------
# Settings


def output_started(layout: OutputLayout) -> bool:
    """Whether any part file holds a whole line (a sample or a marker): only then is the output started. A run
    that failed before its first sample (a model that did not load, a wrong flag) leaves nothing to resume."""
    for path in layout.part_files():
        with open(path, "rb") as fh:
            while block := fh.read(1 << 16):
                if b"\n" in block:
                    return True
    return False


def check_settings(layout: OutputLayout, settings: dict[str, Any], *, started: bool) -> None:
    """Refuse to add to a started output with other settings (``ResumeError`` naming the first that differs).
    The settings of an output without a sample bind nothing: ``record_settings`` replaces them.

    Only the keys of ``settings`` are compared. A key that only the recorded file holds is one this code no longer
    records because it cannot change a sample (dropout-ntp's ``dynamic``/``max_num``: it never sends an image), so
    it binds nothing; comparing it refused a rerun that changed ``--dynamic`` on an output the old code started."""
    path = layout.settings
    if not path.exists() or not started:
        if started:  # samples without settings (the file was deleted): adopt these
            atomic_write_json(path, settings)
        return
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ResumeError(f"{path}: not valid JSON ({err}); restore it, or move the output folder away to "
                          "start afresh") from None
    # settings recorded before the system message was one: those prompts had no system turn of ours
    old = {"system_prompt": "none", **old}
    for key in sorted(settings):
        if key == "prompt_path" and key not in old:  # written before the prompt file was recorded: unknown
            continue
        if old.get(key) != settings.get(key):
            hint = ("another prompt file with the same name already fills this output; rename one of them or "
                    "use another --out-dir") if key == "prompt_path" else \
                "rerun with the same settings or use another --out-dir"
            raise ResumeError(f"{path}: {key}: this output was started with {old.get(key)!r}, now "
                              f"{settings.get(key)!r}; {hint}")


def record_settings(layout: OutputLayout, settings: dict[str, Any]) -> None:
    """Write the settings when the first samples are about to be made (not before: see ``output_started``)."""
    path = layout.settings
    try:
        if json.loads(path.read_text(encoding="utf-8")) == settings:
            return
    except (OSError, ValueError):
        pass
    atomic_write_json(path, settings)
