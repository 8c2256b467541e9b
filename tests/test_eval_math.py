"""Answer checking for best-of-N math (spl/evaluation/math_answers.py, paper §4.2, App. C.4).

The gold solutions are the strongest test we have: a checker that cannot read the reference
solutions cannot be trusted on model completions written in the same style.
"""

import json

import pytest

from spl.evaluation.datasets import data_path, load_gsm8k, load_math
from spl.evaluation.math_answers import (
    GSM8K_STOP,
    MATH_STOP,
    build_gsm8k_prompt,
    build_math_prompt,
    extract_gsm8k_answer,
    extract_math_answer,
    gsm8k_gold_answer,
    gsm8k_is_correct,
    last_boxed,
    math_equiv,
    math_is_correct,
    normalize_math_answer,
    normalize_number,
    truncate_at_stop,
)


# ------------------------------------------------------------------------------------------------
# GSM8K
# ------------------------------------------------------------------------------------------------
def test_gsm8k_checker_reads_all_1319_gold_solutions():
    """Parsing each gold solution as a model completion gives its "#### N" answer: 1319/1319."""
    problems = load_gsm8k()
    assert len(problems) == 1319
    failures = []
    for p in problems:
        # The gold answer, read independently: the text after "####", commas removed.
        expected = p.solution.split("####")[-1].strip().replace(",", "")
        if extract_gsm8k_answer(p.solution) != expected or not gsm8k_is_correct(p.solution, p.answer):
            failures.append((p.id, expected, extract_gsm8k_answer(p.solution)))
    assert failures == []  # no exceptions


def test_gsm8k_answer_is_fallback_on_gold_solutions():
    """Without the "####" line, "The answer is N." (the few-shot style) still reads right: 1319/1319."""
    for p in load_gsm8k():
        body = p.solution.rsplit("\n####", 1)[0]
        assert gsm8k_is_correct(f"{body}\nThe answer is {p.answer}.", p.answer), p.id


def test_gsm8k_completion_conventions():
    # The first "####" answers our question; an invented next question is cut off.
    completion = " 3 + 4 = 7 apples. The answer is 7. #### 7\n\nQ: Tom has 2 cats. A: #### 2"
    assert extract_gsm8k_answer(completion) == "7"
    assert extract_gsm8k_answer(" So it costs $1,600.00 in all.") == "1600"  # last-number fallback
    assert extract_gsm8k_answer("#### -5") == "-5"
    assert extract_gsm8k_answer("The answer is 2.50 dollars, not 3") == "2.5"
    assert extract_gsm8k_answer("I do not know.") is None
    assert gsm8k_is_correct("#### 18.0", "18")
    assert not gsm8k_is_correct("#### 180", "18")
    assert normalize_number("1,450,000") == "1450000"
    assert normalize_number("twelve") is None
    with pytest.raises(ValueError, match="no '####'"):
        gsm8k_gold_answer("no marker here")


# ------------------------------------------------------------------------------------------------
# MATH
# ------------------------------------------------------------------------------------------------
def test_math_checker_reads_all_500_gold_solutions():
    """The last boxed answer of every MATH-500 gold solution is equivalent to its `answer` field.

    No exceptions: PRM800K extracted `answer` from the same boxes, so this also pins the brace
    matching (nested braces in 500/500 boxes, e.g. \\frac{\\sqrt{3}}{2}).
    """
    problems = load_math()
    assert len(problems) == 500
    failures = [p.id for p in problems if not math_equiv(extract_math_answer(p.solution), p.answer)]
    assert failures == []
    # The same solutions, written the way the few-shot prompt asks and followed by an invented
    # next problem whose box must be ignored.
    for p in problems:
        completion = f" {p.solution}\n\n###\n\nProblem: What is 1+1?\n\nAnswer: $\\boxed{{2}}$"
        assert math_is_correct(completion, p.answer), p.id


def test_math_normalization_merges_only_equal_answers():
    """Across MATH-500's 301 distinct answer strings, exactly these pairs normalize alike.

    Each merge is right: thousands separators, degrees, units, spacing, "x=5" and \\frac14.
    """
    answers = sorted({json.loads(line)["answer"] for line in data_path("math/math500_test.jsonl").open()})
    groups: dict[str, list[str]] = {}
    for a in answers:
        groups.setdefault(normalize_math_answer(a), []).append(a)
    merged = {k: v for k, v in groups.items() if len(v) > 1}
    assert merged == {
        "10080": ["10,\\!080", "10080"],
        "120": ["120", "120^\\circ"],
        "15": ["15", "15\\mbox{ cm}^2"],
        "2\\sqrt{5}": ["2 \\sqrt{5}", "2\\sqrt{5}"],
        "30": ["30", "30^\\circ"],
        "36": ["36", "36^\\circ", "\\$36"],
        "5": ["5", "x=5"],
        "90": ["90", "90^\\circ"],
        "\\frac{1}{4}": ["\\frac14", "\\frac{1}{4}"],
    }


# A hand-written table of MATH answer pairs: (model's boxed answer, gold answer, equivalent?).
# Each row is one convention of Hendrycks et al.'s is_equiv or Minerva's normalization, or one
# way a naive normalizer goes wrong; "no" rows are as important as "yes" rows.
MATH_PAIRS = [
    # Fractions: dfrac/tfrac, TeX shorthand arguments, a/b, decimals of equal exact value.
    ("\\dfrac{33}{100}", "\\frac{33}{100}", True),
    ("\\tfrac{1}{3}", "\\frac13", True),
    ("\\frac12", "0.5", True),
    ("\\frac 59", "\\frac{5}{9}", True),
    ("\\frac9{19}", "\\frac{9}{19}", True),
    ("\\frac{270}7", "\\frac{270}{7}", True),
    ("\\frac\\pi2", "\\frac{\\pi}{2}", True),
    ("\\frac{\\pi}2", "\\frac{\\pi}{2}", True),
    ("\\frac\\sqrt32", "\\frac{\\sqrt{3}}{2}", False),  # TeX reads \frac{\sqrt}{3}2: not the same
    ("1/2", "\\frac{1}{2}", True),
    ("-3/4", "-\\frac{3}{4}", True),
    ("0.25", "\\frac14", True),
    ("-\\frac{1}{2}", "-0.5", True),
    ("\\frac{-1}{2}", "-\\frac{1}{2}", True),
    ("\\frac{2}{4}", "\\frac{1}{2}", True),  # equal exact values
    ("\\frac{6}{3}", "2", True),
    ("0.333", "\\frac13", False),  # rounded: not the exact answer
    ("0.33", "0.333", False),
    ("\\frac{1}{3}", "\\frac{3}{1}", False),
    ("\\frac{1}{2}", "\\frac{1}{2}x", False),
    ("\\frac{9}{5}", "1\\frac{4}{5}", True),  # MATH-500 writes mixed numbers
    ("137.5", "137 \\frac{1}{2}", True),
    ("1\\frac{4}{5}", "\\frac{14}{5}", False),
    # Plain numbers: trailing zeros, signs, leading dot, thousands separators of every kind.
    ("5.0", "5", True),
    ("5.00", "5", True),
    ("+5", "5", True),
    (".5", "\\frac{1}{2}", True),
    ("12", "-12", False),
    ("1{,}000", "1000", True),
    ("1,000", "1000", True),
    ("1\\,000", "1000", True),
    ("10,\\!080", "10080", True),
    ("11,\\! 111,\\! 111,\\! 100", "11111111100", True),
    ("1,000", "1", False),
    ("1,2", "12", False),  # a pair, not a thousands group
    ("100", "1000", False),
    ("\u22123", "-3", True),  # Unicode minus sign
    ("\u22123", "3", False),
    # Units: only at the end, only if they are units (Minerva's list and Hendrycks' "\text{ ...}").
    ("5 cm", "5", True),
    ("5 \\text{cm}", "5", True),
    ("5\\text{ cm}", "5", True),
    ("15\\mbox{ cm}^2", "15", True),
    ("864 \\mbox{ inches}^2", "864", True),
    ("5.4 \\text{ cents}", "5.4", True),
    ("\\$18.90", "18.90", True),
    ("18.9 dollars", "18.90", True),
    ("12 \\text{ square units}", "12", True),
    ("5 m", "5", True),
    ("50\\%", "50", True),
    ("50 percent", "50", True),
    ("5 cm", "6", False),
    ("5 \\text{cm}", "50", False),
    ("\\frac{270}7\\text{ degrees}", "\\frac{270}{7}", True),
    # Degrees, in every notation.
    ("30^\\circ", "30", True),
    ("30^{\\circ}", "30", True),
    ("30\u00b0", "30", True),
    ("30 degrees", "30", True),
    ("30^\\circ", "60", False),
    # List connectives are separators, never deleted.
    ("2 \\text{ or } 5", "25", False),
    ("2 \\text{ or } 5", "2, 5", True),
    ("3 \\text{ and } 4", "34", False),
    ("3 \\text{ and } 4", "3,4", True),
    ("3\\text{and}4", "3, 4", True),
    ("1, 2 \\text{ and } 3", "1,2,3", True),
    # Text wrappers and multiple choice.
    ("\\text{(C)}", "C", True),
    ("\\text{(C)}", "(C)", True),
    ("(C)", "C", True),
    ("\\textbf{(B)}", "B", True),
    ("\\text{(C)}", "(D)", False),
    ("\\text{Evelyn}", "Evelyn", True),
    ("\\text{east}", "\\text{west}", False),
    ("\\text{even}", "\\text{odd}", False),
    ("\\mathrm{ellipse}", "\\text{ellipse}", True),
    ("\\boxed{7}", "7", True),
    # Roots, pi, spacing.
    ("\\sqrt3", "\\sqrt{3}", True),
    ("\\sqrt 3", "\\sqrt{3}", True),
    ("2\\sqrt5", "2 \\sqrt{5}", True),
    ("\u221a3", "\\sqrt{3}", True),
    ("\\sqrt[3]2", "\\sqrt[3]{2}", True),
    ("\\sqrt[3]{2}", "\\sqrt{2}", False),
    ("\\sqrt{3}", "\\sqrt{2}", False),
    ("\\sqrt{3}", "3", False),
    ("11\\sqrt2", "11\\sqrt{2}", True),
    ("2\\pi", "2 \\pi", True),
    ("2\u03c0", "2\\pi", True),
    ("\\pi", "3.14", False),  # no rounding
    ("\\frac{\\sqrt{3}}{2}", "\\frac{\\sqrt3}{2}", True),
    # Equations and variables.
    ("x = 3", "3", True),
    ("k=5", "5", True),
    ("x = 3", "4", False),
    ("y = 2x + 1", "2x+1", True),  # a short left side is a variable name (Hendrycks)
    ("f(x) = 2x + 1", "2x+1", False),  # a longer one is kept
    ("2x+1", "1+2x", False),  # no algebra, as in both reference checkers
    ("x^2", "x^{2}", False),
    # Delimiters, intervals, sets, tuples.
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})", True),
    ("(1,2)", "(2,1)", False),
    ("(1,2)", "[1,2]", False),
    ("[2, 5)", "[2,5)", True),
    ("(-\\infty, 0]", "(-\u221e,0]", True),
    ("(2,\\infty)", "(2, \\infty)", True),
    ("(2,\\infty)", "[2,\\infty)", False),
    ("\\{1,2\\}", "\\{1, 2\\}", True),
    ("(0,9) \\cup (9,36)", "(0,9)\\cup(9,36)", True),
    ("x \\leq 3", "x\\le3", True),
    ("x \\geq 3", "x \\le 3", False),
    ("f \\circ g", "fg", False),  # \circ as composition is kept
    ("x \\rightarrow \\infty", "x \\infty", False),  # \right must not eat \rightarrow
    # Matrices and row breaks.
    ("\\begin{pmatrix} 1/5 \\\\ -18/5 \\end{pmatrix}", "\\begin{pmatrix}1/5\\\\-18/5\\end{pmatrix}", True),
    ("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "\\begin{pmatrix} 2 \\\\ 1 \\end{pmatrix}", False),
    # Trailing punctuation and nothing at all.
    ("7.", "7", True),
    ("", "7", False),
    (None, "5", False),
]


def test_math_answer_table():
    """At least 100 hand-written pairs; every row states the expected verdict."""
    assert len(MATH_PAIRS) >= 100
    assert {expected for *_, expected in MATH_PAIRS} == {True, False}
    wrong = [(a, b, want) for a, b, want in MATH_PAIRS if math_equiv(a, b) != want]
    assert wrong == []
    # Equivalence is symmetric on every row (a checker must not depend on which side is gold).
    assert [(a, b) for a, b, _ in MATH_PAIRS if a is not None and math_equiv(a, b) != math_equiv(b, a)] == []


# GSM8K completions: (completion, gold, scores?). The extraction rules, one row each.
GSM8K_PAIRS = [
    ("So she has 3 + 4 = 7 apples. #### 7", "7", True),
    ("#### 1,600", "1600", True),
    ("#### $1,600.00", "1600", True),
    ("#### 18.0", "18", True),
    ("#### 180", "18", False),
    ("The answer is \u22123.", "-3", True),  # a Unicode minus is a minus
    ("The answer is \u22123.", "3", False),
    ("#### \u22125", "-5", True),
    ("The answer is 3 hours and 20 minutes = 200 minutes.", "200", True),
    ("The answer is 3 hours and 20 minutes = 200 minutes.", "3", False),
    ("#### 2 + 3 = 5", "5", True),
    ("The answer is 18. Then she buys 3 more.", "18", True),
    ("The answer is 2.50 dollars, not 3", "2.5", True),
    ("The final answer is 42", "42", True),
    ("She pays $5 for 2 cups. The answer is $10.", "10", True),
    ("First 2 + 2 = 4. Then 4 * 3 = 12.", "12", True),  # last-number fallback
    ("I do not know.", "0", False),
    ("#### 7\n\nQ: Tom has 2 cats. A: #### 2", "7", True),  # an invented next question is cut
    ("#### 7\n\nQ: Tom has 2 cats. A: #### 2", "2", False),
]


@pytest.mark.parametrize("completion, gold, expected", GSM8K_PAIRS)
def test_gsm8k_answer_table(completion, gold, expected):
    assert gsm8k_is_correct(completion, gold) == expected


def test_last_boxed():
    assert last_boxed("so $\\boxed{\\frac{1}{2}}$, then \\fbox{3}") == "3"
    assert last_boxed("\\boxed{\\{1\\pm\\sqrt{5},-2\\}}") == "\\{1\\pm\\sqrt{5},-2\\}"
    assert last_boxed("hence $\\boxed 5$.") == "5"
    assert last_boxed("\\boxed{never closed") is None
    assert last_boxed("no box") is None


# ------------------------------------------------------------------------------------------------
# Prompts
# ------------------------------------------------------------------------------------------------
def test_few_shot_prompts():
    gsm = build_gsm8k_prompt("How many legs do 2 cats have?")
    assert gsm.startswith("As an expert problem solver")
    assert gsm.endswith("Q: How many legs do 2 cats have?\n\nA:")
    assert gsm.count("####") == 3  # the instruction and both shots
    math_prompt = build_math_prompt("What is $1+1$?")
    assert "Output your answer in the format Answer: $\\boxed{\\text{answer}}$" in math_prompt
    assert math_prompt.endswith("###\n\nProblem: What is $1+1$?\n\nAnswer:")
    assert build_math_prompt("P", answer_cue=False).endswith("Problem: P")
    # The shots' own answers are what the checkers read.
    assert last_boxed(math_prompt.split("###")[0]) == "41"
    assert truncate_at_stop("a\n\nQ: b", GSM8K_STOP) == "a"
    assert truncate_at_stop("a\n###\nb", MATH_STOP) == "a"
