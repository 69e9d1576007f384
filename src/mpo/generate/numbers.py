r"""Numbers with units in final answers: ``12``, ``-3.5``, ``1,000``, ``\frac{1}{2}``, ``12 cm²``,
``12 \text{square units}``, ``12\ \text{cm}``, ``1.5 million``.

What lives here, and why it is its own module: the rules ``mpo.generate.answers.check_answer`` uses to
read a numeric answer and the unit written after it. Models decorate correct numbers ("12 square units",
"12 km/h", "12 years old"); before these rules such answers were judged wrong and became the *rejected*
side of a pair whose chosen side said the same thing. Everything is a pure function of a string that
``clean_answer`` already unwrapped.

How a unit is read:

* LaTeX spacing (``\ ``, ``~``, ``\;``, ``\:``, ``\quad``) becomes a space, ``\,`` and ``\!`` vanish (they
  also separate thousands: ``1\,000``); ``\text{}``/``\mathrm{}``/``\mbox{}`` are unwrapped; ``²``, ``³``,
  ``^{2}`` become ``^2``/``^3``; ``°``, ``^\circ`` and ``\degree`` become the unit ``°``.
* The *tail* is the run of words (plus ``%``, ``°``, ``/``) at the end of the text. At most
  ``MAX_UNIT_WORDS`` words; a relation word (``or``, ``and``, ``not``, ``is``, ``than`` ...) or a single
  letter that is no unit (``2x``) means the tail is not a unit, so ``12 or thirteen`` is not ``12``.
* Aliases are normalised (``centimeters`` -> ``cm``, ``feet`` -> ``ft``, ``per`` -> ``/``, ``square cm``
  -> ``cm^2``); a few words that describe rather than measure (``old``, ``long``, ``total``) are dropped;
  ``units`` and ``%`` are no unit at all (``10%`` and ``10`` are the same ChartQA answer).
* ``thousand``/``million``/``billion`` right after the number multiply it: ``12 thousand`` is 12000.

Example: ``parse_number("12 \\text{square units}")`` is ``Number(12, True, "")``;
``parse_number("5 meters")`` is ``Number(5, True, "m")``; ``parse_number("12 or 13")`` is ``None``.
"""

from __future__ import annotations

import re
from fractions import Fraction
from typing import NamedTuple

__all__ = ["MAX_NUMBER_CHARS", "MAX_UNIT_WORDS", "Number", "canonical_unit", "parse_number", "prepare_units", "split_unit"]

MAX_UNIT_WORDS = 4
"""Longer word tails are prose (``12 is the number of apples``), not a unit."""
MAX_NUMBER_CHARS = 300
"""Longer answers are never read as a number: real ones are short, hostile ones long (and tokenised here)."""


class Number(NamedTuple):
    """A numeric answer: ``unit`` is the canonical unit (``""`` for none); ``is_int`` says the number was
    written without a decimal point or exponent (such answers must match exactly)."""

    value: int | float
    is_int: bool
    unit: str = ""


_NUM = re.compile(r"([-+]?)(\d{1,40}(?:,\d{3}){0,10}(?:\.\d{0,40})?|\.\d{1,40})(?:[eE]([-+]?\d{1,3}))?")
_FRAC = re.compile(r"([-+]?)(?:\\[dt]?frac\{(\d{1,20})\}\{(\d{1,20})\}|(\d{1,20})\s*/\s*(\d{1,20}))")
_UNWRAP = re.compile(r"\\(?:text|textrm|textnormal|mathrm|mbox|operatorname)\s*\{([^{}]*)\}")
_SPACE = re.compile(r"\\[ ;:]|\\q?quad(?![A-Za-z])|~")
_THIN = re.compile(r"\\[,!]")
_DEGREE = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|\\degree(?![A-Za-z])|°|º")
_POWER = re.compile(r"\s*\^\s*\{?\s*([23])\s*\}?")
_PERCENT = re.compile(r"\bper\s*cent\b|\bpercent(?:age)?\b|\bpct\b", re.IGNORECASE)
_TOKEN = re.compile(r"\s+|[^\W\d_]+\.?(?:\^[23])?|.", re.DOTALL)
_UNIT_TOKEN = re.compile(r"[^\W\d_]+\.?(?:\^[23])?|[%°/]")

_ALIASES = {
    **dict.fromkeys(("mm", "millimeter", "millimeters", "millimetre", "millimetres"), "mm"),
    **dict.fromkeys(("cm", "centimeter", "centimeters", "centimetre", "centimetres"), "cm"),
    **dict.fromkeys(("m", "meter", "meters", "metre", "metres"), "m"),
    **dict.fromkeys(("km", "kilometer", "kilometers", "kilometre", "kilometres"), "km"),
    **dict.fromkeys(("in", "inch", "inches"), "in"),
    **dict.fromkeys(("ft", "foot", "feet"), "ft"),
    **dict.fromkeys(("yd", "yard", "yards"), "yd"),
    **dict.fromkeys(("mi", "mile", "miles"), "mi"),
    **dict.fromkeys(("ms", "millisecond", "milliseconds"), "ms"),
    **dict.fromkeys(("s", "sec", "secs", "second", "seconds"), "s"),
    **dict.fromkeys(("min", "mins", "minute", "minutes"), "min"),
    **dict.fromkeys(("h", "hr", "hrs", "hour", "hours"), "h"),
    **dict.fromkeys(("d", "day", "days"), "day"),
    **dict.fromkeys(("wk", "wks", "week", "weeks"), "week"),
    **dict.fromkeys(("yr", "yrs", "year", "years"), "yr"),
    **dict.fromkeys(("mg", "milligram", "milligrams"), "mg"),
    **dict.fromkeys(("g", "gram", "grams", "gramme", "grammes"), "g"),
    **dict.fromkeys(("kg", "kgs", "kilogram", "kilograms", "kilo", "kilos"), "kg"),
    **dict.fromkeys(("lb", "lbs", "pound", "pounds"), "lb"),
    **dict.fromkeys(("ml", "milliliter", "milliliters", "millilitre", "millilitres"), "ml"),
    **dict.fromkeys(("l", "liter", "liters", "litre", "litres"), "l"),
    **dict.fromkeys(("°", "deg", "degs", "degree", "degrees"), "°"),
    **dict.fromkeys(("c", "celsius", "centigrade"), "c"),
    **dict.fromkeys(("f", "fahrenheit"), "f"),
    **dict.fromkeys(("kelvin", "kelvins"), "kelvin"),  # not "k": 12k is twelve thousand, never 12 kelvin
    **dict.fromkeys(("dollar", "dollars", "usd"), "usd"),
    **dict.fromkeys(("per", "/"), "/"),
    **dict.fromkeys(("%", "unit", "units"), ""),  # no unit: 10% is the ChartQA answer 10; "units" is generic
}
_MULTIPLIERS = {"thousand": 10**3, "million": 10**6, "billion": 10**9, "trillion": 10**12}
_POWERS = {"square": "2", "sq": "2", "cubic": "3", "cu": "3"}
_DESCRIPTIVE = frozenset({"old", "long", "tall", "wide", "high", "deep", "thick", "away", "total", "each",
                          "approximately", "approx", "roughly", "exactly", "only", "about"})
_NOT_A_UNIT = frozenset({"or", "and", "not", "no", "nor", "but", "is", "are", "was", "were", "isn", "to",
                         "plus", "minus", "than", "except", "instead", "wrong", "incorrect", "either",
                         "neither", "if", "unless", "maybe", "perhaps", "none",
                         # maths, not measure: 12 pi is not 12
                         "pi", "sqrt", "root", "roots", "squared", "cubed", "inf", "infinity", "log", "ln",
                         "sin", "cos", "tan", "exp"})


def prepare_units(text: str) -> str:
    """Rewrite LaTeX unit decoration as plain text (module docstring): ``12\\ \\text{cm}^{2}`` -> ``12  cm^2``."""
    s = text.replace("−", "-").replace("\\%", "%").replace("\\$", "$").replace("{,}", ",")
    s = _SPACE.sub(" ", _THIN.sub("", s))
    for _ in range(3):  # \text{\mathrm{cm}} nests; three rounds cover every case seen
        unwrapped = _UNWRAP.sub(r" \1", s)
        if unwrapped == s:
            break
        s = unwrapped
    s = _DEGREE.sub(" ° ", s).replace("²", "^2").replace("³", "^3")
    return _PERCENT.sub("%", _POWER.sub(r"^\1", s)).strip()


def split_unit(text: str) -> tuple[str, str]:
    """``(head, tail)`` of prepared text: ``tail`` is the run of unit-like tokens (words, ``%``, ``°``, ``/``)
    at its end, ``head`` the rest; the tail is ``""`` when the text does not end in words right after a
    number or a closing bracket. Whether the tail is a unit is ``canonical_unit``'s decision.

    Example: ``"\\frac{24}{2} cm^2"`` -> ``("\\frac{24}{2}", "cm^2")``; ``"2\\pi"`` -> ``("2\\pi", "")``."""
    tokens = [m.group() for m in _TOKEN.finditer(text)]
    k = len(tokens)
    while k and (tokens[k - 1].isspace() or _UNIT_TOKEN.fullmatch(tokens[k - 1])):
        k -= 1
    if k and tokens[k - 1] == "\\":  # \pi, \sqrt: a LaTeX command belongs to the head
        k += 1
    while k < len(tokens) and tokens[k].isspace():
        k += 1
    head, tail = "".join(tokens[:k]).rstrip(), "".join(tokens[k:])
    if not tail or not head or not (head[-1].isdigit() or head[-1] in ")}]|!."):
        return text, ""
    return head, tail


def canonical_unit(tail: str) -> tuple[int, str] | None:
    """``(multiplier, canonical unit)`` of a tail, or ``None`` when it is not a unit (module docstring)."""
    words = _UNIT_TOKEN.findall(tail)
    if sum(1 for w in words if w != "/") > MAX_UNIT_WORDS:
        return None
    multiplier = 1
    if words and words[0].casefold() in _MULTIPLIERS:
        multiplier = _MULTIPLIERS[words.pop(0).casefold()]
    parts: list[str] = []
    power = ""
    for word in words:
        base, _, exp = word.casefold().partition("^")
        base = base.rstrip(".") or base
        if base in _NOT_A_UNIT:
            return None
        if base in _POWERS:
            power = _POWERS[base]
            continue
        if base in _DESCRIPTIVE:
            continue
        unit = _ALIASES.get(base)
        if unit is None:
            if len(base) == 1:  # 2x, 3 n: a variable, not a unit
                return None
            unit = base[:-1] if len(base) > 3 and base.endswith("s") else base  # apples -> apple
        exp = exp or power
        power = ""
        if unit:
            parts.append(unit + (f"^{exp}" if exp else ""))
    unit = ""
    for part in parts:  # "km", "/", "h" -> "km/h"; "degree celsius" -> "° c"
        unit += part if part == "/" or not unit or unit.endswith("/") else f" {part}"
    return multiplier, "" if not unit.strip("/") else unit


def parse_number(text: str) -> Number | None:
    """A number with an optional unit tail (module docstring); ``None`` for anything else (``3 or 13``,
    ``x = 3``, ``2x``). ``text`` is a cleaned answer (``mpo.generate.answers.clean_answer``)."""
    if len(text) > MAX_NUMBER_CHARS:
        return None
    head, tail = split_unit(prepare_units(text))
    conv = canonical_unit(tail) if tail else (1, "")
    if conv is None:
        return None
    multiplier, unit = conv
    head = head.strip()
    head = head[1:].lstrip() if head.startswith("$") else head
    m = _FRAC.fullmatch(head)
    if m:
        num, den = (int(m.group(2)), int(m.group(3))) if m.group(2) else (int(m.group(4)), int(m.group(5)))
        if den == 0:
            return None
        return Number((-num if m.group(1) == "-" else num) * multiplier / den, False, unit)
    m = _NUM.fullmatch(head)
    if not m:
        return None
    digits = m.group(2).replace(",", "")
    is_int = "." not in digits and m.group(3) is None
    if is_int:
        return Number(int(m.group(1) + digits) * multiplier, True, unit)
    value = float(m.group(1) + digits + (f"e{m.group(3)}" if m.group(3) else ""))
    if value != value or abs(value) == float("inf"):
        return None
    if multiplier != 1:  # exact: 1.5 million is 1500000, not 1500000.0000000002
        exact = Fraction(m.group(1) + digits) * multiplier * Fraction(10) ** int(m.group(3) or 0)
        return Number(int(exact) if exact.denominator == 1 else float(exact), False, unit)
    return Number(value, False, unit)
