"""The training view of a meta file: datasets concatenated in meta order after ``repeat_time``, read lazily.

Item ``i`` maps to (dataset, row) through cumulative sizes; nothing but the row offsets is held in memory. Like
InternVL there is no per-dataset weighting beyond ``repeat_time`` (the trainer's sampler shuffles the union).

``repeat_time`` (see ``mpo.data.meta``) with N rows in the file:

* ``r < 1``: ``int(N * r)`` distinct rows drawn without replacement;
* ``r >= 1``: every row ``int(r)`` times, plus ``int(N * (r - int(r)))`` distinct rows for the fraction
  (InternVL truncates the fraction: 1.5 behaves like 1);
* ``r == 0``: no rows; the annotation file is not even opened.

``int(N * r)`` is computed on the decimal value written in the meta file (``Fraction(repr(r))``), so 2.3 x 10 rows is
23 rows, not 22 as float arithmetic (``2.3 - 2 = 0.2999...``) would give. The draw is seeded by the run seed and the
dataset *name* (not its position), so adding a dataset to the meta file does not change the others' subsamples. It is
drawn once, at construction, identically on every rank.
"""

from __future__ import annotations

import logging
import math
import zlib
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import Image

from mpo.data.errors import MetaError
from mpo.data.images import DEFAULT_MAX_PIXELS, load_image, pixel_limit
from mpo.data.index import AnnotationIndex
from mpo.data.meta import DatasetSpec
from mpo.data.records import PreferenceRecord, parse_row
from mpo.data.records import tile_budget as _tile_budget

__all__ = ["PreferenceMixture", "RowSelection", "select_rows"]

log = logging.getLogger(__name__)

_MAX_ROWS = 2**62  # mixture indices are int64; checked per dataset and for the sum


@dataclass(frozen=True)
class RowSelection:
    """Rows of one dataset after ``repeat_time``: ``copies`` full passes over ``n_rows``, then ``extra`` (sorted)."""

    n_rows: int
    copies: int
    extra: np.ndarray

    def __len__(self) -> int:
        return self.copies * self.n_rows + len(self.extra)

    def row(self, j: int) -> int:
        full = self.copies * self.n_rows
        return j % self.n_rows if j < full else int(self.extra[j - full])


def select_rows(n_rows: int, repeat_time: float, *, seed: int, name: str) -> RowSelection:
    """Apply ``repeat_time`` to a file of ``n_rows`` rows (rules in the module docstring)."""
    if repeat_time < 0 or not math.isfinite(repeat_time):
        raise ValueError(f"{name}: repeat_time must be a finite number >= 0, got {repeat_time}")
    copies = int(repeat_time)
    total = math.floor(n_rows * Fraction(repr(float(repeat_time))))
    if total > _MAX_ROWS:  # a typo such as 1e30; item indices are int64
        raise MetaError(f"{name}: repeat_time {repeat_time:g} x {n_rows} rows = {total:.3g} rows, more than the "
                        f"{_MAX_ROWS:.3g} a mixture can index")
    k = total - copies * n_rows
    rng = np.random.default_rng([seed, zlib.crc32(name.encode("utf-8"))])
    extra = np.sort(rng.choice(n_rows, size=k, replace=False)) if k else np.zeros(0, dtype=np.int64)
    return RowSelection(n_rows, copies, extra.astype(np.int64))


class PreferenceMixture:
    """All datasets of a meta file as one indexable sequence of preference rows.

    Args:
        specs: from ``mpo.data.read_meta``.
        seed: seeds the ``repeat_time`` subsamples (use the run seed, the same on every rank).
        cache_dir: index cache folder (default ``$MPO_CACHE_DIR/index`` or ``~/.cache/mpo/index``).
        max_dynamic_patch: the global tile budget, for datasets whose entry sets none.
        max_image_pixels: decompression-bomb limit of ``load_image`` (``data.max_image_pixels``): an image with
            more pixels is a row error; None or 0 turns the limit off (see ``mpo.data.images``).
    """

    def __init__(self, specs: list[DatasetSpec], *, seed: int = 42, cache_dir: str | Path | None = None,
                 max_dynamic_patch: int = 12, max_image_pixels: int | None = DEFAULT_MAX_PIXELS):
        names = [s.name for s in specs]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"dataset names must be unique, repeated: {', '.join(dupes)}")
        self._specs = list(specs)
        self._by_name = {s.name: d for d, s in enumerate(specs)}
        self.max_dynamic_patch = max_dynamic_patch
        self.max_image_pixels = pixel_limit(max_image_pixels)
        self._indexes: list[AnnotationIndex | None] = []
        self._selections: list[RowSelection] = []
        for spec in specs:
            index = AnnotationIndex(spec.annotation, cache_dir) if spec.repeat_time > 0 else None
            n_rows = len(index) if index is not None else 0
            if index is not None and spec.length is not None and spec.length != n_rows:
                log.warning("%s: meta length %d differs from the %d rows of %s", spec.name, spec.length, n_rows,
                            spec.annotation)
            self._indexes.append(index)
            self._selections.append(select_rows(n_rows, spec.repeat_time, seed=seed, name=spec.name))
            if spec.repeat_time > 0 and n_rows and not len(self._selections[-1]):
                log.warning("%s: repeat_time %g of %d rows selects none (int(%d x %g) = 0): the dataset is left out",
                            spec.name, spec.repeat_time, n_rows, n_rows, spec.repeat_time)
        sizes = [len(s) for s in self._selections]
        if sum(sizes) > _MAX_ROWS:  # np.cumsum would wrap around silently
            raise MetaError(f"the datasets hold {sum(sizes):.3g} rows after repeat_time, more than the "
                            f"{_MAX_ROWS:.3g} a mixture can index")
        self._offsets = np.cumsum([0] + sizes).astype(np.int64)

    def __len__(self) -> int:
        return int(self._offsets[-1])

    @property
    def dataset_sizes(self) -> dict[str, int]:
        """Rows per dataset after ``repeat_time``, in meta order."""
        return {s.name: len(sel) for s, sel in zip(self._specs, self._selections, strict=True)}

    @property
    def specs(self) -> list[DatasetSpec]:
        return list(self._specs)

    def spec(self, dataset_index: int) -> DatasetSpec:
        return self._specs[dataset_index]

    def locate(self, i: int) -> tuple[int, int]:
        """``(dataset index, row index in its annotation file)`` of mixture item ``i``."""
        if not 0 <= i < len(self):
            raise IndexError(f"mixture index {i} out of range [0, {len(self)})")
        d = int(np.searchsorted(self._offsets, i, side="right")) - 1
        return d, self._selections[d].row(i - int(self._offsets[d]))

    def source(self, i: int) -> tuple[str, int]:
        """``(dataset name, 1-based line number)`` of item ``i``, without parsing the row."""
        d, row = self.locate(i)
        index = self._indexes[d]
        assert index is not None
        return self._specs[d].name, index.line_number(row)

    def record(self, i: int) -> PreferenceRecord:
        """The parsed row of item ``i``. Raises ``RowError`` for a bad row (warnings are not raised)."""
        d, row = self.locate(i)
        index = self._indexes[d]
        assert index is not None  # a repeat_time 0 dataset has no items to locate
        record, _warnings = parse_row(index.raw(row), self._specs[d].name, index.line_number(row))
        return record

    def images(self, record: PreferenceRecord) -> list[Image.Image]:
        """The decoded RGB images of ``record``, in placeholder order. Raises ``ImageError``."""
        spec = self._specs[self._by_name[record.dataset]]
        return [load_image(spec.root, rel, dataset=record.dataset, line=record.line, field=record.image_field(k),
                           allow_outside_root=spec.allow_outside_root, max_pixels=self.max_image_pixels)
                for k, rel in enumerate(record.images)]

    def tile_budget(self, record: PreferenceRecord) -> int:
        """Tiles allowed per image of ``record``: the dataset's (or the global) budget split over its images."""
        spec = self._specs[self._by_name[record.dataset]]
        return _tile_budget(spec.max_dynamic_patch or self.max_dynamic_patch, len(record.images))
