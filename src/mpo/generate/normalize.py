r"""The text forms of a final answer: ``clean_answer`` (the packaging stripped) and ``normalize_answer`` (the form
two answers are compared in, and pairs are told apart by).

What lives here, and why it is its own module: the string rules of ``mpo.generate.answers``, which keeps the
extraction and the checking and re-exports both names. Every function is pure and linear in the length of its
input (answers are judged by the million, and hostile ones are long).

The normal form keeps what changes a value and drops what does not:

* markdown bold (``**12** cm``, ``**12**cm``, ``**5**th``) is packaging, read as CommonMark reads it; Python's
  ``**`` between operands (``2**3``, ``2 ** 3``) is a power. A ``**`` with a space on one side only (``12** cm``)
  is a bold mark that lost its partner, never a power;
* a minus keeps its sign in one spelling (``x - y`` = ``x-y``, ``- x`` = ``-x``; ``-x`` ≠ ``x``, ``-3`` ≠ ``3``,
  ``- sin x`` ≠ ``sin x``, ``- -5`` ≠ ``-5``); a dash that is no minus goes: a hyphen between a word character and
  a prose word (``north-east`` = ``north - east``, ``x-ray``, ``12-cm``), a markdown bullet before a prose word at
  the very start (``- Paris``, ``- 猫``), a dash with nothing after it (``Paris -``). A function name (``sin``,
  ``ln``) or a short letter group (``xy``) is no prose word, so the dash before it stays a minus;
* brackets stay only where they carry meaning: an interval or tuple (a comma or semicolon inside, not a
  thousands comma, or an open-closed mix: ``[1, 2)`` ≠ ``(1, 2]``), a group with an operator inside that something
  outside acts on (``(n+1)!``, ``2^(n+1)``), or a signed quantity after an operand (``sin(-x)``, ``f(-2)``: else
  the sign would read as a binary minus); ``(12 cm)``, ``(1,000)``, ``(45°)``, ``(-5)``, ``f(2)``,
  ``Paris (France)`` read without them;
* ``!`` is a factorial after a digit, a closing bracket or a single Latin letter (``4!``, ``n!``); after a word or
  a CJK character (``Paris!``, ``是!``) it is punctuation;
* a leading approximation sign (``≈ 3``, ``\approx 3``, ``~0.5``) is packaging: the value is judged by the usual
  rules (integers exactly), whatever the spacing.

Example: ``normalize_answer("**Final** x - y")`` is ``"final x-y"``; ``normalize_answer("(12 cm)")`` is ``"12 cm"``.
"""

from __future__ import annotations

import functools
import re

__all__ = ["clean_answer", "math_form", "normalize_answer"]

# ----------------------------------------------------------------------------------------------------
# Cleaning: the packaging models put around an answer

_WRAPPER = re.compile(r"\\(?:text|textbf|textrm|mathrm|mathbf|mbox|boxed)\s*\{([^{}]*)\}")
_LEAD_IN = re.compile(r"(?:the\s+)?(?:final\s+)?answer(?:\s+is)?\s*[:：]?\s+", re.IGNORECASE)
_ABBREV = re.compile(r"(?:[A-Za-z]\.){2,}")
_LONE_OPTION = (re.compile(r"\(([A-Za-z])\)"), re.compile(r"([A-Z])\)"),
                re.compile(r"(?:option|choice)\s*\(?([A-Z])\)?", re.IGNORECASE))
# before a number, a sign or a LaTeX value (\frac): "≈ 3", "\approx 0.5", "~0.5"; "x ≈ 3" keeps its relation
_APPROX = re.compile(r"(?:≈|∼|≃|~|\\approx(?![A-Za-z]))\s*(?=[-+−.\d\\$])")
_STARS = re.compile(r"\*\*")
# Python's power: a ** between operands with the same spacing on both sides (2**3, 2 ** 3)
_PYTHON_POWER = re.compile(r"(?<=[\w)}\]])(?:\*\*|\s+\*\*\s+)(?=[\w({\[\\-])")


def _is_word_char(ch: str) -> bool:
    return ch.isalnum() or ch == "_"


def _is_punct(ch: str) -> bool:
    return not ch.isalnum() and not ch.isspace()


def _unbold(s: str) -> str:
    """Drop markdown bold pairs anywhere (``**12** cm`` -> ``12 cm``, ``12 **cm**``, ``**12**cm`` -> ``12cm``),
    leaving a ``**`` between operands alone (``2**3``, ``(a+b)**2``). A ``**`` opens bold when no word character
    precedes it and no space follows; it closes the open one when no space precedes it and, if punctuation
    precedes it, a space or punctuation follows (CommonMark's right-flanking rule: ``**5**th`` is bold 5, while
    ``**(a+b)**2`` closes nothing and stays a power). Without an open bold mark a ``**`` is never a closer, so
    ``2**3`` stays a power. One pass over the ``**`` marks: linear."""
    cuts: list[int] = []
    opener = None
    for m in _STARS.finditer(s):
        a, b = m.start(), m.end()
        before, after = s[a - 1] if a else " ", s[b] if b < len(s) else " "
        if opener is not None and not before.isspace() and (
                not _is_punct(before) or after.isspace() or _is_punct(after)):
            cuts += [opener, a]
            opener = None
        elif not _is_word_char(before) and not after.isspace():
            opener = a
    if not cuts:
        return s
    out, prev = [], 0
    for k in cuts:
        out.append(s[prev:k])
        prev = k + 2
    return "".join(out) + s[prev:]


@functools.lru_cache(maxsize=1 << 16)
def clean_answer(raw: str) -> str:
    """Strip the packaging models put around an answer: ``**B**`` (also ``**12** cm``), ``$x$``, ``\\text{B}``,
    "The answer is", a leading approximation sign before a number (``≈ 3``), a trailing period (not after an
    abbreviation such as ``U.S.``), and lone option labels ``(B)``, ``B)``, ``Option B``."""
    s = raw.strip()
    for _ in range(4):  # wrappers nest (``**$\text{B}$**``); four rounds cover every case seen
        before = s
        lead = _LEAD_IN.match(s)
        s = s[lead.end():] if lead else s
        s = _unbold(s)
        if s.startswith("**") or s.endswith("**"):  # markdown bold left unclosed, or empty
            s = s.strip("*").strip()
        for left, right in (("__", "__"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
            if len(s) > len(left) + len(right) and s.startswith(left) and s.endswith(right):
                s = s[len(left): -len(right)].strip()
        whole = _WRAPPER.fullmatch(s)
        if whole:
            s = whole.group(1).strip()
        approx = _APPROX.match(s)
        s = s[approx.end():] if approx else s
        if s.endswith(".") and not _ABBREV.fullmatch(s):
            s = s[:-1].rstrip()
        if s == before:
            break
    for pattern in _LONE_OPTION:
        m = pattern.fullmatch(s)
        if m:
            return m.group(1)
    return s


def math_form(text: str) -> str:
    """What math-verify is given: the text without markdown bold or a leading approximation sign, Python's power
    as ``^`` (math-verify's LaTeX parser read ``2**3`` as ``2``). Spacing never changes the verdict: ``≈3`` and
    ``≈ 3`` are sent as ``3``."""
    s = _unbold(text.strip())
    approx = _APPROX.match(s)
    return _PYTHON_POWER.sub("^", s[approx.end():] if approx else s)


# ----------------------------------------------------------------------------------------------------
# The normal form

_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                 "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = frozenset({"a", "an", "the"})
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
# Kept besides word characters: what changes a number's or a formula's value or meaning. Relations, factorial
# marks and interval brackets reach this set only after ``_relations``, ``_FACTORIAL`` and ``_brackets`` have turned
# the ones that mean nothing (prose parentheses, "Paris!") into spaces. ``\``, ``,`` and ``;`` stay until
# ``_dashes`` has read them (``x, -3`` is a list, not ``x-3``; ``-\infty`` a minus).
_PUNCT = re.compile(r"[^\w\s.\-+/%°^<>=≤≥≠≈!()\[\]\\,;]")
_SEPARATORS = re.compile(r"[\\,;]")
_LOOSE_DOT = re.compile(r"(?<!\d)\.|\.(?!\d)")
_SIZING = re.compile(r"\\(?:left|right|big|bigg|bigl|bigr|biggl|biggr)(?![a-z])")
_RELATION = re.compile(r"\\(?:leqslant|leq|le|geqslant|geq|ge|neq|ne|approx|lt|gt)(?![a-z])|<=|>=|!=|[≤⩽≥⩾≠≈<>=]")
_RELATION_SIGN = {"\\leqslant": "≤", "\\leq": "≤", "\\le": "≤", "<=": "≤", "⩽": "≤",
                  "\\geqslant": "≥", "\\geq": "≥", "\\ge": "≥", ">=": "≥", "⩾": "≥",
                  "\\neq": "≠", "\\ne": "≠", "!=": "≠", "\\approx": "≈", "\\lt": "<", "\\gt": ">"}
# 4!, (n+1)!, n!, 2n!; not "Paris!", "是!" (a CJK character is a word, not a variable) nor LaTeX's \!
_FACTORIAL = re.compile(r"(?<=[\d)\]])!|(?<=[a-z])(?<![^\W\d_][a-z])!")
_GROUP_OPS = frozenset("+-*^=<>≤≥≠≈|\\")  # not "/": "12 (km/h)" is a unit, "(1/2)" one quantity
_DASH = re.compile(r"-+")
_LETTERS = re.compile(r"[^\W\d_]+")
_OPERAND_END = frozenset(")]}!%°.'")


def _relations(s: str) -> str:
    """Relation signs as tokens of one spelling: ``x\\le3`` -> ``x ≤ 3`` (``\\le``, ``\\leq``, ``<=``, ``≤`` alike)."""
    return _RELATION.sub(lambda m: f" {_RELATION_SIGN.get(m.group(), m.group())} ", s)


def _is_thousands_comma(s: str, k: int) -> bool:
    """Whether the comma at ``s[k]`` separates thousands (``_THOUSANDS``: a digit before, exactly three after)."""
    return (k > 0 and s[k - 1].isdigit() and s[k + 1: k + 4].isdigit() and len(s[k + 1: k + 4]) == 3
            and not s[k + 4: k + 5].isdigit())


def _brackets(s: str) -> str:
    """Brackets as tokens where they carry meaning, else spaces. A matched pair (either kind: ``[1, 2)`` is a
    pair) is kept when it is an interval or tuple (an open-closed mix, or a comma or semicolon inside:
    ``[1, 2)``, ``(-\\infty, 3]``, ``(3, 2)``; a thousands comma, ``(1,000)``, is part of its number), when it
    groups an operator (a leading sign does not count) and is not the whole answer (``(n+1)!``, ``2^(n+1)``;
    ``(x+1)`` alone reads ``x+1``), or when it holds a signed quantity right after an operand (``f(-2)``,
    ``sin(-x)``, ``2(-3)``: without them the sign would read as a binary minus, ``sin - x``). So ``(12 cm)``,
    ``(45°)``, ``(-5)``, ``x = (-5)``, ``f(2)``, ``3 (cm)``, ``Paris (France)`` and ``["C"]`` read without them.
    Unmatched ones go. Linear: the counts inside a pair come from prefix sums, and the spaces next to each bracket
    are scanned once."""
    seps, ops = [0], [0]
    for k, ch in enumerate(s):
        seps.append(seps[-1] + (ch == ";" or ch == "," and not _is_thousands_comma(s, k)))
        ops.append(ops[-1] + (ch in _GROUP_OPS))
    first, last = len(s) - len(s.lstrip()), len(s.rstrip()) - 1  # the whole answer's ends
    out, stack = list(s), []
    for k, ch in enumerate(s):
        if ch in "([":
            stack.append(k)
        elif ch in ")]":
            if not stack:
                out[k] = " "
                continue
            start = stack.pop()
            j = start + 1
            while j < k and s[j].isspace():  # the spaces after each opening bracket are read once: linear
                j += 1
            signed = j < k and s[j] in "+-"
            interval = (s[start] == "(") != (ch == ")") or seps[k] > seps[start + 1]
            group = ops[k] - ops[start + 1] - signed > 0 and (start, k) != (first, last)
            if signed and not (interval or group):
                i = start - 1
                while i >= 0 and s[i].isspace():  # the spaces before each opening bracket: read once
                    i -= 1
                group = i >= 0 and (_is_word_char(s[i]) or s[i] in _OPERAND_END or s[i] == "\0")
            out[start], out[k] = (f" {s[start]} ", f" {ch} ") if interval or group else (" ", " ")
    for k in stack:
        out[k] = " "
    return "".join(out)


def _dashes(s: str) -> str:
    """Every ``-`` as a minus in one spelling, or a space. A minus comes before an operand (a digit, a letter, a
    bracket, a LaTeX command, or another minus: ``- -5`` is ``-(-5)``): after an operand it is binary and joins
    both sides (``x - y`` -> ``x-y``), else unary and joins the operand (``- x`` -> ``-x``, ``x = - 3`` -> ``x =
    -3``). Not a minus, so a space: a dash before nothing (``Paris -``), runs of dashes (``--``), and a dash next
    to a prose word (``_is_prose``; not a function name such as ``sin`` nor a short letter group such as ``xy``):

    * a hyphen or dash between a word character and a word, either side prose (``north-east``, ``north -
      east``, ``x-ray``, ``2-methylpropane``, ``12-cm``); ``a-b``, ``xy - z``, ``sin -x``, ``2 - xy`` are minus
      signs;
    * a markdown bullet: a dash at the very start of the answer with a space after it, before a prose word
      (``- Paris``, ``- Yes``, ``- 猫``). Before anything else it is a minus (``- sin x`` = ``-sin x``, ``- xy``,
      ``- 12``), as it is anywhere else (``x = - sin x``) and written tight (``-Paris``).

    One pass; the spaces around a dash are scanned by hand (``\\s*-\\s*`` as a regex is quadratic on a long run of
    spaces)."""
    out: list[str] = []
    done = 0  # s[:done] is in out
    for m in _DASH.finditer(s):
        left, right = m.start(), m.end()
        while left > done and s[left - 1].isspace():
            left -= 1
        while right < len(s) and s[right].isspace():
            right += 1
        out.append(s[done:left])
        out.append(_dash(s, m.group(), left - 1, right, spaced_after=right > m.end()))
        done = right
    out.append(s[done:])
    return "".join(out)


# Letter groups that read as maths, not words, though they have three letters or more: function names and
# spelled-out Greek letters (``- sin x`` is a minus, ``- Paris`` a bullet). Two-letter groups are maths (``xy``,
# ``AB``) unless listed in _SHORT_WORDS: the answer words and the unit abbreviations of ``mpo.generate.numbers``.
_MATH_NAMES = frozenset("sin cos tan cot sec csc sinh cosh tanh coth arcsin arccos arctan arcsec arccsc arccot log "
                        "exp sqrt lim det gcd lcm inf infty alpha beta gamma delta epsilon theta lambda sigma omega "
                        "phi psi rho tau".split())
_SHORT_WORDS = frozenset("no ok cm mm km kg mg ml ft in yd lb hr yr".split())
_MATH_LETTERS = re.compile(r"[a-zα-ω]+")  # Latin or Greek (casefolded); other scripts (猫) are words


def _is_prose(word: str) -> bool:
    """Whether a run of letters (casefolded) reads as a word rather than maths (``_dashes``): three letters or
    more and no function name, a listed short word, or a letter outside Latin and Greek."""
    if len(word) > 2:
        return word not in _MATH_NAMES
    return word in _SHORT_WORDS or not _MATH_LETTERS.fullmatch(word)


def _is_operand_start(s: str, at: int) -> bool:
    nxt = s[at] if at < len(s) else ""
    return bool(nxt) and (nxt.isalnum() or nxt in "([{\\∞" or (nxt == "." and s[at + 1: at + 2].isdigit()))


def _dash(s: str, run: str, before_at: int, after_at: int, *, spaced_after: bool) -> str:
    """What the dash run between ``s[before_at]`` and ``s[after_at]`` (spaces around it cut) becomes (``_dashes``)."""
    nxt = s[after_at] if after_at < len(s) else ""
    prev = s[before_at] if before_at >= 0 else ""
    if nxt == "-" and s[after_at + 1: after_at + 2] != "-":  # a minus before a signed operand: "- -5"
        k = after_at + 1
        while k < len(s) and s[k].isspace():  # read here and by the next dash: each space twice at most
            k += 1
        operand = _is_operand_start(s, k)
    else:
        operand = _is_operand_start(s, after_at)
    if len(run) > 1 or not operand:
        return " "
    if nxt.isalpha():
        word_after = _LETTERS.match(s, after_at)  # each word is read by the one dash before it
        after = word_after.group() if word_after else nxt
        if not prev:
            if spaced_after and _is_prose(after):  # "- paris": a bullet
                return " "
        elif _is_word_char(prev):
            k = before_at
            while k >= 0 and s[k].isalpha():  # the word before: each word is read by the one dash after it
                k -= 1
            before = s[k + 1: before_at + 1]
            command = k >= 0 and s[k] == "\\"  # \theta - x: a LaTeX command, not a word
            if _is_prose(after) or (before and not command and _is_prose(before)):  # "north-east", "x-ray"
                return " "
    binary = bool(prev) and (_is_word_char(prev) or prev in _OPERAND_END)
    return "-" if binary else " -"


@functools.lru_cache(maxsize=1 << 16)
def normalize_answer(text: str) -> str:
    """Short-answer normal form: lower case, no markup, number words as digits, no articles, punctuation that
    means nothing dropped. Unlike the VQA normaliser (the seed's ``vqa_score``) it keeps what changes a value
    (module docstring): ``-3`` and ``-x`` keep their sign, ``3.5`` its decimals, ``4!`` its factorial, relations
    stay tokens of one spelling (``x > 3`` is not ``x < 3``, ``\\le`` is ``\\leq``), an interval or tuple keeps
    its brackets (``[1, 2)`` is not ``(1, 2]``); thousands separators go (``1,000`` -> ``1000``). Prose
    parentheses and ``!`` after a word still go, so ``Paris (France)`` reads ``paris france``."""
    s = clean_answer(text).casefold().replace("\u2212", "-")
    s = _WRAPPER.sub(r"\1", s)
    s = _FACTORIAL.sub("\0", _SIZING.sub(" ", _PYTHON_POWER.sub("^", _relations(s))))  # \0: a factorial's !
    s = _brackets(s.replace("!", " ")).replace("\0", "!")
    s = _PUNCT.sub(" ", _THOUSANDS.sub("", s))
    s = _LOOSE_DOT.sub(" ", _SEPARATORS.sub(" ", _dashes(s)))
    words = (_NUMBER_WORDS.get(w, w) for w in s.split())
    return " ".join(w for w in words if w not in _ARTICLES)
