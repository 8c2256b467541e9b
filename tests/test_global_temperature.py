"""Tests for spl/global_temperature.py: exactness against enumeration, the rejuvenation kernel's
invariance, no crash on random tiny models, diagnostics, row bounds and stop strings.

The enumerable model: vocabulary 3 (id 2 is EOS), budget 8 tokens, so 2^8 - 1 + 2^8 = 511 outcomes
(EOS at steps 1-8 after up to 7 free tokens, or 8 free tokens cut at the budget). Their
probabilities come from batched full forwards without a KV cache, an oracle independent of the
samplers' cached path. Global and token-level temperature differ there by TV ~0.5 at T = 0.5 and 2.

The noise floor. m exact samples of a distribution p have an empirical TV to p of about
0.4 * sum_y sqrt(p_y (1 - p_y)) / sqrt(m); rather than trust that formula, each test draws m exact
samples 20 times (multinomial, cheap) and averages their TV: that is the floor the sampler is
measured against, and both are printed. A sampler passes within ``TV_MARGIN`` above it: its bias
at the candidate count the test affords plus the floor's own spread (a few thousandths).
"""

from __future__ import annotations

import collections
import math
import warnings

import pytest
import torch

from spl.config import ModelConfig
from spl.global_temperature import (
    _move,
    _Particles,
    _proposal,
    choose_method,
    importance_resample,
    sample_global_temperature,
    smc_sample,
)
from spl.model import Transformer
from spl.sampling import Rollout, StopStrings, generate

V, EOS, BUDGET = 3, 2, 8
PROMPT = [0, 1]
TV_MARGIN = 0.03  # the bound above the noise floor
LENGTH_TV = 0.02  # the length distribution (9 ended-at-step outcomes + cut), beyond its own small floor


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: a second intra-op thread only adds synchronization. Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(vocab_size: int = V, n_layers: int = 2, seed: int = 0, lm_scale: float = 2.0,
               max_seq_len: int = 96) -> Transformer:
    cfg = ModelConfig(dim=16, n_layers=n_layers, head_dim=8, hidden_dim=32, n_heads=2, n_kv_heads=1,
                      vocab_size=vocab_size, rope_theta=1e4, max_seq_len=max_seq_len)
    torch.manual_seed(seed)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(lm_scale)  # next-token distributions that depend on the prefix
    return model


@pytest.fixture(scope="module")
def enum_model() -> Transformer:
    return tiny_model()


@torch.no_grad()
def enumerate_states(model: Transformer, prompt: list[int], t: int, T: float, token_temperature: float = 1.0,
                     look_ahead: bool = False, eos: int = EOS) -> dict[tuple[int, ...], float]:
    """log of the unnormalized target over the states after t steps: finished responses (EOS within
    t) get log pi(y) / T; running ones (t tokens, no EOS) too, plus log Z_t(y) with ``look_ahead``.
    With ``token_temperature`` the log-probs are the token-tempered model's instead (and T = 1)."""
    out: dict[tuple[int, ...], float] = {}
    frontier: list[tuple[tuple[int, ...], float]] = [((), 0.0)]
    for _ in range(t):
        logits = model(torch.tensor([prompt + list(p) for p, _ in frontier]))[:, -1].double()  # (F, V)
        lp = (logits / token_temperature).log_softmax(-1)
        nxt = []
        for (p, logp), row in zip(frontier, lp.tolist(), strict=True):
            for v in range(model.cfg.vocab_size):
                if v == eos:
                    out[p + (v,)] = (logp + row[v]) / T
                else:
                    nxt.append((p + (v,), logp + row[v]))
        frontier = nxt
    if look_ahead:
        logits = model(torch.tensor([prompt + list(p) for p, _ in frontier]))[:, -1].double()
        log_z = (logits.log_softmax(-1) / T).logsumexp(-1).tolist()
    else:
        log_z = [0.0] * len(frontier)
    out.update({p: logp / T + z for (p, logp), z in zip(frontier, log_z, strict=True)})
    return out


def normalize(log_w: dict) -> dict:
    z = math.log(sum(math.exp(v) for v in log_w.values()))
    return {y: math.exp(v - z) for y, v in log_w.items()}


def total_variation(p: dict, q: dict) -> float:
    return 0.5 * sum(abs(p.get(y, 0.0) - q.get(y, 0.0)) for y in set(p) | set(q))


def empirical(samples) -> dict:
    counts = collections.Counter(tuple(s) for s in samples)
    return {y: c / len(samples) for y, c in counts.items()}


def lengths(dist: dict) -> dict:
    """The length statistic: (length, ended by EOS) -> probability."""
    out: dict = collections.defaultdict(float)
    for y, p in dist.items():
        out[len(y), y[-1] == EOS] += p
    return out


def noise_floor(p: dict, m: int, draws: int = 20) -> tuple[float, float]:
    """Mean TV to p of m exact samples of p, for the outcomes and for the length statistic."""
    ys = list(p)
    probs = torch.tensor([p[y] for y in ys], dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    tv, tv_len = 0.0, 0.0
    for _ in range(draws):
        picks = torch.multinomial(probs, m, replacement=True, generator=gen)
        counts = torch.bincount(picks, minlength=len(ys))
        emp = {y: c / m for y, c in zip(ys, counts.tolist(), strict=True) if c}
        tv += total_variation(emp, p) / draws
        tv_len += total_variation(lengths(emp), lengths(p)) / draws
    return tv, tv_len


@pytest.fixture(scope="module")
def exact(enum_model) -> dict[float, dict]:
    logps = enumerate_states(enum_model, PROMPT, BUDGET, 1.0)
    assert len(logps) == 511
    # The budget is part of the outcome space: truncated and EOS-ended outcomes carry all the mass.
    assert sum(math.exp(v) for v in logps.values()) == pytest.approx(1.0, abs=1e-9)
    return {T: normalize({y: v / T for y, v in logps.items()}) for T in (0.5, 2.0)}


# ----------------------------------------------------------------------------------------------
# Exactness at a budget of 8 tokens


@pytest.mark.parametrize("T", [0.5, 2.0])
def test_token_temperature_differs_from_global(enum_model, exact, T):
    token_level = normalize(enumerate_states(enum_model, PROMPT, BUDGET, 1.0, token_temperature=T))
    assert total_variation(token_level, exact[T]) >= 0.1


# 500 prompts x 16 samples = 8000 samples per method and temperature, from 128 candidates each.
REPEATS, SAMPLES, CANDIDATES = 500, 16, 128
SAMPLERS = {
    "resample": lambda m, T: importance_resample(m, [PROMPT] * REPEATS, T, **COMMON),
    "smc": lambda m, T: smc_sample(m, [PROMPT] * REPEATS, T, moves=0, **COMMON),
    "smc_moves": lambda m, T: smc_sample(m, [PROMPT] * REPEATS, T, moves=2, **COMMON),
}
COMMON = dict(max_new_tokens=BUDGET, num_samples=SAMPLES, num_candidates=CANDIDATES, eos_id=EOS, seed=1)


@pytest.mark.parametrize("T", [0.5, 2.0])
@pytest.mark.parametrize("method", list(SAMPLERS))
def test_global_temperature_is_exact(enum_model, exact, method, T):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # 16 of 64 at T = 2 may share lineages
        out = SAMPLERS[method](enum_model, T)
    emp = empirical(out.tokens)
    floor, floor_len = noise_floor(exact[T], len(out.tokens))
    tv, tv_len = total_variation(emp, exact[T]), total_variation(lengths(emp), lengths(exact[T]))
    print(f"{method} T={T}: TV {tv:.4f} (floor {floor:.4f}), length TV {tv_len:.4f} (floor {floor_len:.4f})")
    assert tv <= floor + TV_MARGIN
    assert tv_len <= floor_len + LENGTH_TV
    # logps stay those of the untempered model, for moved samples too.
    logps = enumerate_states(enum_model, PROMPT, BUDGET, 1.0)
    for tokens, logp in zip(out.tokens[:300], out.logps[:300].tolist(), strict=True):
        assert logp == pytest.approx(logps[tuple(tokens)], abs=1e-4)
    if method == "smc_moves":
        assert out.moves_proposed.sum() > 0 and out.moves_accepted.sum() > 0


# ----------------------------------------------------------------------------------------------
# The rejuvenation kernel alone: exact samples of its target stay exact after moves


@torch.inference_mode()
def forced(model: Transformer, samples: list[tuple[int, ...]], t: int, T: float, eos: int = EOS
           ) -> tuple[Rollout, _Particles]:
    """A rollout driven through ``samples`` (as smc_sample's bookkeeping would record them) up to
    step t: mid-decoding (t < BUDGET, the look-ahead folded in) or ended (t = BUDGET)."""
    rollout = Rollout(model, [PROMPT], len(samples), BUDGET, eos, rewindable=True)
    parts = _Particles(rollout, len(samples), BUDGET)
    step = 0
    while True:
        logp, _, log_z = _proposal(rollout.logits, T)
        live = rollout.live()
        parts.log_z[rollout.rows[live], step] = log_z[live]
        if step == t:
            return rollout, parts
        nxt = torch.tensor([s[step] if step < len(s) else eos for s in samples])[rollout.rows]
        if rollout.append(nxt, logp.gather(1, nxt[:, None]).squeeze(1)):
            parts.log_z[:, step + 1:] = 0  # no look-ahead once decoding has ended
            return rollout, parts
        rollout.advance()
        step += 1


MOVES = 16  # enough that a kernel invariant for a wrong target drifts measurably toward it


# Mid-decoding (the look-ahead target g_t) and after the last token. Moves connect running states
# only, so what a wrong look-ahead would distort is the distribution among running states: on the
# 3-token model it barely varies (Z_t of 3 tokens has little room), on 8 tokens (EOS id 7, lm_head
# x2) the look-ahead changes that conditional distribution by TV 0.05-0.13.
@pytest.mark.parametrize("vocab, t, T", [(3, 5, 2.0), (3, BUDGET, 2.0), (8, 3, 0.5), (8, 3, 2.0)])
def test_moves_leave_their_target_invariant(enum_model, vocab, t, T):
    model, eos = (enum_model, EOS) if vocab == V else (tiny_model(vocab), vocab - 1)
    target = normalize(enumerate_states(model, PROMPT, t, T, look_ahead=t < BUDGET, eos=eos))
    ys, p = list(target), torch.tensor(list(target.values()))
    gen = torch.Generator().manual_seed(0)
    m = 20000
    start = [ys[i] for i in torch.multinomial(p, m, replacement=True, generator=gen).tolist()]
    rollout, parts = forced(model, start, t, T, eos)
    proposed, accepted = torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long)
    with torch.inference_mode():
        for _ in range(MOVES):
            _move(rollout, parts, T, eos, gen, proposed, accepted)
    moved = [tuple(tok[:n]) for tok, n in zip(rollout.out.tolist(), rollout.num_tokens.tolist(), strict=True)]
    changed = sum(a != b for a, b in zip(moved, start, strict=True)) / m
    floor, _ = noise_floor(target, m)
    tv = total_variation(empirical(moved), target)
    print(f"t={t} T={T}: TV {tv:.4f} (floor {floor:.4f}), {changed:.0%} changed, "
          f"acceptance {int(accepted) / int(proposed):.2f}")
    assert tv <= floor + 0.01  # no sampler bias here: only the noise of m draws, twice
    assert changed > 0.1  # the kernel moves: invariance is not from standing still
    # Moved rows keep consistent per-token log-probs.
    lp = enumerate_states(model, PROMPT, t, 1.0, eos=eos)
    for y, logp in zip(moved[:200], rollout.token_logps.sum(-1)[:200].tolist(), strict=True):
        assert logp == pytest.approx(lp[y], abs=1e-4)


# ----------------------------------------------------------------------------------------------
# Never crash: random tiny models, budgets up to 64, extreme temperatures, EOS patterns


def test_resampling_onto_finished_particles_only(monkeypatch):
    # The old crash: a resampling step that keeps only finished particles left 0 rows to decode
    # (sample_probs failed in its reshape). EOS likely, T = 0.5 (sharpened towards it) and
    # resampling at every step make that common; the run must end cleanly when it happens.
    model = tiny_model(8, n_layers=1, seed=25, lm_scale=1.0, max_seq_len=80)
    with torch.no_grad():
        model.lm_head.weight[3] += 0.5 * model.lm_head.weight.std() * 8
    emptied, select = [], Rollout.select

    def counting_select(self, ancestors):
        running_before = bool(self.live().any())
        index = select(self, ancestors)
        emptied.append(running_before and self.rows.numel() == 0)  # every running particle dropped
        return index
    monkeypatch.setattr(Rollout, "select", counting_select)
    for seed in range(6):
        out = smc_sample(model, [[1, 2], [5]], 0.5, max_new_tokens=64, num_samples=4, num_candidates=16,
                         eos_id=3, resample_threshold=1.0, seed=seed, moves=seed % 2)
        assert out.finished.all() and all(t[-1] == 3 for t in out.tokens)
    assert any(emptied)


class DigitTokenizer:
    """Token v decodes to str(v % 10): enough text for stop strings on a tiny vocabulary."""

    def decode(self, ids: list[int]) -> str:
        return "".join(str(i % 10) for i in ids)


@pytest.mark.parametrize("seed", range(24))
def test_never_crashes(seed):
    rng = torch.Generator().manual_seed(seed)
    pick = lambda n: int(torch.randint(n, (1,), generator=rng))
    vocab = (8, 13, 50)[pick(3)]
    model = tiny_model(vocab, n_layers=1 + pick(2), seed=seed, lm_scale=(1.0, 3.0, 6.0)[pick(3)],
                       max_seq_len=80)
    eos = pick(vocab)
    with torch.no_grad():  # EOS rare, common or dominant: particles end at every step, or never
        model.lm_head.weight[eos] += (-2.0, 0.0, 2.0, 4.0)[pick(4)] * model.lm_head.weight.std() * 8
    T = (0.25, 0.5, 2.0, 4.0)[pick(4)]
    budget = (1, 2, 7, 16, 33, 64)[pick(6)]
    prompts = [[1 + pick(vocab - 1) for _ in range(1 + pick(5))] for _ in range(1 + pick(3))]
    k = 1 + pick(6)
    n = k + pick(12)
    stop = StopStrings(DigitTokenizer(), ["77"]) if pick(3) == 0 else None
    kw = dict(max_new_tokens=budget, num_samples=k, num_candidates=n, eos_id=eos if pick(5) else None,
              stop=stop, max_rows=(None, n // 2 + 1, 3 * n)[pick(3)], seed=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # lineage warnings are expected here
        outs = [importance_resample(model, prompts, T, **kw), smc_sample(model, prompts, T, moves=0, **kw),
                smc_sample(model, prompts, T, moves=1 + pick(2), resample_threshold=(0.5, 1.0)[pick(2)],
                           **kw)]
    for out in outs:
        assert len(out.tokens) == len(prompts) * k and out.prompt_index.tolist() == [
            i for i in range(len(prompts)) for _ in range(k)]
        for tokens, finished, n_tok in zip(out.tokens, out.finished.tolist(), out.num_tokens.tolist(),
                                           strict=True):
            assert 1 <= len(tokens) == n_tok <= budget and all(0 <= v < vocab for v in tokens)
            ends = (kw["eos_id"] is not None and tokens[-1] == kw["eos_id"]) or (
                stop is not None and "77" in DigitTokenizer().decode(tokens))
            assert finished == ends and (finished or len(tokens) == budget)
        assert torch.isfinite(out.logps).all() and torch.isfinite(out.log_z).all()
        assert ((out.ess >= 1 - 1e-6) & (out.ess <= n + 1e-6)).all()
        assert ((out.distinct_samples >= 1) & (out.distinct_samples <= k)).all()
        assert ((out.distinct_lineages >= 1) & (out.distinct_lineages <= k)).all()
        assert (out.moves_accepted <= out.moves_proposed).all()
    # Log-probs of the returned (possibly moved) samples against a full forward, no cache.
    out = outs[2]
    with torch.no_grad():
        for i in range(min(3, len(out.tokens))):
            seq = prompts[int(out.prompt_index[i])] + out.tokens[i]
            lp = model(torch.tensor([seq[:-1]]))[0].log_softmax(-1)  # (len - 1, V)
            ref = sum(lp[len(seq) - len(out.tokens[i]) - 1 + s, tok] for s, tok in enumerate(out.tokens[i]))
            assert float(out.logps[i]) == pytest.approx(float(ref), abs=1e-3)


# ----------------------------------------------------------------------------------------------
# Diagnostics, warnings, dispatch, row bounds


def test_diagnostics_count_distinct_samples_and_lineages(enum_model):
    # 13 tokens, no EOS, 8 steps: the 64 candidates all differ, and T = 0.05 raises pi to the 20th
    # power, putting nearly all weight on the likeliest of them; importance resampling then draws
    # copies of a few candidates, and says so.
    with pytest.warns(RuntimeWarning, match="distinct draws"):
        out = importance_resample(tiny_model(13, seed=1), [PROMPT, [1, 0, 1]], 0.05, max_new_tokens=BUDGET,
                                  num_samples=8, num_candidates=64, seed=0)
    for p in range(2):
        samples = out.tokens[8 * p:8 * (p + 1)]
        d = out.diagnostics(p)
        assert d["distinct_samples"] == len({tuple(s) for s in samples}) < 4
        assert d["distinct_lineages"] < 4 and d["ess"] < 8 and d["method"] == "resample"
        assert d["decoded_tokens"] > 0 and d["move_acceptance"] is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # at T = 1 all weights are equal: ESS = n, every lineage distinct
        out = smc_sample(enum_model, [PROMPT], 1.0, max_new_tokens=BUDGET, num_samples=8, num_candidates=32,
                         eos_id=EOS, seed=0)
    assert out.ess.tolist() == pytest.approx([32.0]) and out.distinct_lineages.tolist() == [8]
    assert out.num_resamples.tolist() == [0] and out.min_step_ess.tolist() == pytest.approx([32.0])
    # ...so at T = 1 the default is one particle per sample: plain sampling's cost.
    out = smc_sample(enum_model, [PROMPT], 1.0, max_new_tokens=BUDGET, num_samples=8, eos_id=EOS, seed=0)
    assert out.num_candidates == 8 and out.distinct_lineages.tolist() == [8]


def test_resampling_copies_lineages_and_moves_renew_them(enum_model):
    # Resampling at every step (threshold 1) on 16 particles collapses lineages; moves from j = 0
    # give accepted particles new ones.
    kw = dict(max_new_tokens=BUDGET, num_samples=16, num_candidates=16, eos_id=EOS, resample_threshold=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        plain = [smc_sample(enum_model, [PROMPT], 2.0, moves=0, seed=s, **kw) for s in range(10)]
        moved = [smc_sample(enum_model, [PROMPT], 2.0, moves=3, seed=s, **kw) for s in range(10)]
    assert all(o.num_resamples.item() >= 5 for o in plain)
    mean = lambda outs, f: sum(float(getattr(o, f).float().mean()) for o in outs) / len(outs)
    assert mean(moved, "distinct_lineages") > mean(plain, "distinct_lineages")
    assert mean(moved, "distinct_samples") > mean(plain, "distinct_samples")


def test_arguments_are_checked(enum_model):
    kw = dict(max_new_tokens=4, eos_id=EOS)
    with pytest.raises(ValueError, match="num_candidates .* at least num_samples"):
        smc_sample(enum_model, [PROMPT], 2.0, num_samples=8, num_candidates=4, **kw)
    with pytest.raises(ValueError, match="num_candidates .* at least num_samples"):
        importance_resample(enum_model, [PROMPT], 2.0, num_samples=8, num_candidates=4, **kw)
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="positive"):
            smc_sample(enum_model, [PROMPT], bad, **kw)
    with pytest.raises(ValueError, match="method"):
        sample_global_temperature(enum_model, [PROMPT], 2.0, method="mcmc", **kw)
    with pytest.raises(ValueError, match="moves"):
        smc_sample(enum_model, [PROMPT], 2.0, moves=-1, **kw)


def test_auto_dispatches_to_the_chosen_method(enum_model):
    kw = dict(max_new_tokens=BUDGET, num_samples=4, eos_id=EOS, seed=3)
    for T in (0.5, 2.0):
        out = sample_global_temperature(enum_model, [PROMPT], T, **kw)
        assert out.method == choose_method(T)
        direct = sample_global_temperature(enum_model, [PROMPT], T, method=choose_method(T), **kw)
        assert out.tokens == direct.tokens


class CountRows:
    """Wraps a model's forward to record the most rows any one call decoded."""

    def __init__(self, model: Transformer):
        self.most, self.forward = 0, model.forward

        def forward(tokens, **kw):
            self.most = max(self.most, tokens.shape[0])
            return self.forward(tokens, **kw)
        model.forward = forward


@pytest.mark.parametrize("sampler", ["resample", "smc", "token"])
def test_max_rows_bounds_the_rows_decoded_at_once(sampler):
    model = tiny_model(13, seed=1)
    counter = CountRows(model)
    prompts = [[1, 2], [3], [4, 5, 6]]
    kw = dict(max_new_tokens=6, num_samples=4, eos_id=0, seed=0, max_rows=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        if sampler == "token":
            out = generate(model, prompts, temperature=0.7, **kw)
        else:
            out = sample_global_temperature(model, prompts, 2.0, method=sampler, num_candidates=20, **kw)
    assert counter.most <= 8  # 20 candidates per prompt: islands of at most 8 particles
    assert out.prompt_index.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    if sampler != "token":
        assert out.num_candidates == 20 and (out.ess <= 20).all()


def test_stop_strings_end_completions():
    model = tiny_model(13, seed=2, lm_scale=1.0)
    stop = StopStrings(DigitTokenizer(), ["3"])
    kw = dict(max_new_tokens=40, seed=0, stop=stop)
    for out in (generate(model, [[1, 2]], num_samples=32, **kw),
                smc_sample(model, [[1, 2]], 2.0, num_samples=8, moves=2, **kw)):
        texts = [DigitTokenizer().decode(t) for t in out.tokens]
        # Ended exactly at the first "3" (token 3 decodes to it), or ran the whole budget.
        for text, finished in zip(texts, out.finished.tolist(), strict=True):
            assert "3" not in text[:-1] and text.endswith("3") == finished and (finished or len(text) == 40)
        assert out.finished.any()
    assert stop.cut("12345") == ("12", True) and stop.cut("1245") == ("1245", False)
    with pytest.raises(ValueError, match="non-empty"):
        StopStrings(DigitTokenizer(), [""])


# ----------------------------------------------------------------------------------------------
# Evaluation records how global-temperature samples were drawn


def test_evaluation_records_sampler_diagnostics(tmp_path):
    from spl.demo import train_demo_tokenizer
    from spl.evaluation.bestofn import best_of_n_summary
    from spl.evaluation.datasets import MathProblem
    from spl.evaluation.scoring import EvalModel, SamplingSetting, sample_responses
    from spl.tokenizer import load_tokenizer

    train_demo_tokenizer(tmp_path / "tokenizer.model")
    tok = load_tokenizer(tmp_path / "tokenizer.model")
    model = tiny_model(tok.vocab_size, seed=3, lm_scale=1.0)
    counter = CountRows(model)
    em = EvalModel("tiny", tmp_path, model, tok, chat=False)
    prompts = [tok.encode("Question: Which pet?", bos=True), tok.encode("Answer:", bos=True)]
    samples = sample_responses(em, prompts, SamplingSetting(global_temp=2.0), num_samples=4, max_new_tokens=6,
                               batch_size=8, generator=torch.Generator().manual_seed(0), stop=["."])
    assert counter.most <= 8  # 16 particles per prompt, in islands of 8
    assert len(samples.sampler) == 2 and samples.sampler[0]["num_candidates"] == 16
    summary = samples.sampler_summary()
    assert summary["sampler_method"] == "smc" and 1 <= summary["sampler_mean_distinct_samples"] <= 4
    assert summary["sampler_min_distinct_lineages"] >= 1 and summary["sampler_min_ess"] <= 16
    # Best-of-N says how many of each problem's n samples differ at all.
    problems = [MathProblem("a", "q", "", "1"), MathProblem("b", "q", "", "2")]
    completions = [["#### 1", "#### 1", "#### 2"], ["#### 2", "#### 3", "#### 4"]]
    assert best_of_n_summary("gsm8k", problems, completions)["splits"]["all"]["distinct_samples"] == 2.5
