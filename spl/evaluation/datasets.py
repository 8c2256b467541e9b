"""Readers for the evaluation data shipped in ``data/`` (see data/README.md for sources).

One reader per format: GSM8K and MATH-500 (best-of-N, §4.2), MMLU and TruthfulQA MC1
(calibration, §4.3 / App. D), HH-RLHF prompts (diversity, §4.1), GlobalOpinionQA (opinion
representation) and the Political Compass propositions (App. E). Lines are read by the one
JSONL reader, ``spl.data.read_jsonl``; a malformed line is a ``spl.data.DataError`` naming file,
line and field, so a broken file is fixed in one look.

The multiple-choice prompt of App. D lives here too, because it is a property of how these
datasets are posed to the model: letters, option order and the shuffle that TruthfulQA needs.
"""

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spl import survey
from spl.data import DataError, read_jsonl
from spl.evaluation.math_answers import gsm8k_gold_answer

# The repository's data folder (spl/evaluation/datasets.py -> repo root / data).
DATA_DIR = Path(__file__).resolve().parents[2] / "data"

# Default files, relative to DATA_DIR.
GSM8K_TEST = "gsm8k/test.jsonl"
MATH500_TEST = "math/math500_test.jsonl"
MMLU_SUBSET = "mmlu/test_first20_per_subject.jsonl"
TRUTHFULQA_MC = "truthfulqa_mc/mc_task.jsonl"
HH_RLHF_SPLIT = "hh_rlhf/helpful_base_test_first800_split.jsonl"
GLOBAL_OPINIONS_US = "global_opinions/globalopinionqa_united_states.jsonl"
GLOBAL_OPINIONS_ALL = "global_opinions/globalopinionqa_first400_questions_all_countries.jsonl"
POLITICAL_COMPASS = "political_compass/pct_propositions.jsonl"

# Appendix D's prompt, verbatim (the paper shows four options, A-D). ``format_multiple_choice``
# extends the same layout to the 2-13 options of TruthfulQA MC1.
CALIBRATION_PROMPT = (
    "Please answer the following multiple choice question. Start your answer with the capital "
    "letter corresponding to your choice:\n\n"
    "{question}\n\n"
    "Answer choices:\n\n"
    "A. {option_a}\n\n"
    "B. {option_b}\n\n"
    "C. {option_c}\n\n"
    "D. {option_d}\n\n"
    "Your answer:"
)
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def data_path(relative: str | Path) -> Path:
    """Absolute path of a file in the repository's data folder, with a clear error if absent."""
    path = DATA_DIR / relative
    if not path.is_file():
        raise FileNotFoundError(f"evaluation data file {path} not found; the data/ folder ships "
                                "with the repository (see data/README.md)")
    return path


def read_records(path: str | Path, required: dict[str, type | tuple[type, ...]]) -> list[dict[str, Any]]:
    """Records of a JSONL file, each an object holding ``required`` fields of those types.

    Each record also gets ``_where`` (a ``spl.data.Where``) so later checks name the same line.
    """
    records = []
    for record, where in read_jsonl(path):
        for name, kind in required.items():
            if name not in record:
                raise DataError(where, name, "missing")
            # bool is an int in Python; a level of `true` is still a format error.
            if not isinstance(record[name], kind) or (isinstance(record[name], bool) and kind is int):
                got = type(record[name]).__name__
                raise DataError(where, name, f"should be {_type_name(kind)}, got {got}")
        records.append({**record, "_where": where})
    return records


def _type_name(kind: type | tuple[type, ...]) -> str:
    return " or ".join(k.__name__ for k in kind) if isinstance(kind, tuple) else kind.__name__


def _resolve(path: str | Path | None, default: str) -> Path:
    """``path`` as given if it exists, else relative to DATA_DIR (so ``MMLU_SUBSET`` works too)."""
    if path is None:
        return data_path(default)
    if Path(path).is_file() or Path(path).is_absolute():
        return Path(path)
    return data_path(path)


# ---------------------------------------------------------------------------------------------
# Best-of-N math
# ---------------------------------------------------------------------------------------------


@dataclass
class MathProblem:
    """A GSM8K or MATH problem; ``answer`` is the gold final answer as text."""

    id: str
    question: str
    solution: str
    answer: str
    level: int | None = None  # MATH difficulty 1-5; None for GSM8K
    subject: str | None = None


def load_gsm8k(path: str | Path | None = None) -> list[MathProblem]:
    """GSM8K test problems; the gold answer is the number after the solution's "####"."""
    problems = []
    for i, r in enumerate(read_records(_resolve(path, GSM8K_TEST), {"question": str, "answer": str})):
        try:
            gold = gsm8k_gold_answer(r["answer"])
        except ValueError as e:
            raise DataError(r["_where"], "answer", str(e)) from None
        problems.append(MathProblem(id=f"gsm8k-{i}", question=r["question"], solution=r["answer"],
                                    answer=gold))
    return problems


def load_math(path: str | Path | None = None, levels: set[int] | None = None) -> list[MathProblem]:
    """MATH-500 problems (or any file with its fields), optionally only some levels."""
    fields = {"problem": str, "solution": str, "answer": str, "level": int, "unique_id": str}
    problems = []
    for r in read_records(_resolve(path, MATH500_TEST), fields):
        if not 1 <= r["level"] <= 5:
            raise DataError(r["_where"], "level", f"must be 1-5, got {r['level']}")
        if levels is None or r["level"] in levels:
            problems.append(MathProblem(id=r["unique_id"], question=r["problem"], solution=r["solution"],
                                        answer=r["answer"], level=r["level"], subject=r.get("subject")))
    return problems


# ---------------------------------------------------------------------------------------------
# Multiple choice (calibration)
# ---------------------------------------------------------------------------------------------


@dataclass
class MultipleChoice:
    """A multiple-choice question; ``choices[correct_index]`` is right."""

    id: str
    question: str
    choices: list[str]
    correct_index: int
    subject: str | None = None

    def prompt(self) -> str:
        """The App. D prompt for this question (see ``format_multiple_choice``)."""
        return format_multiple_choice(self.question, self.choices)

    @property
    def letters(self) -> list[str]:
        """The option letters, "A", "B", ... one per choice."""
        return list(LETTERS[: len(self.choices)])


def format_multiple_choice(question: str, choices: list[str]) -> str:
    """App. D's prompt; with four options it is exactly ``CALIBRATION_PROMPT``.

    Other option counts keep the same layout, one "X. option" paragraph per letter.
    """
    if not 2 <= len(choices) <= len(LETTERS):
        raise ValueError(f"need 2-{len(LETTERS)} choices, got {len(choices)}")
    head, tail = CALIBRATION_PROMPT.split("A. {option_a}")
    options = "\n\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(choices))
    return head.format(question=question) + options + tail.split("D. {option_d}")[1]


def shuffle_choices(choices: list[str], correct_index: int, seed: int, key: str) -> tuple[list[str], int]:
    """Seeded shuffle of one question's options; returns the new list and the new correct index.

    The generator is seeded with (seed, key), so a question's order does not depend on which
    other questions were loaded or in what order.
    """
    order = list(range(len(choices)))
    random.Random(f"{seed}:{key}").shuffle(order)
    return [choices[i] for i in order], order.index(correct_index)


def load_mmlu(path: str | Path | None = None, shuffle_seed: int | None = None) -> list[MultipleChoice]:
    """MMLU questions. The source's answer letters are balanced, so shuffling is optional."""
    fields = {"subject": str, "row": int, "question": str, "choices": list, "answer_index": int}
    questions = []
    for r in read_records(_resolve(path, MMLU_SUBSET), fields):
        if not 0 <= r["answer_index"] < len(r["choices"]):
            raise DataError(r["_where"], "answer_index", f"{r['answer_index']} is outside the choices")
        qid = f"mmlu-{r['subject']}-{r['row']}"
        choices, answer = r["choices"], r["answer_index"]
        if shuffle_seed is not None:
            choices, answer = shuffle_choices(choices, answer, shuffle_seed, qid)
        questions.append(MultipleChoice(qid, r["question"], choices, answer, subject=r["subject"]))
    return questions


def load_truthfulqa_mc1(path: str | Path | None = None, shuffle_seed: int = 0) -> list[MultipleChoice]:
    """TruthfulQA MC1, options shuffled with ``shuffle_seed``.

    The source lists the correct option first for every question, so letter-based evaluation
    without a shuffle would reward a model that always says "A". There is no opt-out.
    """
    fields = {"idx": int, "question": str, "mc1_choices": list, "mc1_labels": list}
    questions = []
    for r in read_records(_resolve(path, TRUTHFULQA_MC), fields):
        labels = r["mc1_labels"]
        if len(labels) != len(r["mc1_choices"]) or sorted(labels) != [0] * (len(labels) - 1) + [1]:
            raise DataError(r["_where"], "mc1_labels", f"must mark exactly one of the "
                                                       f"{len(r['mc1_choices'])} choices with 1")
        qid = f"truthfulqa-{r['idx']}"
        choices, answer = shuffle_choices(r["mc1_choices"], labels.index(1), shuffle_seed, qid)
        questions.append(MultipleChoice(qid, r["question"], choices, answer))
    return questions


# ---------------------------------------------------------------------------------------------
# HH-RLHF prompts (diversity)
# ---------------------------------------------------------------------------------------------


@dataclass
class Dialogue:
    """An HH-RLHF comparison: the shared prompt (ending in "Assistant:") and both responses."""

    id: str
    prompt: str
    chosen: str
    rejected: str


def load_hh_rlhf(path: str | Path | None = None) -> list[Dialogue]:
    """HH-RLHF comparisons from the pre-split file (fields idx, prompt, chosen, rejected)."""
    fields = {"idx": int, "prompt": str, "chosen": str, "rejected": str}
    return [Dialogue(f"hh-{r['idx']}", r["prompt"], r["chosen"], r["rejected"])
            for r in read_records(_resolve(path, HH_RLHF_SPLIT), fields)]


# ---------------------------------------------------------------------------------------------
# Opinions
# ---------------------------------------------------------------------------------------------
@dataclass
class OpinionQuestion:
    """A survey question with each population's answer shares over ``options``."""

    id: str
    question: str
    options: list[str]
    distributions: dict[str, list[float]] = field(default_factory=dict)  # population -> shares

    def prompt(self) -> str:
        """The GlobalOpinionQA prompt ("Question: ...\\nOptions: A. ... B. ...\\nAnswer:").

        Rebuilt from the fields, so it stays right after non-substantive options are dropped.
        """
        options = " ".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(self.options))
        return f"Question: {self.question}\nOptions: {options}\nAnswer:"


def load_global_opinions(path: str | Path | None = None,
                         substantive_only: bool = False) -> list[OpinionQuestion]:
    """GlobalOpinionQA questions, from either shipped file, read strictly by ``spl.survey``.

    The single-country file has ``population``/``distribution``; the all-countries file has
    ``distributions`` (country -> shares). Shares must sum to 1 (``spl.survey.SUM_TOLERANCE``);
    errors name the file, line and question id. With ``substantive_only`` options such as
    "DK/Refused" are dropped and each distribution renormalized over the rest (``spl.survey``'s
    rule); questions left with fewer than two options are skipped.
    """
    path = _resolve(path, GLOBAL_OPINIONS_US)
    questions = []
    for qid, text, options, groups, where in survey.read_questions(path):
        if substantive_only:
            if sum(not survey.NON_SUBSTANTIVE.match(o.strip()) for o in options) < 2:
                continue  # nothing left to compare
            options, groups = survey.substantive(options, groups, where)
        questions.append(OpinionQuestion(qid, text, options, dict(groups)))
    return questions


@dataclass
class Proposition:
    """A Political Compass Test statement (App. E)."""

    id: str
    statement: str
    topic: str


def load_political_compass(path: str | Path | None = None) -> list[Proposition]:
    """The 62 Political Compass Test propositions (the paper's "60 statements")."""
    fields = {"pct_id": str, "statement": str, "topic": str}
    return [Proposition(r["pct_id"], r["statement"], r["topic"])
            for r in read_records(_resolve(path, POLITICAL_COMPASS), fields)]
