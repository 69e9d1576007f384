"""``mpo data check``: validate every dataset, every row and every image of a meta file, before a run finds out.

Each problem is one line ``DATASET:LINE: FIELD: MESSAGE`` (warnings read ``DATASET:LINE: FIELD: warning: MESSAGE``);
problems of a whole dataset entry (a meta key) use line 0 and the key as field. A summary table per dataset follows.

Exit code: 0 no error (warnings allowed), 1 some row or dataset has an error, 2 the meta file itself is unusable.

With a processor, each usable pair is also planned by ``mpo.data.encode.PairEncoder.plan_length`` (prompt + the
longer answer, image tokens included) and the table shows token-length p50/p95/max. A pair over ``max_length`` is
a warning of kind ``too_long``: the data is valid, but training at that length will drop it. Give the run's
``system_prompt`` (``data.system_prompt``: auto | none | text) and ``max_dynamic_patch``, or the lengths are those of
a run with the defaults. ``max_image_pixels`` is the decompression-bomb limit (``data.max_image_pixels``).

``workers > 1`` checks chunks of rows in a process pool (spawned, so it is safe after torch has started threads).
"""

from __future__ import annotations

import math
import multiprocessing
import re
import sys
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from mpo.data.errors import MetaError, RowError, TooLongError
from mpo.data.images import DEFAULT_MAX_PIXELS, load_image, pixel_limit
from mpo.data.index import AnnotationIndex
from mpo.data.meta import DatasetSpec, MetaEntry, read_meta_entries
from mpo.data.records import PreferenceRecord, parse_row, tile_budget

__all__ = ["CheckReport", "DatasetReport", "Problem", "run_check"]


@dataclass(frozen=True)
class Problem:
    """One finding; ``line`` is 1-based, or 0 for the dataset's meta entry."""

    line: int
    severity: str
    field: str | None
    message: str
    kind: str = "row"

    @classmethod
    def from_error(cls, err: RowError) -> Problem:
        return cls(err.line, err.severity, err.field, err.message, err.kind)


@dataclass
class DatasetReport:
    """What ``run_check`` found in one dataset. ``error`` is set when the dataset as a whole is unusable."""

    name: str
    error: str | None = None
    rows: int = 0
    usable: int = 0
    problems: list[Problem] = field(default_factory=list)
    modalities: Counter = field(default_factory=Counter)
    lengths: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    too_long: int = 0

    @property
    def errors_by_kind(self) -> Counter:
        return Counter(p.kind for p in self.problems if p.severity == "error")

    @property
    def n_warnings(self) -> int:
        return sum(p.severity == "warning" for p in self.problems)

    def length_stats(self) -> dict[str, int] | None:
        if not len(self.lengths):
            return None
        p50, p95 = np.percentile(self.lengths, [50, 95], method="inverted_cdf")
        return {"p50": int(p50), "p95": int(p95), "max": int(self.lengths.max()), "over_max_length": self.too_long}

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "error": self.error, "rows": self.rows, "usable": self.usable,
                "problems": [{"line": p.line, "severity": p.severity, "field": p.field, "message": p.message}
                             for p in self.problems],
                "errors_by_kind": dict(self.errors_by_kind), "modalities": dict(self.modalities),
                "lengths": self.length_stats()}


@dataclass
class CheckReport:
    """The result of ``run_check``; ``meta_error`` is set when the meta file itself is unusable."""

    meta_path: str
    datasets: list[DatasetReport] = field(default_factory=list)
    meta_error: str | None = None
    planned_lengths: bool = False
    max_length: int | None = None

    @property
    def ok(self) -> bool:
        return self.meta_error is None and not any(
            d.error or any(p.severity == "error" for p in d.problems) for d in self.datasets)

    @property
    def exit_code(self) -> int:
        return 2 if self.meta_error else 0 if self.ok else 1

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "error": self.meta_error, "datasets": [d.to_json() for d in self.datasets]}

    def problem_lines(self) -> Iterator[str]:
        if self.meta_error:
            yield self.meta_error
        for d in self.datasets:
            if d.error:
                yield f"{d.name}:0: {d.error}"
            for p in d.problems:
                tag = "warning: " if p.severity == "warning" else ""
                yield f"{d.name}:{p.line}: {p.field or '-'}: {tag}{p.message}"

    def lines(self) -> list[str]:
        """Problem lines, then the summary table; control characters from the data are shown escaped."""
        out = list(self.problem_lines())
        if self.datasets:
            out += ([""] if out else []) + _table(self)
        return [_printable(line) for line in out]


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _printable(text: str) -> str:
    """Dataset names, paths and row text can hold terminal escape sequences (``\\x1b]...``): a report printed to
    a terminal shows them as ``\\xNN`` instead of letting the data drive the terminal."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def run_check(meta_path: str | Path, *, processor: Any = None, max_length: int | None = None, workers: int = 1,
              max_dynamic_patch: int = 12, system_prompt: str = "auto", progress: bool = True,
              max_image_pixels: int | None = DEFAULT_MAX_PIXELS, cache_dir: str | Path | None = None) -> CheckReport:
    """Check a meta file; see the module docstring. ``processor`` (an HF processor) turns on length planning,
    with ``system_prompt`` as training's ``data.system_prompt``. Raises ``ValueError`` for an empty
    ``system_prompt`` or a negative ``max_image_pixels`` (0 or None: no limit)."""
    options = _Options(max_dynamic_patch, pixel_limit(max_image_pixels), max_length,
                       str(cache_dir) if cache_dir else None)
    system = None
    if processor is not None:
        from mpo.data.system import resolve_system_prompt

        system = resolve_system_prompt(processor, system_prompt)
    report = CheckReport(str(meta_path), planned_lengths=processor is not None, max_length=max_length)
    try:
        entries = read_meta_entries(meta_path)
    except MetaError as exc:
        report.meta_error = str(exc)
        return report
    try:
        _check_entries(report, entries, options, processor, system, workers, progress)
    finally:
        _INDEXES.clear()
    return report


def _check_entries(report: CheckReport, entries: list[MetaEntry], options: _Options, processor: Any,
                   system: str | None, workers: int, progress: bool) -> None:
    jobs, todo = [], []
    refusal = None
    if processor is not None:  # what training will refuse for this model: say it now
        from mpo.data.augment import augment_refusal

        refusal = augment_refusal(processor)
    for entry in entries:
        dataset, n_rows = _open_dataset(entry, options)
        report.datasets.append(dataset)
        if refusal and entry.spec is not None and entry.spec.data_augment and entry.spec.repeat_time > 0:
            dataset.error = refusal
            continue
        if n_rows:
            todo.append(dataset)
            size = _chunk_size(n_rows, workers)
            jobs += [_Job(entry.spec, start, min(n_rows, start + size), options) for start in range(0, n_rows, size)]
    results: dict[str, list[_ChunkResult]] = {}
    with tqdm(total=sum(j.stop - j.start for j in jobs), unit="row", file=sys.stderr, disable=not progress,
              delay=1.0, desc="mpo data check") as bar:
        for job, result in zip(jobs, _run_jobs(jobs, processor, system, workers), strict=True):
            results.setdefault(job.spec.name, []).append(result)
            bar.update(job.stop - job.start)
    for dataset in todo:
        _merge(dataset, results.get(dataset.name, []))


# ----------------------------------------------------------------------------------------------------
# One chunk of rows: the unit of work of a pool worker.


@dataclass(frozen=True)
class _Options:
    max_dynamic_patch: int
    max_pixels: int | None
    max_length: int | None
    cache_dir: str | None


@dataclass(frozen=True)
class _Job:
    spec: DatasetSpec
    start: int
    stop: int
    options: _Options


@dataclass
class _ChunkResult:
    rows: int = 0
    usable: int = 0
    problems: list[Problem] = field(default_factory=list)
    modalities: Counter = field(default_factory=Counter)
    lengths: list[int] = field(default_factory=list)
    too_long: int = 0


_ENCODER: Any = None  # the PairEncoder of this process (set in the parent, or by _init_worker in a pool worker)


def _make_encoder(processor: Any, system: str | None) -> Any:
    if processor is None:
        return None
    try:
        from mpo.data.encode import PairEncoder
    except ImportError as exc:
        raise RuntimeError(f"token lengths need mpo.data.encode.PairEncoder, which cannot be imported: {exc}") from exc
    # max_length=None: the check measures every pair and compares with max_length itself; ``system`` is the
    # resolved system message (run_check's system_prompt setting), as training renders with
    return PairEncoder(processor, max_length=None, system_prompt=system)


def _init_worker(processor: Any, system: str | None) -> None:
    global _ENCODER
    _ENCODER = _make_encoder(processor, system)


def _run_jobs(jobs: list[_Job], processor: Any, system: str | None, workers: int) -> Iterator[_ChunkResult]:
    global _ENCODER
    if workers <= 1 or len(jobs) <= 1:
        _ENCODER = _make_encoder(processor, system)
        try:
            yield from map(_check_chunk, jobs)
        finally:
            _ENCODER = None
        return
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_init_worker,
                             initargs=(processor, system)) as pool:
        yield from pool.map(_check_chunk, jobs)


_INDEXES: dict[Path, AnnotationIndex] = {}  # per process: a worker loads each index once, not once per chunk


def _index(path: Path, cache_dir: str | None) -> AnnotationIndex:
    if path not in _INDEXES:
        _INDEXES[path] = AnnotationIndex(path, cache_dir)
    return _INDEXES[path]


def _check_chunk(job: _Job) -> _ChunkResult:
    index = _index(job.spec.annotation, job.options.cache_dir)
    result = _ChunkResult()
    for line, raw in index.iter_rows(job.start, job.stop):
        result.rows += 1
        errors = _check_row(raw, line, job.spec, job.options, result)
        result.usable += not errors
    return result


def _check_row(raw: bytes, line: int, spec: DatasetSpec, opt: _Options, result: _ChunkResult) -> int:
    """Check one row into ``result``; return its number of errors."""
    try:
        record, warnings = parse_row(raw, spec.name, line)
    except RowError as err:
        result.problems.append(Problem.from_error(err))
        return 1
    result.problems += [Problem.from_error(w) for w in warnings]
    result.modalities[record.modality] += 1
    sizes, errors = [], 0
    for k, rel in enumerate(record.images):
        try:
            image = load_image(spec.root, rel, dataset=spec.name, line=line, field=record.image_field(k),
                               allow_outside_root=spec.allow_outside_root, max_pixels=opt.max_pixels)
            sizes.append(image.size)
        except RowError as err:
            result.problems.append(Problem.from_error(err))
            errors += 1
    if not errors and _ENCODER is not None:
        errors += _plan_length(record, sizes, spec, opt, result)
    return errors


def _plan_length(record: PreferenceRecord, sizes: list[tuple[int, int]], spec: DatasetSpec, opt: _Options,
                 result: _ChunkResult) -> int:
    budget = tile_budget(spec.max_dynamic_patch or opt.max_dynamic_patch, len(record.images))
    try:
        n = int(_ENCODER.plan_length(record, sizes, max_patches=budget))
    except RowError as err:
        result.problems.append(Problem.from_error(err))
        return int(err.severity == "error")
    except Exception as exc:  # a processor that chokes on one row is that row's problem, not the end of the check
        result.problems.append(Problem(record.line, "error", None, f"cannot plan the token length: "
                                                                   f"{type(exc).__name__}: {exc}", "encode"))
        return 1
    result.lengths.append(n)
    if opt.max_length is not None and n > opt.max_length:
        result.too_long += 1
        result.problems.append(Problem.from_error(TooLongError(
            spec.name, record.line, None, f"{n} tokens (prompt + longer answer, images included) > max_length "
                                          f"{opt.max_length}; training drops this pair", "warning")))
    return 0


# ----------------------------------------------------------------------------------------------------
# Datasets: open, merge chunk results, summarise.


def _chunk_size(n_rows: int, workers: int) -> int:
    # Several chunks per worker balance the pool; 2,000 rows keep the progress bar moving on one worker.
    return max(64, min(2000, math.ceil(n_rows / (4 * max(1, workers)))))


def _open_dataset(entry: MetaEntry, options: _Options) -> tuple[DatasetReport, int]:
    dataset = DatasetReport(entry.name)
    dataset.problems += [Problem(0, "warning", key, message, "meta") for key, message in entry.warnings]
    if entry.spec is None:
        dataset.error = f"{entry.error_field or '-'}: {entry.error}"
        return dataset, 0
    if entry.spec.repeat_time == 0:
        return dataset, 0
    try:
        n_rows = len(_index(entry.spec.annotation, options.cache_dir))
    except OSError as exc:
        dataset.error = f"annotation: cannot read {entry.spec.annotation}: {exc.strerror}"
        return dataset, 0
    if entry.spec.length is not None and entry.spec.length != n_rows:
        dataset.problems.append(Problem(0, "warning", "length", f"is {entry.spec.length} but "
                                        f"{entry.spec.annotation.name} has {n_rows} rows", "meta"))
    return dataset, n_rows


def _merge(dataset: DatasetReport, results: list[_ChunkResult]) -> None:
    lengths = []
    for r in results:
        dataset.rows += r.rows
        dataset.usable += r.usable
        dataset.problems += r.problems
        dataset.modalities.update(r.modalities)
        dataset.too_long += r.too_long
        lengths += r.lengths
    dataset.lengths = np.asarray(lengths, dtype=np.int64)


def _table(report: CheckReport) -> list[str]:
    head = ["dataset", "rows", "usable", "errors", "warnings", "text", "single", "multi"]
    if report.planned_lengths:
        head += ["p50", "p95", "max", f">{report.max_length}" if report.max_length else ">max_len"]
    body = []
    for d in report.datasets:
        if d.error:
            body.append([d.name, "-", "-", "unusable"] + [""] * (len(head) - 4))
            continue
        kinds = " ".join(f"{k}={n}" for k, n in sorted(d.errors_by_kind.items())) or "0"
        row = [d.name, d.rows, d.usable, kinds, d.n_warnings,
               d.modalities["text"], d.modalities["single"], d.modalities["multi"]]
        if report.planned_lengths:
            stats = d.length_stats()
            row += ([stats["p50"], stats["p95"], stats["max"], d.too_long] if stats else ["-"] * 4)
        body.append(row)
    cells = [[str(c) for c in r] for r in [head] + body]
    widths = [max(len(r[k]) for r in cells) for k in range(len(head))]
    return ["  ".join(c.ljust(w) if k == 0 else c.rjust(w)
                      for k, (c, w) in enumerate(zip(r, widths, strict=True))).rstrip() for r in cells]
