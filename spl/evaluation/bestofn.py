"""Best-of-N math (paper §4.2, App. C): few-shot samples, unbiased pass@k, difficulty splits.

- ``bestofn_generate``: N completions per problem with App. C.4's few-shot prompt.
- ``best_of_n_summary``: correctness of every completion (``math_answers``), pass@k (Chen et
  al. 2021's unbiased estimator), redundant solutions, overall and per split: MATH by level
  (1, 3, 5 = easy, medium, hard), GSM8K by a difficulty source's easy/medium/hard.
- ``read_completions``: completions generated elsewhere, in the JSONL format evaluate.py reads.
- ``read_difficulty_source`` / ``difficulty_from_completions``: GSM8K splits.

GSM8K splits must not come from a model being compared: a problem lands in "hard" when that
model's own samples failed on it, so the same model looks worse on "hard" by selection alone
(issue 12 simulated two identical models, 200 problems, n = 128: pass@128 on "hard" was 0.175
for the one that set the splits and 0.265 for the other). The paper used Mistral-7B-Instruct, not one of its
fine-tunes. So the splits come from a designated source, fixed before any compared model is
scored: a model directory (sampled here, like the paper's), a completions file of another
model, or a fixed file of {"id", "difficulty"} lines. With none, GSM8K has no splits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from spl.data import DataError
from spl.evaluation import metrics
from spl.evaluation.datasets import MathProblem, load_gsm8k, load_math, read_records
from spl.evaluation.math_answers import (
    GSM8K_STOP,
    MATH_STOP,
    build_gsm8k_prompt,
    build_math_prompt,
    gsm8k_is_correct,
    math_is_correct,
    truncate_at_stop,
)
from spl.evaluation.scoring import (
    EvalModel,
    EvaluationError,
    Prompt,
    SamplingSetting,
    fit_prompt,
    sample_responses,
)

BESTOFN_DATASETS = ("gsm8k", "math")
PASS_AT_K = (1, 4, 16, 64, 128)  # §4.2's sample counts
DIFFICULTIES = ("easy", "medium", "hard")


def bestofn_prompt(dataset: str, problem: MathProblem) -> Prompt:
    """App. C.4's few-shot prompt for one problem."""
    text = build_gsm8k_prompt(problem.question) if dataset == "gsm8k" else build_math_prompt(problem.question)
    return Prompt.user(problem.id, text)


def is_correct(dataset: str, completion: str, gold: str) -> bool:
    return gsm8k_is_correct(completion, gold) if dataset == "gsm8k" else math_is_correct(completion, gold)


def bestofn_generate(policy: EvalModel, dataset: str, problems: Sequence[MathProblem],
                     setting: SamplingSetting, *, num_samples: int, max_new_tokens: int, batch_size: int,
                     seed: int) -> tuple[list[list[str]], int, dict]:
    """``num_samples`` completions (text) per problem, how many prompts had to be cut to fit, and
    the global-temperature sampler's diagnostics ({} for token-level sampling). Generation stops at
    the dataset's stop strings (the next few-shot question); answers are read before them."""
    tok = policy.tokenizer
    encoded = [fit_prompt(policy.encode_prompt(bestofn_prompt(dataset, p)), policy.max_len - max_new_tokens,
                          tok.bos_id) for p in problems]
    generator = torch.Generator(device=policy.device).manual_seed(seed)
    samples = sample_responses(policy, [ids for ids, _ in encoded], setting, num_samples=num_samples,
                               max_new_tokens=max_new_tokens, batch_size=batch_size, generator=generator,
                               desc=f"{dataset} {policy.name} {setting.label}",
                               stop=GSM8K_STOP if dataset == "gsm8k" else MATH_STOP)
    return ([[tok.decode(t) for t in toks] for toks in samples.tokens], sum(cut for _, cut in encoded),
            samples.sampler_summary())


def best_of_n_summary(dataset: str, problems: Sequence[MathProblem], completions: Sequence[Sequence[str]],
                      difficulty: dict[str, str] | None = None, ks: Sequence[int] = PASS_AT_K) -> dict:
    """Correctness of every completion, pass@k and redundancy, overall and per difficulty split.

    Splits: MATH by level; GSM8K by ``difficulty`` (problem id -> easy/medium/hard) when given.
    Returns ``{"splits": {split: metrics}, "correct": per-problem lists of bools}``.
    """
    if len(problems) != len(completions):
        raise ValueError(f"{len(problems)} problems but {len(completions)} completion lists")
    correct = [[is_correct(dataset, c, p.answer) for c in cs]
               for p, cs in zip(problems, completions, strict=True)]
    groups: dict[str, list[int]] = {"all": list(range(len(problems)))}
    for i, p in enumerate(problems):
        split = f"level {p.level}" if p.level is not None else (difficulty or {}).get(p.id)
        if split is not None:
            groups.setdefault(split, []).append(i)
    # Splits in reading order (all, easy, medium, hard, level 1, ...), whatever the problem order.
    rank = {name: r for r, name in enumerate(("all", *DIFFICULTIES))}
    groups = dict(sorted(groups.items(), key=lambda kv: (rank.get(kv[0], len(rank)), kv[0])))
    stops = GSM8K_STOP if dataset == "gsm8k" else MATH_STOP
    splits = {}
    for split, idx in groups.items():
        n = [len(completions[i]) for i in idx]
        c = [sum(correct[i]) for i in idx]
        row: dict[str, float | int] = {"problems": len(idx), "samples_per_problem": min(n)}
        for k, value in metrics.mean_pass_at_k(n, c, ks).items():
            row[f"pass@{k}"] = value
        row["fraction_correct"] = float(np.mean([ci / ni for ci, ni in zip(c, n, strict=True)]))
        # Redundancy compares what answers our problem: the text before an invented next one.
        redundancy = [metrics.redundancy_fraction([truncate_at_stop(s, stops) for s in completions[i]],
                                                  correct[i]) for i in idx]
        row["redundant_solutions"] = metrics.summarize(redundancy)["mean"]
        # How many of the n samples differ at all: copies say nothing new about pass@k.
        row["distinct_samples"] = metrics.summarize(
            [len({truncate_at_stop(s, stops) for s in completions[i]}) for i in idx])["mean"]
        row["problems_with_a_correct_solution"] = sum(ci > 0 for ci in c)
        splits[split] = row
    return {"splits": splits, "correct": correct}


def read_completions(path: str | Path) -> dict[tuple[str, str], tuple[list[MathProblem], list[list[str]]]]:
    """Completions generated elsewhere, grouped: {(model, dataset): (problems, completions per problem)}.

    One JSON object per line: ``dataset`` ("gsm8k" or "math"), ``completion`` (the generated
    text after the prompt), the problem as ``id`` (e.g. "gsm8k-12", or MATH-500's unique_id
    "test/algebra/1004.json") or ``problem`` (its exact text), and optionally ``answer`` (the
    gold answer; looked up in data/ when absent) and ``model`` (a curve label, default
    "completions"). Every completion of a problem counts as one of its n samples, in file order.
    """
    known = {"gsm8k": load_gsm8k(), "math": load_math()}
    by_id = {ds: {p.id: p for p in ps} for ds, ps in known.items()}
    by_text = {ds: {p.question.strip(): p for p in ps} for ds, ps in known.items()}
    grouped: dict[tuple[str, str], dict[str, tuple[MathProblem, list[str]]]] = {}
    for r in read_records(path, {"dataset": str, "completion": str}):
        where, dataset = r["_where"], r["dataset"]
        if dataset not in BESTOFN_DATASETS:
            raise DataError(where, "dataset", f"must be one of {BESTOFN_DATASETS}, got {dataset!r}")
        key = r.get("id") or r.get("problem")
        if not isinstance(key, str) or not key.strip():
            raise DataError(where, "id", "give the problem as 'id' or 'problem' (a string)")
        problem = by_id[dataset].get(key) or by_text[dataset].get(key.strip())
        if "answer" in r:
            level = r.get("level", problem.level if problem else None)
            problem = MathProblem(problem.id if problem else key, problem.question if problem else key,
                                  "", str(r["answer"]), level=level)
        elif problem is None:
            raise DataError(where, "id", f"{dataset} problem {key[:60]!r} is not in the shipped data; give "
                                         "its gold 'answer'")
        model = str(r.get("model", "completions"))
        entry = grouped.setdefault((model, dataset), {}).setdefault(problem.id, (problem, []))
        entry[1].append(r["completion"])
    return {key: ([p for p, _ in group.values()], [cs for _, cs in group.values()])
            for key, group in grouped.items()}


# ---------------------------------------------------------------------------------------------
# GSM8K difficulty splits
# ---------------------------------------------------------------------------------------------


@dataclass
class DifficultySource:
    """Where the GSM8K splits come from; ``splits`` (problem id -> easy/medium/hard) is filled
    when read from a file, and after sampling for a model."""

    kind: str  # "model", "completions" or "file"
    path: str
    splits: dict[str, str] | None = None

    def describe(self) -> str:
        return {"model": "samples of the model", "completions": "the completions file",
                "file": "the fixed splits file"}[self.kind] + f" {self.path}"


def gsm8k_difficulty(problems: Sequence[MathProblem], correct: Sequence[Sequence[bool]]) -> dict[str, str]:
    """Easy/medium/hard per GSM8K problem from one model's samples in generation order (§4.2)."""
    return {p.id: metrics.difficulty_from_first_success(c) for p, c in zip(problems, correct, strict=True)}


def difficulty_from_completions(problems: Sequence[MathProblem],
                                completions: Sequence[Sequence[str]]) -> dict[str, str]:
    """GSM8K splits from a difficulty model's completions (its samples, in order, per problem)."""
    correct = [[gsm8k_is_correct(c, p.answer) for c in cs]
               for p, cs in zip(problems, completions, strict=True)]
    return gsm8k_difficulty(problems, correct)


def read_difficulty_source(path: str | Path) -> DifficultySource:
    """A model directory, a completions file (one model's GSM8K lines) or a splits file.

    A splits file has one {"id": "gsm8k-12", "difficulty": "easy" | "medium" | "hard"} per line,
    as ``evaluate.py`` writes to ``gsm8k_difficulty.jsonl`` for reuse.
    """
    path = Path(path)
    if path.is_dir():
        return DifficultySource("model", str(path))
    records = read_records(path, {})
    if not records:
        raise EvaluationError(f"--difficulty-from {path}: the file is empty")
    if "difficulty" in records[0]:
        splits = {}
        for r in read_records(path, {"id": str, "difficulty": str}):
            if r["difficulty"] not in DIFFICULTIES:
                raise DataError(r["_where"], "difficulty",
                                f"must be one of {DIFFICULTIES}, got {r['difficulty']!r}")
            splits[r["id"]] = r["difficulty"]
        return DifficultySource("file", str(path), splits)
    gsm8k = {model: group for (model, dataset), group in read_completions(path).items() if dataset == "gsm8k"}
    if len(gsm8k) != 1:
        raise EvaluationError(f"--difficulty-from {path}: a completions file must hold GSM8K completions "
                              f"of one model, found {len(gsm8k)} ({', '.join(sorted(gsm8k)) or 'none'})")
    ((problems, completions),) = gsm8k.values()
    return DifficultySource("completions", str(path), difficulty_from_completions(problems, completions))
