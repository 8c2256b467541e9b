"""The survey reader (spl/survey.py): shipped files, refusals that name the question, the stated
rules for "DK/Refused", zero shares and pooling, and the preference data built from them."""

import json

import pytest
import torch

from spl.demo import preference_pairs
from spl.demo_answers import erased_groups, read_questions_file, theory, write_questions
from spl.survey import (
    ALL_COUNTRIES_FILE,
    SUM_TOLERANCE,
    US_FILE,
    SurveyError,
    SurveyQuestion,
    load_questions,
    pool,
)


def write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def us_record(qid=7, options=("Yes", "No", "DK/Refused"), shares=(0.5, 0.3, 0.2)):
    return {"id": qid, "population": "United States", "question_text": f"Question {qid}?",
            "options": list(options), "distribution": list(shares)}


def test_shipped_files_load_with_the_stated_rules():
    us = load_questions(US_FILE)
    assert len(us) == 181 and all(q.population_name == "United States" for q in us)
    # "DK/Refused" is dropped and the rest renormalized: goqa-10282 is [0.52, 0.34, 0.1, 0.02, 0.02].
    q = next(q for q in us if q.id == "goqa-10282")
    assert q.options == ["Very serious problem", "Somewhat serious problem", "Not too serious of a problem",
                         "Not a problem at all"]
    assert q.population == pytest.approx([x / 0.98 for x in (0.52, 0.34, 0.1, 0.02)], abs=1e-12)
    assert "DK/Refused" not in q.prompt() and q.prompt().endswith("D. Not a problem at all\nAnswer:")
    for q in us:
        assert abs(sum(q.population) - 1) < 1e-12 and len(q.options) == len(q.population) >= 2
    # Pooling: each country counts equally (independent arithmetic on the raw file).
    raw = next(json.loads(line) for line in ALL_COUNTRIES_FILE.read_text().splitlines()
               if json.loads(line)["min_id"] == 0)
    pooled = load_questions(ALL_COUNTRIES_FILE, ids=["goqa-0"], countries=["Belgium", "Greece", "Spain"])[0]
    renorm = {c: [x / sum(s[:3]) for x in s[:3]] for c, s in raw["distributions"].items()}  # drop DK (4th)
    expected = [sum(renorm[c][k] for c in ("Belgium", "Greece", "Spain")) / 3 for k in range(3)]
    assert pooled.pooled and pooled.population_name == "pooled"
    assert pooled.population == pytest.approx(expected, abs=1e-12)
    assert pooled.groups["Greece"] == pytest.approx(renorm["Greece"], abs=1e-12)


@pytest.mark.parametrize("record,message", [
    (us_record(shares=(0.5, 0.3, 0.17)), "sum to 0.97"),  # rounding in a user's own file: refused
    (us_record(shares=(0.5, 0.5)), "2 shares for 3 options"),
    (us_record(shares=(0.5, 0.6, -0.1)), ">= 0"),
    (us_record(shares=(0.5, "0.3", 0.2)), ">= 0"),
    ({**us_record(), "options": ["Only one"], "distribution": [1.0]}, "at least two"),
])
def test_bad_distributions_are_refused_naming_the_question(tmp_path, record, message):
    path = write(tmp_path / "bad.jsonl", [us_record(qid=3), record])
    with pytest.raises(SurveyError, match=message) as err:
        load_questions(path)
    assert "goqa-7" in str(err.value) and "line 2" in str(err.value)


def test_sum_tolerance_is_the_stated_one(tmp_path):
    ok = us_record(shares=(0.5, 0.3, 0.2 + 0.5 * SUM_TOLERANCE))
    load_questions(write(tmp_path / "ok.jsonl", [ok]))
    bad = us_record(shares=(0.5, 0.3, 0.2 + 2 * SUM_TOLERANCE))
    with pytest.raises(SurveyError, match="tolerance"):
        load_questions(write(tmp_path / "bad.jsonl", [bad]))


def test_unknown_and_absent_countries_are_refused():
    with pytest.raises(SurveyError, match="unknown country.*Atlantis"):
        load_questions(ALL_COUNTRIES_FILE, countries=["Greece", "Atlantis"])
    # A real country that did not answer this question: the question is named.
    with pytest.raises(SurveyError, match=r"goqa-0\).*no answers from \['Nigeria'\]"):
        load_questions(ALL_COUNTRIES_FILE, ids=["goqa-0"], countries=["Greece", "Nigeria"])
    with pytest.raises(SurveyError, match="no question with id"):
        load_questions(US_FILE, ids=["goqa-999999"])


def test_all_non_substantive_is_refused(tmp_path):
    record = us_record(options=("Yes", "No", "DK/Refused"), shares=(0.0, 0.0, 1.0))
    with pytest.raises(SurveyError, match="goqa-7.*non-substantive"):
        load_questions(write(tmp_path / "dk.jsonl", [record]))


class LetterTokenizer:
    """Just enough of spl.tokenizer.Tokenizer for preference_pairs: letters 10-14, a prompt 30+."""

    vocab_size, bos_id, eos_id, pad_id = 40, 1, 2, 0

    def __init__(self):
        self.prompts = {}

    def encode(self, text, bos=False):
        letter = text.strip()
        if len(letter) == 1:
            ids = [10 + "ABCDE".index(letter)]
        else:
            ids = [30 + self.prompts.setdefault(text, len(self.prompts))]
        return [self.bos_id, *ids] if bos else ids


def test_zero_shares_and_comparisons():
    q = SurveyQuestion("goqa-1", "Q?", ["a", "b", "c", "d"], "United States", [0.6, 0.4, 0.0, 0.0],
                       {"United States": [0.6, 0.4, 0.0, 0.0]})
    other = SurveyQuestion("goqa-2", "R?", ["a", "b", "c", "d", "e"], "United States", [0.2] * 5,
                           {"United States": [0.2] * 5})
    tok = LetterTokenizer()
    pairs = preference_pairs([q, other], tok, comparisons=50, seed=0, non_answer_comparisons=2,
                             by_share=False)
    prompt = tok.encode(q.prompt(), bos=True)
    # The format: each option then </s> beats the same option running on with any other token, twice.
    form = [(tuple(p.chosen_ids), tuple(p.rejected_ids)) for p in pairs
            if p.prompt_ids == prompt and len(p.chosen_ids) == 2]
    tokens = [t for t in range(tok.vocab_size) if t != tok.eos_id]
    expected = [((w, tok.eos_id), (w, t)) for w in range(10, 14) for t in tokens] * 2
    assert sorted(form) == sorted(expected)
    pairs = [p for p in pairs if len(p.chosen_ids) == 1]
    mine = [(p.chosen_ids[0], p.rejected_ids[0]) for p in pairs if p.prompt_ids == prompt]
    assert all(len(p.rejected_ids) == 1 for p in pairs)  # the answers: one token, no eos
    a, b, c, d, e = 10, 11, 12, 13, 14
    count = {pair: mine.count(pair) for pair in set(mine)}
    assert count[(a, b)] == 30 and count[(b, a)] == 20  # round(50 * 0.6 / 1.0)
    assert count[(a, c)] == 50 and (c, a) not in count  # a zero share wins no comparison
    assert (c, d) not in count and (d, c) not in count  # two zero shares are never compared
    # Non-answers lose to every option: E (an option elsewhere only) and </s> like zero-share
    # options, every other token twice; nothing else is compared.
    assert all(count[(w, e)] == 50 for w in (a, b, c, d))
    assert all(count[(w, tok.eos_id)] == 50 for w in (a, b, c, d))  # an empty answer: a refusal
    others = [t for t in range(tok.vocab_size) if t not in (a, b, c, d, e, tok.eos_id)]
    assert all(count[(w, t)] == 2 for w in (a, b, c, d) for t in others)
    assert len(count) == 6 + 8 + 4 * len(others)  # a-b both ways, a and b beat c and d; e, eos; the rest
    # Theory gives zero shares exactly 0 (DPO and SPL alike).
    pop, ref = torch.tensor(q.population, dtype=torch.float64), torch.full((4,), 0.25, dtype=torch.float64)
    for alpha in (0.1, 1.0, 2.0):
        assert theory(ref, pop, alpha, 0.1)[2:].tolist() == [0.0, 0.0]



def test_non_answer_comparisons_in_proportion_to_share():
    """The demo's default: option i of k beats each non-answer k p_i times as often as the equal
    count (a person's answer, drawn from p, against one nobody gives), zero-share options never;
    the comparisons between options are the same as with equal counts."""
    q = SurveyQuestion("goqa-1", "Q?", ["a", "b", "c", "d"], "United States", [0.6, 0.4, 0.0, 0.0],
                       {"United States": [0.6, 0.4, 0.0, 0.0]})
    tok = LetterTokenizer()
    prompt = tok.encode(q.prompt(), bos=True)

    def counts(**kw):
        pairs = preference_pairs([q], tok, comparisons=50, seed=0, non_answer_comparisons=10, **kw)
        mine = [(p.chosen_ids[0], p.rejected_ids[0]) for p in pairs
                if p.prompt_ids == prompt and len(p.chosen_ids) == 1]
        return {pair: mine.count(pair) for pair in set(mine)}

    by_share, equal = counts(), counts(by_share=False)
    a, b, c, d = 10, 11, 12, 13
    for w, scale in ((a, 4 * 0.6), (b, 4 * 0.4)):
        assert by_share[(w, tok.eos_id)] == round(scale * 50)  # an empty answer, like a zero share
        assert by_share[(w, 20)] == round(scale * 10)  # a token that answers nothing
        assert equal[(w, tok.eos_id)] == 50 and equal[(w, 20)] == 10
    assert all((w, t) not in by_share for w in (c, d) for t in range(20, 30))
    options = {(x, y) for x in (a, b, c, d) for y in (a, b, c, d)}
    between = {k: by_share[k] for k in options & by_share.keys()}
    assert between == {k: equal[k] for k in options & equal.keys()}


def test_erased_groups_and_round_trip(tmp_path):
    q = load_questions(ALL_COUNTRIES_FILE, ids=["goqa-0"], countries=["Belgium", "Greece", "Spain"])[0]
    assert pool(q.groups) == q.population
    dpo_like = torch.tensor([0.95, 0.0, 0.05], dtype=torch.float64)  # Belgium's top answer is C
    assert [c for c, *_ in erased_groups(q, dpo_like)] == ["Belgium"]
    assert erased_groups(q, torch.tensor(q.population, dtype=torch.float64)) == []
    write_questions(tmp_path / "q.jsonl", [q, *load_questions(US_FILE, ids=["goqa-10282"])])
    back = read_questions_file(tmp_path / "q.jsonl")
    assert back[0] == q and back[1].population_name == "United States" and not back[1].pooled
