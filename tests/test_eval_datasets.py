"""Readers of the shipped evaluation data (spl/evaluation/datasets.py) and their errors."""

import collections
import json
import re

import pytest

from spl.data import DataError, read_jsonl, split_hh
from spl.evaluation.datasets import (
    CALIBRATION_PROMPT,
    DATA_DIR,
    GLOBAL_OPINIONS_ALL,
    format_multiple_choice,
    load_global_opinions,
    load_gsm8k,
    load_hh_rlhf,
    load_math,
    load_mmlu,
    load_political_compass,
    load_truthfulqa_mc1,
    read_records,
    shuffle_choices,
)


def test_shipped_data_counts_and_attribution():
    assert len(load_gsm8k()) == 1319
    assert len(load_math()) == 500
    levels = collections.Counter(p.level for p in load_math(DATA_DIR / "math/math500_L1_L3_L5_40each.jsonl"))
    assert levels == {1: 40, 3: 40, 5: 40}
    assert len(load_math(levels={5})) == 134
    assert len(load_mmlu()) == 1140
    assert len(load_political_compass()) == 62
    assert len(load_global_opinions()) == 181
    assert len(load_global_opinions(GLOBAL_OPINIONS_ALL)) == 400
    # Every data file is named, with its license, in data/README.md; the folder stays small.
    readme = (DATA_DIR / "README.md").read_text()
    files = sorted(p for p in DATA_DIR.rglob("*.jsonl"))
    assert files and all(p.name in readme for p in files)
    assert "license" in readme.lower()
    assert sum(p.stat().st_size for p in DATA_DIR.rglob("*")) < 8_000_000


def test_truthfulqa_options_are_shuffled_with_a_seed():
    """The source lists the right answer first; after the shuffle positions are spread out."""
    questions = load_truthfulqa_mc1(shuffle_seed=0)
    assert len(questions) == 817
    positions = collections.Counter(q.correct_index for q in questions)
    assert positions[0] < 0.35 * len(questions) and len(positions) >= 8
    source = [json.loads(line) for line in (DATA_DIR / "truthfulqa_mc/mc_task.jsonl").open()]
    for q, r in zip(questions, source, strict=True):
        assert sorted(q.choices) == sorted(r["mc1_choices"])
        assert q.choices[q.correct_index] == r["mc1_choices"][0]
    # Same seed, same order; another seed, another order.
    assert [q.choices for q in load_truthfulqa_mc1(shuffle_seed=0)] == [q.choices for q in questions]
    assert [q.choices for q in load_truthfulqa_mc1(shuffle_seed=1)] != [q.choices for q in questions]


def test_shuffle_choices_is_per_question_deterministic():
    choices, answer = shuffle_choices(["a", "b", "c", "d"], 2, seed=3, key="q7")
    assert choices[answer] == "c"
    assert shuffle_choices(["a", "b", "c", "d"], 2, seed=3, key="q7") == (choices, answer)


def test_calibration_prompt_layout():
    four = format_multiple_choice("Q?", ["w", "x", "y", "z"])
    assert four == CALIBRATION_PROMPT.format(question="Q?", option_a="w", option_b="x", option_c="y",
                                             option_d="z")
    two = format_multiple_choice("Q?", ["yes", "no"])
    assert two.endswith("A. yes\n\nB. no\n\nYour answer:")
    mmlu = load_mmlu()[0]
    assert mmlu.letters == ["A", "B", "C", "D"] and mmlu.choices[mmlu.correct_index] == "4"
    with pytest.raises(ValueError, match="2-26 choices"):
        format_multiple_choice("Q?", ["only"])


def test_hh_rlhf_split_matches_shipped_split():
    """Splitting the raw dialogues at the last marker of the common prefix reproduces the
    pre-split file for all 800, including idx 567 (marker inside chosen) and 721 (equal texts)."""
    raw = [record for record, _ in read_jsonl(DATA_DIR / "hh_rlhf/helpful_base_test_first800.jsonl")]
    split = load_hh_rlhf()
    assert len(raw) == len(split) == 800
    for r, b in zip(raw, split, strict=True):
        assert split_hh(r["chosen"], r["rejected"]) == (b.prompt, b.chosen, b.rejected)
    assert split[567].prompt.endswith("\n\nAssistant:") and "\n\nAssistant:" in split[567].chosen


def test_global_opinions_substantive_filter():
    questions = load_global_opinions(substantive_only=True)
    assert all("DK/Refused" not in q.options for q in questions)
    assert all(abs(sum(d) - 1) < 1e-9 for q in questions for d in q.distributions.values())
    first = load_global_opinions()[0]
    assert first.prompt().startswith("Question: Please indicate how much")
    assert first.prompt().endswith("E. DK/Refused\nAnswer:")


# ------------------------------------------------------------------------------------------------
# Malformed files: every error names file and line.
# ------------------------------------------------------------------------------------------------
def _write(tmp_path, lines: list[str]):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _error(path, line: int, field: str, message: str) -> str:
    """The regex of a DataError message (file, line and field are named)."""
    return re.escape(f"{path}, line {line}, field '{field}': {message}")


def test_invalid_json_names_file_and_line(tmp_path):
    path = _write(tmp_path, ['{"question": "q", "answer": "a\\n#### 1"}', "", '{"question": "q", oops}'])
    with pytest.raises(DataError, match=_error(path, 3, "<json>", "invalid JSON")):
        load_gsm8k(path)


def test_missing_and_mistyped_fields(tmp_path):
    path = _write(tmp_path, ['{"question": "q"}'])
    with pytest.raises(DataError, match=_error(path, 1, "answer", "missing")):
        load_gsm8k(path)
    path = _write(tmp_path, ['{"question": "q", "answer": "no marker"}'])
    with pytest.raises(DataError, match=_error(path, 1, "answer", "GSM8K solution has no '####'")):
        load_gsm8k(path)
    good = {"problem": "p", "solution": "s", "answer": "1", "level": 2, "unique_id": "u"}
    path = _write(tmp_path, [json.dumps(good), json.dumps({**good, "level": "Level 2"})])
    with pytest.raises(DataError, match=_error(path, 2, "level", "should be int, got str")):
        load_math(path)
    path = _write(tmp_path, [json.dumps({**good, "level": True})])
    with pytest.raises(DataError, match=_error(path, 1, "level", "should be int")):
        load_math(path)
    path = _write(tmp_path, ["[1, 2]"])
    with pytest.raises(DataError, match=_error(path, 1, "<record>", "expected a JSON object, got list")):
        read_records(path, {})


def test_semantic_errors(tmp_path):
    path = _write(tmp_path, [json.dumps({"idx": 0, "question": "q", "mc1_choices": ["a", "b"],
                                         "mc1_labels": [1, 1]})])
    with pytest.raises(DataError, match=_error(path, 1, "mc1_labels", "must mark exactly one")):
        load_truthfulqa_mc1(path)
    path = _write(tmp_path, [json.dumps({"id": 7, "question_text": "q", "options": ["a", "b"],
                                         "population": "X", "distribution": [0.5]})])
    message = f"{path}, line 1 (question goqa-7), X: 1 shares for 2 options"
    with pytest.raises(DataError, match=re.escape(message)):
        load_global_opinions(path)  # spl.survey's strict reader (tests/test_survey.py has the rest)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_mmlu("no/such/file.jsonl")
