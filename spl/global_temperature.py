"""Global temperature: whole responses sampled from ``pi_T(y) = pi(y | x)^(1/T) / Z`` (eqs. 7-10).

Token-level temperature (``spl/sampling.py``, eq. 6) tempers each next-token distribution; the
global target tempers whole-sequence probabilities, and only it keeps their order. An SPL model
trained at alpha / beta = T approximates ``pi_DPO^(1/T)``; these samplers apply the transform to
any model at inference. The outcome space is ``spl/sampling.py``'s (EOS, a stop string, or the
token budget ends a response), so the budget is part of the target. Every sampler is exact as
its number of candidates or particles n grows.

**Importance resampling** (``importance_resample``): n candidates from pi, weights
``pi(y)^(1/T) / pi(y) = pi(y)^(1/T - 1)``. Degenerates with length: the log-weights' spread grows
with the number of tokens.

**SMC** (``smc_sample`` with ``moves=0``). Intermediate targets ``gamma_t(y) = pi(y)^(1/T)`` over
responses of t tokens (running) or finished within t. Drawing y_t from the token-tempered
``q_t(v) = p(v | y_<t)^(1/T) / Z_t`` with ``Z_t = sum_v p(v | y_<t)^(1/T)`` multiplies a particle's
weight by ``gamma_{t+1} / (gamma_t q_t) = Z_t``, a function of the prefix alone. So Z_t is folded
in *before* y_t is drawn (a fully adapted filter): the weights then target the look-ahead marginal
``g_t(y_<t) = sum_v gamma_{t+1}(y_<t, v) = gamma_t(y_<t) Z_t(y_<t)`` (``gamma_t`` for a finished
particle, whose weight is frozen). A prompt's group is resampled (systematic) when its ESS falls
below ``resample_threshold * n``, to equal weights at the group's mean, which keeps the mean weight
an unbiased estimate of ``sum_y pi(y)^(1/T)`` (``log_z``).

**Resample-move** (``moves > 0``). Resampling copies particles, so after a few rounds all of them
descend from a few ancestors (path degeneracy). After each resampling step, every running particle
gets ``moves`` Metropolis-Hastings moves that leave ``g_t`` invariant (Gilks & Berzuini 2001; the
suffix proposal as in Karan & Du 2025, "Reasoning with Sampling", for power distributions):

1. a position j uniform in [0, t), one for all rows (it does not depend on their state);
2. keep y_<j; draw y'_j .. y'_{t-1} from the same token-tempered q;
3. accept with probability min(1, R); otherwise keep y.

With ``Q(y' | y) = prod_{s=j}^{t-1} p(y'_s | y'_<s)^(1/T) / Z_s(y'_<s)`` the proposal's density and
the shared prefix cancelling in the target's ratio,

    R = g_t(y') Q(y | y') / (g_t(y) Q(y' | y))
      = [prod_{s=j}^{t-1} p(y'_s)^(1/T) Z_t(y')] / [prod_{s=j}^{t-1} p(y_s)^(1/T) Z_t(y)]
        * [prod_{s=j}^{t-1} p(y_s)^(1/T) / Z_s(y)] / [prod_{s=j}^{t-1} p(y'_s)^(1/T) / Z_s(y')]
      = prod_{s=j}^{t} Z_s(y') / prod_{s=j}^{t} Z_s(y),

the ratio of the two suffixes' SMC weight increments (look-ahead Z_t included), i.e. the exact
``pi^(1/T)`` ratio corrected for the proposal. The increments are kept per row, so a move costs
only the t - j + 1 forwards of its regeneration. Moves connect running particles only: a proposal
that emits EOS or a stop string is rejected and finished particles stay, so every move has its
reverse and ``g(y) K(y, y') = (1/t) min(g(y) Q(y' | y), g(y') Q(y | y'))`` is symmetric (detailed
balance). A ``g_t``-invariant kernel may move weighted particles too, weights unchanged (Del Moral,
Doucet & Jasra 2006), so groups that did not resample move along with those that did. At the end,
k samples per prompt are drawn from the weighted particles and moved under the final target (no
look-ahead factor), which makes the copies that draw creates distinct.

**Diagnostics**, per prompt (``GlobalSampleOutput.diagnostics``): the final weights' ESS, the lowest
per-step ESS, resampling steps, moves accepted/proposed, distinct samples among the k returned,
and their distinct lineages: the first-token draws they descend from (resampling copies a
lineage, an accepted move from j = 0 starts a new one; each importance-resampling candidate is
its own). A warning fires when lineages < k / 2: the samples are then copies and near-copies of a
few draws, and diversity or best-of-N numbers computed from them overstate nothing but duplicates.

Memory: ``max_rows`` bounds the rows decoded at once. Prompts share a call while their n rows
fit; a prompt with n > max_rows runs as independent islands of at most max_rows particles, whose
weights stay on one scale (resampling keeps the mean), so their samples are pooled by weight.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

from spl.model import Transformer
from spl.sampling import (
    GenerationOutput,
    Rollout,
    StopStrings,
    effective_sample_size,
    generate_batch,
    make_generator,
    plan_calls,
    sample_logits,
    systematic_resample,
)

METHODS = ("auto", "resample", "smc")


def default_num_candidates(num_samples: int, temperature: float | None = None) -> int:
    """Candidates or particles per prompt when not given: 4 per sample, at least 16; at T = 1 every
    weight is equal (the target is the model itself), so extra candidates would buy nothing."""
    return num_samples if temperature == 1 else max(16, 4 * num_samples)


def choose_method(temperature: float) -> str:
    """``auto``'s rule, the one place it is written: SMC (without moves) at every temperature.

    Measured with ``benchmarks/bench_global_temperature.py`` at equal compute (RESULTS.md,
    "Global temperature"): importance resampling collapses with length at T != 1 (at 128 tokens
    and T = 1.5, 1-3 distinct samples of 16 from 128 candidates, ESS ~1% of n); SMC keeps 16 of 16
    distinct, ~12 lineages and a TV to the exact target near the noise floor. Rejuvenation moves
    (``moves`` > 0) cost t - j + 1 forwards each; spent instead on particles, the same compute gave
    more lineages and a lower TV on every model measured, so ``auto`` leaves them off.
    """
    if not temperature > 0:
        raise ValueError(f"global temperature must be a positive number, got {temperature}")
    return "smc"


# ---------------------------------------------------------------------------------------------
# Output and diagnostics


@dataclass(kw_only=True)
class GlobalSampleOutput(GenerationOutput):
    """k samples per prompt from pi^(1/T), with per-prompt diagnostics (P,) of how they were drawn."""

    method: str  # "resample" or "smc" (never "auto")
    num_candidates: int  # n candidates or particles per prompt
    ess: torch.Tensor  # (P,) effective sample size of the final weights, out of n
    min_step_ess: torch.Tensor  # (P,) lowest ESS over decoding steps (before resampling), out of n
    log_z: torch.Tensor  # (P,) estimate of log sum_y pi(y | x)^(1/T), the target's normalizer
    num_resamples: torch.Tensor  # (P,) long, resampling steps (0 for importance resampling)
    moves_proposed: torch.Tensor  # (P,) long, Metropolis-Hastings moves proposed to running particles
    moves_accepted: torch.Tensor  # (P,) long
    distinct_samples: torch.Tensor  # (P,) long, distinct token sequences among the k samples
    distinct_lineages: torch.Tensor  # (P,) long, distinct first-token draws they descend from

    def diagnostics(self, prompt: int) -> dict:
        """Prompt ``prompt``'s diagnostics as plain numbers (for JSONL and reports)."""
        proposed = int(self.moves_proposed[prompt])
        accepted = int(self.moves_accepted[prompt])
        return {"method": self.method, "num_candidates": self.num_candidates,
                "ess": round(float(self.ess[prompt]), 3),
                "min_step_ess": round(float(self.min_step_ess[prompt]), 3),
                "resamples": int(self.num_resamples[prompt]),
                "move_acceptance": round(accepted / proposed, 4) if proposed else None,
                "distinct_samples": int(self.distinct_samples[prompt]),
                "distinct_lineages": int(self.distinct_lineages[prompt]),
                "decoded_tokens": int(self.decoded_tokens[prompt]),
                "log_z": round(float(self.log_z[prompt]), 4)}


@dataclass
class _Call:
    """One call's result: per group (Pc prompts) m equally weighted samples and the group's totals."""

    samples: GenerationOutput  # Pc * m rows, prompt-major
    lineage: torch.Tensor  # (Pc * m,) long, lineage id (unique within the call)
    log_w: torch.Tensor  # (Pc, n) fp64 final particle log-weights (before the final draw)
    min_ess_fraction: torch.Tensor  # (Pc,) lowest per-step ESS / n
    resamples: torch.Tensor  # (Pc,) long
    proposed: torch.Tensor  # (Pc,) long
    accepted: torch.Tensor  # (Pc,) long


def _check(temperature: float, num_samples: int, num_candidates: int | None = None, moves: int = 0) -> None:
    if not temperature > 0 or math.isinf(temperature):
        raise ValueError(f"global temperature must be a positive number, got {temperature}")
    if num_samples < 1:
        raise ValueError(f"num_samples must be at least 1, got {num_samples}")
    if num_candidates is not None and num_candidates < num_samples:
        raise ValueError(f"num_candidates ({num_candidates}) must be at least num_samples ({num_samples}): "
                         "the samples are drawn from the candidates")
    if moves < 0:
        raise ValueError(f"moves must be >= 0, got {moves}")


def _pool(calls: list[tuple[int, int, _Call]], num_prompts: int, k: int, n: int, method: str,
          generator: torch.Generator | None) -> GlobalSampleOutput:
    """Combine calls (islands of one prompt, or groups of several prompts) into k samples per prompt.

    Each call returns m equally weighted samples per group; a group of mean weight W (the
    island's estimate of sum_y pi^(1/T)) gives each of them weight W / m. A prompt's islands are
    pooled by drawing k samples by those weights; with one island that keeps its k, once each.
    """
    device = calls[0][2].log_w.device
    everything = GenerationOutput.concat([c.samples for _, _, c in calls], [0] * len(calls))
    row_offsets = [0]  # first row of each call in ``everything``
    lineage_offsets = [0]  # lineage ids are unique within a call: shift them apart
    for _, _, call in calls:
        row_offsets.append(row_offsets[-1] + call.samples.logps.numel())
        lineage_offsets.append(lineage_offsets[-1] + int(call.lineage.max()) + 1)
    islands: list[list[tuple[int, int]]] = [[] for _ in range(num_prompts)]  # (call, group) per prompt
    for c, (first, count, _) in enumerate(calls):
        for g in range(count):
            islands[first + g].append((c, g))
    chosen, lineages, stats = [], [], []
    for groups in islands:
        rows, lineage, sample_log_w, log_w = [], [], [], []
        for c, g in groups:
            call = calls[c][2]
            m = call.samples.logps.numel() // call.log_w.shape[0]
            rows.append(row_offsets[c] + g * m + torch.arange(m, device=device))
            lineage.append(call.lineage[g * m:(g + 1) * m] + lineage_offsets[c])
            island_log_mean = call.log_w[g].logsumexp(-1) - math.log(call.log_w.shape[1])
            sample_log_w.append((island_log_mean - math.log(m)).expand(m))
            log_w.append(call.log_w[g])
        pick = (systematic_resample(torch.cat(sample_log_w)[None], k, generator)[0] if len(groups) > 1
                else torch.arange(k, device=device))  # (k,)
        chosen.append(torch.cat(rows)[pick])
        lineages.append(len(set(torch.cat(lineage)[pick].tolist())))
        all_w = torch.cat(log_w)  # (n,) every particle's final log-weight, on one scale
        min_fraction = torch.stack([calls[c][2].min_ess_fraction[g] for c, g in groups]).min()
        stats.append((effective_sample_size(all_w[None])[0], min_fraction * n,
                      all_w.logsumexp(-1) - math.log(all_w.numel())))
    out = everything.select(torch.cat(chosen))  # (P * k,) prompt-major

    def per_prompt(get) -> torch.Tensor:
        total = torch.zeros(num_prompts, dtype=torch.long, device=device)
        for first, count, call in calls:
            total[first:first + count] += get(call)
        return total

    ess, min_ess, log_z = (torch.stack(column).float() for column in zip(*stats, strict=True))
    distinct = [len({tuple(t) for t in out.tokens[p * k:(p + 1) * k]}) for p in range(num_prompts)]
    return GlobalSampleOutput(
        out.tokens, out.logps, out.num_tokens, out.finished,
        torch.arange(num_prompts, device=device).repeat_interleave(k),
        per_prompt(lambda c: c.samples.decoded_tokens), method=method, num_candidates=n, ess=ess,
        min_step_ess=min_ess, log_z=log_z, num_resamples=per_prompt(lambda c: c.resamples),
        moves_proposed=per_prompt(lambda c: c.proposed), moves_accepted=per_prompt(lambda c: c.accepted),
        distinct_samples=torch.tensor(distinct, device=device),
        distinct_lineages=torch.tensor(lineages, device=device))


def _warn_if_degenerate(out: GlobalSampleOutput, k: int) -> None:
    few = (out.distinct_lineages < k / 2).nonzero().squeeze(1).tolist()
    if few:
        worst = int(out.distinct_lineages.min())
        # stacklevel 3: past this helper and the public sampler, to the caller's line.
        warnings.warn(f"{out.method}: the {k} samples of prompts {few[:8]} descend from fewer than "
                      f"{k / 2:g} distinct draws (fewest: {worst}; lowest per-step ESS "
                      f"{float(out.min_step_ess.min()):.1f} of {out.num_candidates}): copies or near-copies "
                      f"of a few draws, not independent samples (unless pi^(1/T) itself sits on a few "
                      f"responses). Raise num_candidates, or bring the temperature closer to 1.",
                      RuntimeWarning, stacklevel=3)


# ---------------------------------------------------------------------------------------------
# Importance resampling


def importance_resample(model: Transformer, prompts: list[list[int]], temperature: float, *,
                        max_new_tokens: int, num_samples: int = 1, num_candidates: int | None = None,
                        eos_id: int | None = None, stop: StopStrings | None = None,
                        max_rows: int | None = None, seed: int | None = None,
                        generator: torch.Generator | None = None, prefill_chunk: int | None = None
                        ) -> GlobalSampleOutput:
    """Sampling-importance-resampling: n candidates per prompt from pi, kept by weight pi^(1/T - 1).

    The weight is target / proposal = pi^(1/T) / pi, self-normalized within each prompt; samples
    are drawn from the candidates (systematic resampling), so they never leave what pi itself
    samples. Exact as n grows (default ``default_num_candidates``); with few candidates the
    samples lean toward pi.
    """
    _check(temperature, num_samples)
    n = num_candidates if num_candidates is not None else default_num_candidates(num_samples, temperature)
    _check(temperature, num_samples, n)
    generator = make_generator(model, seed, generator)
    calls = []
    for first, count, copies in plan_calls(len(prompts), n, max_rows):
        cand = generate_batch(model, prompts[first:first + count], copies, max_new_tokens, eos_id, 1.0,
                              None, None, None, generator, prefill_chunk, stop, None)
        log_w = ((1 / temperature - 1) * cand.logps.double()).view(count, copies)  # (Pc, n)
        m = min(num_samples, copies)
        local = systematic_resample(log_w, m, generator)  # (Pc, m)
        flat = (local + copies * torch.arange(count, device=local.device)[:, None]).flatten()
        zeros = torch.zeros(count, dtype=torch.long, device=local.device)
        calls.append((first, count, _Call(cand.select(flat), flat, log_w,
                                          effective_sample_size(log_w) / copies, zeros, zeros, zeros)))
    out = _pool(calls, len(prompts), num_samples, n, "resample", generator)
    _warn_if_degenerate(out, num_samples)
    return out


# ---------------------------------------------------------------------------------------------
# Sequential Monte Carlo with resample-move rejuvenation


def smc_sample(model: Transformer, prompts: list[list[int]], temperature: float, *, max_new_tokens: int,
               num_samples: int = 1, num_candidates: int | None = None, moves: int = 0,
               resample_threshold: float = 0.5, eos_id: int | None = None, stop: StopStrings | None = None,
               max_rows: int | None = None, seed: int | None = None,
               generator: torch.Generator | None = None, prefill_chunk: int | None = None
               ) -> GlobalSampleOutput:
    """Sequential Monte Carlo with n particles per prompt and a token-tempered proposal; with
    ``moves`` > 0, resample-move: that many Metropolis-Hastings rejuvenation moves after each
    resampling step and after the final draw (module docstring: the weights, the acceptance ratio,
    why it stays exact). Each move costs t - j + 1 forwards of every live row. Default n:
    ``default_num_candidates``.
    """
    _check(temperature, num_samples)
    n = num_candidates if num_candidates is not None else default_num_candidates(num_samples, temperature)
    _check(temperature, num_samples, n, moves)
    if not 0 <= resample_threshold <= 1:
        raise ValueError(f"resample_threshold must lie in [0, 1], got {resample_threshold}")
    generator = make_generator(model, seed, generator)
    calls = [(first, count, _smc_call(model, prompts[first:first + count], temperature, copies,
                                      num_samples, max_new_tokens, eos_id, stop, resample_threshold, moves,
                                      generator, prefill_chunk))
             for first, count, copies in plan_calls(len(prompts), n, max_rows)]
    out = _pool(calls, len(prompts), num_samples, n, "smc", generator)
    _warn_if_degenerate(out, num_samples)
    return out


def _proposal(logits: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """From (A, V) logits: log p (A, V), the token-tempered proposal's logits log p^(1/T) (A, V),
    and log Z_t = logsumexp of the latter (A,) fp64, the weight increment."""
    logp = logits.log_softmax(dim=-1)  # (A, V)
    proposal = logp / temperature  # (A, V) normalized by log Z_t
    return logp, proposal, proposal.logsumexp(dim=-1).double()


class _Particles:
    """Per-row bookkeeping beside a Rollout: weight increments and lineages, reordered with it."""

    def __init__(self, rollout: Rollout, num_rows: int, max_new_tokens: int):
        device = rollout.logits.device
        # log Z_s of each row's prefix at each position s: the weight increments moves compare.
        self.log_z = torch.zeros(num_rows, max_new_tokens + 1, dtype=torch.float64, device=device)
        self.lineage = torch.arange(num_rows, device=device)  # (B,)
        self.next_lineage = num_rows

    def select(self, rollout: Rollout, ancestors: torch.Tensor) -> None:
        rollout.select(ancestors)
        self.log_z, self.lineage = self.log_z[ancestors], self.lineage[ancestors]


@torch.inference_mode()
def _smc_call(model: Transformer, prompts: list[list[int]], temperature: float, n: int, k: int,
              max_new_tokens: int, eos_id: int | None, stop: StopStrings | None, threshold: float, moves: int,
              generator: torch.Generator | None, prefill_chunk: int | None) -> _Call:
    """One particle system per prompt (n each, decoded together); returns min(k, n) moved samples each."""
    rollout = Rollout(model, prompts, n, max_new_tokens, eos_id, prefill_chunk, stop, rewindable=moves > 0)
    P, device = len(prompts), rollout.logits.device
    parts = _Particles(rollout, P * n, max_new_tokens)
    log_w = torch.zeros(P * n, dtype=torch.float64, device=device)  # (B,) fp64: sums of many steps
    min_ess = torch.ones(P, dtype=torch.float64, device=device)  # (P,) as a fraction of n
    resamples = torch.zeros(P, dtype=torch.long, device=device)  # (P,)
    proposed, accepted = (torch.zeros(P, dtype=torch.long, device=device) for _ in range(2))
    group_start = n * torch.arange(P, device=device)[:, None]  # (P, 1) first row of each prompt
    while True:
        logp, proposal, log_z_t = _proposal(rollout.logits, temperature)  # (A, V), (A, V), (A,)
        live = rollout.live()  # (A,)
        parts.log_z[rollout.rows[live], rollout.t] = log_z_t[live]
        log_w[rollout.rows[live]] += log_z_t[live]
        groups = log_w.view(P, n)  # (P, n)
        ess = effective_sample_size(groups)  # (P,)
        # Only groups with a particle still running can gain from resampling.
        running = (~rollout.done).view(P, n).any(dim=-1)  # (P,)
        min_ess = torch.where(running, torch.minimum(min_ess, ess / n), min_ess)
        resample = running & (ess < threshold * n)  # (P,)
        if bool(resample.any()):
            # Groups above the threshold keep their particles: identity ancestors.
            keep_order = torch.arange(n, device=device).expand(P, n)  # (P, n)
            local = torch.where(resample[:, None], systematic_resample(groups, n, generator), keep_order)
            mean_w = groups.logsumexp(dim=-1, keepdim=True) - math.log(n)  # (P, 1)
            # Resampled groups restart from equal weights at their mean; the others keep theirs.
            log_w = torch.where(resample[:, None], mean_w, groups).flatten()  # (B,)
            parts.select(rollout, (local + group_start).flatten())
            resamples += resample.long()
            for _ in range(moves if rollout.t > 0 else 0):
                _move(rollout, parts, temperature, eos_id, generator, proposed, accepted)
            logp, proposal, _ = _proposal(rollout.logits, temperature)  # the rows changed
        next_tokens = sample_logits(proposal, generator)  # (A,) from q_t = p^(1/T) / Z_t
        if rollout.append(next_tokens, logp.gather(1, next_tokens[:, None]).squeeze(1)):
            break
        rollout.advance()
    # The final draw: m per group by weight, then moves under the final target (no look-ahead).
    m = min(k, n)
    final_w = log_w.view(P, n)
    parts.select(rollout, (systematic_resample(final_w, m, generator) + group_start).flatten())
    for _ in range(moves):
        _move(rollout, parts, temperature, eos_id, generator, proposed, accepted)
    return _Call(rollout.output(), parts.lineage, final_w, min_ess, resamples, proposed, accepted)


def _move(rollout: Rollout, parts: _Particles, temperature: float, eos_id: int | None,
          generator: torch.Generator | None, proposed: torch.Tensor, accepted: torch.Tensor) -> None:
    """One Metropolis-Hastings move for every running particle: regenerate from a random position j,
    accept with min(1, R) (module docstring). Counts into ``proposed`` and ``accepted`` (P,)."""
    moving = rollout.live()  # (A,) running particles; finished ones stay
    t = rollout.t
    if t == 0 or not bool(moving.any()):
        return
    device = moving.device
    j = int(torch.randint(t, (1,), generator=generator, device=device))
    # Mid-decoding the state includes the look-ahead factor Z_t; after the last token it does not.
    look_ahead = rollout.fed == t
    rows = rollout.rows  # (A,)
    saved = rollout.rewind(j)
    width = t - j + look_ahead  # weight increments compared: positions j .. t - 1 (+ t)
    new_tokens = torch.empty(rows.numel(), t - j, dtype=torch.long, device=device)  # (A, t - j)
    new_logps = torch.empty(rows.numel(), t - j, device=device)  # (A, t - j)
    new_log_z = torch.empty(rows.numel(), width, dtype=torch.float64, device=device)  # (A, width)
    for s in range(j, t):
        logp, proposal, new_log_z[:, s - j] = _proposal(rollout.logits, temperature)
        tok = sample_logits(proposal, generator)  # (A,)
        new_tokens[:, s - j], new_logps[:, s - j] = tok, logp.gather(1, tok[:, None]).squeeze(1)
        if s < t - 1 or look_ahead:
            rollout.logits = rollout.feed(tok)
    if look_ahead:
        new_log_z[:, -1] = _proposal(rollout.logits, temperature)[2]
    # A proposal that finished (EOS or a stop string) has no reverse move: rejected.
    ended = (new_tokens == eos_id).any(dim=1) if eos_id is not None else torch.zeros_like(moving)
    if rollout.stop is not None:
        joined = torch.cat([rollout.out[rows, :j], new_tokens], dim=1)  # (A, t)
        window = joined[:, max(0, j - rollout.stop.window):]
        ended |= torch.tensor(rollout.stop.hit(window.tolist()), device=device)
    log_r = new_log_z.sum(dim=1) - parts.log_z[rows, j:j + width].sum(dim=1)  # (A,) log R
    u = torch.rand(rows.numel(), generator=generator, device=device, dtype=torch.float64)
    accept = moving & ~ended & (u.log() < log_r)  # (A,)
    rollout.keep_or_restore(saved, accept)
    won = rows[accept]
    rollout.out[won, j:t], rollout.token_logps[won, j:t] = new_tokens[accept], new_logps[accept]
    parts.log_z[won, j:j + width] = new_log_z[accept]
    if j == 0:  # a whole new response: a lineage of its own
        parts.lineage[won] = parts.next_lineage + torch.arange(won.numel(), device=device)
        parts.next_lineage += won.numel()
    groups = rollout.prompt_index[rows]
    proposed += torch.bincount(groups[moving], minlength=proposed.numel())
    accepted += torch.bincount(groups[accept], minlength=accepted.numel())


# ---------------------------------------------------------------------------------------------


def sample_global_temperature(model: Transformer, prompts: list[list[int]], temperature: float, *,
                              method: str = "auto", moves: int | None = None, **kwargs
                              ) -> GlobalSampleOutput:
    """Samples from pi^(1/T) by ``method``: "resample" (``importance_resample``), "smc"
    (``smc_sample``; ``moves`` its rejuvenation moves, default 0), or "auto" (``choose_method``).
    ``kwargs`` go to the sampler."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "auto":
        method = choose_method(temperature)
    if method == "resample":
        if moves:
            raise ValueError("moves apply to method 'smc' only")
        return importance_resample(model, prompts, temperature, **kwargs)
    return smc_sample(model, prompts, temperature, **({} if moves is None else {"moves": moves}), **kwargs)
