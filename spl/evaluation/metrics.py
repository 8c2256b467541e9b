"""Evaluation metrics over numbers and text (paper §4, App. B.1, C, D, E).

Best-of-N (§4.2): unbiased pass@k (Chen et al. 2021) and the fraction of redundant solutions.
Calibration (§4.3, App. D): accuracy, expected calibration error over equal-width bins of the
top-option confidence, the multi-class Brier score, and reliability-diagram bins.
Opinion representation (§3, Cor. 3.2): KL(population || model) and total variation.
Diversity (§4.1, App. B.1): distinct-n, self-BLEU, fraction unique, non-word token rate, and the
mean pairwise embedding cosine distance of eq. 44.

Everything here is a pure function of Python lists / numpy arrays so each formula can be checked
by hand; per-prompt values are averaged over prompts by the caller.
"""

import functools
import math
import re
import unicodedata
from collections import Counter
from collections.abc import Sequence

import numpy as np

from spl.extras import ExtraMissing, import_extra


def summarize(values: Sequence[float | None]) -> dict[str, float]:
    """Mean, standard error of the mean and count of per-prompt values (None/NaN left out)."""
    x = np.array([v for v in values if v is not None and not math.isnan(v)], dtype=np.float64)
    if x.size == 0:
        return {"mean": math.nan, "stderr": math.nan, "n": 0}
    stderr = float(x.std(ddof=1) / math.sqrt(x.size)) if x.size > 1 else math.nan
    return {"mean": float(x.mean()), "stderr": stderr, "n": int(x.size)}


# ---------------------------------------------------------------------------------------------
# Best-of-N
# ---------------------------------------------------------------------------------------------


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k = 1 - C(n-c, k) / C(n, k) from n samples of which c are correct.

    Computed as 1 - prod_{i=n-c+1}^{n} (1 - k/i) (Chen et al. 2021, Fig. 3): the binomials
    overflow floats for n = 128, the product of terms in [0, 1] does not.
    """
    if not 0 <= c <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass@k needs 1 <= k <= n, got k={k} with n={n} samples")
    if n - c < k:
        # Every k-subset contains a correct sample.
        return 1.0
    return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def mean_pass_at_k(num_samples: Sequence[int], num_correct: Sequence[int],
                   ks: Sequence[int]) -> dict[int, float]:
    """Mean pass@k over problems, for each k that every problem has enough samples for.

    Ks above the smallest sample count are left out rather than estimated with bias.
    """
    if len(num_samples) != len(num_correct) or not num_samples:
        raise ValueError("need equally many sample and correct counts, and at least one problem")
    usable = [k for k in ks if k <= min(num_samples)]
    return {k: float(np.mean([pass_at_k(n, c, k) for n, c in zip(num_samples, num_correct, strict=True)]))
            for k in usable}


def normalize_solution(text: str) -> str:
    """Solution text up to whitespace: runs of spaces/newlines count as one space."""
    return " ".join(text.split())


def redundancy_fraction(solutions: Sequence[str], correct: Sequence[bool]) -> float | None:
    """Fraction of a problem's correct solutions that repeat an earlier correct one.

    Two solutions are the same when ``normalize_solution`` makes them equal. With c correct
    solutions of which u are distinct this is (c - u) / c: 0 when every correct solution is
    new, (c-1)/c when all are one text. None when no solution is correct (undefined).
    """
    if len(solutions) != len(correct):
        raise ValueError(f"{len(solutions)} solutions but {len(correct)} correctness flags")
    good = [normalize_solution(s) for s, ok in zip(solutions, correct, strict=True) if ok]
    if not good:
        return None
    return (len(good) - len(set(good))) / len(good)


def difficulty_from_first_success(correct: Sequence[bool]) -> str:
    """GSM8K difficulty as in §4.2, read from a reference model's samples in generation order.

    The paper calls a problem easy if it "takes 4 or fewer samples to solve", medium for 5-64
    and hard beyond 64; we take "samples to solve" as the 1-based index of the first correct
    sample (never solved counts as hard).
    """
    first = next((i + 1 for i, ok in enumerate(correct) if ok), None)
    if first is not None and first <= 4:
        return "easy"
    if first is not None and first <= 64:
        return "medium"
    return "hard"


# ---------------------------------------------------------------------------------------------
# Calibration
# ---------------------------------------------------------------------------------------------


def softmax_over_options(logits: Sequence[float]) -> list[float]:
    """Renormalize option-letter logits (or log-probs) into probabilities over the options only."""
    x = np.asarray(logits, dtype=np.float64)
    p = np.exp(x - x.max())  # shift by the max so exp cannot overflow
    return (p / p.sum()).tolist()


def _check_probs(probs: Sequence[Sequence[float]], correct: Sequence[int]) -> None:
    if len(probs) != len(correct) or not probs:
        raise ValueError(f"{len(probs)} probability rows but {len(correct)} answers (need >= 1)")
    for i, (row, answer) in enumerate(zip(probs, correct, strict=True)):
        if not 0 <= answer < len(row):
            raise ValueError(f"question {i}: correct index {answer} outside its {len(row)} options")
        if abs(sum(row) - 1.0) > 1e-4 or min(row) < 0:
            raise ValueError(f"question {i}: probabilities must be >= 0 and sum to 1, got {row}")


def reliability_bins(confidences: Sequence[float], hits: Sequence[bool],
                     n_bins: int = 10) -> list[dict[str, float]]:
    """Equal-width bins over [0, 1]: bin b holds confidences in (b/n_bins, (b+1)/n_bins].

    Each bin reports its edges, count, mean confidence and accuracy (NaN when empty), which is
    what a reliability diagram draws. Edges come from ``np.linspace`` as in Guo et al. (2017).
    """
    conf = np.asarray(confidences, dtype=np.float64)
    hit = np.asarray(hits, dtype=np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # side="left" on the inner edges puts a value equal to an edge into the bin below it,
    # giving right-closed bins; a confidence of exactly 0 joins the first bin.
    index = np.searchsorted(edges[1:-1], conf, side="left")
    bins = []
    for b in range(n_bins):
        inside = index == b
        count = int(inside.sum())
        bins.append({
            "lower": float(edges[b]), "upper": float(edges[b + 1]), "count": count,
            "confidence": float(conf[inside].mean()) if count else math.nan,
            "accuracy": float(hit[inside].mean()) if count else math.nan,
        })
    return bins


def expected_calibration_error(confidences: Sequence[float], hits: Sequence[bool],
                               n_bins: int = 10) -> float:
    """ECE = sum over bins of (bin size / total) * |accuracy - mean confidence|."""
    total = len(confidences)
    return float(sum(b["count"] / total * abs(b["accuracy"] - b["confidence"])
                     for b in reliability_bins(confidences, hits, n_bins) if b["count"]))


def brier_score(probs: Sequence[Sequence[float]], correct: Sequence[int]) -> float:
    """Multi-class Brier score: mean over questions of sum_k (p_k - 1[k = answer])^2, in [0, 2].

    The sum runs over every option, not just the top one, so it also rewards spreading the
    remaining mass sensibly; questions may have different numbers of options (TruthfulQA).
    """
    _check_probs(probs, correct)
    return float(np.mean([sum((p - (k == answer)) ** 2 for k, p in enumerate(row))
                          for row, answer in zip(probs, correct, strict=True)]))


def calibration_metrics(probs: Sequence[Sequence[float]], correct: Sequence[int],
                        n_bins: int = 10) -> dict:
    """Accuracy, ECE (top-option confidence, ``n_bins`` equal-width bins), Brier, and the bins.

    ``probs[i]`` are the renormalized option probabilities of question i (App. D); the
    prediction is the arg-max option, its probability the confidence.
    """
    _check_probs(probs, correct)
    confidences = [max(row) for row in probs]
    hits = [int(np.argmax(row)) == answer for row, answer in zip(probs, correct, strict=True)]
    return {
        "n": len(probs),
        "accuracy": float(np.mean(hits)),
        "ece": expected_calibration_error(confidences, hits, n_bins),
        "ece_bins": n_bins,
        "brier": brier_score(probs, correct),
        "brier_form": "multi-class: sum over options of (p_k - y_k)^2, mean over questions",
        "mean_confidence": float(np.mean(confidences)),
        "reliability": reliability_bins(confidences, hits, n_bins),
    }


# ---------------------------------------------------------------------------------------------
# Opinion representation
# ---------------------------------------------------------------------------------------------


def _as_distribution(p: Sequence[float], name: str) -> np.ndarray:
    x = np.asarray(p, dtype=np.float64)
    if x.ndim != 1 or x.size == 0 or (x < 0).any() or x.sum() <= 0:
        raise ValueError(f"{name} must be a non-empty vector of non-negative weights, got {p}")
    # Survey shares are rounded (they sum to 0.99 or 1.01); renormalize both sides alike.
    return x / x.sum()


def kl_divergence(population: Sequence[float], model: Sequence[float], eps: float = 1e-6) -> float:
    """KL(population || model) in nats: how badly the model under-represents people's answers.

    The model's distribution is floored at ``eps`` and renormalized, so an option the model
    never picks costs about log(p/eps) instead of infinity (answer frequencies from a few
    samples hit zero often). Options the population never picks contribute 0.
    """
    p = _as_distribution(population, "population distribution")
    q = _as_distribution(model, "model distribution")
    if p.shape != q.shape:
        raise ValueError(f"population has {p.size} options but the model has {q.size}")
    q = np.maximum(q, eps)
    q = q / q.sum()
    mask = p > 0
    return float(np.sum(p[mask] * np.log(p[mask] / q[mask])))


def total_variation(population: Sequence[float], model: Sequence[float]) -> float:
    """Total variation distance: half the L1 distance, in [0, 1]."""
    p = _as_distribution(population, "population distribution")
    q = _as_distribution(model, "model distribution")
    if p.shape != q.shape:
        raise ValueError(f"population has {p.size} options but the model has {q.size}")
    return float(0.5 * np.abs(p - q).sum())


# ---------------------------------------------------------------------------------------------
# Text diversity
# ---------------------------------------------------------------------------------------------
# Lower-cased words and single punctuation marks: the tokenization for distinct-n and self-BLEU
# (punctuation counts, so "Hi!" and "Hi." differ, as in most BLEU tokenizers).
_TOKEN_RE = re.compile(r"\w+|[^\w\s]")


def tokenize(text: str) -> list[str]:
    """Lower-cased word and punctuation tokens."""
    return _TOKEN_RE.findall(text.lower())


def _ngrams(tokens: Sequence[str], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct-n (Li et al. 2016): distinct n-grams / all n-grams, pooled over the responses.

    Pooled over one prompt's N responses, so a phrase reused across responses lowers it.
    0.0 when no response has n tokens.
    """
    grams = Counter()
    for text in texts:
        grams.update(_ngrams(tokenize(text), n))
    total = sum(grams.values())
    return len(grams) / total if total else 0.0


def sentence_bleu(hypothesis: Sequence[str], references: Sequence[Sequence[str]],
                  max_n: int = 4, epsilon: float = 0.1) -> float:
    """BLEU of one tokenized hypothesis against several references (Papineni et al. 2002).

    Uniform weights over 1..max_n-gram precisions; each precision clips a hypothesis n-gram's
    count by its largest count in any one reference. Smoothing is Chen & Cherry (2014) method 1,
    the one Texygen's self-BLEU uses: a zero match count becomes ``epsilon``. The brevity penalty
    uses the reference length closest to the hypothesis length (the shorter on ties).
    """
    if not hypothesis or not references:
        return 0.0
    log_precision = 0.0
    for n in range(1, max_n + 1):
        hyp = _ngrams(hypothesis, n)
        max_ref = Counter()
        for ref in references:
            max_ref |= _ngrams(ref, n)  # | keeps the per-n-gram maximum over references
        matches = sum(min(count, max_ref[gram]) for gram, count in hyp.items())
        total = max(sum(hyp.values()), 1)  # a hypothesis shorter than n has no n-grams
        log_precision += math.log((matches or epsilon) / total) / max_n
    c = len(hypothesis)
    r = min((len(ref) for ref in references), key=lambda length: (abs(length - c), length))
    brevity = 1.0 if c > r else math.exp(1.0 - r / c)
    return brevity * math.exp(log_precision)


def self_bleu(texts: Sequence[str], max_n: int = 4) -> float:
    """Self-BLEU (Zhu et al. 2018): mean BLEU of each response against all the others.

    Higher means more alike (less diverse). Needs at least two responses.
    """
    if len(texts) < 2:
        raise ValueError(f"self-BLEU needs at least 2 responses, got {len(texts)}")
    tokens = [tokenize(t) for t in texts]
    return float(np.mean([sentence_bleu(tokens[i], tokens[:i] + tokens[i + 1:], max_n)
                          for i in range(len(tokens))]))


def fraction_unique(texts: Sequence[str]) -> float:
    """Distinct responses / responses, where responses equal up to whitespace are the same."""
    if not texts:
        raise ValueError("fraction_unique needs at least one response")
    return len({normalize_solution(t) for t in texts}) / len(texts)


# Non-word tokens (Fig. 1b's "lexical integrity", App. E's samples). Temperature-scaled sampling
# writes tokens that are no word of any language: glued words ("socioeconomicstatuscanimpact"),
# sub-word debris ("investigg", "FacebookvPhpageto") and script mixes ("Cosmoelles兼Enabled").
# A token is judged against a real English word list (wordfreq's, 321k forms including names,
# brands and acronyms), so ordinary words that a shape rule would flag ("iPhone", "PhD", "CO2",
# "café") are words here. Rules, per whitespace token:
#   1. strip surrounding punctuation; nothing left: punctuation, not counted;
#   2. a URL, e-mail address or domain is a word;
#   3. split at inner punctuation other than apostrophes ("and/or", "24/7", "COVID-19", "e.g",
#      "migration.itorProf"); the token is a word iff every part is:
#      - a number, or a number with a short suffix (1990s, 2nd, 5km, 4K);
#      - in the word list, lower-cased, possibly after dropping a possessive "'s";
#      - an acronym: 2-8 capitals, optionally with digits or a plural "s" (GPUs, H2O, A100);
#      - letters of one non-Latin script only (we do not judge other languages; a part that
#        mixes scripts is debris).
_URL_RE = re.compile(r"(?:[a-z][a-z0-9+.-]*://|www\.)\S+|[\w.+-]+@[\w-]+(?:\.[\w-]+)+|"
                     r"[\w-]+(?:\.[\w-]+)*\.(?:com|org|net|edu|gov|io|ai|co|uk|de|fr|info)(?:/\S*)?",
                     re.IGNORECASE)
_PART_SPLIT_RE = re.compile(r"[^\w']+|_+")
_NUMBER_PART_RE = re.compile(r"\d+(?:[a-z]{1,3}|[A-Z])?")
_ACRONYM_RE = re.compile(r"(?=[A-Z0-9]*[A-Z])[A-Z0-9]{2,8}s?")


def load_english_words() -> frozenset[str] | None:
    """wordfreq's large English word list (lower case), or None when wordfreq is not installed.

    An evaluation extra (requirements-eval.txt); without it the caller reports the non-word
    metric as skipped. Installed but failing to import, it raises ``spl.extras.ExtraBroken``.
    """
    try:
        wordfreq = import_extra("wordfreq", needed_for="the non-word token rate")
    except ExtraMissing:
        return None
    return _english_words(wordfreq.get_frequency_dict)


@functools.lru_cache(maxsize=1)
def _english_words(get_frequency_dict) -> frozenset[str]:
    # The list loads in ~0.1 s, once per process.
    return frozenset(get_frequency_dict("en", wordlist="large"))


def _script(ch: str) -> str:
    """The Unicode script of a letter, from its name: "LATIN", "CJK", "HANGUL", "CYRILLIC", ..."""
    return unicodedata.name(ch, "UNKNOWN").split()[0]


def _is_word_part(part: str, words: frozenset[str]) -> bool:
    if _NUMBER_PART_RE.fullmatch(part) or _ACRONYM_RE.fullmatch(part):
        return True
    letters = [ch for ch in part if ch.isalpha()]
    scripts = {_script(ch) for ch in letters}
    if scripts and "LATIN" not in scripts:
        return len(scripts) == 1  # another language's word; a mix of scripts is debris
    lower = part.lower().strip("'")
    return lower in words or lower.removesuffix("'s") in words


def is_non_word(token: str, words: frozenset[str]) -> bool | None:
    """Whether one whitespace token is a non-word; None for pure punctuation (not counted)."""
    core = re.sub(r"^[\W_]+|[\W_]+$", "", token.replace("\u2019", "'"))
    if not core:
        return None
    if _URL_RE.fullmatch(core):
        return False
    parts = [p for p in _PART_SPLIT_RE.split(core) if p.strip("'")]
    return not all(_is_word_part(p, words) for p in parts)


def non_word_token_rate(texts: Sequence[str], words: frozenset[str]) -> float:
    """Fraction of whitespace tokens (punctuation-only ones aside) that are not words.

    ``words`` is a lower-cased word list (``load_english_words``). See the rules above.
    """
    judged = [is_non_word(token, words) for text in texts for token in text.split()]
    counted = [flag for flag in judged if flag is not None]
    return sum(counted) / len(counted) if counted else 0.0


def mean_pairwise_cosine_distance(embeddings: np.ndarray, include_self: bool = True) -> float:
    """Mean of 1 - cos(phi(y_i), phi(y_j)) over response pairs (App. B.1, eq. 44).

    Eq. 44 averages over all N^2 ordered pairs, self-pairs (distance 0) included, so its value
    is (N-1)/N times the mean over distinct pairs; ``include_self=False`` gives the latter.
    """
    x = np.asarray(embeddings, dtype=np.float64)  # (N, D)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"need an (N, D) array with N >= 2 responses, got shape {x.shape}")
    norms = np.linalg.norm(x, axis=1, keepdims=True)  # (N, 1)
    if (norms == 0).any():
        raise ValueError("an embedding is all zeros; its cosine similarity is undefined")
    unit = x / norms  # (N, D)
    distance = 1.0 - unit @ unit.T  # (N, N)
    n = x.shape[0]
    if include_self:
        np.fill_diagonal(distance, 0.0)  # exactly 0, not float round-off
        return float(distance.sum() / n**2)
    return float((distance.sum() - np.trace(distance)) / (n * (n - 1)))
