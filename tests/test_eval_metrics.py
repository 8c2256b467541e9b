"""Metrics (spl/evaluation/metrics.py): each checked against enumeration or hand arithmetic."""

import itertools
import math

import numpy as np
import pytest

from spl.evaluation.metrics import (
    brier_score,
    calibration_metrics,
    difficulty_from_first_success,
    distinct_n,
    expected_calibration_error,
    fraction_unique,
    is_non_word,
    kl_divergence,
    load_english_words,
    mean_pairwise_cosine_distance,
    mean_pass_at_k,
    non_word_token_rate,
    pass_at_k,
    redundancy_fraction,
    reliability_bins,
    self_bleu,
    sentence_bleu,
    softmax_over_options,
    summarize,
    tokenize,
    total_variation,
)
from tests.eval_extras import require_extra


# ------------------------------------------------------------------------------------------------
# Best-of-N
# ------------------------------------------------------------------------------------------------
def test_pass_at_k_equals_enumeration_of_all_k_subsets():
    """pass@k is the fraction of k-subsets of the n samples that contain a correct one."""
    for n in range(1, 8):
        for c in range(n + 1):
            samples = [True] * c + [False] * (n - c)
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(samples, k))
                brute = sum(any(s) for s in subsets) / len(subsets)
                assert pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12), (n, c, k)


def test_pass_at_k_large_n_is_stable():
    # n = 128 is the paper's largest; the product form must agree with exact integer binomials.
    for c in (0, 1, 5, 64, 127, 128):
        for k in (1, 4, 16, 64, 128):
            exact = 1 - math.comb(128 - c, k) / math.comb(128, k)
            assert pass_at_k(128, c, k) == pytest.approx(exact, abs=1e-12)
    with pytest.raises(ValueError, match="k <= n"):
        pass_at_k(16, 3, 64)
    with pytest.raises(ValueError, match="c <= n"):
        pass_at_k(4, 5, 1)


def test_mean_pass_at_k_skips_unsupported_k():
    table = mean_pass_at_k([16, 16], [0, 16], ks=[1, 4, 16, 64, 128])
    assert table == {1: 0.5, 4: 0.5, 16: 0.5}


def test_redundancy_fraction():
    """4 correct solutions, 2 distinct after whitespace normalization -> (4 - 2) / 4 = 0.5."""
    solutions = ["x = 2", "x  =\n2", "y = 2", "x = 2", "wrong"]
    assert redundancy_fraction(solutions, [True, True, True, True, False]) == 0.5
    assert redundancy_fraction(["a", "b"], [True, True]) == 0.0
    assert redundancy_fraction(["a", "b"], [False, False]) is None


def test_difficulty_from_first_success():
    assert difficulty_from_first_success([False] * 3 + [True]) == "easy"
    assert difficulty_from_first_success([False] * 4 + [True]) == "medium"
    assert difficulty_from_first_success([False] * 63 + [True]) == "medium"
    assert difficulty_from_first_success([False] * 64 + [True]) == "hard"
    assert difficulty_from_first_success([False] * 128) == "hard"


# ------------------------------------------------------------------------------------------------
# Calibration
# ------------------------------------------------------------------------------------------------
PROBS = [[0.9, 0.1], [0.8, 0.2], [0.35, 0.65], [0.6, 0.4]]
ANSWERS = [0, 1, 1, 0]


def test_ece_and_brier_hand_computed():
    """Four two-option questions; predictions 0, 0, 1, 0 with confidences .9, .8, .65, .6.

    Hits: yes, no, yes, yes -> accuracy 3/4.
    10 bins: each confidence sits alone in (.8,.9], (.7,.8], (.6,.7], (.5,.6], so
      ECE = (|1-.9| + |0-.8| + |1-.65| + |1-.6|) / 4 = (.1 + .8 + .35 + .4) / 4 = 0.4125.
    2 bins: all four in (.5, 1]: mean confidence 2.95/4 = .7375, accuracy .75,
      ECE = |.75 - .7375| = 0.0125.
    Multi-class Brier: (.1² + .1²) + (.8² + .8²) + (.35² + .35²) + (.4² + .4²)
      = .02 + 1.28 + .245 + .32 = 1.865, / 4 = 0.46625.
    """
    result = calibration_metrics(PROBS, ANSWERS)
    assert result["accuracy"] == 0.75
    assert result["ece"] == pytest.approx(0.4125, abs=1e-12)
    assert result["ece_bins"] == 10
    assert result["brier"] == pytest.approx(0.46625, abs=1e-12)
    assert calibration_metrics(PROBS, ANSWERS, n_bins=2)["ece"] == pytest.approx(0.0125, abs=1e-12)
    counts = [b["count"] for b in result["reliability"]]
    assert counts == [0, 0, 0, 0, 0, 1, 1, 1, 1, 0]


def test_brier_three_options_and_ragged():
    """[.5, .3, .2] with answer C: .5² + .3² + .8² = .25 + .09 + .64 = 0.98; mean with 0 is 0.49."""
    assert brier_score([[0.5, 0.3, 0.2]], [2]) == pytest.approx(0.98)
    assert brier_score([[0.5, 0.3, 0.2], [1.0, 0.0]], [2, 0]) == pytest.approx(0.49)
    with pytest.raises(ValueError, match="outside its 2 options"):
        brier_score([[0.5, 0.5]], [2])
    with pytest.raises(ValueError, match="sum to 1"):
        brier_score([[0.5, 0.6]], [0])


def test_bins_are_right_closed():
    bins = reliability_bins([0.0, 0.3, 0.30001, 1.0], [True, True, False, True], n_bins=10)
    assert bins[0]["count"] == 1  # 0 joins the first bin
    assert bins[2]["count"] == 1 and bins[2]["accuracy"] == 1.0  # 0.3 is in (0.2, 0.3]
    assert bins[3]["count"] == 1 and bins[3]["accuracy"] == 0.0  # 0.30001 is in (0.3, 0.4]
    assert bins[9]["count"] == 1
    assert math.isnan(bins[5]["accuracy"])
    assert expected_calibration_error([1.0, 1.0], [True, True]) == 0.0


def test_softmax_over_options():
    p = softmax_over_options([math.log(2), 0.0, 0.0])
    assert p == pytest.approx([0.5, 0.25, 0.25])
    assert sum(softmax_over_options([1000.0, 1000.0])) == pytest.approx(1.0)  # no overflow


# ------------------------------------------------------------------------------------------------
# Opinions
# ------------------------------------------------------------------------------------------------
def test_kl_and_total_variation():
    """p = [.8, .2], q = [.5, .5]: KL = .8 ln 1.6 + .2 ln .4 = .376003 - .183258 = 0.192745;
    TV = (|.3| + |.3|) / 2 = 0.3."""
    assert kl_divergence([0.8, 0.2], [0.5, 0.5]) == pytest.approx(0.8 * math.log(1.6) + 0.2 * math.log(0.4))
    assert kl_divergence([0.8, 0.2], [0.5, 0.5]) == pytest.approx(0.192745, abs=1e-6)
    assert total_variation([0.8, 0.2], [0.5, 0.5]) == pytest.approx(0.3)
    assert kl_divergence([0.5, 0.5], [0.5, 0.5]) == 0.0
    # Rounded survey shares are renormalized; zero model mass is floored, not infinite.
    assert total_variation([0.51, 0.5], [0.5, 0.5]) == pytest.approx(abs(0.51 / 1.01 - 0.5))
    assert math.isfinite(kl_divergence([0.5, 0.5], [1.0, 0.0]))
    assert kl_divergence([1.0, 0.0], [0.5, 0.5]) == pytest.approx(math.log(2))  # p = 0 adds nothing
    with pytest.raises(ValueError, match="2 options but the model has 3"):
        total_variation([0.5, 0.5], [0.2, 0.3, 0.5])


# ------------------------------------------------------------------------------------------------
# Text diversity
# ------------------------------------------------------------------------------------------------
def test_distinct_n():
    """Unigrams the cat sat the cat ran: 4 distinct of 6; bigrams: 3 distinct of 4."""
    texts = ["The cat sat", "the cat ran"]
    assert distinct_n(texts, 1) == pytest.approx(4 / 6)
    assert distinct_n(texts, 2) == pytest.approx(3 / 4)
    assert distinct_n(["one"], 2) == 0.0
    assert tokenize("Hi, you!") == ["hi", ",", "you", "!"]


def test_sentence_bleu_hand_computed():
    """hyp "the cat sat on the mat" vs ref "the cat sat on a mat" (both 6 tokens, BP = 1):
    p1 = 5/6 (second "the" clipped), p2 = 3/5, p3 = 2/4, p4 = 1/3;
    BLEU = (5/6 * 3/5 * 2/4 * 1/3)^(1/4) = (1/12)^(1/4) = 0.537285.
    Smoothing: hyp "a b" vs ref "a c": p1 = 1/2, p2 = 0 -> 0.1, p3 and p4 have no n-grams -> 0.1/1;
    BLEU = (0.5 * 0.1^3)^(1/4) = 0.149535.
    Brevity: hyp "the cat" vs ref "the cat sat on": p_n as above with 1, 1, 0.1, 0.1 and
    BP = exp(1 - 4/2) = e^-1, BLEU = e^-1 * (0.01)^(1/4) = 0.116334."""
    hyp, ref = "the cat sat on the mat".split(), "the cat sat on a mat".split()
    assert sentence_bleu(hyp, [ref]) == pytest.approx((1 / 12) ** 0.25)
    assert sentence_bleu(hyp, [ref]) == pytest.approx(0.537285, abs=1e-6)
    assert sentence_bleu(["a", "b"], [["a", "c"]]) == pytest.approx(0.149535, abs=1e-6)
    assert sentence_bleu(["the", "cat"], [["the", "cat", "sat", "on"]]) == pytest.approx(
        math.exp(-1) * 0.01**0.25)
    # Clipping takes the max count over references: "the" x3 against refs with 1 and 2 -> 2/3;
    # the closest reference length (3) sets BP = 1.
    refs = [["the", "cat"], ["the", "the", "dog"]]
    assert sentence_bleu(["the", "the", "the"], refs, max_n=1) == pytest.approx(2 / 3)


def test_self_bleu():
    assert self_bleu(["a b c d", "a b c d", "a b c d"]) == pytest.approx(1.0)
    # Disjoint 4-token texts share nothing: p_n = 0.1 / (5 - n) for n = 1..4, so
    # BLEU = (0.1^4 / (4 * 3 * 2 * 1))^(1/4) = 0.1 / 24^(1/4) = 0.045180.
    assert self_bleu(["a b c d", "e f g h"]) == pytest.approx(0.1 / 24**0.25)
    with pytest.raises(ValueError, match="at least 2"):
        self_bleu(["only one"])


def test_fraction_unique():
    assert fraction_unique(["a  b", "a b\n", "c"]) == pytest.approx(2 / 3)


@pytest.fixture(scope="module")
def english_words():
    require_extra("wordfreq")
    return load_english_words()


# Ordinary text that shape rules get wrong: slashes, hyphens, acronyms, camel-case brands,
# chemistry, accents, URLs, abbreviations, possessives, numbers with units.
WORDS = ("and/or 24/7 COVID-19 GPUs PhD iPhone CO2 café https://example.com/a?b=1 www.python.org "
         "bob@mail.com e.g. U.S. 1990s 2nd 3.5% 1,000 (well-known) don't it\u2019s Fanon's H2O A100 "
         "5km 10am Mr. O'Brien rock'n'roll YouTube naïve résumé -- ...")
# Debris from App. E's DPO t = 1.4 samples, each a non-word: glued words, sub-word fragments,
# script mixes, glue through punctuation.
DEBRIS = ("socioeconomicstatuscanimpact FacebookvPhpageto Cosmoelles兼Enabled(\"\");Think investigg "
          "investigg2 Twndejoin TelcPFfl migration.itorProf'initCulture lastname그 만husandayalert "
          "Additionally,transnationalideounohapboften Clarionth admitantly")
SPL_SAMPLE = ("There is a significant Body of research that underlines how social class can be a powerful "
              "force in shaping people's identities and social connections, often more so than nationality. "
              "According to Fanon, in his seminal book *Black Skin, White Masks*, \"each civilization is "
              "founded upon an exclusively superficial class through which it states its fundamental "
              "ideology\" (p. 34).")
DPO_T14_SAMPLE = ("This statement is partially valid as socioeconomic status can create significant "
                  "divides and differences between people ScotlandFilein FacebookvPhpageto "
                  "investiggMajorforcesdifferencesamongIt can be argued that although Nationalitiesaresys "
                  "[...] prevents admitantly Clarionth Civilw identifying thingsint Unless "
                  "otherwisementionedsecess decades edge Twndejoin Ibid "
                  "reported Africanschoolatt highway spec TelcPFfl")


def test_non_word_false_positives_and_negatives(english_words):
    false_positives = [t for t in WORDS.split() if is_non_word(t, english_words)]
    assert false_positives == []
    assert [t for t in ("--", "...", "(", "**") if is_non_word(t, english_words) is not None] == []
    false_negatives = [t for t in DEBRIS.split() if not is_non_word(t, english_words)]
    assert false_negatives == []
    # Every debris token counts; the two punctuation-only tokens of WORDS do not.
    n_debris, n_words = len(DEBRIS.split()), len(WORDS.split()) - 2
    rate = non_word_token_rate([WORDS, DEBRIS], english_words)
    assert rate == pytest.approx(n_debris / (n_words + n_debris))
    # App. E: SPL's coherent sample has no non-words; the t = 1.4 sample 12 of its 42 counted
    # tokens ("[...]" is punctuation).
    assert non_word_token_rate([SPL_SAMPLE], english_words) == 0.0
    assert non_word_token_rate([DPO_T14_SAMPLE], english_words) == pytest.approx(12 / 42)
    assert non_word_token_rate(["-- ... !!"], english_words) == 0.0  # nothing counted
    assert non_word_token_rate(["cat dgo"], frozenset({"cat", "dog"})) == 0.5


def test_mean_pairwise_cosine_distance():
    """Embeddings e1 = (1, 0), e2 = (0, 1), e3 = (1, 1): distances 1, 1 - 1/√2, 1 - 1/√2.
    Ordered distinct pairs sum to 2 (1 + 2 (1 - 1/√2)) = 3.171573; eq. 44 divides by N² = 9
    (0.352397), the distinct-pair mean by N(N-1) = 6 (0.528595)."""
    e = np.array([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]])  # scale does not matter
    total = 2 * (1 + 2 * (1 - 1 / math.sqrt(2)))
    assert mean_pairwise_cosine_distance(e) == pytest.approx(total / 9)
    assert mean_pairwise_cosine_distance(e, include_self=False) == pytest.approx(total / 6)
    assert mean_pairwise_cosine_distance(np.ones((4, 3))) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="all zeros"):
        mean_pairwise_cosine_distance(np.zeros((2, 3)))


def test_summarize():
    s = summarize([1.0, 2.0, None, float("nan"), 3.0])
    assert s["n"] == 3 and s["mean"] == 2.0 and s["stderr"] == pytest.approx(1 / math.sqrt(3))
    assert summarize([])["n"] == 0
