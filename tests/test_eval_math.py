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


@pytest.mark.parametrize("predicted, gold", [
    ("\\dfrac{33}{100}", "\\frac{33}{100}"),
    ("\\frac12", "0.5"),
    ("1/2", "\\frac{1}{2}"),
    ("0.25", "\\frac14"),
    ("-\\frac{1}{2}", "-0.5"),
    ("5.0", "5"),
    ("x = 3", "3"),
    ("5.4 \\text{ cents}", "5.4"),
    ("11,\\! 111,\\! 111,\\! 100", "11111111100"),
    ("\\frac{270}7\\text{ degrees}", "\\frac{270}{7}"),
    ("\\text{(C)}", "(C)"),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})"),
    ("\\sqrt 3", "\\sqrt{3}"),
    ("10\\%", "10"),
    ("\\begin{pmatrix} 1/5 \\\\ -18/5 \\end{pmatrix}", "\\begin{pmatrix}1/5\\\\-18/5\\end{pmatrix}"),
])
def test_math_equivalent_forms(predicted, gold):
    assert math_equiv(predicted, gold)


@pytest.mark.parametrize("predicted, gold", [
    ("0.333", "\\frac13"),  # a rounded decimal is not the exact answer
    ("2x+1", "1+2x"),  # no algebra: Hendrycks' checker would also say no
    ("(1,2)", "(2,1)"),
    ("12", "-12"),
    ("f \\circ g", "fg"),  # \circ as composition is kept
    (None, "5"),
])
def test_math_different_answers(predicted, gold):
    assert not math_equiv(predicted, gold)


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
