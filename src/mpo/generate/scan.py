"""Pass 1 of ``mpo postprocess correctness``: read a Stage-1 file, judge every line, group the verdicts by key.

What lives here, and why it is its own module: everything that touches the *input* of Stage 2 before
any pair is picked. That is finding the Stage-1 files of ``--data-dir`` (``stage1_files``; ``no_stage1_files``
says where they are when it holds none), judging one record (``judge_record``: truncated or unextractable responses
are format negatives, never positives), validating the fields a line needs and building its group key
``(image, question_orig, answer, system_prompt, prompt)``, and streaming the file within bounded memory. The
run itself (``mpo.generate.postprocess``) and pair selection (``mpo.generate.pairs``) only see the result: a
``_Scan`` holding, per key, one small ``Entry`` per judged line.

Bounded memory on a 1.2-million-line file: pass 0 counts newlines block by block and cuts the first
``max_lines`` lines into byte ranges (``_byte_ranges``); each range is one process-pool task
(``_scan_range``) that keeps only a digest of the response, the label, the normalised answer and the byte
offset of each line, never the record. Pass 2 re-reads the few records it writes by that offset.
Malformed lines are kept the same way, as ``(line, offset, field, message)`` without their text:
``malformed_rows`` re-reads each by its offset for the report that lists every one of them (the console shows
the first ``MAX_LOGGED_ERRORS``).

A change to how records are judged needs a bump of ``mpo.generate.postprocess.JUDGE_VERSION``, so that
``manifest.json`` entries of older runs are recomputed.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from mpo.data.errors import RowError
from mpo.data.records import is_encodable
from mpo.generate.answers import (
    PROMPT_VERSIONS,
    ExtractResult,
    check_answer,
    extract_answer,
    fix_answer,
    is_empty_answer,
    normalize_answer,
)

if TYPE_CHECKING:  # only for annotations: postprocess imports this module
    from mpo.generate.postprocess import PostprocessConfig

__all__ = ["FMT", "MAX_LOGGED_ERRORS", "NEG", "POS", "BadLine", "Entry", "Judgement", "Key", "judge_record",
           "malformed_rows", "no_stage1_files", "question_of", "stage1_files"]

POS, NEG, FMT = 1, 0, 2
MAX_LOGGED_ERRORS = 20
_MIN_CHUNK_BYTES = 1 << 20  # smaller pool tasks cost more in start-up and pickling than they save
_READ_BLOCK = 1 << 22  # pass 0 counts newlines block by block; ranges are cut at block ends
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")  # only lines with such an escape need the check

Key = tuple[str, str, str, str, str]
"""``(image as JSON text or "", question_orig, answer as text, system_prompt as JSON text or "", prompt)``.

The first three name the question (``--gt-responses`` positives join by them, see ``question_of``); the last
two are what the model was sampled with: the row's own ``system_prompt`` and the instruction-wrapped prompt
(``question``). Answers sampled under another system prompt or template are another group, so a pair never
mixes them, and a pair row can carry both (the prompt is its ``question``, the system prompt its own)."""


class BadLine(NamedTuple):
    """What pass 1 keeps of one malformed line: where it is and why (its text is re-read for the report)."""

    line: int
    offset: int
    field_name: str
    message: str


class Entry(NamedTuple):
    """What pass 1 keeps of one judged line: enough to pick pairs and to re-read the record."""

    digest: int
    label: int
    pred: str
    src: int
    offset: int


class Judgement(NamedTuple):
    """Verdict on one record: ``label`` is POS/NEG/FMT; ``response`` is the text to train on (rewritten
    by ``--answer-fix`` when that applied); ``reason`` names a format failure."""

    label: int
    answer_pred: str | None
    reason: str | None
    response: str


class _Malformed(Exception):
    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(message)
        self.field_name, self.message = field_name, message


# ----------------------------------------------------------------------------------------------------
# Judging one record


def judge_record(record: dict, mode: str, *, answer_fix: bool = False, timeout: float = 2.0) -> Judgement:
    """Label one Stage-1 record. Truncated responses (``finish_reason == "length"``) and responses with
    no extractable answer are format negatives, never positives. ``answer`` may be a list of accepted
    answers. With ``answer_fix``, a *correct* response's answer is rewritten (``fix_answer``) and kept
    only if the rewritten text is judged correct again."""
    response, version = record["response"], record.get("prompt_version", "en")
    if record.get("finish_reason") == "length":
        return Judgement(FMT, None, "truncated", response)
    result = extract_answer(response, version)
    if result.answer is None:
        return Judgement(FMT, None, result.reason, response)
    answers = _answers(record)
    if not any(check_answer(result.answer, gt, mode, timeout=timeout) for gt in answers):
        return Judgement(NEG, result.answer, None, response)
    if answer_fix and (fixed := _apply_fix(response, result, answers, version, mode)):
        return Judgement(POS, fixed[1], None, fixed[0])
    return Judgement(POS, result.answer, None, response)


def _answers(record: dict) -> list[Any]:
    return record["answer"] if isinstance(record["answer"], list) else [record["answer"]]


def _apply_fix(response: str, result: ExtractResult, answers: list[Any], version: str,
               mode: str) -> tuple[str, str] | None:
    """``(rewritten response, its answer)`` when ``fix_answer`` applies and the rewrite is judged correct
    again. Only option-letter answers are rewritten, so this never reaches math-verify: it gives the
    same result in pass 2 as in pass 1."""
    for gt in answers:
        fixed = fix_answer(response, result, gt, version)
        again = extract_answer(fixed, version) if fixed else None
        if again and again.answer and check_answer(again.answer, gt, mode):
            return fixed, again.answer
    return None


def _key_of(record: Any) -> Key:
    """Validate the fields pass 1 needs and build the group key (raises ``_Malformed``)."""
    if not isinstance(record, dict):
        raise _Malformed("-", f"expected a JSON object, got {type(record).__name__}")
    if not isinstance(record.get("response"), str):
        raise _Malformed("response", "missing" if "response" not in record else "not a string")
    if is_empty_answer(record.get("answer")):  # the rule Stage 1 applies to prompt rows
        raise _Malformed("answer", "missing or empty")
    version = record.get("prompt_version", "en")
    if version not in PROMPT_VERSIONS:
        expected = ", ".join(PROMPT_VERSIONS)
        raise _Malformed("prompt_version", f"unknown {version!r}; expected one of {expected}")
    question = record.get("question_orig", record.get("question"))
    if not isinstance(question, str):
        raise _Malformed("question_orig", "missing (and no question)")
    prompt = record.get("question")  # the prompt it was sampled with; a record without one: the question itself
    prompt = prompt if isinstance(prompt, str) else question
    image, answer, system = record.get("image"), record["answer"], record.get("system_prompt")
    image_key = image if isinstance(image, str) else json.dumps(image, ensure_ascii=False) if image else ""
    answer_key = answer if isinstance(answer, str) else json.dumps(answer, ensure_ascii=False)
    # only a string is a system prompt (Stage 1 and training ignore anything else): see with_row_system
    system_key = json.dumps(system, ensure_ascii=False) if isinstance(system, str) else ""
    return image_key, question, answer_key, system_key, prompt


def question_of(key: Key) -> tuple[str, str, str]:
    """The question a key samples: ``(image, question_orig, answer)``, without how it was prompted."""
    return key[0], key[1], key[2]


def _require_unicode(record: Any) -> None:
    """JSON may escape half a UTF-16 pair (``"\\ud83d"``): valid JSON, but a string that cannot be encoded, so
    hashing the response or writing the record out would raise far from this line. Such a line is malformed."""
    for name, value in record.items() if isinstance(record, dict) else ():
        if not (is_encodable(name) and is_encodable(json.dumps(value, ensure_ascii=False))):
            raise _Malformed(name if is_encodable(name) else "-", "is not valid Unicode: a \\ud800-\\udfff "
                             "escape without its other half (lone surrogate)")


def _digest(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big")


# ----------------------------------------------------------------------------------------------------
# Pass 1: stream byte ranges, judge, group


@dataclass
class _Scan:
    groups: dict[Key, list[Entry]] = field(default_factory=dict)
    lines: int = 0
    bad: list[BadLine] = field(default_factory=list)  # every malformed line, in file order
    reasons: Counter[str] = field(default_factory=Counter)

    def merge(self, other: _Scan) -> None:
        for key, entries in other.groups.items():
            mine = self.groups.get(key)
            if mine is None:
                self.groups[key] = entries
            else:
                mine.extend(entries)
        self.lines += other.lines
        self.bad.extend(other.bad)
        self.reasons.update(other.reasons)


class _Task(NamedTuple):
    path: str
    start: int
    end: int
    first_line: int
    src: int
    mode: str
    answer_fix: bool
    timeout: float


def _scan_range(task: _Task) -> _Scan:
    """Judge the lines in ``[start, end)`` of one file (a process-pool task)."""
    out = _Scan()
    with open(task.path, "rb") as fh:
        fh.seek(task.start)
        offset, line = task.start, task.first_line - 1
        while offset < task.end:
            raw = fh.readline()
            if not raw:
                break
            here, offset, line = offset, offset + len(raw), line + 1
            if not raw.strip():
                continue
            out.lines += 1
            try:
                record = json.loads(raw)
                if _SURROGATE_ESCAPE.search(raw):
                    _require_unicode(record)
                key = _key_of(record)
                verdict = judge_record(record, task.mode, answer_fix=task.answer_fix, timeout=task.timeout)
            except _Malformed as err:
                out.bad.append(BadLine(line, here, err.field_name, err.message))
                continue
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                out.bad.append(BadLine(line, here, "-", f"not valid JSON ({err})"))
                continue
            except RecursionError:
                out.bad.append(BadLine(line, here, "-", "not valid JSON (nested too deeply)"))
                continue
            if verdict.reason:
                out.reasons[verdict.reason] += 1
            pred = normalize_answer(verdict.answer_pred) if verdict.answer_pred is not None else ""
            entry = Entry(_digest(verdict.response), verdict.label, pred, task.src, here)
            out.groups.setdefault(key, []).append(entry)
    return out


def malformed_rows(path: Path, bad: list[BadLine]) -> Iterator[dict[str, Any]]:
    """One report row per malformed line of ``path``: ``RowError.to_dict()`` (file, line, field, message) plus
    the line as it is in the file, without its newline: ``raw``, or ``raw_base64`` when it is not UTF-8 (JSON
    cannot hold those bytes, and the report must give the line back exactly)."""
    with open(path, "rb") as fh:
        for entry in bad:
            fh.seek(entry.offset)
            raw = fh.readline().removesuffix(b"\n")
            row: dict[str, Any] = RowError(str(path), entry.line, entry.field_name, entry.message).to_dict()
            try:
                row["raw"] = raw.decode("utf-8")
            except UnicodeDecodeError:
                row["raw_base64"] = base64.b64encode(raw).decode("ascii")
            yield row


def stage1_files(data_dir: Path) -> list[Path]:
    """The datasets of ``--data-dir``: its ``*.jsonl`` files (directly in it, not below), sorted by name."""
    return sorted(p for p in Path(data_dir).iterdir() if p.suffix == ".jsonl" and p.is_file())


_SKIP_DIRS = frozenset({"parts", "reports"})  # Stage 1's own bookkeeping: part files and reports are no datasets
_MAX_DIRS_SEEN = 2000  # a --data-dir at the root of a large tree: look a little, never walk it all


def no_stage1_files(data_dir: Path) -> str:
    """Why a ``--data-dir`` without ``*.jsonl`` files is refused, naming the folders below it (at most 3 levels
    down) that hold some. The seed README passes the sampling ``--out-dir`` here, whose files lie in
    ``<out-dir>/<model>/max_tiles_<N>/``; the run used to print a warning, write nothing and exit 0, so a
    scripted pipeline went on with no pairs."""
    found: list[Path] = []
    for seen, (root, dirs, files) in enumerate(os.walk(data_dir)):
        depth = len(Path(root).relative_to(data_dir).parts)
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS) if depth < 3 else []
        if depth and any(f.endswith(".jsonl") for f in files):
            found.append(Path(root))
        if seen >= _MAX_DIRS_SEEN:
            break
    head = f"--data-dir {data_dir}: no *.jsonl files in it (Stage-1 files must lie directly in the folder)"
    if not found:
        return (f"{head}, nor in its sub-folders (3 levels deep); pass the folder that mpo generate correctness "
                "wrote, <out-dir>/<model>/max_tiles_<N>")
    if len(found) == 1:
        return f"{head}; did you mean {found[0]}?"
    names = ", ".join(str(p) for p in found[:5]) + (f" (and {len(found) - 5} more)" if len(found) > 5 else "")
    return f"{head}; did you mean one of {names}? (one run per folder, e.g. one per tile setting)"


def _byte_ranges(path: Path, max_lines: int, chunk_bytes: int) -> list[tuple[int, int, int]]:
    """``(start, end, first_line)`` ranges covering the first ``max_lines`` lines, cut after newlines."""
    ranges, start, first, lines, pos = [], 0, 1, 0, 0
    with open(path, "rb") as fh:
        while lines < max_lines:
            block = fh.read(_READ_BLOCK)
            if not block:
                break
            n = block.count(b"\n")
            if lines + n >= max_lines:  # the limit falls inside this block: stop after that newline
                cut = -1
                for _ in range(max_lines - lines):
                    cut = block.index(b"\n", cut + 1)
                pos += cut + 1
                break
            lines, pos = lines + n, pos + len(block)
            if n and pos - start >= chunk_bytes:
                end = pos - (len(block) - 1 - block.rfind(b"\n"))
                ranges.append((start, end, first))
                start, first = end, lines + 1
    if pos > start:
        ranges.append((start, pos, first))
    return ranges


def _scan_file(path: Path, src: int, mode: str, cfg: PostprocessConfig, max_lines: int) -> _Scan:
    chunk_bytes = max(path.stat().st_size // (cfg.workers * 4), _MIN_CHUNK_BYTES)
    tasks = [_Task(str(path), s, e, f, src, mode, cfg.answer_fix, cfg.timeout)
             for s, e, f in _byte_ranges(path, max_lines, chunk_bytes)]
    total = _Scan()
    if cfg.workers == 1 or len(tasks) < 2:
        for part in map(_scan_range, tasks):
            total.merge(part)
    else:
        with ProcessPoolExecutor(max_workers=min(cfg.workers, len(tasks))) as pool:
            for part in pool.map(_scan_range, tasks):
                total.merge(part)
    return total
