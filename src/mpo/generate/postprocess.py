"""Stage 2 of correctness data: judge the Stage-1 samples and build chosen/rejected pairs (CPU only).

For every ``<data_dir>/<ds>.jsonl`` (one Stage-1 record per line) this writes, under ``save_dir``::

    raw/<ds>_pairs_vqa_correctness_rules.jsonl  correct response vs wrong answer
    raw/<ds>_pairs_vqa_format_rules.jsonl       correct response vs format failure (no answer / truncated)
    pos_items/<ds>.jsonl                        every correct record, plus its ``answer_pred``
    neg_items/<ds>.jsonl                        one row per question with a wrong answer and no correct one
    reports/<ds>.malformed_lines.jsonl          every line that could not be used: file, line, why, its text
    reports/gt_responses/malformed_lines.jsonl  the same for ``--gt-responses`` (when given)
    manifest.json                               per input: size, mtime, settings, counts, outputs (resume)

Nothing is written over a file this tool did not write: an output path that is an input file is always refused,
and an existing output that ``manifest.json`` does not list as this dataset's is refused unless ``--overwrite``
(``_check_outputs``; a curated ``raw/`` file in a ``--save-dir`` without a manifest was replaced). A dataset's
outputs are listed in the manifest before they are written, so the files a crash leaves behind are still known
as ours.

A pair row is ``{"image"?, "question", "chosen", "rejected", "answer_gt", "question_orig", "system_prompt"?,
"chosen_meta"?, "rejected_meta"?}``, where ``question`` is the prompt the model was sampled with (the
instruction-wrapped ``question`` of the Stage-1 records, as in the seed) and ``system_prompt`` the row's own, when it
had one: training renders the pair as the responses were drawn. (The original question, with its short-answer
instruction such as "Answer the question using a single word or phrase.", paired long step-by-step answers with a
question that asks for one word; it stays in the row as ``question_orig``.)

The run is split by role over three modules, each readable alone:

* ``mpo.generate.postprocess`` (this module): the run: ``PostprocessConfig``, the per-file loop of
  ``run_postprocess``, ``manifest.json`` (resume), ``--gt-responses``, the output-path checks, and writing
  the files;
* ``mpo.generate.scan``: pass 1: reading the Stage-1 files, judging each line (``judge_record``) and
  grouping the verdicts by key within bounded memory;
* ``mpo.generate.pairs``: pair selection per key (``select_pairs``).

Every public name of the three is importable from here, as it was before the split.

How it stays within bounded memory on a 1.2-million-line file: pass 1 streams the file in byte ranges
(one per process-pool task), judges each line and keeps only a small ``Entry`` per line (a digest of the
response, the label, the normalised answer, the byte offset), grouped by key. Pass 2 walks the keys in
sorted order, picks pairs from those entries, and re-reads just the records it writes by offset (the four
files are written by the pool too, one file per worker at a time).

Determinism: keys are ``(image, question_orig, answer, system_prompt, prompt)`` (``mpo.generate.scan.Key``);
identical responses of a key are merged before pairing; candidates are ordered by response digest and sampled
with an RNG seeded from a stable hash of the key; outputs are sorted by key, then by (chosen, rejected).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mpo.data.errors import RowError
from mpo.fsio import atomic_write_json, atomic_write_jsonl
from mpo.generate.answers import extract_answer, mode_for_dataset
from mpo.generate.outpaths import OutputPathError, check_outputs
from mpo.generate.pairs import _KeyPlan, _plan, select_pairs
from mpo.generate.scan import (
    FMT,
    MAX_LOGGED_ERRORS,
    NEG,
    POS,
    Entry,
    Judgement,
    Key,
    _answers,
    _apply_fix,
    _scan_file,
    judge_record,
    malformed_rows,
    no_stage1_files,
    question_of,
    stage1_files,
)

# Entry, Judgement, judge_record, select_pairs (and POS/NEG/FMT, Key, MAX_LOGGED_ERRORS) moved to scan.py
# and pairs.py; they are re-exported here, so imports from this module keep working.
__all__ = ["DatasetStats", "Entry", "Judgement", "Key", "ManifestConflict", "OutputPathError", "PostprocessConfig",
           "judge_record", "output_paths", "run_postprocess", "select_pairs"]

Question = tuple[str, str, str]
"""``(image, question_orig, answer)`` of a key (``question_of``): what ``--gt-responses`` positives join by."""

JUDGE_VERSION = 5
"""Bump when judging or the rows written change, so that ``manifest.json`` entries of older runs are recomputed.
2: units after numbers. 3: signs, relations, factorials and interval brackets make an answer differ; pair rows
keep the sampled prompt and the row's ``system_prompt``. 4: what version 3 broke is right again: markdown bold
(``**12** cm``), a spaced or loose dash (``x - y``, ``- Paris``), brackets around one quantity (``(12 cm)``), ``!``
after a CJK character, a leading ``≈`` written tight. 5: a minus before a function name or a short letter group
(``- sin x``, ``sin(-x)``) and a double negation (``-(-5)``) count; ``**12**cm`` is bold 12 and ``(1,000)`` one
number."""


class ManifestConflict(ValueError):
    """A dataset name of ``--data-dir`` is already in ``--save-dir`` built from another input file."""


@dataclass(frozen=True)
class PostprocessConfig:
    """Settings of ``mpo postprocess correctness`` (flag names in the error messages)."""

    data_dir: Path
    save_dir: Path
    answer_fix: bool = False
    force: bool = False
    gt_responses: Path | None = None
    num_pairs_per_key: int = 15
    max_lines: int = 1_000_000
    overwrite: bool = False
    workers: int = 2
    timeout: float = 2.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "data_dir", Path(self.data_dir))
        object.__setattr__(self, "save_dir", Path(self.save_dir))
        for flag, value, low in (("--num-pairs-per-key", self.num_pairs_per_key, 0),
                                 ("--max-lines", self.max_lines, 1), ("--workers", self.workers, 1)):
            if value < low:
                raise ValueError(f"{flag}: must be >= {low}, got {value}")
        if not (math.isfinite(self.timeout) and self.timeout > 0):  # nan passed "<= 0" and broke manifest.json
            raise ValueError(f"--timeout: must be > 0, got {self.timeout}")
        if not Path(self.data_dir).is_dir():
            raise ValueError(f"--data-dir: not a folder: {self.data_dir}")
        if self.gt_responses is not None and not Path(self.gt_responses).is_file():
            raise ValueError(f"--gt-responses: no such file: {self.gt_responses}")
        if not stage1_files(self.data_dir):
            raise ValueError(no_stage1_files(self.data_dir))


@dataclass
class DatasetStats:
    """What happened to one input file (also what ``manifest.json`` stores as ``counts``)."""

    dataset: str
    lines: int = 0
    malformed: int = 0
    positives: int = 0
    negatives: int = 0
    format_negatives: int = 0
    format_reasons: dict[str, int] = field(default_factory=dict)
    keys: int = 0
    all_correct_keys: int = 0
    all_wrong_keys: int = 0
    correctness_pairs: int = 0
    format_pairs: int = 0
    neg_items: int = 0
    skipped: bool = False
    errors: list[str] = field(default_factory=list)  # the first MAX_LOGGED_ERRORS, for the console
    malformed_report: str = ""  # the file listing every malformed line (not a count: not in the manifest)

    def summary(self) -> str:
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(self.format_reasons.items()))
        head = f"[{self.dataset}]" + (" skipped (done, see manifest.json)" if self.skipped else "")
        report = f" malformed_lines={self.malformed_report}" if self.malformed and self.malformed_report else ""
        return (f"{head} lines={self.lines} malformed={self.malformed} positives={self.positives} "
                f"negatives={self.negatives} format_negatives={self.format_negatives} ({reasons}) "
                f"keys={self.keys} all_correct_keys={self.all_correct_keys} "
                f"all_wrong_keys={self.all_wrong_keys} pairs: correctness={self.correctness_pairs} "
                f"format={self.format_pairs} neg_items={self.neg_items}{report}")


# ----------------------------------------------------------------------------------------------------
# Writing


class _Records:
    """Re-reads records by (source, byte offset); judged positives come back with ``answer_pred``."""

    def __init__(self, paths: list[Path], mode: str, answer_fix: bool) -> None:
        self._files = [open(p, "rb") for p in paths]  # noqa: SIM115 (closed in close())
        self._mode, self._answer_fix = mode, answer_fix

    def record(self, entry: Entry) -> dict:
        fh = self._files[entry.src]
        fh.seek(entry.offset)
        return json.loads(fh.readline())

    def positive(self, entry: Entry) -> dict:
        """The record of a judged positive as written: ``answer_pred`` added, ``--answer-fix`` applied.
        Extraction and the fix are deterministic, so nothing is re-judged (no math-verify here)."""
        record = self.record(entry)
        version = record.get("prompt_version", "en")
        result = extract_answer(record["response"], version)
        record["answer_pred"] = result.answer
        if self._answer_fix and (fixed := _apply_fix(record["response"], result, _answers(record), version,
                                                     self._mode)):
            record["response"], record["answer_pred"] = fixed
        return record

    def close(self) -> None:
        for fh in self._files:
            fh.close()


def _pair_rows(plans: list[_KeyPlan], records: _Records, rule: str) -> Iterator[dict]:
    for plan in plans:
        pairs = plan.correctness if rule == "correctness" else plan.format
        loaded: dict[Entry, dict] = {}  # a response takes part in several pairs of its key: read it once
        rows = []
        for pos, neg in pairs:
            if pos not in loaded:
                loaded[pos] = records.positive(pos)
            if neg not in loaded:
                loaded[neg] = records.record(neg)
            chosen, rejected = loaded[pos], loaded[neg]
            row: dict[str, Any] = {"image": rejected["image"]} if rejected.get("image") else {}
            row.update(question=plan.key[4], chosen=chosen["response"], rejected=rejected["response"],
                       answer_gt=plan.key[2], question_orig=plan.key[1])
            if plan.key[3]:
                row["system_prompt"] = json.loads(plan.key[3])
            if "meta" in chosen:
                row["chosen_meta"] = chosen["meta"]
            if "meta" in rejected:
                row["rejected_meta"] = rejected["meta"]
            rows.append(row)
        rows.sort(key=lambda r: (r["chosen"], r["rejected"]))
        yield from rows


def _pos_rows(plans: list[_KeyPlan], records: _Records) -> Iterator[dict]:
    for plan in plans:
        for entry in plan.positives:
            yield records.positive(entry)


def _neg_rows(plans: list[_KeyPlan], records: _Records) -> Iterator[dict]:
    """Hard questions as valid Stage-1 input: ``question`` is the original question, never the prompt (it would
    be wrapped twice), with the row's own ``system_prompt`` when it had one (it is part of the prompt)."""
    for plan in plans:
        if plan.neg_item is not None:
            record = records.record(plan.neg_item)
            row: dict[str, Any] = {"image": record["image"]} if record.get("image") else {}
            row.update(question=plan.key[1], answer=record["answer"])
            if plan.key[3]:
                row["system_prompt"] = json.loads(plan.key[3])
            if "meta" in record:
                row["meta"] = record["meta"]
            yield row


class _Writer:
    """Writes output files of one dataset from its plans, each atomically (``mpo.fsio``)."""

    def __init__(self, plans: list[_KeyPlan], sources: list[Path], mode: str, answer_fix: bool) -> None:
        self._plans, self._records = plans, _Records(sources, mode, answer_fix)

    def write(self, kind: str, dest: Path) -> int:
        plans, records = self._plans, self._records
        rows = (_pos_rows(plans, records) if kind == "pos_items" else _neg_rows(plans, records)
                if kind == "neg_items" else _pair_rows(plans, records, kind))
        return atomic_write_jsonl(dest, rows)

    def close(self) -> None:
        self._records.close()


_POOL_WRITER: _Writer | None = None  # one per pool worker, built by the pool's initializer


def _init_pool_writer(*args: Any) -> None:
    global _POOL_WRITER
    _POOL_WRITER = _Writer(*args)


def _pool_write(job: tuple[str, Path]) -> int:
    assert _POOL_WRITER is not None
    return _POOL_WRITER.write(*job)


def _write_outputs(plans: list[_KeyPlan], sources: list[Path], mode: str, cfg: PostprocessConfig,
                   paths: dict[str, Path]) -> None:
    """The four files, written by up to ``cfg.workers`` processes (one file each at a time): pass 2 is
    JSON parsing and encoding, as costly as judging. The plans reach the workers through the pool's
    initializer, which a fork start inherits without pickling."""
    jobs = [(kind, paths[kind]) for kind in ("pos_items", "correctness", "format", "neg_items")]
    args = (plans, sources, mode, cfg.answer_fix)
    if cfg.workers == 1:
        writer = _Writer(*args)
        try:
            for job in jobs:
                writer.write(*job)
        finally:
            writer.close()
        return
    with ProcessPoolExecutor(min(cfg.workers, len(jobs)), initializer=_init_pool_writer, initargs=args) as pool:
        list(pool.map(_pool_write, jobs))


GT_REPORT = Path("reports") / "gt_responses" / "malformed_lines.jsonl"  # a folder: no dataset's report is named so


def output_paths(save_dir: Path, ds: str) -> dict[str, Path]:
    """The files written for dataset ``ds``: the seed's four, then the report of its malformed lines."""
    save_dir = Path(save_dir)
    return {"correctness": save_dir / "raw" / f"{ds}_pairs_vqa_correctness_rules.jsonl",
            "format": save_dir / "raw" / f"{ds}_pairs_vqa_format_rules.jsonl",
            "pos_items": save_dir / "pos_items" / f"{ds}.jsonl",
            "neg_items": save_dir / "neg_items" / f"{ds}.jsonl",
            "malformed": save_dir / "reports" / f"{ds}.malformed_lines.jsonl"}


# ----------------------------------------------------------------------------------------------------
# Driver


def _file_id(path: Path) -> dict[str, Any]:
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _settings(cfg: PostprocessConfig, mode: str) -> dict[str, Any]:
    """What the outputs depend on besides the input file; a change means recompute."""
    gt = _file_id(Path(cfg.gt_responses)) if cfg.gt_responses else None
    return {"judge_version": JUDGE_VERSION, "mode": mode, "num_pairs_per_key": cfg.num_pairs_per_key,
            "max_lines": cfg.max_lines, "answer_fix": cfg.answer_fix, "force": cfg.force, "gt_responses": gt,
            "timeout": cfg.timeout}


def _process(path: Path, cfg: PostprocessConfig, gt_pos: dict[Question, list[Entry]], mode: str) -> DatasetStats:
    stats = DatasetStats(dataset=path.stem)
    scan = _scan_file(path, 0, mode, cfg, cfg.max_lines)
    stats.lines, stats.malformed = scan.lines, len(scan.bad)
    stats.errors = [str(RowError(str(path), b.line, b.field_name, b.message)) for b in scan.bad[:MAX_LOGGED_ERRORS]]
    paths = output_paths(cfg.save_dir, path.stem)
    atomic_write_jsonl(paths["malformed"], malformed_rows(path, scan.bad))
    stats.format_reasons = dict(sorted(scan.reasons.items()))
    labels = Counter(e.label for entries in scan.groups.values() for e in entries)
    stats.positives, stats.negatives, stats.format_negatives = labels[POS], labels[NEG], labels[FMT]
    stats.keys = len(scan.groups)
    plans = _plan(scan, gt_pos, cfg, stats)
    del scan  # the plans hold the few entries that are written; the rest can go before pass 2
    sources = [path] + ([Path(cfg.gt_responses)] if cfg.gt_responses else [])
    _write_outputs(plans, sources, mode, cfg, paths)
    return stats


def _gt_positives(cfg: PostprocessConfig, mode: str, cache: dict[str, dict[Question, list[Entry]]],
                  log: Callable[[str], None]) -> dict[Question, list[Entry]]:
    """Judged positives of ``--gt-responses`` (source 1), by question (``question_of``: a reference response joins
    the keys of its question whatever prompt or system prompt they were sampled with); judged once per checking
    mode. Its malformed lines (the same in every mode) are logged and written to :data:`GT_REPORT` at its first
    scan."""
    if cfg.gt_responses is None:
        return {}
    if mode not in cache:
        path = Path(cfg.gt_responses)
        scan = _scan_file(path, 1, mode, cfg, 1 << 62)
        if not cache:
            report = cfg.save_dir / GT_REPORT
            atomic_write_jsonl(report, malformed_rows(path, scan.bad))
            for b in scan.bad[:MAX_LOGGED_ERRORS]:
                log(f"malformed: {RowError(str(path), b.line, b.field_name, b.message)} (--gt-responses)")
            if scan.bad:
                log(f"malformed: {len(scan.bad)} line(s) of --gt-responses {path} cannot be used; every one is in "
                    f"{report}")
        by_question: dict[Question, list[Entry]] = {}
        for key, entries in scan.groups.items():
            by_question.setdefault(question_of(key), []).extend(e for e in entries if e.label == POS)
        cache[mode] = {q: pos for q, pos in by_question.items() if pos}
    return cache[mode]


def _read_manifest(path: Path, log: Callable[[str], None]) -> dict:
    if not path.is_file():
        return {}
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        log(f"warning: {path}: not valid JSON ({err}); every dataset is recomputed")
        return {}
    return manifest if isinstance(manifest, dict) else {}


def _check_sources(files: list[Path], datasets: dict, manifest_path: Path) -> None:
    """Refuse, before anything is written, a dataset whose name the manifest lists from another input file:
    outputs are named by the file's stem, so ``max_tiles_6/geoqa.jsonl`` and ``max_tiles_12/geoqa.jsonl`` in
    one ``--save-dir`` would silently replace each other's pairs. ``--overwrite`` replaces on purpose."""
    clashes = []
    for path in files:
        old = (datasets.get(path.stem) or {}).get("source") or {}
        new = str(path.resolve())
        if old.get("path") not in (None, new):
            clashes.append(f"{path.stem!r} was built from {old['path']}, not {new}")
    if clashes:
        raise ManifestConflict(f"{manifest_path}: " + "; ".join(clashes) + ": inputs with one name would "
                               "overwrite each other's pairs; use another --save-dir, rename the file, or pass "
                               "--overwrite to replace them")


def _check_outputs(cfg: PostprocessConfig, files: list[Path], manifest: dict, manifest_path: Path) -> None:
    """Refuse (``OutputPathError``), before anything is written, to write where this run must not: over an input
    file (always, ``--overwrite`` too: the input would be gone), through a regular file (``--save-dir afile``), or,
    unless ``--overwrite``, over an existing output that the manifest does not list as this dataset's (curated
    pairs copied in by hand, a file of another tool, a ``--save-dir`` that lost its manifest)."""
    inputs = {path: "--data-dir" for path in files}
    if cfg.gt_responses is not None:
        inputs[Path(cfg.gt_responses)] = "--gt-responses"
    outputs = {path.stem: list(output_paths(cfg.save_dir, path.stem).values()) for path in files}
    gt_report = [cfg.save_dir / GT_REPORT] if cfg.gt_responses is not None else []
    check_outputs([manifest_path, *(p for ps in outputs.values() for p in ps), *gt_report], inputs, "--save-dir",
                  cfg.save_dir)
    if cfg.overwrite:
        return
    datasets = manifest.get("datasets", {})
    foreign = [p for ds, ps in outputs.items() for p in ps
               if p.exists() and str(p.relative_to(cfg.save_dir)) not in (datasets.get(ds) or {}).get("outputs", [])]
    foreign += [p for p in gt_report if p.exists() and str(GT_REPORT) not in manifest.get("reports", [])]
    if foreign:
        more = f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else ""
        raise OutputPathError(f"--save-dir {cfg.save_dir}: {foreign[0]}{more} exists and {manifest_path} does not "
                              "list it as written by mpo postprocess for this dataset; it would be replaced: move it "
                              "away, use another --save-dir, or pass --overwrite to replace it")


def run_postprocess(cfg: PostprocessConfig, log: Callable[[str], None] = print) -> list[DatasetStats]:
    """Process every ``*.jsonl`` of ``cfg.data_dir`` (sorted by name); returns one stats row per file.

    A file whose manifest entry matches its size, mtime and the settings, and whose outputs exist, is
    skipped unless ``overwrite``; a dataset with zero pairs is recorded like any other (empty files). A
    dataset the manifest lists from another input path raises ``ManifestConflict`` unless ``overwrite``; an
    output that would replace an input or a file this tool did not write raises ``OutputPathError``
    (``_check_outputs``).
    """
    if cfg.force and cfg.gt_responses is None:
        log("warning: --force has no effect without --gt-responses (there are no reference responses to add)")
    manifest_path = cfg.save_dir / "manifest.json"
    manifest = _read_manifest(manifest_path, log)
    datasets = manifest.setdefault("datasets", {})
    files = stage1_files(cfg.data_dir)  # not empty: PostprocessConfig refuses a --data-dir without any
    _check_outputs(cfg, files, manifest, manifest_path)
    if not cfg.overwrite:
        _check_sources(files, datasets, manifest_path)
    if cfg.gt_responses is not None and str(GT_REPORT) not in manifest.get("reports", []):
        manifest["reports"] = [*manifest.get("reports", []), str(GT_REPORT)]  # listed before it is written
        atomic_write_json(manifest_path, manifest)
    results, gt_cache = [], {}
    for path in files:
        mode = mode_for_dataset(path.stem)
        source, settings = _file_id(path), _settings(cfg, mode)
        done = datasets.get(path.stem)
        paths = output_paths(cfg.save_dir, path.stem)
        listed = [str(p.relative_to(cfg.save_dir)) for p in paths.values()]
        # the outputs that run wrote: a dataset done before the malformed-lines report existed is still done
        written = [cfg.save_dir / p for p in done.get("outputs", listed)] if done else []
        if (not cfg.overwrite and done and done.get("source") == source
                and done.get("settings") == settings and all(p.is_file() for p in written)):
            stats = DatasetStats(**{**done["counts"], "dataset": path.stem, "skipped": True})
        else:
            # listed before they are written (no settings: not done), so that files a crash leaves are ours
            datasets[path.stem] = {"source": source, "outputs": listed}
            atomic_write_json(manifest_path, manifest)
            stats = _process(path, cfg, _gt_positives(cfg, mode, gt_cache, log), mode)
            counts = {k: v for k, v in asdict(stats).items()
                      if k not in ("dataset", "skipped", "errors", "malformed_report")}
            datasets[path.stem] = {"source": source, "settings": settings, "counts": counts, "outputs": listed}
            atomic_write_json(manifest_path, manifest)
        stats.malformed_report = str(paths["malformed"]) if paths["malformed"].is_file() else ""
        for message in stats.errors:
            log(f"malformed: {message}")
        if stats.malformed > len(stats.errors) and not stats.skipped:
            log(f"malformed: ... {stats.malformed - len(stats.errors)} more in {path}; every malformed line is "
                f"in {paths['malformed']}")
        log(stats.summary())
        results.append(stats)
    return results

