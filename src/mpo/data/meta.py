"""The meta file: a JSON object that names the preference datasets of a run (the MMPR / InternVL layout).

Example (``meta.json``)::

    {
      "shape_colour": {"root": "images", "annotation": "annotations/shape_colour.jsonl",
                       "repeat_time": 1, "length": 1200, "data_augment": false, "max_dynamic_patch": 6}
    }

Keys of a dataset entry (everything else gives a warning that names the key):

* ``root`` (required, str): folder that image paths of the rows are relative to.
* ``annotation`` (required, str): the JSONL file of rows.
* ``repeat_time`` (number >= 0, default 1): ``r < 1`` keeps a seeded subsample of ``int(N * r)`` distinct rows;
  ``r >= 1`` keeps ``int(r)`` full copies plus a seeded subsample of ``int(N * (r - int(r)))`` rows. InternVL drops
  the fraction above 1 (1.5 behaves like 1); we keep it. ``0`` skips the dataset.
* ``max_dynamic_patch`` (int >= 1 or null): tile budget of this dataset, overriding the global one.
* ``data_augment`` (bool, default false): InternVL's training transform for this dataset, a JPEG re-encode of
  every tile at a quality from 75..100 (:mod:`mpo.data.augment`; InternVL tiles only).
* ``length`` (int >= 0 or null): informational row count (InternVL ignores it); a mismatch with the file gives a
  warning. An integral float is read as the integer (``10.0`` is 10); any other value is a warning and ignored.
* ``allow_outside_root`` (bool, default false): allow image paths that resolve outside ``root``.

Relative ``root`` and ``annotation`` paths resolve against the meta file's folder (InternVL resolves them against the
working directory, so a run depended on where it was started from).
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from mpo.data.errors import MetaError

__all__ = ["DatasetSpec", "MetaEntry", "read_meta", "read_meta_entries", "KNOWN_KEYS"]

log = logging.getLogger(__name__)

KNOWN_KEYS = ("root", "annotation", "repeat_time", "max_dynamic_patch", "data_augment", "length",
              "allow_outside_root")


@dataclass(frozen=True)
class DatasetSpec:
    """One usable dataset of a meta file; paths are absolute."""

    name: str
    root: Path
    annotation: Path
    repeat_time: float
    max_dynamic_patch: int | None
    data_augment: bool
    length: int | None
    allow_outside_root: bool


@dataclass
class MetaEntry:
    """One dataset entry as read: ``spec`` is None exactly when ``error`` says why the entry is unusable.

    ``warnings`` are ``(key, message)`` pairs, e.g. ``("colour", "unknown key, ignored")``.
    """

    name: str
    spec: DatasetSpec | None
    error: str | None = None
    error_field: str | None = None
    warnings: list[tuple[str, str]] = field(default_factory=list)


def read_meta_entries(path: str | Path) -> list[MetaEntry]:
    """Read a meta file entry by entry; an unusable entry is reported on its entry, the others still load.

    Raises:
        MetaError: the file is missing, not valid JSON (the message gives line and column), not a JSON object,
            or lists no dataset.
    """
    path = Path(path)
    data = _load_json(path)
    if not isinstance(data, dict):
        raise MetaError(f"{path}: expected a JSON object mapping dataset names to entries, got {_kind(data)}")
    if not data:
        raise MetaError(f"{path}: the meta file lists no dataset")
    base = path.resolve().parent
    entries = [_read_entry(str(name), raw, base) for name, raw in data.items()]
    for entry in entries:
        if entry.name in getattr(data, "repeated", ()):
            entry.spec, entry.error_field = None, None
            entry.error = ("this dataset name appears more than once in the meta file; JSON keeps only the last "
                           "entry, so rename one of them")
    return entries


def read_meta(path: str | Path) -> list[DatasetSpec]:
    """Read a meta file for training: every entry must be usable (repeat_time 0 entries are kept; they hold 0 rows).

    Raises:
        MetaError: as ``read_meta_entries``, or naming every unusable entry as ``FILE: DATASET: FIELD: MESSAGE``.
    """
    entries = read_meta_entries(path)
    bad = [f"{path}: {e.name}: {e.error_field or '-'}: {e.error}" for e in entries if e.spec is None]
    if bad:
        raise MetaError("\n".join(bad))
    for e in entries:  # e.g. a misspelt "repeat_times": the run goes on with the default, and says so
        for key, message in e.warnings:
            log.warning("%s: %s: %s: %s", path, e.name, key, message)
    return [e.spec for e in entries if e.spec is not None]


# ----------------------------------------------------------------------------------------------------


def _load_json(path: Path) -> object:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise MetaError(f"{path}: meta file not found") from None
    except UnicodeDecodeError as exc:
        raise MetaError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise MetaError(f"{path}: cannot read the meta file: {exc.strerror}") from None
    try:
        data = json.loads(text, object_pairs_hook=_Object.from_pairs)
    except json.JSONDecodeError as exc:
        raise MetaError(_json_error_message(path, text, exc)) from None
    except RecursionError:  # thousands of nested [ or {: the C decoder stops at Python's recursion limit
        raise MetaError(f"{path}: not usable JSON: nested too deeply") from None
    except ValueError as exc:  # CPython refuses integers of more than 4300 digits (int_max_str_digits)
        raise MetaError(f"{path}: not usable JSON: {str(exc).split(';')[0]}") from None
    try:
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        # JSON may escape half a UTF-16 pair; such a name or path cannot be printed, hashed or opened later.
        raise MetaError(f"{path}: not valid Unicode: a \\ud800-\\udfff escape without its other half "
                        "(lone surrogate)") from None
    return data


class _Object(dict):
    """A JSON object that remembers its repeated keys: ``json`` silently keeps the last of them, which for a
    meta file would drop a whole dataset (or a setting) without a word."""

    repeated: tuple[str, ...] = ()

    @classmethod
    def from_pairs(cls, pairs: list[tuple[str, object]]) -> _Object:
        obj = cls(pairs)
        if len(obj) < len(pairs):
            counts = Counter(k for k, _ in pairs)
            obj.repeated = tuple(k for k, n in counts.items() if n > 1)
        return obj


def _json_error_message(path: Path, text: str, exc: json.JSONDecodeError) -> str:
    """Name line and column; for the common trailing comma (InternVL's own ``debug_mpo.json``) say what to delete."""
    before = text[: exc.pos].rstrip()
    nxt = text[exc.pos: exc.pos + 1]
    if before.endswith(",") and nxt in ("}", "]"):
        comma = len(before) - 1
        line = text.count("\n", 0, comma) + 1
        col = comma - (text.rfind("\n", 0, comma) + 1) + 1
        return (f"{path}: invalid JSON at line {line}, column {col}: trailing comma before '{nxt}'; "
                "JSON allows no comma after the last item: delete this comma")
    return f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"


def _kind(value: object) -> str:
    if isinstance(value, dict):  # _Object included
        return "an object"
    names = {list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class _EntryError(Exception):
    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key, self.message = key, message


def _read_entry(name: str, raw: object, base: Path) -> MetaEntry:
    if not isinstance(raw, dict):
        return MetaEntry(name, None, f"expected an object with root and annotation, got {_kind(raw)}", None)
    warnings = [(k, "unknown key, ignored (known keys: " + ", ".join(KNOWN_KEYS) + ")")
                for k in raw if k not in KNOWN_KEYS]
    repeated = getattr(raw, "repeated", ())
    if repeated:
        return MetaEntry(name, None, "appears more than once in this entry; JSON keeps only the last value, "
                                     "so delete the other", repeated[0], warnings)
    try:
        spec = _build_spec(name, raw, base, warnings)
    except _EntryError as exc:
        return MetaEntry(name, None, exc.message, exc.key, warnings)
    if spec.repeat_time == 0:
        warnings.append(("repeat_time", "is 0: dataset skipped"))
    return MetaEntry(name, spec, None, None, warnings)


def _build_spec(name: str, raw: dict, base: Path, warnings: list[tuple[str, str]]) -> DatasetSpec:
    root = _path_field(raw, "root", base)
    annotation = _path_field(raw, "annotation", base)
    repeat = raw.get("repeat_time", 1)
    if not _is_number(repeat) or not math.isfinite(repeat):
        raise _EntryError("repeat_time", f"must be a number >= 0, got {json.dumps(repeat)}")
    if repeat < 0:
        raise _EntryError("repeat_time", f"must be >= 0 (0 skips the dataset), got {json.dumps(repeat)}")
    if repeat > 0 and not _is_file(annotation):
        raise _EntryError("annotation", f"file not found: {annotation}")
    mdp = raw.get("max_dynamic_patch")
    if mdp is not None and (not isinstance(mdp, int) or isinstance(mdp, bool) or mdp < 1):
        raise _EntryError("max_dynamic_patch", f"must be an integer >= 1 or null, got {json.dumps(mdp)}")
    length = _length_field(raw.get("length"), warnings)
    flags = {}
    for key in ("data_augment", "allow_outside_root"):
        value = raw.get(key, False)
        if not isinstance(value, bool):
            raise _EntryError(key, f"must be true or false, got {json.dumps(value)}")
        flags[key] = value
    return DatasetSpec(name=name, root=root, annotation=annotation, repeat_time=float(repeat),
                       max_dynamic_patch=mdp, data_augment=flags["data_augment"], length=length,
                       allow_outside_root=flags["allow_outside_root"])


def _length_field(value: object, warnings: list[tuple[str, str]]) -> int | None:
    """``length`` is informational (InternVL never reads it), so a bad value is a warning, never an unusable entry."""
    if _is_number(value) and math.isfinite(value) and value == int(value) and value >= 0:
        return int(value)
    if value is not None:
        warnings.append(("length", f"must be an integer >= 0 or null, got {json.dumps(value)}; ignored"))
    return None


def _path_field(raw: dict, key: str, base: Path) -> Path:
    if key not in raw:
        raise _EntryError(key, "is required")
    value = raw[key]
    if not isinstance(value, str) or not value.strip():
        raise _EntryError(key, f"must be a non-empty path string, got {json.dumps(value)}")
    if "://" in value:
        raise _EntryError(key, f"remote paths are not supported, got {value!r}; download the data first")
    if "\x00" in value:
        raise _EntryError(key, f"contains a NUL character, which no path can hold: {value!r}")
    try:
        return (base / Path(value).expanduser()).resolve()
    except RuntimeError:  # "~name/..." for a user this machine does not have
        raise _EntryError(key, f"cannot expand {value!r}: no such user's home folder") from None


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:  # e.g. a name longer than the filesystem allows (ENAMETOOLONG): it cannot be a file
        return False
