"""One preference row: parsing, validation and the ``<image>`` placeholder rules.

A row is one JSON object per line of an annotation file::

    {"image": "a.png", "question": "What colour is the shape?", "chosen": "It is red.", "rejected": "It is blue."}

* ``image``: absent, null, ``""`` or ``[]`` (text-only); a string (one image); a list of strings (several images;
  a one-element list counts as one image). Paths are relative to the dataset root.
* ``question``, ``chosen``, ``rejected``: non-empty strings. ``system_prompt``: optional string.
* Every other key is kept in ``PreferenceRecord.meta``.

Placeholder rules (after InternVL, made explicit), applied to ``question``:

* one image, no ``<image>`` -> ``"<image>\\n"`` is prepended (InternVL does the same);
* n >= 2 images, no ``<image>`` -> ``"Image-1: <image>\\nImage-2: <image>\\n..."`` is prepended (InternVL instead
  fails an assertion and silently swaps in a random other row);
* otherwise the count of ``<image>`` must equal the number of images, and a text-only row must have none.

Blank lines are skipped by the index (they are not rows and not errors); see ``mpo.data.index``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from mpo.data.errors import RowError

__all__ = ["IMAGE_PLACEHOLDER", "PreferenceRecord", "parse_row", "tile_budget", "normalise_question", "decode_json_row",
           "is_encodable"]

IMAGE_PLACEHOLDER = "<image>"
_ROW_KEYS = ("image", "question", "chosen", "rejected", "system_prompt")
# Only rows whose text holds such an escape pay for the full Unicode check (``_require_unicode``).
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


@dataclass(frozen=True)
class PreferenceRecord:
    """A validated row. ``question`` holds exactly one ``<image>`` per entry of ``images``, in order."""

    dataset: str
    line: int
    question: str
    chosen: str
    rejected: str
    images: tuple[str, ...] = ()
    system_prompt: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def modality(self) -> Literal["text", "single", "multi"]:
        n = len(self.images)
        return "text" if n == 0 else "single" if n == 1 else "multi"

    def image_field(self, k: int) -> str:
        """The field name that errors about image ``k`` carry: ``image`` for one image, else ``image[k]`` (0-based)."""
        return "image" if len(self.images) == 1 else f"image[{k}]"


def tile_budget(max_dynamic_patch: int, n_images: int) -> int:
    """Tiles allowed per image: ``max(1, max_dynamic_patch // n_images)`` (InternVL's multi-image rule).

    Example: a budget of 12 gives 12 tiles to a single image, 6 to each of 2 images, 1 to each of 20 images.
    A text-only row (``n_images == 0``) gets 1, the budget of InternVL's dummy image.
    """
    if max_dynamic_patch < 1:
        raise ValueError(f"max_dynamic_patch must be >= 1, got {max_dynamic_patch}")
    if n_images == 0:
        return 1
    return max(1, max_dynamic_patch // n_images)


def normalise_question(question: str, n_images: int, *, dataset: str = "-", line: int = 0) -> str:
    """Apply the placeholder rules of the module docstring; raise ``RowError`` (field ``question``) on a mismatch."""
    count = question.count(IMAGE_PLACEHOLDER)
    if n_images == 0:
        if count:
            raise RowError(dataset, line, "question",
                           f"has {count} {IMAGE_PLACEHOLDER} placeholder(s) but the row has no image")
        return question
    if count == 0:
        if n_images == 1:
            return f"{IMAGE_PLACEHOLDER}\n{question}"
        prefix = "".join(f"Image-{k + 1}: {IMAGE_PLACEHOLDER}\n" for k in range(n_images))
        return prefix + question
    if count != n_images:
        raise RowError(dataset, line, "question",
                       f"has {count} {IMAGE_PLACEHOLDER} placeholders for {n_images} image(s); "
                       f"write one per image, or none to have them added")
    return question


def parse_row(raw: bytes | str, dataset: str, line: int) -> tuple[PreferenceRecord, list[RowError]]:
    """Parse and validate one annotation line.

    Returns:
        The record and its warnings (``RowError`` with ``severity="warning"``, e.g. chosen == rejected).

    Raises:
        RowError: the first problem that makes the row unusable, naming its field.
    """
    obj = decode_json_row(raw, dataset, line)
    images = _images(obj.get("image"), dataset, line)
    text = {k: _text(obj, k, dataset, line) for k in ("question", "chosen", "rejected")}
    for key in ("chosen", "rejected"):
        if IMAGE_PLACEHOLDER in text[key]:
            raise RowError(dataset, line, key, f"contains {IMAGE_PLACEHOLDER}; answers cannot hold image placeholders")
    system_prompt = obj.get("system_prompt")
    if system_prompt is not None and not isinstance(system_prompt, str):
        raise RowError(dataset, line, "system_prompt", f"expected a string or null, got {_kind(system_prompt)}")
    warnings: list[RowError] = []
    video = obj.get("video")
    if video:
        if not images:
            raise RowError(dataset, line, "video", "video rows are not supported; remove the row or give it an image")
        warnings.append(RowError(dataset, line, "video", "ignored: the row has an image", "warning"))
    question = normalise_question(text["question"], len(images), dataset=dataset, line=line)
    if text["chosen"] == text["rejected"]:
        warnings.append(RowError(dataset, line, "rejected", "is identical to chosen: the pair teaches nothing",
                                 "warning"))
    meta = {k: v for k, v in obj.items() if k not in _ROW_KEYS}
    record = PreferenceRecord(dataset, line, question, text["chosen"], text["rejected"], images, system_prompt, meta)
    return record, warnings


# ----------------------------------------------------------------------------------------------------


def _kind(value: object) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null",
             int: "a number", float: "a number"}
    return names.get(type(value), type(value).__name__)


def decode_json_row(raw: bytes | str, dataset: str, line: int) -> dict:
    """One JSONL line → a dict, or a :class:`RowError` naming the line (bad UTF-8/JSON, too deep, huge numbers,
    lone surrogates, not an object). Shared by the preference rows and the generation prompt files."""
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise RowError(dataset, line, None, f"not valid UTF-8 (byte 0x{raw[exc.start]:02x} at column "
                                                f"{exc.start + 1})") from None
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise RowError(dataset, line, None, f"not valid JSON at column {exc.colno}: {exc.msg}") from None
    except RecursionError:  # thousands of nested [ or {: the C decoder stops at Python's recursion limit
        raise RowError(dataset, line, None, "not usable JSON: nested too deeply") from None
    except ValueError as exc:  # CPython refuses integers of more than 4300 digits (int_max_str_digits)
        raise RowError(dataset, line, None, f"not usable JSON: {str(exc).split(';')[0]}") from None
    if not isinstance(obj, dict):
        raise RowError(dataset, line, None, f"expected a JSON object, got {_kind(obj)}")
    if _SURROGATE_ESCAPE.search(raw):
        _require_unicode(obj, dataset, line)
    return obj


def _require_unicode(obj: dict, dataset: str, line: int) -> None:
    """JSON may escape half a UTF-16 pair (``"\\ud800"``); Python then holds a string that cannot be encoded, and
    the tokenizer, a log line or an output file would fail on it far from this row. Refuse the row here."""
    for key, value in obj.items():
        try:
            json.dumps([key, value], ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            name = key if is_encodable(key) else None
            raise RowError(dataset, line, name, "is not valid Unicode: a \\ud800-\\udfff escape without its "
                                                "other half (lone surrogate)") from None


def is_encodable(text: str) -> bool:
    """``text`` encodes as UTF-8 (no lone surrogate)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _text(obj: dict, key: str, dataset: str, line: int) -> str:
    if key not in obj:
        raise RowError(dataset, line, key, "is missing")
    value = obj[key]
    if not isinstance(value, str):
        raise RowError(dataset, line, key, f"expected a string, got {_kind(value)}")
    if not value.strip():
        raise RowError(dataset, line, key, "is empty")
    return value


def _images(value: object, dataset: str, line: int) -> tuple[str, ...]:
    if value is None or value == "" or value == []:
        return ()
    if isinstance(value, str):
        if not value.strip():
            raise RowError(dataset, line, "image", 'is a blank path (omit the key or use "" for a text-only row)')
        return (value,)
    if not isinstance(value, list):
        raise RowError(dataset, line, "image", f"expected a path string or a list of path strings, got {_kind(value)}")
    for k, item in enumerate(value):
        if not isinstance(item, str):
            raise RowError(dataset, line, f"image[{k}]", f"expected a path string, got {_kind(item)}")
        if not item.strip():
            raise RowError(dataset, line, f"image[{k}]", "is an empty path")
    return tuple(value)
