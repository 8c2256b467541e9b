"""Sampling: KV-cached batched generation, token-level filters, and global-temperature samplers.

Token-level temperature t (paper eq. 6) rescales and renormalizes every next-token distribution:
``pi'(y) = prod_i pi(y_i | y_<i)^(1/t) / Z(y_<i)``. SPL trained at alpha / beta = T instead learns
a *global* temperature on whole sequences of the DPO policy, ``pi_DPO(y)^(1/T) / Z`` (eqs. 7-10).
At inference the same transform of any model is ``pi_T(y) = pi(y)^(1/T) / Z``. The two coincide
only when no next-token distribution depends on the prefix; only the global one keeps the order of
sequence probabilities. ``generate`` does the first; two samplers below target the second exactly
(as their candidate count grows), for any model ``pi``:

* ``importance_resample``: N candidates from pi (T = 1), weights ``pi(y)^(1/T - 1)``.
* ``smc_sample``: sequential Monte Carlo. Each step proposes from the token-tempered
  ``q(v) = p(v)^(1/T) / Z_t`` with ``Z_t = sum_v p(v | prefix)^(1/T)``, so the importance weight of
  a finished sequence is ``pi(y)^(1/T) / q(y) = prod_t Z_t``; particles are resampled within their
  prompt's group when the effective sample size (ESS) falls below a fraction of the group.

The outcome space, for every sampler here: a response either ends with ``eos_id`` (which is part
of it and of its log-prob) within ``max_new_tokens`` tokens, or is cut at that budget, in which case
its probability is the product of its tokens' probabilities with no end-of-sequence factor. These
outcomes' probabilities sum to one, so ``pi_T`` is a distribution over them: the token budget is part
of the target. Returned ``logps`` are always ``log pi(y | x)`` under the untempered model.

Token filters apply in Hugging Face's default order: temperature, then top-k, then top-p, then
min-p; each later filter sees the distribution the earlier ones left. Temperature 0 is greedy.
Ties resolve deterministically: top-k keeps every token tied with the k-th logit (as HF does),
top-p breaks ties by lower token id, greedy picks the lowest id.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from spl.model import Transformer

# Shape letters as in spl/model.py, plus: P prompts, N samples (P * per-prompt count), A rows
# still held in the KV cache, n candidates or particles per prompt, k draws per prompt.


# ---------------------------------------------------------------------------------------------
# Token-level filters: pure functions of (B, V) fp32 logits returning a (B, V) bool keep-mask.


def top_k_mask(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep tokens whose logit is at least the k-th largest (ties at the boundary all kept)."""
    kth = logits.topk(min(k, logits.shape[-1]), dim=-1).values[:, -1:]  # (B, 1)
    return logits >= kth


def top_p_mask(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most probable tokens whose mass reaches p (nucleus sampling)."""
    probs = logits.softmax(dim=-1)  # (B, V)
    # A stable descending sort puts the lower token id first among equal probabilities.
    sorted_probs, order = probs.sort(dim=-1, descending=True, stable=True)  # (B, V) each
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # (B, V) mass strictly ahead
    # A token is needed while the tokens ahead of it fall short of p; the first always is.
    keep_sorted = mass_before < p
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)  # (B, V) back in id order


def min_p_mask(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Keep tokens with probability at least ``min_p`` times the most probable one's."""
    probs = logits.softmax(dim=-1)  # (B, V)
    return probs >= min_p * probs.amax(dim=-1, keepdim=True)


def process_logits(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int | None = None,
                   top_p: float | None = None, min_p: float | None = None) -> torch.Tensor:
    """Temperature, then top-k, top-p, min-p (HF's default order); removed tokens get -inf."""
    if temperature not in (0.0, 1.0):
        logits = logits / temperature
    for mask_fn, arg in ((top_k_mask, top_k), (top_p_mask, top_p), (min_p_mask, min_p)):
        if arg is not None:
            logits = logits.masked_fill(~mask_fn(logits, arg), -math.inf)
    return logits


def _invert_cdf(cdf: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Index i with ``cdf[i-1] <= u * total < cdf[i]`` per row: cdf (R, V), u (R, k) in [0, 1)."""
    total = cdf[:, -1:]  # (R, 1)
    # u * total can round up to total itself; stepping one ulp below it keeps the draw inside the
    # last token of nonzero mass, so a zero-mass (masked) token can never be picked.
    x = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))  # (R, k)
    return torch.searchsorted(cdf, x, right=True)  # (R, k)


def sample_logits(logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row from softmax(logits) -> (B,); see ``sample_probs``."""
    return sample_probs((logits - logits.amax(dim=-1, keepdim=True)).exp(), generator)  # -inf -> 0


VOCAB_BLOCK = 256  # sample_probs: entries per vocabulary block (32000 = 125 blocks)


def sample_probs(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One index per row from (B, V) non-negative weights (normalized or not) -> (B,).

    Exact inverse-CDF sampling in two levels: pick a vocabulary block by its mass, then a token
    inside it by the fp64 running sum of its entries; two uniforms per row. Why not simpler:
    ``torch.multinomial`` draws an exponential per vocabulary entry (~8 ms per step at B = 16,
    V = 32000 on CPU, more than the output projection); one fp32 cumulative sum over V would blur
    rare tokens (partial sums near 1 carry ~6e-8 absolute error each); an fp64 one over V writes
    a fresh (B, V) fp64 buffer per step, which costs several times its arithmetic on CPU.
    Block masses are fp32 sums of 256 entries, relatively accurate to ~1e-7.
    """
    B, V = probs.shape
    full = V - V % VOCAB_BLOCK  # entries in whole blocks; a shorter block holds the rest
    masses = probs[:, :full].reshape(B, -1, VOCAB_BLOCK).sum(dim=-1)  # (B, V // 256) a view, no copy
    if full < V:
        masses = torch.cat([masses, probs[:, full:].sum(dim=-1, keepdim=True)], dim=1)  # (B, nb)
    u = torch.rand(B, 2, generator=generator, device=probs.device, dtype=torch.float64)  # (B, 2)
    block = _invert_cdf(masses.double().cumsum(dim=-1), u[:, :1])  # (B, 1)
    cols = block * VOCAB_BLOCK + torch.arange(VOCAB_BLOCK, device=probs.device)  # (B, 256)
    inside = probs.gather(1, cols.clamp(max=V - 1)).double().masked_fill(cols >= V, 0)  # (B, 256)
    return (block * VOCAB_BLOCK + _invert_cdf(inside.cumsum(dim=-1), u[:, 1:])).squeeze(1)  # (B,)


def systematic_resample(log_w: torch.Tensor, k: int, generator: torch.Generator | None = None
                        ) -> torch.Tensor:
    """k indices per row of log-weights (P, n), each i drawn k * w_i times in expectation -> (P, k).

    Systematic (one uniform per row, k evenly spaced points) rather than multinomial: it is
    unbiased too, with lower variance in how often each candidate is copied.
    """
    w = (log_w - log_w.logsumexp(dim=-1, keepdim=True)).double().exp()  # (P, n)
    u = torch.rand(log_w.shape[0], 1, generator=generator, device=log_w.device, dtype=torch.float64)
    u = (u + torch.arange(k, device=log_w.device)) / k  # (P, k) stratified points in [0, 1)
    return _invert_cdf(w.cumsum(dim=-1), u)  # (P, k)


def effective_sample_size(log_w: torch.Tensor) -> torch.Tensor:
    """(sum w)^2 / sum w^2 per row of log-weights (P, n), computed in log space -> (P,)."""
    return (2 * log_w.logsumexp(dim=-1) - (2 * log_w).logsumexp(dim=-1)).exp()


# ---------------------------------------------------------------------------------------------
# Outputs


@dataclass
class GenerationOutput:
    """N = P * per-prompt samples, prompt-major: sample i answers prompt ``prompt_index[i]``."""

    tokens: list[list[int]]  # generated ids per sample, ending with eos_id when it was sampled
    logps: torch.Tensor  # (N,) fp32 log pi(tokens | prompt) under the untempered model
    num_tokens: torch.Tensor  # (N,) long, len(tokens[i])
    finished: torch.Tensor  # (N,) bool: ended with eos_id (False: cut at max_new_tokens)
    prompt_index: torch.Tensor  # (N,) long

    def select(self, index: torch.Tensor) -> GenerationOutput:
        """The samples at ``index`` (M,), in that order."""
        rows = index.tolist()
        return GenerationOutput([self.tokens[i] for i in rows], self.logps[index],
                                self.num_tokens[index], self.finished[index], self.prompt_index[index])


@dataclass
class GlobalSampleOutput(GenerationOutput):
    """Samples from pi^(1/T), with per-prompt diagnostics of the weighted candidates they came from."""

    ess: torch.Tensor  # (P,) effective sample size of the final candidate weights, out of n
    log_z: torch.Tensor  # (P,) estimate of log sum_y pi(y | x)^(1/T) (the target's normalizer)
    num_resamples: torch.Tensor  # (P,) long, SMC resampling steps (0 for importance resampling)


# ---------------------------------------------------------------------------------------------
# The decoding state shared by every sampler


def _make_generator(model: Transformer, seed: int | None, generator: torch.Generator | None
                    ) -> torch.Generator | None:
    """The generator to draw from: ``generator``, else a fresh one seeded with ``seed``, else None
    (torch's global RNG). It lives on the model's device, so draws never cross devices."""
    if generator is not None and seed is not None:
        raise ValueError("pass either seed or generator, not both")
    if generator is None and seed is not None:
        generator = torch.Generator(device=model.lm_head.weight.device).manual_seed(seed)
    return generator


class _Rollout:
    """B = P * copies rows decoding together: one prefill per prompt, shared by its copies.

    Per-row results (tokens, log-probs, lengths, done) are indexed by row 0..B-1 throughout. The KV
    cache and ``logits`` hold only ``rows`` (A,), in cache order: finished rows are dropped from
    the cache once they are a quarter of it, so long tails of a few live rows decode cheaply.
    """

    def __init__(self, model: Transformer, prompts: list[list[int]], copies: int, max_new_tokens: int,
                 eos_id: int | None, prefill_chunk: int | None):
        cfg, device = model.cfg, model.lm_head.weight.device
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token (e.g. BOS)")
        if max_new_tokens < 1 or copies < 1:
            raise ValueError(f"max_new_tokens ({max_new_tokens}) and the number of samples per prompt "
                             f"({copies}) must be at least 1")
        ids = [t for p in prompts for t in p] + ([eos_id] if eos_id is not None else [])
        if min(ids) < 0 or max(ids) >= cfg.vocab_size:
            raise ValueError(f"token ids (prompts, eos_id) must lie in [0, {cfg.vocab_size})")
        L = max(len(p) for p in prompts)
        if L + max_new_tokens > cfg.max_seq_len:
            raise ValueError(f"longest prompt ({L}) + max_new_tokens ({max_new_tokens}) exceeds the "
                             f"model's max_seq_len ({cfg.max_seq_len})")
        self.model, self.eos_id, self.max_new_tokens = model, eos_id, max_new_tokens
        P = len(prompts)
        # Left padding lines up every prompt's last token at step L - 1; pad slots are masked
        # (the id 0 written there is never attended to).
        pad = torch.tensor([L - len(p) for p in prompts], device=device)  # (P,)
        tokens = torch.tensor([[0] * (L - len(p)) + p for p in prompts], device=device)  # (P, L)
        # The last sampled token is never fed back, hence the - 1.
        self.cache = model.new_cache(P, L + max_new_tokens - 1, pad=pad)
        h = model.prefill(tokens, cache=self.cache, chunk_size=prefill_chunk)  # (P, D)
        # Copies share the prompt's prefill: the cache rows are duplicated, not recomputed, and
        # the output projection runs on the last position only.
        self.prompt_index = torch.arange(P, device=device).repeat_interleave(copies)  # (B,)
        self.cache.reorder(self.prompt_index)
        self.logits = model.lm_head(h).float().index_select(0, self.prompt_index)  # (A, V) A = B
        B = P * copies
        self.rows = torch.arange(B, device=device)  # (A,) row held by each cache slot
        self.out = torch.zeros(B, max_new_tokens, dtype=torch.long, device=device)  # (B, max_new)
        self.logps = torch.zeros(B, device=device)  # (B,)
        self.num_tokens = torch.zeros(B, dtype=torch.long, device=device)  # (B,)
        self.done = torch.zeros(B, dtype=torch.bool, device=device)  # (B,)
        self.t = 0  # tokens generated so far by every live row

    def live(self) -> torch.Tensor:
        """(A,) bool: which cache rows still decode (finished ones may linger until compaction)."""
        return ~self.done[self.rows]

    def append(self, next_tokens: torch.Tensor, token_logps: torch.Tensor) -> bool:
        """Record (A,) sampled tokens and their (A,) base-model log-probs; True when all rows ended."""
        live = self.live()  # (A,)
        rows, nxt = self.rows[live], next_tokens[live]  # (A',) each
        self.out[rows, self.t] = nxt
        self.logps[rows] += token_logps[live]
        self.num_tokens[rows] += 1
        if self.eos_id is not None:
            self.done[rows] = nxt == self.eos_id
        self.t += 1
        self._next = next_tokens
        # One host sync per step: negligible beside a forward, and it ends batches early.
        return self.t == self.max_new_tokens or bool(self.done.all())

    def advance(self) -> None:
        """Feed the tokens just appended; ``logits`` become the next step's (A, V)."""
        live = self.live()
        nxt = self._next
        if 4 * int((~live).sum()) >= live.numel():
            keep = live.nonzero().squeeze(1)  # (A',)
            self.cache.reorder(keep)
            self.rows, nxt = self.rows[keep], nxt[keep]
        self.logits = self.model(nxt[:, None], cache=self.cache)[:, -1]  # (A, V) fp32

    def select(self, ancestors: torch.Tensor) -> torch.Tensor:
        """Row i becomes a copy of row ``ancestors[i]`` (B,); returns the old cache slot of each new
        cache row (A',), so callers can reorder their own per-slot tensors the same way."""
        slot = torch.full_like(self.done, -1, dtype=torch.long)  # (B,) cache slot of each row
        slot[self.rows] = torch.arange(self.rows.numel(), device=slot.device)
        self.out, self.logps = self.out[ancestors], self.logps[ancestors]
        self.num_tokens, self.done = self.num_tokens[ancestors], self.done[ancestors]
        # Only live rows need a cache row, and a live row's ancestor is live, hence cached.
        self.rows = (~self.done).nonzero().squeeze(1)  # (A',)
        index = slot[ancestors[self.rows]]  # (A',)
        self.cache.reorder(index)
        self.logits = self.logits[index]
        return index

    def output(self) -> GenerationOutput:
        lengths = self.num_tokens.tolist()
        tokens = [row[:n] for row, n in zip(self.out.tolist(), lengths, strict=True)]
        # done is set by eos_id alone, so it is exactly "finished" (not cut at the budget).
        return GenerationOutput(tokens, self.logps, self.num_tokens, self.done.clone(), self.prompt_index)


# ---------------------------------------------------------------------------------------------
# Token-level sampling


@torch.inference_mode()
def generate(model: Transformer, prompts: list[list[int]], *, max_new_tokens: int, num_samples: int = 1,
             eos_id: int | None = None, temperature: float = 1.0, top_k: int | None = None,
             top_p: float | None = None, min_p: float | None = None, seed: int | None = None,
             generator: torch.Generator | None = None, prefill_chunk: int | None = None,
             stream: Callable[[int], None] | None = None) -> GenerationOutput:
    """``num_samples`` completions of each prompt (token ids), sampled token by token.

    ``stream`` is called with each new token id of a single-row generation (one prompt, one
    sample), so a terminal can show the text as it is produced.

    Filters (module docstring) shape what is sampled; ``logps`` stay under the untempered model.
    All ``len(prompts) * num_samples`` rows decode as one batch (split the prompts to bound memory);
    ``prefill_chunk`` bounds the prompt's attention memory. Same seed, same samples.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be a positive integer, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must lie in (0, 1], got {top_p}")
    if min_p is not None and not 0 <= min_p <= 1:
        raise ValueError(f"min_p must lie in [0, 1], got {min_p}")
    if stream is not None and len(prompts) * num_samples != 1:
        raise ValueError("stream needs exactly one prompt and one sample")
    generator = _make_generator(model, seed, generator)
    plain = temperature == 1.0 and top_k is None and top_p is None and min_p is None
    rollout = _Rollout(model, prompts, num_samples, max_new_tokens, eos_id, prefill_chunk)
    while True:
        logits = rollout.logits  # (A, V) fp32, untempered
        if plain:
            # Softmax feeds both the draw and the log-prob of the drawn token: one pass over V
            # fewer than log_softmax + exp. A drawn token has probability > 0, so its log is finite.
            probs = logits.softmax(dim=-1)  # (A, V)
            next_tokens = sample_probs(probs, generator)  # (A,)
            token_logps = probs.gather(1, next_tokens[:, None]).squeeze(1).log()  # (A,)
        else:
            if temperature == 0:
                next_tokens = logits.argmax(dim=-1)  # (A,) filters cannot change the argmax
            else:
                filtered = process_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p,
                                          min_p=min_p)  # (A, V)
                next_tokens = sample_logits(filtered, generator)  # (A,)
            # log pi of the drawn token without writing out a (A, V) log-softmax.
            token_logps = logits.gather(1, next_tokens[:, None]).squeeze(1) - logits.logsumexp(dim=-1)
        ended = rollout.append(next_tokens, token_logps)
        if stream is not None:
            stream(int(next_tokens[0]))
        if ended:
            return rollout.output()
        rollout.advance()


# ---------------------------------------------------------------------------------------------
# Global temperature: target pi(y)^(1/T) over complete sequences (eqs. 7-10)


def _global_output(samples: GenerationOutput, log_w: torch.Tensor, num_samples: int,
                   num_resamples: torch.Tensor, warn_ess: float, method: str,
                   generator: torch.Generator | None) -> GlobalSampleOutput:
    """Draw ``num_samples`` per prompt from the weighted candidates (P, n); diagnostics; warn."""
    P, n = log_w.shape
    ess = effective_sample_size(log_w)  # (P,)
    # The mean weight estimates E_q[pi^(1/T) / q] = sum_y pi(y)^(1/T), both samplers alike.
    log_z = log_w.logsumexp(dim=-1) - math.log(n)  # (P,)
    low = (ess < warn_ess * n).nonzero().squeeze(1).tolist()
    if low:
        # stacklevel 3: past this helper and the public sampler, to the caller's line.
        warnings.warn(f"{method}: effective sample size below {warn_ess:.0%} of {n} candidates for "
                      f"prompts {low[:8]} (lowest {ess.min().item():.1f}); samples are close to "
                      f"copies of a few candidates. Raise num_candidates, bring the temperature "
                      f"closer to 1, or try the other method.", RuntimeWarning, stacklevel=3)
    index = systematic_resample(log_w, num_samples, generator)  # (P, k) within each prompt
    flat = (index + n * torch.arange(P, device=index.device)[:, None]).flatten()  # (P * k,)
    chosen = samples.select(flat)
    return GlobalSampleOutput(chosen.tokens, chosen.logps, chosen.num_tokens, chosen.finished,
                              chosen.prompt_index, ess=ess.float(), log_z=log_z.float(),
                              num_resamples=num_resamples)


def _check_global(temperature: float, num_samples: int, num_candidates: int | None) -> int:
    if not temperature > 0:
        raise ValueError(f"global temperature must be positive, got {temperature}")
    if num_samples < 1:
        raise ValueError(f"num_samples must be at least 1, got {num_samples}")
    # Default: 4 candidates per sample and at least 16, so few samples are copies of one another.
    n = num_candidates if num_candidates is not None else max(16, 4 * num_samples)
    if n < 1:
        raise ValueError(f"num_candidates must be at least 1, got {n}")
    return n


def importance_resample(model: Transformer, prompts: list[list[int]], temperature: float, *,
                        max_new_tokens: int, num_samples: int = 1, num_candidates: int | None = None,
                        eos_id: int | None = None, warn_ess: float = 0.1, seed: int | None = None,
                        generator: torch.Generator | None = None, prefill_chunk: int | None = None
                        ) -> GlobalSampleOutput:
    """Sampling-importance-resampling: n candidates per prompt from pi, kept by weight pi^(1/T - 1).

    The weight is target / proposal = pi^(1/T) / pi, self-normalized within each prompt; samples
    are drawn from the candidates (systematic resampling), so they never leave what pi itself
    samples. Exact as n grows; with few candidates the samples lean toward pi. Warns when a
    prompt's ESS is below ``warn_ess * n``.
    """
    n = _check_global(temperature, num_samples, num_candidates)
    generator = _make_generator(model, seed, generator)
    candidates = generate(model, prompts, max_new_tokens=max_new_tokens, num_samples=n, eos_id=eos_id,
                          generator=generator, prefill_chunk=prefill_chunk)
    log_w = ((1 / temperature - 1) * candidates.logps.double()).view(len(prompts), n)  # (P, n)
    no_resamples = torch.zeros(len(prompts), dtype=torch.long, device=log_w.device)
    return _global_output(candidates, log_w, num_samples, no_resamples, warn_ess, "importance_resample",
                          generator)


def smc_sample(model: Transformer, prompts: list[list[int]], temperature: float, *, max_new_tokens: int,
               num_samples: int = 1, num_candidates: int | None = None, eos_id: int | None = None,
               resample_threshold: float = 0.5, warn_ess: float = 0.1, seed: int | None = None,
               generator: torch.Generator | None = None, prefill_chunk: int | None = None
               ) -> GlobalSampleOutput:
    """Sequential Monte Carlo with n particles per prompt and a token-tempered proposal.

    Math. Intermediate targets are the tempered prefix probabilities ``pi(y_<=t)^(1/T)``. Drawing
    y_t from ``q_t(v) = p(v)^(1/T) / Z_t`` multiplies a particle's weight by
    ``p(y_t)^(1/T) / q_t(y_t) = Z_t = sum_v p(v | y_<t)^(1/T)``: exact, and a function of the
    prefix alone. So Z_t is folded in *before* y_t is drawn, and resampling then (when a group's
    ESS < ``resample_threshold * n``) picks prefixes by weights free of the proposal's noise (a
    fully adapted particle filter). Finished particles (EOS, or the budget) gain no further
    factor. Resampling copies a prefix with its KV-cache row and sets its group's weights to their
    mean, which keeps the mean weight an unbiased estimate of sum_y pi(y)^(1/T) (``log_z``).
    ``num_samples`` are finally drawn from the weighted particles by systematic resampling; warns
    when a prompt's final ESS is below ``warn_ess * n``.
    """
    n = _check_global(temperature, num_samples, num_candidates)
    if not 0 <= resample_threshold <= 1:
        raise ValueError(f"resample_threshold must lie in [0, 1], got {resample_threshold}")
    generator = _make_generator(model, seed, generator)
    particles, log_w, num_resamples = _smc_particles(model, prompts, temperature, n, max_new_tokens,
                                                     eos_id, resample_threshold, generator, prefill_chunk)
    return _global_output(particles, log_w, num_samples, num_resamples, warn_ess, "smc_sample", generator)


@torch.inference_mode()
def _smc_particles(model: Transformer, prompts: list[list[int]], temperature: float, n: int,
                   max_new_tokens: int, eos_id: int | None, resample_threshold: float,
                   generator: torch.Generator | None, prefill_chunk: int | None
                   ) -> tuple[GenerationOutput, torch.Tensor, torch.Tensor]:
    """The particle system of ``smc_sample``: all P * n particles, log-weights (P, n), resamples (P,)."""
    rollout = _Rollout(model, prompts, n, max_new_tokens, eos_id, prefill_chunk)
    P, device = len(prompts), rollout.logits.device
    log_w = torch.zeros(P * n, dtype=torch.float64, device=device)  # (B,) fp64: sums of many steps
    num_resamples = torch.zeros(P, dtype=torch.long, device=device)  # (P,)
    group_start = n * torch.arange(P, device=device)[:, None]  # (P, 1) first row of each prompt
    while True:
        logp = rollout.logits.log_softmax(dim=-1)  # (A, V) base-model next-token log-probs
        proposal = logp / temperature  # (A, V) log p^(1/T), normalized by log Z_t below
        log_z_t = proposal.logsumexp(dim=-1)  # (A,)
        live = rollout.live()  # (A,)
        log_w[rollout.rows[live]] += log_z_t[live].double()
        groups = log_w.view(P, n)  # (P, n)
        # Only groups with a particle still running can gain from resampling.
        running = (~rollout.done).view(P, n).any(dim=-1)  # (P,)
        resample = running & (effective_sample_size(groups) < resample_threshold * n)  # (P,)
        if bool(resample.any()):
            # Groups above the threshold keep their particles: identity ancestors.
            keep_order = torch.arange(n, device=device).expand(P, n)  # (P, n)
            local = torch.where(resample[:, None], systematic_resample(groups, n, generator), keep_order)
            mean_w = groups.logsumexp(dim=-1, keepdim=True) - math.log(n)  # (P, 1)
            # Resampled groups restart from equal weights at their mean; the others keep theirs.
            log_w = torch.where(resample[:, None], mean_w, groups).flatten()  # (B,)
            index = rollout.select((local + group_start).flatten())  # (A',) old slot per cache row
            logp, proposal = logp[index], proposal[index]
            num_resamples += resample.long()
        next_tokens = sample_logits(proposal, generator)  # (A,) from q_t = p^(1/T) / Z_t
        if rollout.append(next_tokens, logp.gather(1, next_tokens[:, None]).squeeze(1)):
            return rollout.output(), log_w.view(P, n), num_resamples
        rollout.advance()


def sample_global_temperature(model: Transformer, prompts: list[list[int]], temperature: float, *,
                              method: str = "auto", **kwargs) -> GlobalSampleOutput:
    """Samples from pi^(1/T) by ``method``: "resample" (``importance_resample``), "smc"
    (``smc_sample``), or "auto": importance resampling for T >= 1, SMC for T < 1.

    Why that default: above 1 the exact target lifts the many low-probability continuations, and
    a token-tempered proposal walks into them; candidates drawn from pi stay on pi's support. Below
    1, candidates from pi are mostly too unlikely to matter, so their ESS collapses with length,
    while the sharpened token proposal already lands near the target. ``kwargs`` go to the sampler.
    """
    if method == "auto":
        method = "resample" if temperature >= 1 else "smc"
    if method == "resample":
        return importance_resample(model, prompts, temperature, **kwargs)
    if method == "smc":
        return smc_sample(model, prompts, temperature, **kwargs)
    raise ValueError(f"method must be 'auto', 'resample' or 'smc', got {method!r}")
