r"""Answer judging for sampled responses: pull out the final answer, then compare it with the ground truth.

Everything here is a pure function of its arguments (the math-verify guard keeps a helper process, but
its answers depend only on the inputs). Two steps:

1. ``extract_answer(response, version)`` reads the final answer in the format the prompt version asked
   for. A response without a well-formed answer is a *format failure* with a reason, never "the whole text
   is the answer" (the InternVL seed's behaviour, which let substring-happy scorers accept garbage).
2. ``check_answer(pred, gt, mode)`` decides correctness with cheap, exact rules first (option letters,
   yes/no, normalised strings, numbers with their units: ``mpo.generate.numbers``) and calls math-verify
   only when the prediction looks mathematical (a unit tail cut off) and so does gt, or gt is a number.
   math-verify runs in a child process that is killed when it overruns ``timeout``: sympy can spend
   minutes in C code on strings such as ``10^{10^{10}}``, where a signal-based alarm never fires. That
   process guard lives in ``mpo.generate.mathcheck``; the cleaned and normalised text forms of an answer
   (``clean_answer``, ``normalize_answer``, re-exported here) in ``mpo.generate.normalize``.

Example: the ``en_v2`` response ``"Half of the unit square.\nAnswer: \boxed{\frac{1}{2}}"`` gives
``ExtractResult(answer="\frac{1}{2}", reason=None, span=(40, 51))``; ``check_answer("\frac{1}{2}", "0.5")``
is True, ``check_answer("2.5", "2")`` is False and a response without a box gives
``ExtractResult(None, "no_box")``.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Any

from mpo.generate.mathcheck import _MATH  # math-verify in a killable child process
from mpo.generate.normalize import clean_answer, math_form, normalize_answer
from mpo.generate.numbers import Number, canonical_unit, parse_number, prepare_units, split_unit

__all__ = [
    "ANLS_THRESHOLD",
    "CHECK_MODES",
    "PROMPT_VERSIONS",
    "REL_TOL",
    "ExtractResult",
    "anls_score",
    "check_answer",
    "clean_answer",
    "extract_answer",
    "fix_answer",
    "is_empty_answer",
    "mode_for_dataset",
    "normalize_answer",
    "option_letter",
]

PROMPT_VERSIONS = ("en", "zh", "en_v2", "zh_v2", "en_r1", "zh_r1")
CHECK_MODES = ("auto", "relaxed", "anls")
REL_TOL = 1e-3
"""Relative tolerance for non-integer numbers in ``auto``/``anls`` mode (integers must match exactly)."""
RELAXED_TOL = 0.05
"""ChartQA's relaxed accuracy: 5 % relative error."""
ANLS_THRESHOLD = 0.5
"""An answer passes when its ANLS score (a similarity, 1 - normalised edit distance) reaches this."""
MAX_MATH_CHARS = 300
"""Longer strings are never sent to math-verify: real final answers are short, hostile ones are long."""
MAX_EDIT_CHARS = 500
"""Longer strings get no edit-distance credit (the distance is quadratic in the length)."""


@dataclass(frozen=True, slots=True)
class ExtractResult:
    """The final answer of a response, or why there is none.

    ``answer`` is the cleaned answer text (``None`` on a format failure, then ``reason`` says why) and
    ``span`` the ``(start, end)`` of the raw answer inside the response, used by ``fix_answer``.
    """

    answer: str | None
    reason: str | None = None
    span: tuple[int, int] | None = None


def _fail(reason: str) -> ExtractResult:
    return ExtractResult(None, reason)


# ----------------------------------------------------------------------------------------------------
# Extraction

# One \s* per gap (not "\s*(?:\*\*)?\s*"): two adjacent \s* backtrack quadratically on a long run of spaces.
# A ``**`` after the colon belongs to the marker only when the marker opened bold (``**Final answer:** 12``); in
# ``Final answer: **12** cm`` it opens the answer's bold (taking it left ``12** cm``).
_TRIGGER = re.compile(r"\*\*(?:final answer|答案)\s*(?:\*\*\s*[:：]|[:：]\s*(?:\*\*)?)"
                      r"|(?:final answer|答案)\s*(?:\*\*\s*)?[:：]", re.IGNORECASE)
_BOX = re.compile(r"\\boxed\s*\{")
_BRACE = re.compile(r"\\.|[{}]", re.DOTALL)


def extract_answer(response: str, version: str) -> ExtractResult:
    """Final answer of ``response`` written for prompt ``version`` (one of ``PROMPT_VERSIONS``).

    * ``en``/``zh``: text after the last "Final answer:" / "答案:" marker (any case, ASCII or full-width
      colon, markdown bold allowed), which must sit on the last line; at most 2 markers and at least 2
      newlines (some reasoning) as in the seed.
    * ``en_v2``/``zh_v2``: content of the last ``\\boxed{...}``, which must be balanced; no box or an
      unbalanced last box is a format failure. Responses of at most 20 characters fail (seed rule).
    * ``en_r1``/``zh_r1``: one ``<think>...</think>`` block first (at least 20 characters of thought),
      then the last balanced box after ``</think>``.
    """
    if version in ("en", "zh"):
        return _extract_marker(response)
    if version in ("en_v2", "zh_v2"):
        if len(response.strip()) <= 20:
            return _fail("too_short")
        return _extract_box(response, 0)
    if version in ("en_r1", "zh_r1"):
        return _extract_r1(response)
    raise ValueError(f"prompt_version: unknown {version!r}; expected one of {', '.join(PROMPT_VERSIONS)}")


def _extract_marker(response: str) -> ExtractResult:
    triggers = list(_TRIGGER.finditer(response))
    if not triggers:
        return _fail("no_answer_marker")
    if len(triggers) > 2:
        return _fail("too_many_markers")
    if response.count("\n") < 2 or not response[: triggers[-1].start()].strip():
        return _fail("no_reasoning")
    start = triggers[-1].end()
    tail = response[start:]
    raw = tail.strip()
    if "\n" in raw:
        return _fail("answer_not_last_line")
    start += len(tail) - len(tail.lstrip())
    return _cleaned(raw, (start, start + len(raw)))


def _extract_box(response: str, offset: int) -> ExtractResult:
    """Last ``\\boxed{`` in ``response[offset:]``; braces escaped as ``\\{`` do not count."""
    last = None
    for last in _BOX.finditer(response, offset):  # noqa: B007 (keep the last match)
        pass
    if last is None:
        return _fail("no_box")
    depth = 1
    for tok in _BRACE.finditer(response, last.end()):
        ch = tok.group()
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return _cleaned(response[last.end(): tok.start()], (last.end(), tok.start()))
    return _fail("unbalanced_box")


def _extract_r1(response: str) -> ExtractResult:
    body = response.lstrip()
    lead = len(response) - len(body)
    if not body.startswith("<think>"):
        return _fail("no_think")
    if body.count("<think>") != 1 or body.count("</think>") != 1:
        return _fail("think_tags")
    end = body.index("</think>")
    if len(body[len("<think>"): end].strip()) < 20:
        return _fail("short_think")
    return _extract_box(response, lead + end + len("</think>"))


def _cleaned(raw: str, span: tuple[int, int]) -> ExtractResult:
    answer = clean_answer(raw)
    return ExtractResult(answer, None, span) if answer else _fail("empty_answer")


# ----------------------------------------------------------------------------------------------------
# Options and numbers

_OPTION_FORMS = (
    re.compile(r"([A-Za-z])"),
    re.compile(r"\(([A-Za-z])\)(?:[.:]?\s+.*)?", re.DOTALL),
    re.compile(r"([A-Z])[.:)](?:\s+.*)?", re.DOTALL),
    re.compile(r"(?:option|choice)\s*\(?([A-Z])\)?(?:[.:)]?\s+.*|[.:)])?", re.DOTALL | re.IGNORECASE),
)
_GT_OPTION = re.compile(r"\(?([A-N])\)?[.)]?")


def option_letter(pred: str) -> str | None:
    """Option letter a prediction names (``B``, ``(B)``, ``B.``, ``B) cat``, ``Option B``), upper-cased,
    or ``None``. ``A cat`` is not an option (an article)."""
    s = clean_answer(pred)
    for pattern in _OPTION_FORMS:
        m = pattern.fullmatch(s)
        if m:
            return m.group(1).upper()
    return None


_YEAR = re.compile(r"(?:19|20)\d\d")


def _parse_number(text: str) -> Number | None:
    """A number with an optional unit tail (``12``, ``-3.5``, ``1,000``, ``45°``, ``3 cm``, ``10%``, ``$12``,
    ``1/2``, ``\\frac{1}{2}``, ``12 \\text{square units}``, ``12 km/h``, ``12 thousand``); ``None`` for
    anything else (``3 or 13``). The unit rules live in ``mpo.generate.numbers``."""
    return parse_number(clean_answer(text))


def _numbers_match(pred: Number, gt: Number, gt_text: str, mode: str) -> bool:
    if pred.unit and gt.unit and pred.unit != gt.unit:  # 12 cm is not 12 m; a unit on one side is ignored
        return False
    if mode == "relaxed":
        if _YEAR.fullmatch(gt_text):  # a year: a 5 % window would accept 2019 for 2020
            return pred.value == gt.value
        tol = RELAXED_TOL
    elif gt.is_int:
        # an integer answer (a count, an exact result) needs an exact match: 1001 is wrong for 1000
        return pred.value == gt.value
    else:
        tol = REL_TOL
    if gt.value == 0:
        return pred.value == 0
    return abs(pred.value - gt.value) <= tol * abs(gt.value)


_LATEX_CMD = re.compile(r"\\[A-Za-z]+")
_MATH_FUNCS = re.compile(r"\b(?:arcsin|arccos|arctan|sin|cos|tan|cot|sec|csc|log|ln|exp|sqrt|pi|inf)\b",
                         re.IGNORECASE)
_WORD = re.compile(r"[^\W\d_]{2,}")
_MATH_SIGN = re.compile(r"[\d\\^=+*/]")


def _looks_mathematical(text: str) -> bool:
    """True for formulas (``\\frac{1}{2}``, ``2\\sqrt{3}``, ``x = 2``), false for prose: a word of two or
    more letters outside LaTeX commands and function names means "not a formula", so ``3 or 13`` is
    never handed to math-verify (which would read it as the set {3, 13} or worse)."""
    if len(text) > MAX_MATH_CHARS or not _MATH_SIGN.search(text):
        return False
    return not _WORD.search(_MATH_FUNCS.sub(" ", _LATEX_CMD.sub(" ", text)))


def _yes_no(norm: str) -> str | None:
    words = norm.split()
    if not words or words[0] not in ("yes", "no"):
        return None
    other = "no" if words[0] == "yes" else "yes"
    return None if other in words else words[0]


def anls_score(pred: str, gt: str) -> float:
    """ANLS of one answer (Biten et al., 2019): ``1 - NL`` when the normalised Levenshtein distance NL is
    below 0.5, else 0. A *similarity*: 1.0 for equal strings (the seed scored the distance instead)."""
    a, b = normalize_answer(pred), normalize_answer(gt)
    if a == b:
        return 1.0 if a else 0.0
    if not a or not b or max(len(a), len(b)) > MAX_EDIT_CHARS:
        return 0.0
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    nl = prev[-1] / max(len(a), len(b))
    return 1.0 - nl if nl < 0.5 else 0.0


# ----------------------------------------------------------------------------------------------------
# Checking


def mode_for_dataset(name: str) -> str:
    """Checking mode from a dataset (file) name, case-insensitive: ChartQA -> ``relaxed``; DocVQA and
    InfographicsVQA -> ``anls``; everything else -> ``auto``. Unlike the seed's ``get_mode``, the SROIE, CLEVR_math,
    geos and geometry files get no 5 % tolerance: their answers are exact (counts, lengths, totals)."""
    low = name.lower()
    if "chartqa" in low:
        return "relaxed"
    if "docvqa" in low or "infographic" in low:
        return "anls"
    return "auto"


def check_answer(pred: str | None, gt: Any, mode: str = "auto", *, timeout: float = 2.0) -> bool:
    """Whether ``pred`` answers ``gt`` correctly, in order:

    1. gt is an option letter A-N: the prediction must name the same letter (and nothing else decides);
    2. gt is yes/no: the prediction must start with the same word and not contain the other;
    3. equal ``normalize_answer`` forms;
    4. gt is a number: a prediction that is a number with an optional unit tail (``12 cm²``, ``12 km/h``,
       ``12 \\text{square units}``; ``mpo.generate.numbers``) is compared numerically (integers exactly,
       otherwise ``REL_TOL``; 5 % in ``relaxed`` mode, years exactly); units differ only when both sides
       name one and the normalised names differ (``12 cm`` = ``12 centimeters``, ``12 cm`` != ``12 m``);
    5. ``anls`` mode: ANLS score >= ``ANLS_THRESHOLD`` (non-numeric gt only);
    6. both sides look mathematical once a unit tail is cut off, or gt is a number and the prediction a
       formula the cheap rules could not read: math-verify, given at most ``timeout`` seconds (else False).

    A correct answer inside a longer wrong one (``13`` for ``3``, ``3 or 13``) fails every rule.
    """
    if mode not in CHECK_MODES:
        raise ValueError(f"mode: unknown {mode!r}; expected one of {', '.join(CHECK_MODES)}")
    if pred is None:
        return False
    pred, gt = pred.strip(), str(gt).strip()
    if not pred or not gt:
        return False
    return _check_cached(pred, gt, mode, float(timeout))


@functools.lru_cache(maxsize=1 << 16)
def _check_cached(pred: str, gt: str, mode: str, timeout: float) -> bool:
    """The judgement for stripped, non-empty strings; cached because a dataset repeats its answers."""
    if pred.casefold() == gt.casefold():  # the seed's first rule; also covers answers normalised to ""
        return True
    gt_option = _GT_OPTION.fullmatch(gt)
    if gt_option:
        return option_letter(pred) == gt_option.group(1)
    pred_norm, gt_norm = normalize_answer(pred), normalize_answer(gt)
    if gt_norm in ("yes", "no"):
        return _yes_no(pred_norm) == gt_norm
    if pred_norm and pred_norm == gt_norm:
        return True
    gt_num = _parse_number(gt)
    if gt_num is not None:
        pred_num = _parse_number(pred)
        if pred_num is not None:
            return _numbers_match(pred_num, gt_num, gt, mode)
    elif mode == "anls":
        return anls_score(pred, gt) >= ANLS_THRESHOLD
    # math-verify decides what the cheap rules could not read: formulas on both sides, or a numeric gt and a
    # formula (``x = 12 cm``, ``\\sqrt{144}``); prose is never sent (it reads "3 or 13" as a set or worse)
    # without bold or a leading approximation sign, Python's power as ^ (math-verify's LaTeX parser read 2**3 as 2,
    # and ``≈3`` differently from ``≈ 3``): ``normalize.math_form``
    pred, gt = math_form(pred), math_form(gt)
    pred_math = _math_part(pred)
    if pred_math is None:
        return False
    gt_math = _math_part(gt) or ((gt, "") if gt_num is not None else None)
    if gt_math is None:
        return False
    if pred_math[1] and gt_math[1] and pred_math[1] != gt_math[1]:  # 2\sqrt{3} cm is not 2\sqrt{3} m
        return False
    return _MATH.equal(pred_math[0], gt_math[0], timeout)


def _math_part(text: str) -> tuple[str, str] | None:
    """``(formula, canonical unit)`` of an answer that looks mathematical once a unit tail is cut off
    (``\\frac{24}{2}\\text{ cm}^2`` -> ``("\\frac{24}{2}", "cm^2")``; ``x = 2`` -> ``("x = 2", "")``), or
    ``None`` for prose. The tail goes because math-verify reads ``12 centimeters`` as a product of letters."""
    if len(text) > MAX_MATH_CHARS:
        return None
    head, tail = split_unit(prepare_units(text))
    unit = canonical_unit(tail) if tail else None
    if unit is not None and unit[0] == 1 and _looks_mathematical(head):
        return head, unit[1]
    return (text, "") if _looks_mathematical(text) else None


def is_empty_answer(answer: Any) -> bool:
    """Whether a ground truth can never be matched: ``None``, ``""``, a blank string, ``[]`` or a list of such.

    ``check_answer`` is False for every prediction against it, so Stage 1 (``mpo.generate.items``) refuses the
    prompt row and Stage 2 (``mpo.generate.scan``) counts the line as malformed: one rule for both stages.
    """
    items = answer if isinstance(answer, list) else [answer]  # one level, as Stage 2 reads a list of answers
    return all(a is None or (isinstance(a, str) and not a.strip()) for a in items)


def fix_answer(response: str, result: ExtractResult, gt: Any, version: str) -> str | None:
    """The seed's ``--answer-fix``, made safe: rewrite the final answer of an option question to the
    bare letter (``**(B) cat**`` -> ``B``; for ``en``/``zh`` also drop ``**`` on the last line).

    Returns ``None`` unless gt is an option letter and the extracted answer already names it, so a wrong
    response can never be rewritten to state the right answer. Callers re-judge the rewritten text.
    """
    gt_option = _GT_OPTION.fullmatch(str(gt).strip())
    if gt_option is None or result.answer is None or result.span is None:
        return None
    letter = gt_option.group(1)
    start, end = result.span
    if option_letter(result.answer) != letter:
        return None
    fixed = response[:start] + letter + response[end:]
    if version in ("en", "zh"):
        head, sep, last = fixed.rpartition("\n")
        fixed = head + sep + last.replace("**", "")
    return fixed if fixed != response else None
