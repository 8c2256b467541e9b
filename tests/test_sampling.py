"""Tests for spl/sampling.py: filters, cached decoding, seeding, row bounds, token-level exactness.

Token-level sampling is checked against the exact token-tempered distribution on a model whose
outcome space can be enumerated: vocabulary 4 (id 3 is EOS), at most 3 new tokens, so
1 + 3 + 9 + 27 = 40 outcomes (EOS at steps 1-3, or three non-EOS tokens cut at the budget), with
probabilities from full forwards without a KV cache (the global-temperature samplers' tests are in
test_global_temperature.py).

Total-variation noise budget. With m draws, E|p_hat_i - p_i| ~ sqrt(2 p_i (1 - p_i) / (pi m)), so
E[TV] ~ 0.4 * sum_i sqrt(p_i (1 - p_i)) / sqrt(m). Over 40 outcomes sum_i sqrt(p_i) <= sqrt(40), and
here ~5-6. With m = 40000 that is E[TV] <= 0.016 against the 0.03 bound; TV's own spread is a small
fraction of its mean (a sum of 40 terms), so the bound sits many standard deviations out.
Measured: 0.007-0.016.
"""

from __future__ import annotations

import collections
import math

import pytest
import torch

from spl.config import ModelConfig
from spl.model import Transformer
from spl.sampling import (
    _invert_cdf,
    generate,
    min_p_mask,
    plan_calls,
    process_logits,
    sample_probs,
    systematic_resample,
    top_k_mask,
    top_p_mask,
)

V, EOS, BUDGET = 4, 3, 3  # the enumerable model: vocabulary, EOS id, max_new_tokens
PROMPTS = [[0, 1], [2, 0, 1]]  # unequal lengths: left padding is part of what is tested
N = 40000  # samples per prompt; see the noise budget above
TV_BOUND = 0.03


@pytest.fixture(autouse=True)
def seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: a second intra-op thread only adds synchronization (and on a shared
    2-core machine, waits for a descheduled thread). Restored for the other test files."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------------
# Token filters against hand-computed masks


def test_top_k_keeps_ties_at_the_boundary():
    logits = torch.tensor([[2.0, 1.0, 1.0, 0.0, -1.0], [0.0, 3.0, -1.0, 2.0, 1.0]])
    # Row 0: the 2nd largest is 1.0, held by ids 1 and 2, both kept. Row 1: 3.0 and 2.0.
    expected = torch.tensor([[True, True, True, False, False], [False, True, False, True, False]])
    assert torch.equal(top_k_mask(logits, 2), expected)
    assert top_k_mask(logits, 99).all()  # k beyond V keeps everything


def test_top_p_mask():
    # probs (0.5, 0.2, 0.2, 0.1): mass ahead of each in sorted order is 0, 0.5, 0.7, 0.9.
    # p = 0.6 needs ids 0 and 1 (0.5 < 0.6); the tie between ids 1 and 2 goes to the lower id.
    logits = torch.tensor([[0.5, 0.2, 0.2, 0.1]]).log()
    assert torch.equal(top_p_mask(logits, 0.6), torch.tensor([[True, True, False, False]]))
    assert torch.equal(top_p_mask(logits, 0.3), torch.tensor([[True, False, False, False]]))
    assert torch.equal(top_p_mask(logits, 0.95), torch.tensor([[True, True, True, True]]))
    # Order within the vocabulary does not matter: (0.1, 0.2, 0.5, 0.2), p = 0.6 keeps ids 2, 1.
    shuffled = torch.tensor([[0.1, 0.2, 0.5, 0.2]]).log()
    assert torch.equal(top_p_mask(shuffled, 0.6), torch.tensor([[False, True, True, False]]))


def test_min_p_mask():
    # probs (0.5, 0.2, 0.2, 0.1), min_p 0.3: threshold 0.3 * 0.5 = 0.15 keeps the first three.
    logits = torch.tensor([[0.5, 0.2, 0.2, 0.1]]).log()
    assert torch.equal(min_p_mask(logits, 0.3), torch.tensor([[True, True, True, False]]))
    assert torch.equal(min_p_mask(logits, 0.5), torch.tensor([[True, False, False, False]]))


def test_filter_order_temperature_top_k_top_p():
    # Temperature before top-p: logits (2, 0, -2) give probs (0.867, 0.117, 0.016) and top-p 0.8
    # keeps one token; at temperature 4 they are (0.506, 0.307, 0.186): mass ahead 0, 0.506, 0.813
    # keeps two.
    logits = torch.tensor([[2.0, 0.0, -2.0]])
    assert torch.isfinite(process_logits(logits, top_p=0.8)).tolist() == [[True, False, False]]
    assert torch.isfinite(process_logits(logits, temperature=4, top_p=0.8)).tolist() == [[True, True, False]]
    # Top-k before top-p: probs (0.4, 0.3, 0.2, 0.1); top-k 2 renormalizes to (0.571, 0.429), where
    # top-p 0.5 keeps one token, though top-p 0.5 alone keeps two (mass ahead 0, 0.4).
    logits = torch.tensor([[0.4, 0.3, 0.2, 0.1]]).log()
    assert torch.isfinite(process_logits(logits, top_p=0.5)).sum() == 2
    assert torch.isfinite(process_logits(logits, top_k=2, top_p=0.5)).sum() == 1
    # Kept tokens keep their tempered logits.
    out = process_logits(logits, temperature=2, top_k=3)
    assert torch.allclose(out[0, :3], logits[0, :3] / 2) and out[0, 3] == -math.inf


def test_inverse_cdf_never_picks_zero_mass_tokens():
    # u just below 1 times the total can round up to the total; the last token has zero mass.
    cdf = torch.tensor([[0.25, 1.0, 1.0]], dtype=torch.float64)
    u = torch.tensor([[0.0, 0.25, 1 - 2**-53]], dtype=torch.float64)
    assert _invert_cdf(cdf, u).tolist() == [[0, 1, 1]]


def test_sample_probs_is_exact_across_vocabulary_blocks():
    # V = 600: blocks of 256, 256 and a short one of 88. Block 1 has no mass at all, and every 7th
    # token none either; those must never be drawn. Each other token's count over n = 100000 draws
    # must sit within 5 standard deviations of n p (600 tokens: a false alarm has odds ~3e-4).
    V, n = 600, 100_000
    probs = (2 * torch.randn(V)).exp()
    probs[256:512] = 0
    probs[::7] = 0
    probs /= probs.sum()
    gen = torch.Generator().manual_seed(0)
    draws = torch.cat([sample_probs(probs.expand(10_000, V), gen) for _ in range(n // 10_000)])
    counts = torch.bincount(draws, minlength=V).double()
    assert counts[probs == 0].sum() == 0
    expected = n * probs.double()
    assert ((counts - expected).abs() <= 5 * (expected * (1 - probs.double())).sqrt() + 1).all()


def test_systematic_resample_counts_are_floor_or_ceil():
    # Systematic resampling copies candidate i either floor(k w_i) or ceil(k w_i) times.
    log_w = torch.randn(3, 7) * 2
    k = 50
    idx = systematic_resample(log_w, k)
    expected = k * log_w.softmax(-1)
    for row, e in zip(idx, expected, strict=True):
        counts = torch.bincount(row, minlength=7).double()
        assert ((counts - e.double()).abs() < 1).all()


def test_settings_that_keep_everything_are_no_filter():
    # One dominant token and a tail of 1e-9: the fp32 running sum reaches exactly 1.0 before the
    # tail, so a top-p mask at p = 1 would drop it. p = 1 (like top_k >= V and min_p = 0) must
    # leave the logits untouched.
    logits = torch.tensor([[30.0] + [10.0] * 9])
    assert not top_p_mask(logits, 1.0).all()  # the mask itself rounds...
    for kw in ({"top_p": 1.0}, {"top_k": 10}, {"top_k": 50}, {"min_p": 0.0}):
        assert torch.equal(process_logits(logits, **kw), logits)  # ...so p = 1 never reaches it


def test_ties_at_the_boundary():
    # Four equal probabilities: top-k 2 keeps all four (ties with the 2nd logit, as HF does); top-p
    # 0.5 keeps the two lowest ids (mass 0.5 reached); min-p keeps every token tied at the threshold.
    logits = torch.zeros(1, 4)
    assert top_k_mask(logits, 2).tolist() == [[True, True, True, True]]
    assert top_p_mask(logits, 0.5).tolist() == [[True, True, False, False]]
    assert min_p_mask(logits, 1.0).tolist() == [[True, True, True, True]]


def test_sample_probs_on_zero_rows():
    assert sample_probs(torch.empty(0, 300)).shape == (0,)
    assert sample_probs(torch.empty(0, 5)).shape == (0,)


def test_plan_calls():
    assert plan_calls(5, 4, None) == [(0, 5, 4)]
    assert plan_calls(5, 4, 8) == [(0, 2, 4), (2, 2, 4), (4, 1, 4)]  # whole prompts while they fit
    assert plan_calls(2, 20, 8) == [(0, 1, 7), (0, 1, 7), (0, 1, 6), (1, 1, 7), (1, 1, 7), (1, 1, 6)]
    assert all(count * copies <= 8 for _, count, copies in plan_calls(7, 3, 8))


def test_generate_max_rows_keeps_order_and_distribution():
    # Split over calls of at most 3 rows: same prompt-major layout, every sample of its own prompt.
    model = small_model(window=None)
    prompts = [[5, 9, 2], [1, 2, 3, 4]]
    out = generate(model, prompts, max_new_tokens=5, num_samples=4, temperature=0, max_rows=3)
    whole = generate(model, prompts, max_new_tokens=5, num_samples=4, temperature=0)
    assert out.tokens == whole.tokens and out.prompt_index.tolist() == [0] * 4 + [1] * 4
    assert out.decoded_tokens.tolist() == whole.decoded_tokens.tolist() == [16, 16]


# ----------------------------------------------------------------------------------------------
# Cached decoding equals full forwards


def small_model(window: int | None) -> Transformer:
    cfg = ModelConfig(dim=32, n_layers=2, head_dim=8, hidden_dim=48, n_heads=4, n_kv_heads=2,
                      vocab_size=37, rope_theta=1e4, sliding_window=window, max_seq_len=128)
    torch.manual_seed(1)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        model.embed_tokens.weight.normal_(0, 1)  # O(1) logits: argmax has no near-ties
    return model


@torch.no_grad()
def greedy_reference(model: Transformer, prompt: list[int], max_new: int, eos_id: int | None
                     ) -> tuple[list[int], float]:
    """Greedy decoding by a full forward over the whole sequence at every step; no cache."""
    seq, out, logp = list(prompt), [], 0.0
    for _ in range(max_new):
        lp = model(torch.tensor([seq]))[0, -1].log_softmax(-1)  # (V,)
        tok = int(lp.argmax())
        seq.append(tok), out.append(tok)
        logp += float(lp[tok])
        if tok == eos_id:
            break
    return out, logp


@pytest.mark.parametrize("prefill_chunk", [None, 4])
def test_greedy_cached_equals_full_forward(prefill_chunk):
    # Window 6 < longest prompt + budget (10 + 16), so the cache rotates; prompts left-padded.
    model = small_model(window=6)
    prompts = [[5, 9, 2], [1, 2, 3, 4, 5, 6, 7], [8, 30, 4, 4, 17, 2, 9, 11, 3, 25]]
    out = generate(model, prompts, max_new_tokens=16, temperature=0, prefill_chunk=prefill_chunk)
    for i, prompt in enumerate(prompts):
        ref, ref_logp = greedy_reference(model, prompt, 16, None)
        assert out.tokens[i] == ref
        assert out.logps[i].item() == pytest.approx(ref_logp, abs=1e-4)
    assert out.num_tokens.tolist() == [16, 16, 16] and not out.finished.any()


def test_greedy_stops_at_eos_per_row():
    # EOS := prompt 0's third greedy token, so rows end at different steps; finished rows leave the
    # cache (compaction) while the others go on.
    model = small_model(window=None)
    prompts = [[5, 9, 2], [1, 2, 3, 4, 5, 6, 7], [8, 30, 4, 4, 17], [3], [12, 12, 12, 12]]
    eos = greedy_reference(model, prompts[0], 3, None)[0][2]
    out = generate(model, prompts, max_new_tokens=12, temperature=0, eos_id=eos)
    for i, prompt in enumerate(prompts):
        ref, ref_logp = greedy_reference(model, prompt, 12, eos)
        assert out.tokens[i] == ref
        assert out.logps[i].item() == pytest.approx(ref_logp, abs=1e-4)
        assert out.finished[i].item() == (ref[-1] == eos)
    assert out.finished[0] and out.num_tokens[0] == 3


def test_top_k_one_is_greedy():
    model = small_model(window=None)
    prompts = [[5, 9, 2], [1, 2, 3, 4]]
    greedy = generate(model, prompts, max_new_tokens=8, temperature=0)
    topk1 = generate(model, prompts, max_new_tokens=8, temperature=1.7, top_k=1, num_samples=3, seed=0)
    assert topk1.tokens == [t for t in greedy.tokens for _ in range(3)]


def test_same_seed_same_samples():
    model = small_model(window=6)
    prompts = [[5, 9, 2], [1, 2, 3, 4, 5, 6, 7]]
    kw = dict(max_new_tokens=10, num_samples=4, temperature=1.3, top_p=0.95, min_p=0.02)
    a = generate(model, prompts, seed=123, **kw)
    b = generate(model, prompts, seed=123, **kw)
    c = generate(model, prompts, generator=torch.Generator().manual_seed(123), **kw)
    d = generate(model, prompts, seed=124, **kw)
    assert a.tokens == b.tokens == c.tokens and torch.equal(a.logps, b.logps)
    assert a.tokens != d.tokens
    assert a.prompt_index.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]


def test_invalid_arguments_are_clear_errors():
    model = small_model(window=None)
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[1], []], max_new_tokens=2)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, [[1]], max_new_tokens=2, top_p=0)
    with pytest.raises(ValueError, match="token ids"):
        generate(model, [[1, 99]], max_new_tokens=2)
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(model, [[1]], max_new_tokens=500)
    with pytest.raises(ValueError, match="seed or generator"):
        generate(model, [[1]], max_new_tokens=2, seed=1, generator=torch.Generator())
    for bad in ({"temperature": -1.0}, {"temperature": math.inf}, {"top_k": 0}, {"top_p": 1.5},
                {"min_p": 1.5}, {"min_p": -0.1}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            generate(model, [[1]], max_new_tokens=2, **bad)


# ----------------------------------------------------------------------------------------------
# Exact distributions on the enumerable model


@pytest.fixture(scope="module")
def enum_model() -> Transformer:
    """Random tiny model; lm_head x2 makes next-token distributions depend on the prefix enough
    that token-level and global temperature differ by TV 0.13-0.21 (checked below)."""
    cfg = ModelConfig(dim=16, n_layers=2, head_dim=8, hidden_dim=32, n_heads=2, n_kv_heads=1,
                      vocab_size=V, rope_theta=1e4, max_seq_len=64)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(2)
    return model


@torch.no_grad()
def enumerate_outcomes(model: Transformer, prompt: list[int], token_temperature: float = 1.0
                       ) -> dict[tuple[int, ...], float]:
    """Log-probability of every complete outcome under the token-tempered model (1.0: pi itself)."""
    out: dict[tuple[int, ...], float] = {}

    def expand(prefix: tuple[int, ...], logp: float) -> None:
        logits = model(torch.tensor([prompt + list(prefix)]))[0, -1].double()  # (V,) full forward
        lp = (logits / token_temperature).log_softmax(-1)
        for v in range(V):
            y = prefix + (v,)
            if v == EOS or len(y) == BUDGET:  # ended by EOS, or cut at the budget: complete
                out[y] = logp + lp[v].item()
            else:
                expand(y, logp + lp[v].item())

    expand((), 0.0)
    return out


def global_target(logps: dict[tuple[int, ...], float], T: float) -> dict[tuple[int, ...], float]:
    """pi(y)^(1/T) / sum_y pi(y)^(1/T)."""
    z = math.log(sum(math.exp(lp / T) for lp in logps.values()))
    return {y: math.exp(lp / T - z) for y, lp in logps.items()}


def total_variation(p: dict, q: dict) -> float:
    return 0.5 * sum(abs(p.get(y, 0.0) - q.get(y, 0.0)) for y in set(p) | set(q))


def empirical(out, num_prompts: int) -> list[dict[tuple[int, ...], float]]:
    counts = [collections.Counter() for _ in range(num_prompts)]
    for tokens, i in zip(out.tokens, out.prompt_index.tolist(), strict=True):
        counts[i][tuple(tokens)] += 1
    return [{y: c / sum(cs.values()) for y, c in cs.items()} for cs in counts]


@pytest.fixture(scope="module")
def exact(enum_model) -> list[dict[tuple[int, ...], float]]:
    logps = [enumerate_outcomes(enum_model, p) for p in PROMPTS]
    for lp in logps:
        assert len(lp) == 40
        # The token budget is part of the outcome space: truncated and EOS-ended outcomes together
        # carry all the mass.
        assert sum(math.exp(v) for v in lp.values()) == pytest.approx(1.0, abs=1e-9)
    return logps


@pytest.mark.parametrize("T", [0.5, 2.0])
def test_token_temperature_differs_from_global(enum_model, exact, T):
    for prompt, logps in zip(PROMPTS, exact, strict=True):
        token_level = {y: math.exp(v) for y, v in enumerate_outcomes(enum_model, prompt, T).items()}
        assert total_variation(token_level, global_target(logps, T)) >= 0.05


@pytest.mark.parametrize("T", [0.5, 1.0, 2.0])
def test_generate_matches_token_level_distribution(enum_model, exact, T):
    out = generate(enum_model, PROMPTS, max_new_tokens=BUDGET, num_samples=N, eos_id=EOS,
                   temperature=T, seed=1)
    for prompt, emp in zip(PROMPTS, empirical(out, len(PROMPTS)), strict=True):
        token_level = {y: math.exp(v) for y, v in enumerate_outcomes(enum_model, prompt, T).items()}
        assert total_variation(emp, token_level) <= TV_BOUND
    # logps are under the untempered model, whatever the sampling temperature.
    for tokens, logp, i in zip(out.tokens[:200], out.logps[:200].tolist(), out.prompt_index[:200].tolist(),
                               strict=True):
        assert logp == pytest.approx(exact[i][tuple(tokens)], abs=1e-5)
    assert all(f == (t[-1] == EOS) for t, f in zip(out.tokens, out.finished.tolist(), strict=True))
    assert all(len(t) == BUDGET for t, f in zip(out.tokens, out.finished.tolist(), strict=True) if not f)
