"""Survey questions with real answer shares: GlobalOpinionQA (Durmus et al. 2023), read strictly.

The population of the paper's social-choice analysis (§3.1-3.2) is a distribution over answers:
p_best(y), the share of people whose preferred answer is y (Prop. A.1). GlobalOpinionQA gives one
such distribution per (question, country); ``data/global_opinions/README.md`` says where the two
shipped files come from (CC BY-NC-SA 4.0). This module turns them into ``SurveyQuestion`` objects
that the demo (``spl/demo.py``) and the sweep (``experiments/opinions.py``) train on.

Rules, stated once here and printed by the demo:

- **Shares must sum to 1** within ``SUM_TOLERANCE`` (the shipped files do to 1e-15). A file that
  sums to 0.98 is refused, not renormalized: that would silently change the population.
- **Non-substantive options are dropped** ("DK/Refused", "Don't know", "No answer", "Missing; Not
  available", "Other missing; ...", and the upstream artifact "Total N="), and each distribution
  is renormalized over the remaining options. They are not opinions: a model should not be
  rewarded for refusing because 2% of respondents did. The rebuilt prompt lists only the kept
  options, lettered A, B, ... in their original order.
- **Zero shares stay zero.** Such an option is still offered (respondents saw it); it wins none of
  its comparisons, and every theory (Prop. 3.1/3.2/A.1) gives it probability 0. Two zero-share
  options are never compared with each other (no rater prefers either).
- **Pooling** several countries (``pool``): each country counts equally, whatever its size or
  sample, so the pooled p_best(y) is the mean of the countries' shares. Raters from the pool then
  compare answers by Bradley-Terry on log p_best (Prop. A.1's Plackett-Luce assumption), exactly
  as for one country.

Errors name the file, line and question id: ``SurveyError``.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from spl.data import DataError

DATA_DIR = Path(__file__).resolve().parents[1] / "data" / "global_opinions"
US_FILE = DATA_DIR / "globalopinionqa_united_states.jsonl"
ALL_COUNTRIES_FILE = DATA_DIR / "globalopinionqa_first400_questions_all_countries.jsonl"
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
POOLED = "pooled"  # the population name of a pool of countries (its countries are in ``groups``)
SUM_TOLERANCE = 1e-4  # |sum of shares - 1| allowed before a distribution is refused
POOLING_RULE = ("each country counts equally: pooled share of an answer = mean of the countries' shares; "
                "raters from the pool prefer answers by Bradley-Terry on log(pooled share)")
MISSING_RULE = ("non-substantive options (DK/Refused, No answer, Missing, Total N=) are dropped and the "
                "shares renormalized; a zero share stays zero (the option is offered, wins no comparison, "
                "and every theory gives it 0)")
# Options that are not an opinion (matched at the start of the option text, case-insensitive).
NON_SUBSTANTIVE = re.compile(
    r"^(dk\b|don.?t know|refused|no answer|(other )?missing|not available|total\b)", re.IGNORECASE)


class SurveyError(DataError):
    """A survey file or request that cannot be used; the message names the file, line and question."""

    def __init__(self, message: str) -> None:  # the message already says where (file, line, question)
        ValueError.__init__(self, message)
        self.where, self.field = None, None


@dataclass(frozen=True)
class SurveyQuestion:
    """One question: its options and, per group (country), the share choosing each option.

    ``population`` is the distribution the model is trained toward: one country's shares, or the
    pool of several (``pool``). ``groups`` keeps every country's own shares for the printout.
    """

    id: str  # "goqa-<row id>", the id evaluate.py's opinions suite uses too
    text: str
    options: list[str]
    population_name: str
    population: list[float]
    groups: dict[str, list[float]] = field(default_factory=dict)

    @property
    def pooled(self) -> bool:
        return len(self.groups) > 1

    def prompt(self) -> str:
        """The GlobalOpinionQA prompt rebuilt from the kept options (as evaluate.py poses it)."""
        return format_prompt(self.text, self.options)

    def letters(self) -> list[str]:
        return list(LETTERS[:len(self.options)])

    def record(self) -> dict:
        """A line of the all-countries file format, with the trained population as one more group:
        ``evaluate.py --suite opinions --opinions-file F --population NAME`` reads it back."""
        return {"min_id": int(self.id.removeprefix("goqa-")), "question_text": self.text,
                "options": self.options, "prompt": self.prompt(), "population_name": self.population_name,
                "distributions": {**self.groups, self.population_name: self.population}}


def format_prompt(text: str, options: list[str]) -> str:
    """"Question: ...\\nOptions: A. x B. y\\nAnswer:" (the upstream format)."""
    lettered = " ".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(options))
    return f"Question: {text}\nOptions: {lettered}\nAnswer:"


def check_shares(shares: object, n_options: int, where: str) -> list[float]:
    """Shares as floats, or a SurveyError naming ``where``: one per option, >= 0, summing to 1."""
    if not isinstance(shares, list) or len(shares) != n_options:
        got = len(shares) if isinstance(shares, list) else type(shares).__name__
        raise SurveyError(f"{where}: {got} shares for {n_options} options")
    if any(isinstance(x, bool) or not isinstance(x, int | float) or not math.isfinite(x) or x < 0
           for x in shares):
        raise SurveyError(f"{where}: shares must be finite numbers >= 0, got {shares}")
    if abs(sum(shares) - 1) > SUM_TOLERANCE:
        raise SurveyError(f"{where}: shares sum to {sum(shares):.6g}, not 1 (tolerance {SUM_TOLERANCE:g})")
    return [float(x) for x in shares]


def substantive(options: list[str], groups: dict[str, list[float]],
                where: str) -> tuple[list[str], dict[str, list[float]]]:
    """Drop non-substantive options and renormalize every group's shares over the rest."""
    keep = [i for i, o in enumerate(options) if not NON_SUBSTANTIVE.match(o.strip())]
    if len(keep) < 2:
        raise SurveyError(f"{where}: fewer than two substantive options in {options}")
    out = {}
    for name, shares in groups.items():
        total = sum(shares[i] for i in keep)
        if total <= 0:
            raise SurveyError(f"{where}: {name} put every answer on non-substantive options")
        out[name] = [shares[i] / total for i in keep]
    return [options[i] for i in keep], out


def pool(groups: dict[str, list[float]]) -> list[float]:
    """The pooled population: each group counts equally (see ``POOLING_RULE``)."""
    columns = zip(*groups.values(), strict=True)
    return [sum(c) / len(groups) for c in columns]


# (id, text, options, {country: shares}, where): one checked line of a survey file
Record = tuple[str, str, list[str], dict[str, list[float]], str]


def read_questions(path: str | Path = US_FILE) -> list[Record]:
    """Every record of a shipped file, checked: (id, text, options, {country: shares}, where).

    Both formats: the one-country file (``population`` + ``distribution``) and the all-countries
    file (``distributions``: country -> shares). Options are kept exactly as in the file.
    """
    path = Path(path)
    if not path.is_file():
        raise SurveyError(f"survey file not found: {path}")
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        at = f"{path}, line {n}"
        try:
            r = json.loads(line)
        except json.JSONDecodeError as e:
            raise SurveyError(f"{at}: invalid JSON ({e.msg})") from None
        if not isinstance(r, dict):
            raise SurveyError(f"{at}: expected an object")
        qid = r.get("id", r.get("min_id"))
        where = f"{at} (question goqa-{qid})"
        if not isinstance(qid, int) or isinstance(qid, bool):
            raise SurveyError(f"{at}: missing integer field 'id' (or 'min_id')")
        text, options = r.get("question_text"), r.get("options")
        if not isinstance(text, str) or not text.strip():
            raise SurveyError(f"{where}: missing field 'question_text'")
        if not isinstance(options, list) or len(options) < 2 or not all(isinstance(o, str) for o in options):
            raise SurveyError(f"{where}: 'options' must list at least two strings")
        if "distributions" in r:
            raw = r["distributions"]
            if not isinstance(raw, dict) or not raw:
                raise SurveyError(f"{where}: 'distributions' must map countries to shares")
        elif "distribution" in r and isinstance(r.get("population"), str):
            raw = {r["population"]: r["distribution"]}
        else:
            raise SurveyError(f"{where}: needs 'distributions', or 'population' and 'distribution'")
        groups = {c: check_shares(s, len(options), f"{where}, {c}") for c, s in raw.items()}
        out.append((f"goqa-{qid}", text, options, groups, where))
    return out


def load_questions(path: str | Path = US_FILE, *, countries: list[str] | None = None,
                   ids: list[str] | None = None, min_countries: int = 1,
                   exclude_texts: set[str] = frozenset()) -> list[SurveyQuestion]:
    """Questions of one file as training targets, non-substantive options dropped (module rules).

    ``countries``: pool exactly these on every selected question (each must have answered it);
    None: one country's shares as they are, or the pool of all countries that answered when there
    are several. ``ids``: keep these questions, in this order (each must exist). ``min_countries``
    and ``exclude_texts`` select pluralistic questions not already asked elsewhere.
    """
    records = read_questions(path)
    known = {c for *_, groups, _ in records for c in groups}
    unknown = sorted(set(countries or ()) - known)
    if unknown:
        raise SurveyError(f"{path}: unknown countr{'y' if len(unknown) == 1 else 'ies'} {unknown} "
                          f"(the file has {len(known)}, e.g. {sorted(known)[:5]})")
    by_id = {r[0]: r for r in records}
    if ids is not None:
        missing = [i for i in ids if i not in by_id]
        if missing:
            raise SurveyError(f"{path}: no question with id {missing}")
        records = [by_id[i] for i in ids]
    out = []
    for qid, text, options, groups, where in records:
        if countries is not None:
            absent = [c for c in countries if c not in groups]
            if absent:
                raise SurveyError(f"{where}: no answers from {absent}; it has {sorted(groups)}")
            groups = {c: groups[c] for c in countries}
        if len(groups) < min_countries or text in exclude_texts:
            continue
        kept, groups = substantive(options, groups, where)
        name = next(iter(groups)) if len(groups) == 1 else POOLED
        out.append(SurveyQuestion(qid, text, kept, name, pool(groups), groups))
    return out
