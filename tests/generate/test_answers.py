"""Table tests of answer extraction and checking (``mpo.generate.answers``).

Cases marked ``seed-bug`` are behaviours of InternVL's ``accuracy_reward.py`` (spec section 5 / 9) that we
fixed; the expected value is ours, the comment says what the seed did.
"""

from __future__ import annotations

import multiprocessing as mp
import time
from concurrent.futures import ProcessPoolExecutor

import pytest

from mpo.generate import answers
from mpo.generate.answers import (
    ExtractResult,
    anls_score,
    check_answer,
    extract_answer,
    fix_answer,
    mode_for_dataset,
    option_letter,
)
from mpo.generate.numbers import Number, parse_number

R = "Step 1: read the figure.\nStep 2: compute the value.\n"  # enough reasoning for every format check
THINK = "<think>I look at the figure and count the objects carefully.</think>\n"

# (id, response, version, answer, reason)
EXTRACT_CASES = [
    ("en-basic", R + "Final answer: 12", "en", "12", None),
    ("en-capital-marker", R + "Final Answer: B", "en", "B", None),
    ("en-lowercase-marker", R + "final answer: 5", "en", "5", None),
    ("en-bold-marker-and-answer", R + "**Final answer:** **B**", "en", "B", None),
    ("en-bold-colon-outside", R + "**Final answer**: 7", "en", "7", None),
    ("en-trailing-period", R + "Final answer: 3.5.", "en", "3.5", None),
    ("en-abbreviation-kept", R + "Final answer: U.S.", "en", "U.S.", None),
    ("en-option-parens", R + "Final answer: (C)", "en", "C", None),
    ("en-option-word", R + "Final answer: Option D", "en", "D", None),
    ("en-option-close-paren", R + "Final answer: D)", "en", "D", None),
    ("en-the-answer-is", R + "Final answer: The answer is 7", "en", "7", None),
    ("en-dollars", R + "Final answer: $\\frac{1}{2}$", "en", "\\frac{1}{2}", None),
    ("en-text-wrapper", R + "Final answer: \\text{Paris}", "en", "Paris", None),
    ("en-boxed-after-marker", R + "Final answer: \\boxed{5}", "en", "5", None),
    ("en-two-markers-last-wins", "Final answer: 3 maybe.\nCheck again.\nFinal answer: 4", "en", "4", None),
    ("en-no-marker", R + "So it is 12.", "en", None, "no_answer_marker"),
    ("en-three-markers", "Final answer: 1\nFinal answer: 2\nFinal answer: 3", "en", None, "too_many_markers"),
    ("en-one-line", "It is 12. Final answer: 12", "en", None, "no_reasoning"),
    ("en-blank-before-marker", "\n\n  Final answer: 12", "en", None, "no_reasoning"),
    ("en-answer-not-last-line", R + "Final answer: 12\nBecause 3 * 4 = 12.", "en", None, "answer_not_last_line"),
    ("en-empty-answer", R + "Final answer:   ", "en", None, "empty_answer"),
    ("en-empty-after-bold", R + "Final answer: ****", "en", None, "empty_answer"),
    ("zh-ascii-colon", "先看图。\n再计算。\n答案: B", "zh", "B", None),
    ("zh-fullwidth-colon", "先看图。\n再计算。\n答案：12", "zh", "12", None),
    ("zh-no-marker", "先看图。\n再计算。\n结果是12", "zh", None, "no_answer_marker"),
    ("v2-basic", R + "Answer: \\boxed{12}", "en_v2", "12", None),
    ("v2-last-box-wins", R + "First \\boxed{3}, then Answer: \\boxed{4}", "en_v2", "4", None),
    ("v2-nested-braces", R + "Answer: \\boxed{\\frac{1}{2}}", "en_v2", "\\frac{1}{2}", None),
    ("v2-escaped-braces", R + "Answer: \\boxed{\\{1, 2\\}}", "en_v2", "\\{1, 2\\}", None),
    ("v2-space-before-brace", R + "Answer: \\boxed {7}", "en_v2", "7", None),
    ("v2-text-in-box", R + "Answer: \\boxed{\\text{B}}", "en_v2", "B", None),
    ("v2-bold-in-box", R + "Answer: \\boxed{**B**}", "en_v2", "B", None),
    ("v2-parens-in-box", R + "Answer: \\boxed{(B)}", "en_v2", "B", None),
    ("v2-close-paren-in-box", R + "Answer: \\boxed{B)}", "en_v2", "B", None),
    ("v2-option-with-text-kept", R + "Answer: \\boxed{(B) 12 cm}", "en_v2", "(B) 12 cm", None),
    ("v2-text-after-box", R + "Answer: \\boxed{5}. Hope this helps!", "en_v2", "5", None),
    ("v2-period-in-box", R + "Answer: \\boxed{5.}", "en_v2", "5", None),
    ("v2-equation", R + "Answer: \\boxed{x = 2}", "en_v2", "x = 2", None),
    ("v2-phrase", R + "Answer: \\boxed{The Eiffel Tower}", "en_v2", "The Eiffel Tower", None),
    ("v2-dollars-in-box", R + "Answer: \\boxed{$45^\\circ$}", "en_v2", "45^\\circ", None),
    ("zh-v2-basic", "先看图。\n答案：\\boxed{12}，这就是结果。", "zh_v2", "12", None),
    # seed-bug: no box -> the seed used the whole response as the answer
    ("v2-no-box-seed-bug", R + "The answer is 12.", "en_v2", None, "no_box"),
    # seed-bug: unbalanced last box -> the seed used the whole response as the answer
    ("v2-unbalanced-last-box-seed-bug", R + "\\boxed{3} or maybe \\boxed{4", "en_v2", None, "unbalanced_box"),
    ("v2-empty-box", R + "Answer: \\boxed{}", "en_v2", None, "empty_answer"),
    ("v2-blank-box", R + "Answer: \\boxed{  }", "en_v2", None, "empty_answer"),
    ("v2-too-short", "\\boxed{5}", "en_v2", None, "too_short"),
    ("v2-fbox-is-not-a-box", R + "Answer: \\fbox{5}", "en_v2", None, "no_box"),
    ("r1-basic", THINK + "The answer is \\boxed{7}.", "en_r1", "7", None),
    ("r1-leading-whitespace", "\n  " + THINK + "So \\boxed{7}", "en_r1", "7", None),
    ("r1-box-after-think-wins", THINK[:-10] + "\\boxed{3}</think>\nSo \\boxed{7}", "en_r1", "7", None),
    ("zh-r1-basic", THINK + "答案是 \\boxed{12}", "zh_r1", "12", None),
    ("r1-no-think", "The answer is \\boxed{7}, after long thought.", "en_r1", None, "no_think"),
    ("r1-two-think-blocks", THINK + THINK + "\\boxed{7}", "en_r1", None, "think_tags"),
    ("r1-unclosed-think", "<think>I look at the figure and count. \\boxed{7}", "en_r1", None, "think_tags"),
    ("r1-short-think", "<think>ok</think>\n\\boxed{7}", "en_r1", None, "short_think"),
    ("r1-box-only-inside-think", THINK[:-10] + "\\boxed{3}</think>\nIt is 3.", "en_r1", None, "no_box"),
    ("r1-unbalanced", THINK + "So \\boxed{7", "en_r1", None, "unbalanced_box"),
]


@pytest.mark.parametrize("response,version,answer,reason", [c[1:] for c in EXTRACT_CASES],
                         ids=[c[0] for c in EXTRACT_CASES])
def test_extract_answer(response: str, version: str, answer: str | None, reason: str | None) -> None:
    result = extract_answer(response, version)
    assert (result.answer, result.reason) == (answer, reason)
    assert (result.span is None) == (answer is None)


# (id, pred, gt, mode, expected)
CHECK_CASES = [
    # option letters: only when gt is a letter A-N
    ("opt-exact", "B", "B", "auto", True),
    ("opt-lowercase", "b", "B", "auto", True),
    ("opt-bold", "**B**", "B", "auto", True),  # seed-bug: **B** was not unwrapped
    ("opt-parens", "(B)", "B", "auto", True),
    ("opt-close-paren", "B)", "B", "auto", True),
    ("opt-period", "B.", "B", "auto", True),
    ("opt-option-word", "Option B", "B", "auto", True),
    ("opt-option-parens-lower", "option (b)", "B", "auto", True),
    ("opt-parens-with-text", "(B) 12 cm", "B", "auto", True),
    ("opt-period-with-text", "B. The cat", "B", "auto", True),
    ("opt-colon-with-text", "B: cat", "B", "auto", True),
    ("opt-answer-is", "The answer is B", "B", "auto", True),
    ("opt-text-wrapper", "\\text{B}", "B", "auto", True),
    ("opt-gt-parens", "A", "(A)", "auto", True),
    ("opt-gt-period", "A", "A.", "auto", True),
    ("opt-last-letter-N", "N", "N", "auto", True),
    ("opt-wrong-letter", "C", "B", "auto", False),
    ("opt-article-not-option", "A cat", "A", "auto", False),
    ("opt-text-only", "cat", "A", "auto", False),
    ("opt-two-letters", "AB", "A", "auto", False),
    ("opt-number-for-letter", "2", "B", "auto", False),
    ("opt-letter-list", "A, B", "A", "auto", False),
    ("opt-outside-A-N-is-string", "o", "O", "auto", True),
    # yes / no
    ("yn-exact", "Yes", "yes", "auto", True),
    ("yn-period", "yes.", "Yes", "auto", True),
    ("yn-upper", "YES", "yes", "auto", True),
    ("yn-no", "No", "no", "auto", True),
    ("yn-no-period", "No.", "No", "auto", True),
    ("yn-opposite", "no", "yes", "auto", False),
    ("yn-with-reason", "Yes, there is a cat", "yes", "auto", True),
    ("yn-both-words", "Yes and no", "yes", "auto", False),
    ("yn-not-sure", "not sure", "no", "auto", False),
    ("yn-none-seed-bug", "none", "no", "auto", False),  # seed-bug: the entailment test had 'no' in 'none'
    ("yn-nothing", "nothing", "no", "auto", False),
    # numbers
    ("num-mc-score-seed-bug", "2.5", "2", "auto", False),  # seed-bug: mc_score took the first char
    ("num-pi-seed-bug", "3.14", "3", "auto", False),  # seed-bug: same
    ("num-13-for-3", "13", "3", "auto", False),
    ("num-3-for-13", "3", "13", "auto", False),
    ("num-zero-seed-bug", "0.0", "0", "auto", True),  # seed-bug: gt 0 fell back to string equality
    ("num-zero-reverse", "0", "0.0", "auto", True),
    ("num-negative-zero", "-0", "0", "auto", True),
    ("num-near-miss-int-seed-bug", "1001", "1000", "auto", False),  # seed-bug: 1e-3 tolerance accepted it
    ("num-int-vs-float-miss", "2.0001", "2", "auto", False),
    ("num-thousands-pred", "1,000", "1000", "auto", True),
    ("num-thousands-gt", "1000", "1,000", "auto", True),
    ("num-int-float-equal", "12.0", "12", "auto", True),
    ("num-float-int-equal", "12", "12.0", "auto", True),
    ("num-rounding-within-tol", "3.1416", "3.14", "auto", True),
    ("num-rounding-outside-tol", "3.15", "3.14", "auto", False),
    ("num-decimal-vs-fraction", "0.3333", "1/3", "auto", True),
    ("num-fraction-vs-decimal", "1/2", "0.5", "auto", True),
    ("num-latex-frac", "\\frac{1}{2}", "0.5", "auto", True),
    ("num-latex-frac-gt", "0.5", "\\frac{1}{2}", "auto", True),
    ("num-dfrac", "\\dfrac{3}{4}", "0.75", "auto", True),
    ("num-sign-matters", "-3", "3", "auto", False),
    ("num-sign-matters-gt", "3", "-3", "auto", False),
    ("num-explicit-plus", "+3", "3", "auto", True),
    ("num-unicode-minus", "\u22123", "-3", "auto", True),
    ("num-degree-sign", "45°", "45", "auto", True),
    ("num-latex-circ", "45^\\circ", "45", "auto", True),
    ("num-latex-circ-braced", "45^{\\circ}", "45", "auto", True),
    ("num-degrees-word", "45 degrees", "45", "auto", True),
    ("num-unit-cm", "3 cm", "3", "auto", True),
    ("num-unit-text", "3\\text{ cm}", "3", "auto", True),
    ("num-unit-word", "12 apples", "12", "auto", True),
    ("num-unit-plural", "12 apple", "12 apples", "auto", True),
    ("num-unit-differs", "12 m", "12 cm", "auto", False),
    ("num-unit-on-gt-only", "3", "3 cm", "auto", True),
    ("num-percent-pred", "10%", "10", "auto", True),
    ("num-percent-gt", "10", "10%", "auto", True),
    ("num-latex-percent", "10\\%", "10", "auto", True),
    ("num-dollar-sign", "$12", "12", "auto", True),
    ("num-latex-dollar", "\\$12", "12", "auto", True),
    ("num-scientific", "1e3", "1000", "auto", True),
    ("num-infinite-is-not-a-number", "1e999", "5", "auto", False),
    ("num-word-pred", "two", "2", "auto", True),
    ("num-word-gt", "2", "two", "auto", True),
    ("num-words-seed-check", "apple pie", "12", "auto", False),
    ("num-contained-in-longer", "3 or 13", "3", "auto", False),
    ("num-contained-in-set", "3, 13", "3", "auto", False),
    ("num-contained-in-latex-set", "\\{3, 13\\}", "3", "auto", False),
    ("num-two-assignments", "x=3, y=4", "3", "auto", False),
    ("num-big-int-equal", "123456789012345678901234567890", "123456789012345678901234567890", "auto", True),
    ("num-big-int-off-by-one", "123456789012345678901234567891", "123456789012345678901234567890", "auto",
     False),
    # math-verify (both sides look mathematical)
    ("mv-assignment", "x = 2", "2", "auto", True),
    ("mv-sqrt", "\\sqrt{4}", "2", "auto", True),
    ("mv-sqrt-simplify", "2\\sqrt{3}", "\\sqrt{12}", "auto", True),
    ("mv-commutative", "x+1", "1+x", "auto", True),
    ("mv-expand", "(x+1)^2", "x^2+2x+1", "auto", True),
    ("mv-sqrt-product", "\\frac{1}{2}\\sqrt{3}", "\\frac{\\sqrt{3}}{2}", "auto", True),
    ("mv-interval", "[1, 2)", "[1,2)", "auto", True),
    ("mv-wrong-expression", "x+2", "x+1", "auto", False),
    ("mv-prose-never-sent", "yes", "sey", "auto", False),  # math-verify alone reads both as y*e*s
    # short answers
    ("str-case", "Paris", "paris", "auto", True),
    ("str-article", "The Eiffel Tower", "eiffel tower", "auto", True),
    ("str-period", "red.", "Red", "auto", True),
    ("str-hyphen", "well-known", "well known", "auto", True),
    ("str-wrong", "dog", "cat", "auto", False),
    ("str-substring-not-enough", "cats and dogs", "dogs", "auto", False),
    ("str-prefix-not-enough", "New York City", "New York", "auto", False),
    ("str-typo-auto", "Chicag0", "Chicago", "auto", False),
    ("str-chinese", "北京", "北京", "auto", True),
    ("str-article-only-answer", "a", "a", "auto", True),  # normalises to "" on both sides
    ("str-empty-pred", "", "5", "auto", False),
    ("str-none-pred", None, "5", "auto", False),
    ("str-empty-gt", "5", "", "auto", False),
    ("str-int-gt", "12", 12, "auto", True),
    # relaxed (ChartQA)
    ("relaxed-4pct", "104", "100", "relaxed", True),
    ("relaxed-6pct", "106", "100", "relaxed", False),
    ("relaxed-below", "9.6", "10", "relaxed", True),
    ("relaxed-percent", "48%", "50", "relaxed", True),
    ("relaxed-year-exact", "2019", "2020", "relaxed", False),
    ("relaxed-year-equal", "2020", "2020", "relaxed", True),
    ("relaxed-old-year", "1950", "1900", "relaxed", False),
    ("relaxed-zero", "0.0", "0", "relaxed", True),
    ("relaxed-string", "blue", "Blue", "relaxed", True),
    ("relaxed-yes", "Yes", "yes", "relaxed", True),
    ("relaxed-letter", "A", "A", "relaxed", True),
    ("relaxed-wrong-string", "red", "Blue", "relaxed", False),
    # anls (DocVQA, InfographicsVQA)
    ("anls-unrelated-seed-bug", "apple pie", "12", "anls", False),  # seed-bug: inverted ANLS said True
    ("anls-near-miss-seed-bug", "Chicag0", "Chicago", "anls", True),  # seed-bug: near misses scored 0
    ("anls-case", "chicago", "Chicago", "anls", True),
    ("anls-unrelated-text", "completely different", "Chicago", "anls", False),
    ("anls-typo-name", "Jon Smith", "John Smith", "anls", True),
    ("anls-numbers-exact", "1,300", "1,200", "anls", False),
    ("anls-numbers-equal", "1200", "1,200", "anls", True),
    ("anls-short-numbers", "12", "13", "anls", False),
    ("anls-half-different", "abcd", "abxy", "anls", False),
    ("anls-yes", "Yes", "yes", "anls", True),
]


@pytest.mark.parametrize("pred,gt,mode,expected", [c[1:] for c in CHECK_CASES], ids=[c[0] for c in CHECK_CASES])
def test_check_answer(pred: str | None, gt: str, mode: str, expected: bool) -> None:
    # a generous limit: symbolic cases take ~0.4 s idle, more on a loaded CI machine (timeouts: see below)
    assert check_answer(pred, gt, mode, timeout=30) is expected


def test_table_size() -> None:
    """The issue asks for at least 150 extraction + checking cases."""
    assert len(EXTRACT_CASES) + len(CHECK_CASES) >= 150
    assert len({c[0] for c in EXTRACT_CASES + CHECK_CASES}) == len(EXTRACT_CASES) + len(CHECK_CASES)


def test_hostile_string_times_out_and_guard_recovers() -> None:
    """``9^{9^{9^{9}}}`` makes sympy build a huge integer in C (signals cannot stop it): the process
    guard kills it after ``timeout`` and the next math-verify call gets a fresh helper."""
    start = time.monotonic()
    assert check_answer("9^{9^{9^{9}}}", "2", timeout=0.5) is False
    assert time.monotonic() - start < 5.0
    assert check_answer("\\sqrt{9}", "3", timeout=30) is True


def _math_check_in_child() -> tuple[bool, bool]:
    inherited = answers._MATH._proc is not None
    return inherited, check_answer("\\sqrt{16}", "4", timeout=30)


def test_math_guard_is_not_shared_with_forked_processes() -> None:
    """A pool forked after the parent started its math-verify helper must not use the parent's pipe
    (two readers on one pipe mix up answers; killing the parent's helper from a worker fails)."""
    assert check_answer("\\sqrt{25}", "5", timeout=30) is True  # the parent's helper is running now
    assert answers._MATH._proc is not None
    with ProcessPoolExecutor(1, mp_context=mp.get_context("fork")) as pool:
        assert pool.submit(_math_check_in_child).result() == (False, True)
    assert check_answer("\\sqrt{36}", "6", timeout=30) is True


def test_unknown_version_and_mode_are_errors() -> None:
    with pytest.raises(ValueError) as err:
        extract_answer("x", "en_v3")
    assert str(err.value) == "prompt_version: unknown 'en_v3'; expected one of en, zh, en_v2, zh_v2, en_r1, zh_r1"
    with pytest.raises(ValueError) as err:
        check_answer("1", "1", "exact")
    assert str(err.value) == "mode: unknown 'exact'; expected one of auto, relaxed, anls"


def test_span_points_at_the_raw_answer() -> None:
    response = R + "Answer: \\boxed{**B**} done"
    result = extract_answer(response, "en_v2")
    assert result == ExtractResult("B", None, (len(R) + 15, len(R) + 20))
    assert response[slice(*result.span)] == "**B**"


@pytest.mark.parametrize("pred,letter", [("B", "B"), ("(c)", "C"), ("D) cat", "D"), ("Option e", "E"),
                                         ("A cat", None), ("12", None), ("", None)])
def test_option_letter(pred: str, letter: str | None) -> None:
    assert option_letter(pred) == letter


def test_anls_score_values() -> None:
    """1 - edit distance / longer length, and 0 once the distance reaches half the length."""
    assert anls_score("Chicag0", "Chicago") == pytest.approx(1 - 1 / 7)
    assert anls_score("abce", "abcd") == pytest.approx(0.75)
    assert anls_score("abxy", "abcd") == 0.0
    assert anls_score("same", "SAME") == 1.0


@pytest.mark.parametrize("name,mode", [("chartqa_en_20k", "relaxed"), ("ChartQA", "relaxed"),
                                       ("docvqa_train", "anls"), ("infographics_vqa", "anls"),
                                       ("InfographicsVQA", "anls"), ("geoqa+", "auto"), ("CLEVR_math", "auto"),
                                       ("geometry3k_en_20240402_extracted", "auto"), ("SROIE_information", "auto")])
def test_mode_for_dataset(name: str, mode: str) -> None:
    assert mode_for_dataset(name) == mode


@pytest.mark.parametrize("gt,pred", [("40", "41"), ("12.5", "12.9"), ("12.50", "12.90")])
def test_exact_math_files_get_no_five_percent(gt: str, pred: str) -> None:
    """The seed judged SROIE, CLEVR_math, geos and geometry with a 5 % tolerance; ours does not (docs)."""
    assert check_answer(pred, gt, mode_for_dataset("CLEVR_math_en_20240402_extracted")) is False
    assert check_answer(pred, gt, "relaxed") is True  # ChartQA keeps it


def test_fix_answer_rewrites_only_correct_option_answers() -> None:
    bold = R + "**Final answer:** **(B) dog**"
    assert fix_answer(bold, extract_answer(bold, "en"), "B", "en") == R + "Final answer: B"
    boxed = R + "Answer: \\boxed{\\text{(B) dog}}"
    assert fix_answer(boxed, extract_answer(boxed, "en_v2"), "B", "en_v2") == R + "Answer: \\boxed{B}"
    wrong = R + "Final answer: **C**"
    assert fix_answer(wrong, extract_answer(wrong, "en"), "B", "en") is None
    clean = R + "Answer: \\boxed{B}"
    assert fix_answer(clean, extract_answer(clean, "en_v2"), "B", "en_v2") is None


def test_fix_answer_never_plants_the_right_answer_seed_bug() -> None:
    """seed-bug: gt ``2``, pred ``12``: the seed rewrote the response to end with ``2`` and kept it as a
    *rejected* sample stating the right answer. We only rewrite option letters already judged right."""
    response = R + "Final answer: 12"
    assert fix_answer(response, extract_answer(response, "en"), "2", "en") is None


# (id, pred, gt, expected): a number with a unit tail. Before the fix every True case here was judged wrong
# (and became the rejected side of a pair whose chosen side said the same), and "12 thousand" was right for 12.
UNIT_CASES = [
    ("square-units", "12 square units", "12", True),
    ("sq-units", "12 sq units", "12", True),
    ("sq-dot-ft", "12 sq. ft", "12", True),
    ("text-square-units", "12 \\text{square units}", "12", True),
    ("superscript-cm2", "12 cm²", "12", True),
    ("km-per-h", "12 km/h", "12", True),
    ("m-per-s", "12 m/s", "12", True),
    ("latex-space-text", "12\\ \\text{cm}", "12", True),
    ("mathrm-tilde", "12 \\mathrm{~cm}", "12", True),
    ("thin-space-text-power", "12\\,\\text{cm}^{2}", "12", True),
    ("years-old", "12 years old", "12", True),
    ("degrees-celsius", "12 degrees Celsius", "12", True),
    ("per-cent-words", "12 per cent", "12", True),
    ("centimeters-for-cm", "12 centimeters", "12 cm", True),
    ("meters-for-m", "5 meters", "5 m", True),
    ("minutes-for-min", "10 minutes", "10 min", True),
    ("feet-for-ft", "5 ft", "5 feet", True),
    ("cm-for-centimeters", "12 cm", "12 centimeters", True),
    ("metres-spelling", "5 metres", "5 meters", True),
    ("square-centimeters-for-cm2", "12 square centimeters", "12 cm^2", True),
    ("per-word-for-slash", "12 meters per second", "12 m/s", True),
    ("seconds-for-s", "30 sec", "30 seconds", True),
    ("hours-for-hr", "3 hours", "3 hr", True),
    ("inches-for-in", "4 inches", "4 in", True),
    ("kg-for-kilograms", "2 kg", "2 kilograms", True),
    ("degrees-for-circ", "45 degrees", "45^{\\circ}", True),
    ("years-for-yrs", "7 years", "7 yrs", True),
    ("descriptive-word", "12 cm long", "12 cm", True),
    ("million-multiplier", "1.5 million", "1500000", True),
    ("thousand-multiplier", "12 thousand", "12000", True),
    ("formula-with-unit", "x = 12 \\text{ cm}", "12", True),  # math-verify, the unit cut off
    ("surd-with-unit", "2\\sqrt{3} \\text{ cm}", "\\sqrt{12}", True),
    ("thousand-is-not-12", "12 thousand", "12", False),
    ("million-is-not-1.5", "1.5 million", "1.5", False),
    ("other-unit", "12 m", "12 cm", False),
    ("other-time-unit", "12 hours", "12 minutes", False),
    ("other-speed-unit", "12 m/s", "12 km/h", False),
    ("other-dimension", "12 \\text{cm}^2", "12 cm", False),
    ("formula-other-unit", "x = 12 \\text{ m}", "12 cm", False),
    ("or-is-not-a-unit", "12 or thirteen", "12", False),
    ("and-a-half", "12 and a half", "12", False),
    ("is-wrong", "12 is wrong", "12", False),
    ("text-is-incorrect", "12 \\text{ is incorrect}", "12", False),
    ("variable-is-not-a-unit", "2x", "2", False),
    ("pi-is-not-a-unit", "12 pi", "12", False),
    ("k-is-not-kelvin", "12k", "12", False),
    ("second-number-in-tail", "12 ft 6 in", "12", False),
]


@pytest.mark.parametrize("pred,gt,expected", [c[1:] for c in UNIT_CASES], ids=[c[0] for c in UNIT_CASES])
def test_check_answer_units(pred: str, gt: str, expected: bool) -> None:
    """A unit after a number never makes a right answer wrong; only two differing units do."""
    assert check_answer(pred, gt, "auto", timeout=30) is expected


@pytest.mark.parametrize("text,number", [
    ("12 \\text{square units}", Number(12, True, "")),
    ("5 meters", Number(5, True, "m")),
    ("12 cm²", Number(12, True, "cm^2")),
    ("12 km per hour", Number(12, True, "km/h")),
    ("12 degrees Celsius", Number(12, True, "° c")),
    ("1.5 million", Number(1500000, False, "")),
    ("\\frac{1}{2} m", Number(0.5, False, "m")),
    ("12 or 13", None),
    ("12 is wrong", None),
])
def test_parse_number_units(text: str, number: Number | None) -> None:
    assert parse_number(text) == number
