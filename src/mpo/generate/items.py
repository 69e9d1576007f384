"""Prompt items: reading and validating a prompt JSONL, stable item ids, per-sample seeds, output paths.

A prompt file holds one JSON object per line (blank lines are skipped). Lines end at ``\n`` only: JSON may hold
U+2028, U+2029 or U+0085 unescaped inside a string (``json.dumps(..., ensure_ascii=False)`` writes them so), and
``str.splitlines`` would cut such a row in two. Each line is decoded on its own, so one line that is not UTF-8 is
that row's error, not the end of the run; a UTF-8 byte-order mark at the start of the file is skipped.

Each generator names the fields it needs (``question`` + ``answer`` for correctness, ``question`` + ``chosen`` for
DropoutNTP); ``image`` is optional: absent/null/""/[] for a text-only prompt, a path, or a list of paths. Every
field of the row is copied to the output. A row that cannot be used (not UTF-8 or not JSON, a missing or empty
field, a missing image file, an ``<image>`` count that does not fit) becomes a ``RowError`` naming
``FILE:LINE: FIELD``; it is reported and skipped, never fatal. An ``answer`` is empty, as Stage 2 judges it
(``mpo.generate.answers.is_empty_answer``), when it is ``""``, blank, ``[]`` or a list of blanks: no response
could ever be judged correct against it, so sampling it would only spend GPU time.

Item id: ``sha1`` of the JSON of (image paths in file order, question[, chosen][, system_prompt]), so it does not
depend on line numbers, the order of the file or the world size. The images stay in file order because questions
refer to them by position ("Image-1", "Image-2"): the same images in another order are another question. The row's
own ``system_prompt`` leads its request (``with_row_system``), so a row whose system prompt was edited is another
item and is sampled again. A row without one hashes as before, so outputs started before it joined the id keep
their samples; a row with one is sampled once more there, since nothing in such an output tells whether its
samples were drawn under the row's system prompt (sent only from 836a4bb on; docs/generate.md). Two rows with the
same id are one item: the later row is reported as a duplicate. Per-sample seed: the first 63 bits of
``sha256("{seed}:{item_id}:{sample_idx}")``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from mpo.data.errors import ImageError, RowError
from mpo.data.images import load_image, resolve_image_path
from mpo.data.records import decode_json_row
from mpo.generate.answers import is_empty_answer

__all__ = [
    "PromptFile",
    "PromptItem",
    "image_stamp",
    "item_id",
    "load_item_images",
    "model_name",
    "read_prompts",
    "sample_seed",
    "subsample_lines",
]

_BOM = b"\xef\xbb\xbf"  # a UTF-8 byte-order mark, as some Windows editors write at the start of a file


@dataclass(frozen=True)
class PromptItem:
    """One usable prompt row. ``prompt`` is the text the generator prepared from it (markers placed)."""

    line: int
    row: dict[str, Any]
    images: tuple[str, ...]
    item_id: str
    prompt: str


@dataclass(frozen=True)
class PromptFile:
    """The usable items of a prompt file (file order) and the rows that were rejected."""

    path: Path
    items: list[PromptItem]
    rejected: list[RowError]
    image_root: Path
    allow_outside_root: bool


def item_id(images: Sequence[str], question: str, chosen: str | None = None, system_prompt: str | None = None) -> str:
    """Stable id of a prompt: sha1 of (image paths in file order, question[, chosen][, system_prompt]); see the
    module docstring. The system prompt goes in as ``{"system_prompt": ...}``, which no ``chosen`` string can
    equal, and only when there is one, so that the ids of rows without it did not change when it was added."""
    key: list[Any] = [list(images), question]
    if chosen is not None:
        key.append(chosen)
    if system_prompt is not None:
        key.append({"system_prompt": system_prompt})
    return hashlib.sha1(json.dumps(key, ensure_ascii=False).encode("utf-8")).hexdigest()


def sample_seed(seed: int, item: str, sample_idx: int) -> int:
    """The seed of sample ``sample_idx`` of item ``item`` under run seed ``seed`` (63 bits, JSON-safe in Python)."""
    digest = hashlib.sha256(f"{seed}:{item}:{sample_idx}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def model_name(checkpoint: str | Path) -> str:
    """The seed's output folder name: the last two path components joined by ``_``.

    Example: ``OpenGVLab/InternVL3-8B`` -> ``OpenGVLab_InternVL3-8B``; ``/ckpt/run1/final`` -> ``run1_final``.
    A path that has no folder name of its own (``.``, ``./``, ``..``, ``run1/..``) is named after the folder it
    resolves to: ``.`` in ``/ckpt/run1`` -> ``ckpt_run1``. (``.`` gave ``""``, so the output went straight into
    ``--out-dir`` under the prompt file's own name, and replaced the prompts when that was their folder.)
    Other paths keep their written form, so an output started before this rule keeps its folder.
    """
    path = Path(str(checkpoint))
    if not path.parts or ".." in path.parts:
        path = path.resolve()
    return "_".join(p for p in path.parts[-2:] if p not in ("/", ""))


def subsample_lines(n_lines: int, max_num: int | None) -> list[int]:
    """Indices kept by ``--sample-max-num``: the seed's strided subsample (offset 0).

    With more than ``max_num`` lines, keep every ``n_lines // max_num``-th line from the first, then the first
    ``max_num`` of those; with at most ``max_num`` lines (or no cap) keep all. Example: 10 lines, cap 3 ->
    stride 3 -> lines 0, 3, 6.
    """
    if max_num is None or n_lines <= max_num:
        return list(range(n_lines))
    if max_num < 1:
        raise ValueError(f"--sample-max-num must be >= 1, got {max_num}")
    return list(range(0, n_lines, n_lines // max_num))[:max_num]


def read_prompts(path: str | Path, *, required: Sequence[str], prepare: Callable[[dict[str, Any], int], str],
                 id_fields: Sequence[str] = ("question",), image_root: str | Path | None = None,
                 allow_outside_root: bool = False, sample_max_num: int | None = None) -> PromptFile:
    """Read, subsample and validate a prompt file.

    Args:
        required: fields every row must have (``question`` must be a non-empty string; ``chosen`` too; ``answer``
            must not be empty (``is_empty_answer``); any other field must be present and not null).
        prepare: ``prepare(row, n_images) -> prompt text``; raises ``ValueError`` for a row it cannot use (its
            message becomes the ``question`` error).
        id_fields: ``("question",)`` or ``("question", "chosen")``: what the item id hashes besides the images.
        image_root: where relative image paths start (default: the prompt file's folder).
    """
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    data = path.read_bytes()
    data = data[len(_BOM):] if data.startswith(_BOM) else data
    raw = [(k + 1, text) for k, text in enumerate(data.split(b"\n")) if text.strip()]
    raw = [raw[k] for k in subsample_lines(len(raw), sample_max_num)]
    items: list[PromptItem] = []
    rejected: list[RowError] = []
    seen: dict[str, int] = {}
    for line, text in raw:
        try:
            item = _parse(text, line, str(path), required, prepare, id_fields, root, allow_outside_root)
        except RowError as err:
            rejected.append(err)
            continue
        if item.item_id in seen:
            rejected.append(RowError(str(path), line, "question", f"duplicate of line {seen[item.item_id]} "
                                                                  "(same images and text); generated once"))
            continue
        seen[item.item_id] = line
        items.append(item)
    return PromptFile(path, items, rejected, root, allow_outside_root)


def image_stamp(prompts: PromptFile, item: PromptItem) -> list[list[int]] | None:
    """``[size, mtime_ns]`` of each image file of ``item`` now, or ``None`` when one cannot be read: how a rerun
    tells that a row whose last attempt failed (an image that could not be decoded, a row the model's processor
    refused) has had its image replaced since (``PartState.retries``)."""
    try:
        stamps = []
        for k, rel in enumerate(item.images):
            st = resolve_image_path(prompts.image_root, rel, dataset=str(prompts.path), line=item.line,
                                    field=_image_field(len(item.images), k),
                                    allow_outside_root=prompts.allow_outside_root).stat()
            stamps.append([st.st_size, st.st_mtime_ns])
        return stamps
    except (OSError, RowError):
        return None


def load_item_images(prompts: PromptFile, item: PromptItem) -> list[Image.Image]:
    """Decode an item's images (RGB). Raises ``ImageError`` naming the file, line and field."""
    return [load_image(prompts.image_root, rel, dataset=str(prompts.path), line=item.line,
                       field=_image_field(len(item.images), k), allow_outside_root=prompts.allow_outside_root)
            for k, rel in enumerate(item.images)]


def _parse(text: bytes, line: int, dataset: str, required: Sequence[str], prepare: Callable[[dict[str, Any], int], str],
           id_fields: Sequence[str], root: Path, allow_outside_root: bool) -> PromptItem:
    row = decode_json_row(text, dataset, line)  # the data layer's hardened decoder: UTF-8, deep, huge, surrogates
    for key in required:
        if row.get(key) is None:
            raise RowError(dataset, line, key, "is missing")
        if key == "answer" and is_empty_answer(row[key]):
            raise RowError(dataset, line, key, "is empty (\"\", blank or []): no response can match it")
        if key in ("question", "chosen") and (not isinstance(row[key], str) or not row[key].strip()):
            raise RowError(dataset, line, key, "must be a non-empty string")
    images = _images(row.get("image"), dataset, line)
    for k, rel in enumerate(images):
        real = resolve_image_path(root, rel, dataset=dataset, line=line, field=_image_field(len(images), k),
                                  allow_outside_root=allow_outside_root)
        if not real.is_file():
            raise ImageError(dataset, line, _image_field(len(images), k), f"file not found: {real}")
    try:
        prompt = prepare(row, len(images))
    except ValueError as exc:
        raise RowError(dataset, line, "question", str(exc)) from None
    system = row.get("system_prompt")  # only a string leads the request (with_row_system): only a string counts
    ident = item_id(images, row["question"], row["chosen"] if "chosen" in id_fields else None,
                    system if isinstance(system, str) else None)
    return PromptItem(line, row, images, ident, prompt)


def _images(value: Any, dataset: str, line: int) -> tuple[str, ...]:
    if value is None or value == "" or value == []:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(v, str) and v for v in value):
        return tuple(value)
    raise RowError(dataset, line, "image", "expected a path or a list of non-empty paths")


def _image_field(n_images: int, k: int) -> str:
    return "image" if n_images == 1 else f"image[{k}]"
