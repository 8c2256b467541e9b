"""Tests for spl/sampling.py: filters, cached decoding, seeding, and exact global temperature.

The global-temperature samplers are checked against the exact target on a model whose outcome
space can be enumerated: vocabulary 4 (id 3 is EOS), at most 3 new tokens, so 1 + 3 + 9 + 27 = 40
outcomes (EOS at steps 1-3, or three non-EOS tokens cut at the budget). Their probabilities come
from full forwards without a KV cache, an oracle independent of the sampler's cached path.

Total-variation noise budget. With m effective draws, E|p_hat_i - p_i| ~ sqrt(2 p_i (1 - p_i) / (pi m)),
so E[TV] ~ 0.4 * sum_i sqrt(p_i (1 - p_i)) / sqrt(m). Over 40 outcomes sum_i sqrt(p_i) <= sqrt(40),
and here ~5-6. With n = 40000 candidates (ESS >= 25000 measured) that is E[TV] <= 0.016, against
the 0.03 bound; TV's own spread is a small fraction of its mean (a sum of 40 terms), so the bound
sits many standard deviations out. Measured: 0.007-0.016.
"""

from __future__ import annotations

import collections
import math
import warnings

import pytest
import torch

from spl.config import ModelConfig
from spl.model import Transformer
from spl.sampling import (
    _invert_cdf,
    generate,
    importance_resample,
    min_p_mask,
    process_logits,
    sample_global_temperature,
    sample_probs,
    smc_sample,
    systematic_resample,
    top_k_mask,
    top_p_mask,
)

V, EOS, BUDGET = 4, 3, 3  # the enumerable model: vocabulary, EOS id, max_new_tokens
PROMPTS = [[0, 1], [2, 0, 1]]  # unequal lengths: left padding is part of what is tested
N = 40000  # candidates (and samples) per prompt; see the noise budget above
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
    s1 = smc_sample(model, prompts, 2.0, max_new_tokens=6, num_samples=3, seed=7, eos_id=4)
    s2 = smc_sample(model, prompts, 2.0, max_new_tokens=6, num_samples=3, seed=7, eos_id=4)
    assert s1.tokens == s2.tokens


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
    with pytest.raises(ValueError, match="positive"):
        smc_sample(model, [[1]], 0.0, max_new_tokens=2)


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


SAMPLERS = {
    "importance_resample": lambda m, T: importance_resample(m, PROMPTS, T, **COMMON),
    "smc": lambda m, T: smc_sample(m, PROMPTS, T, **COMMON),
    # Resampling at every step (the 3-step default run rarely drops below ESS n/2).
    "smc_always_resample": lambda m, T: smc_sample(m, PROMPTS, T, resample_threshold=1.0, **COMMON),
}
COMMON = dict(max_new_tokens=BUDGET, num_samples=N, num_candidates=N, eos_id=EOS, seed=1)


@pytest.mark.parametrize("T", [0.5, 2.0])
@pytest.mark.parametrize("method", list(SAMPLERS))
def test_global_temperature_is_exact(enum_model, exact, method, T):
    out = SAMPLERS[method](enum_model, T)
    for i, (logps, emp) in enumerate(zip(exact, empirical(out, len(PROMPTS)), strict=True)):
        assert total_variation(emp, global_target(logps, T)) <= TV_BOUND
        # log_z estimates log sum_y pi(y)^(1/T); relative error ~ 1/sqrt(ESS) ~ 0.006.
        log_z = math.log(sum(math.exp(v / T) for v in logps.values()))
        assert out.log_z[i].item() == pytest.approx(log_z, abs=0.02)
        assert out.ess[i] > 0.5 * N
    if method == "smc_always_resample":
        assert out.num_resamples.tolist() == [BUDGET, BUDGET]
    for tokens, logp, i in zip(out.tokens[:200], out.logps[:200].tolist(), out.prompt_index[:200].tolist(),
                               strict=True):
        assert logp == pytest.approx(exact[i][tuple(tokens)], abs=1e-5)  # untempered log pi


@pytest.mark.parametrize("sampler, kwargs", [
    (importance_resample, {}),
    (smc_sample, {"resample_threshold": 0.0}),  # never resample: plain sequential importance sampling
], ids=["importance_resample", "smc"])
def test_low_ess_warns(enum_model, sampler, kwargs):
    # T = 0.05 raises pi to the 20th power: the weight piles onto copies of the likeliest outcome.
    # Measured ESS out of 64: importance resampling ~9 (the top outcome has pi ~ 0.13, so about 9
    # copies share the weight), SMC ~4 for prompt 0.
    with pytest.warns(RuntimeWarning, match="effective sample size"):
        out = sampler(enum_model, PROMPTS, 0.05, max_new_tokens=BUDGET, num_samples=4, num_candidates=64,
                      eos_id=EOS, seed=0, warn_ess=0.25, **kwargs)
    assert (out.ess < 0.25 * 64).any()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # at T = 1 all weights are equal: ESS = n, no warning
        out = sampler(enum_model, PROMPTS, 1.0, max_new_tokens=BUDGET, num_samples=4, eos_id=EOS, seed=0,
                      **kwargs)
    assert out.ess.tolist() == pytest.approx([16.0, 16.0])  # default n = max(16, 4 * 4)


def test_dispatch_by_method(enum_model):
    kw = dict(max_new_tokens=BUDGET, num_samples=8, eos_id=EOS, seed=3)
    for T, direct in ((2.0, importance_resample), (0.5, smc_sample)):  # "auto": T >= 1 resamples
        assert sample_global_temperature(enum_model, PROMPTS, T, **kw).tokens == \
            direct(enum_model, PROMPTS, T, **kw).tokens
    with pytest.raises(ValueError, match="method"):
        sample_global_temperature(enum_model, PROMPTS, 2.0, method="mcmc", **kw)
