"""Sampling: KV-cached batched generation, token-level filters, and the decoding state it shares
with the global-temperature samplers (``spl/global_temperature.py``).

Token-level temperature t (paper eq. 6) rescales and renormalizes every next-token distribution:
``pi'(y) = prod_i pi(y_i | y_<i)^(1/t) / Z(y_<i)``. SPL trained at alpha / beta = T instead learns
a *global* temperature on whole sequences, ``pi(y)^(1/T) / Z`` (eqs. 7-10); the samplers for that
target live in ``spl/global_temperature.py`` and decode through ``Rollout`` below.

The outcome space: a response ends at ``eos_id`` (which is part of it and of its log-prob), or
at the first token that completes one of the stop strings (``StopStrings``), or is cut at
``max_new_tokens``, in which case its probability is the product of its tokens' probabilities
with no end factor. These outcomes are prefix-free and their probabilities sum to one. Returned
``logps`` are always ``log pi(y | x)`` under the untempered model.

Token filters apply in Hugging Face's default order: temperature, then top-k, then top-p, then
min-p; each later filter sees the distribution the earlier ones left. Temperature 0 is greedy.
Settings that keep every token are no filter at all: ``top_p = 1``, ``top_k >= V``, ``min_p = 0``
(a top-p cumulative sum can round to 1 before the last token, and would drop it). Ties resolve
deterministically: top-k keeps every token tied with the k-th logit (as HF does); top-p sorts
equal probabilities by token id and keeps the lower ids first, so of tokens tied at the nucleus
boundary only as many as the mass needs are kept; min-p keeps every token tied at its threshold;
greedy picks the lowest id.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch

from spl.model import KVCache, Transformer

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


def check_filters(temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                  min_p: float | None = None) -> None:
    """Raise ValueError naming the first out-of-range token-level setting."""
    if not temperature >= 0 or math.isinf(temperature):
        raise ValueError(f"temperature must be a finite number >= 0 (0 is greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be a positive integer, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must lie in (0, 1], got {top_p}")
    if min_p is not None and not 0 <= min_p <= 1:
        raise ValueError(f"min_p must lie in [0, 1], got {min_p}")


def process_logits(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int | None = None,
                   top_p: float | None = None, min_p: float | None = None) -> torch.Tensor:
    """Temperature, then top-k, top-p, min-p (HF's default order); removed tokens get -inf."""
    if temperature not in (0.0, 1.0):
        logits = logits / temperature
    # Settings that keep everything are skipped, not applied: see the module docstring.
    top_k = top_k if top_k is not None and top_k < logits.shape[-1] else None
    top_p = top_p if top_p is not None and top_p < 1 else None
    min_p = min_p if min_p else None
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
    if B == 0:  # no row left to draw for (reshape below cannot infer a size from 0 elements)
        return torch.empty(0, dtype=torch.long, device=probs.device)
    u = torch.rand(B, 2, generator=generator, device=probs.device, dtype=torch.float64)  # (B, 2)
    if V <= VOCAB_BLOCK:  # one block: a single fp64 running sum (small vocabularies, tests)
        return _invert_cdf(probs.double().cumsum(dim=-1), u[:, :1]).squeeze(1)
    full = V - V % VOCAB_BLOCK  # entries in whole blocks; a shorter block holds the rest
    masses = probs[:, :full].reshape(B, -1, VOCAB_BLOCK).sum(dim=-1)  # (B, V // 256) a view, no copy
    if full < V:
        masses = torch.cat([masses, probs[:, full:].sum(dim=-1, keepdim=True)], dim=1)  # (B, nb)
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
# Stop strings


class StopStrings:
    """Ends a completion at the first token whose text completes one of ``strings``.

    A stop ends the outcome as EOS does (the token stays in ``tokens``; callers cut the text with
    ``cut``). Checking decodes only each row's last ``window`` tokens: a token decodes to at least
    a quarter of a character (byte fallback spends up to 4 tokens on one), so 4 tokens per
    character of the longest stop, plus slack for SentencePiece's dropped leading space, always
    cover a stop that ends at the newest token.
    """

    def __init__(self, tokenizer, strings: Sequence[str]):
        if not strings or any(not isinstance(s, str) or not s for s in strings):
            raise ValueError(f"stop strings must be non-empty strings, got {list(strings)!r}")
        self.decode, self.strings = tokenizer.decode, list(strings)
        self.window = 4 * max(len(s) for s in self.strings) + 8

    def hit(self, tails: list[list[int]]) -> list[bool]:
        """For each row's latest generated tokens: does their text contain a stop string?"""
        return [any(s in text for s in self.strings) for text in map(self.decode, tails)]

    def cut(self, text: str) -> tuple[str, bool]:
        """``text`` up to the first stop string, and whether one was found."""
        at = min((i for i in (text.find(s) for s in self.strings) if i >= 0), default=-1)
        return (text, False) if at < 0 else (text[:at], True)


# ---------------------------------------------------------------------------------------------
# Outputs


@dataclass
class GenerationOutput:
    """N = P * per-prompt samples, prompt-major: sample i answers prompt ``prompt_index[i]``."""

    tokens: list[list[int]]  # generated ids per sample, ending with eos_id when it was sampled
    logps: torch.Tensor  # (N,) fp32 log pi(tokens | prompt) under the untempered model
    num_tokens: torch.Tensor  # (N,) long, len(tokens[i])
    finished: torch.Tensor  # (N,) bool: ended by eos_id or a stop string (False: cut at the budget)
    prompt_index: torch.Tensor  # (N,) long
    # (P,) long: row-tokens pushed through the model after the prefill, per prompt. The compute
    # measure the samplers are compared by (a forward of A rows by one token counts A).
    decoded_tokens: torch.Tensor | None = None

    def select(self, index: torch.Tensor) -> GenerationOutput:
        """The samples at ``index`` (M,), in that order (the cost stays the whole call's)."""
        rows = index.tolist()
        return GenerationOutput([self.tokens[i] for i in rows], self.logps[index], self.num_tokens[index],
                                self.finished[index], self.prompt_index[index], self.decoded_tokens)

    @staticmethod
    def concat(parts: Sequence[GenerationOutput], prompt_offsets: Sequence[int]) -> GenerationOutput:
        """Join outputs of separate calls; call i's prompt j becomes prompt ``prompt_offsets[i] + j``
        (calls may share a prompt, split over them: its costs add up)."""
        index = [p.prompt_index + o for p, o in zip(parts, prompt_offsets, strict=True)]
        num_prompts = max(o + p.decoded_tokens.numel() for p, o in zip(parts, prompt_offsets, strict=True))
        decoded = torch.zeros(num_prompts, dtype=torch.long, device=parts[0].logps.device)  # (P,)
        for p, o in zip(parts, prompt_offsets, strict=True):
            decoded[o:o + p.decoded_tokens.numel()] += p.decoded_tokens
        cat = lambda name: torch.cat([getattr(p, name) for p in parts])
        return GenerationOutput([t for p in parts for t in p.tokens], cat("logps"), cat("num_tokens"),
                                cat("finished"), torch.cat(index), decoded)


def plan_calls(num_prompts: int, copies: int, max_rows: int | None) -> list[tuple[int, int, int]]:
    """Split P prompts x ``copies`` rows into calls of at most ``max_rows`` rows (when possible).

    Returns (first prompt, prompts, copies per prompt) per call, prompt-major in order. Whole
    prompts share a call while they fit; a prompt with more copies than ``max_rows`` is split
    into near-equal parts, one call each (independent groups: the global samplers call them islands).
    """
    if max_rows is None or num_prompts * copies <= max_rows:
        return [(0, num_prompts, copies)]
    if max_rows < 1:
        raise ValueError(f"max_rows must be at least 1, got {max_rows}")
    if copies <= max_rows:
        per = max_rows // copies
        return [(s, min(per, num_prompts - s), copies) for s in range(0, num_prompts, per)]
    parts = -(-copies // max_rows)  # ceil
    sizes = [copies // parts + (i < copies % parts) for i in range(parts)]
    return [(p, 1, size) for p in range(num_prompts) for size in sizes]


# ---------------------------------------------------------------------------------------------
# The decoding state shared by every sampler


def make_generator(model: Transformer, seed: int | None, generator: torch.Generator | None
                   ) -> torch.Generator | None:
    """The generator to draw from: ``generator``, else a fresh one seeded with ``seed``, else None
    (torch's global RNG). It lives on the model's device, so draws never cross devices."""
    if generator is not None and seed is not None:
        raise ValueError("pass either seed or generator, not both")
    if generator is None and seed is not None:
        generator = torch.Generator(device=model.lm_head.weight.device).manual_seed(seed)
    return generator


class Rollout:
    """B = P * copies rows decoding together: one prefill per prompt, shared by its copies.

    Per-row results (tokens, per-token log-probs, lengths, done) are indexed by row 0..B-1. The
    KV cache and ``logits`` hold only ``rows`` (A,), in cache order: finished rows are dropped
    from the cache once they are a quarter of it, so long tails of a few live rows decode cheaply.
    Every row sits at the same step: ``t`` tokens generated, the cache holding the prompt (left
    padded to length L) and the first ``fed`` of them, ``logits`` predicting token ``fed``.

    ``rewindable`` keeps a linear cache even under a sliding window, so ``rewind`` can roll every
    row back to an earlier step (the global samplers' rejuvenation moves regenerate suffixes).
    """

    def __init__(self, model: Transformer, prompts: list[list[int]], copies: int, max_new_tokens: int,
                 eos_id: int | None, prefill_chunk: int | None = None, stop: StopStrings | None = None,
                 rewindable: bool = False):
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
        self.model, self.eos_id, self.stop, self.L = model, eos_id, stop, L
        self.max_new_tokens = max_new_tokens
        P = len(prompts)
        # Left padding lines up every prompt's last token at step L - 1; pad slots are masked
        # (the id 0 written there is never attended to).
        pad = torch.tensor([L - len(p) for p in prompts], device=device)  # (P,)
        tokens = torch.tensor([[0] * (L - len(p)) + p for p in prompts], device=device)  # (P, L)
        # The last sampled token is never fed back, hence the - 1.
        if rewindable:
            # Mask and positions still follow the model's window (spl/model.py); only the storage is
            # linear, so that no key a rewound step needs has been overwritten.
            self.cache = KVCache(replace(cfg, sliding_window=None), P, L + max_new_tokens - 1, device=device,
                                 dtype=model.lm_head.weight.dtype, pad=pad)
        else:
            self.cache = model.new_cache(P, L + max_new_tokens - 1, pad=pad)
        h = model.prefill(tokens, cache=self.cache, chunk_size=prefill_chunk)  # (P, D)
        # Copies share the prompt's prefill: the cache rows are duplicated, not recomputed, and
        # the output projection runs on the last position only.
        self.prompt_index = torch.arange(P, device=device).repeat_interleave(copies)  # (B,)
        self.cache.reorder(self.prompt_index)
        self.logits = model.lm_head(h).float().index_select(0, self.prompt_index)  # (A, V) A = B
        B = P * copies
        self.last_prompt_token = tokens[:, -1].index_select(0, self.prompt_index)  # (B,) fed at L - 1
        self.rows = torch.arange(B, device=device)  # (A,) row held by each cache slot
        self.out = torch.zeros(B, max_new_tokens, dtype=torch.long, device=device)  # (B, max_new)
        self.token_logps = torch.zeros(B, max_new_tokens, device=device)  # (B, max_new) log pi per token
        self.num_tokens = torch.zeros(B, dtype=torch.long, device=device)  # (B,)
        self.done = torch.zeros(B, dtype=torch.bool, device=device)  # (B,)
        self.t = 0  # tokens generated so far by every live row
        # Row-tokens pushed through the model after the prefill, per prompt: the compute measure.
        self.decoded = torch.zeros(P, dtype=torch.long, device=device)  # (P,)

    @property
    def fed(self) -> int:
        """Generated tokens already in the cache: ``t``, or ``t - 1`` once decoding has ended."""
        return self.cache.pos - self.L

    def live(self) -> torch.Tensor:
        """(A,) bool: which cache rows still decode (finished ones may linger until compaction)."""
        return ~self.done[self.rows]

    def hits_stop(self, rows: torch.Tensor, end: int) -> torch.Tensor:
        """(R,) bool: does the text of ``rows``' tokens up to position ``end`` contain a stop string?"""
        if self.stop is None or rows.numel() == 0:
            return torch.zeros(rows.shape, dtype=torch.bool, device=rows.device)
        tails = self.out[rows, max(0, end - self.stop.window):end].tolist()  # one host copy per step
        return torch.tensor(self.stop.hit(tails), device=rows.device)

    def append(self, next_tokens: torch.Tensor, token_logps: torch.Tensor) -> bool:
        """Record (A,) sampled tokens and their (A,) base-model log-probs; True when all rows ended."""
        live = self.live()  # (A,)
        rows, nxt = self.rows[live], next_tokens[live]  # (A',) each
        self.out[rows, self.t] = nxt
        self.token_logps[rows, self.t] = token_logps[live]
        self.num_tokens[rows] += 1
        ended = nxt == self.eos_id if self.eos_id is not None else torch.zeros_like(nxt, dtype=torch.bool)
        self.done[rows] = ended | self.hits_stop(rows, self.t + 1)
        self.t += 1
        self._next = next_tokens
        # One host sync per step: negligible beside a forward, and it ends batches early.
        return self.t == self.max_new_tokens or bool(self.done.all())

    def feed(self, tokens: torch.Tensor) -> torch.Tensor:
        """One decoding step for every cache row: (A,) tokens in, next-token logits (A, V) fp32 out."""
        self.decoded += torch.bincount(self.prompt_index[self.rows], minlength=self.decoded.numel())
        return self.model(tokens[:, None], cache=self.cache)[:, -1]

    def advance(self) -> None:
        """Feed the tokens just appended; ``logits`` become the next step's (A, V)."""
        live = self.live()
        nxt = self._next
        if 4 * int((~live).sum()) >= live.numel():
            keep = live.nonzero().squeeze(1)  # (A',)
            self.cache.reorder(keep)
            self.rows, nxt = self.rows[keep], nxt[keep]
        self.logits = self.feed(nxt)

    def select(self, ancestors: torch.Tensor) -> torch.Tensor:
        """Row i becomes a copy of row ``ancestors[i]`` (B',), where B' may differ from B; returns
        the old cache slot of each new cache row (A',), so callers can reorder their own per-slot
        tensors the same way. Only live rows keep a cache row; a live row's ancestor is live."""
        slot = torch.full_like(self.done, -1, dtype=torch.long)  # (B,) cache slot of each row
        slot[self.rows] = torch.arange(self.rows.numel(), device=slot.device)
        self.out, self.token_logps = self.out[ancestors], self.token_logps[ancestors]
        self.num_tokens, self.done = self.num_tokens[ancestors], self.done[ancestors]
        self.prompt_index = self.prompt_index[ancestors]
        self.last_prompt_token = self.last_prompt_token[ancestors]
        self.rows = (~self.done).nonzero().squeeze(1)  # (A',)
        index = slot[ancestors[self.rows]]  # (A',)
        self.cache.reorder(index)
        self.logits = self.logits[index]
        return index

    def rewind(self, j: int) -> tuple:
        """Roll every cache row back to just before generated position ``j`` and feed the token
        there (the prompt's last one for j = 0): ``logits`` then predict position j again.

        Returns what ``keep_or_restore`` needs to put back, per row, the keys, values and logits
        of the state rewound from. Costs one forward, plus a copy of the rewound cache span.
        """
        cache = self.cache
        if cache.rotating:
            raise ValueError("rewind needs a rollout built with rewindable=True")
        if not 0 <= j < self.t:
            raise ValueError(f"can rewind to a generated position in [0, {self.t}), got {j}")
        start = self.L + j - 1  # time of the token fed first
        saved = ([k[:, :, start:cache.pos].clone() for k in cache.k],
                 [v[:, :, start:cache.pos].clone() for v in cache.v], self.logits, cache.pos)
        cache.pos = start
        prev = self.last_prompt_token[self.rows] if j == 0 else self.out[self.rows, j - 1]  # (A,)
        self.logits = self.feed(prev)
        return saved

    def keep_or_restore(self, saved: tuple, keep: torch.Tensor) -> None:
        """After a rewind and as many feeds as were undone: cache rows where ``keep`` (A,) is True
        keep their new state; the others get back the one saved by ``rewind``."""
        k_saved, v_saved, logits, pos = saved
        if self.cache.pos != pos:
            raise RuntimeError(f"restore at cache step {self.cache.pos}, saved at {pos}")
        start = pos - k_saved[0].shape[2]
        m = keep[:, None, None, None]  # (A, 1, 1, 1)
        for new, old in zip(self.cache.k + self.cache.v, k_saved + v_saved, strict=True):
            new[:, :, start:pos] = torch.where(m, new[:, :, start:pos], old)
        self.logits = torch.where(keep[:, None], self.logits, logits)

    def output(self) -> GenerationOutput:
        lengths = self.num_tokens.tolist()
        tokens = [row[:n] for row, n in zip(self.out.tolist(), lengths, strict=True)]
        # Positions past a row's length hold zeros, so the sum is the sequence log-prob.
        # done is set by eos_id and stop strings alone, so it is exactly "finished" (not cut).
        return GenerationOutput(tokens, self.token_logps.sum(dim=-1), self.num_tokens, self.done.clone(),
                                self.prompt_index, self.decoded.clone())


# ---------------------------------------------------------------------------------------------
# Token-level sampling


def generate(model: Transformer, prompts: list[list[int]], *, max_new_tokens: int, num_samples: int = 1,
             eos_id: int | None = None, temperature: float = 1.0, top_k: int | None = None,
             top_p: float | None = None, min_p: float | None = None, seed: int | None = None,
             generator: torch.Generator | None = None, prefill_chunk: int | None = None,
             stop: StopStrings | None = None, max_rows: int | None = None,
             stream: Callable[[int], None] | None = None) -> GenerationOutput:
    """``num_samples`` completions of each prompt (token ids), sampled token by token.

    ``stream`` is called with each new token id of a single-row generation (one prompt, one
    sample), so a terminal can show the text as it is produced.

    Filters (module docstring) shape what is sampled; ``logps`` stay under the untempered model.
    At most ``max_rows`` rows decode at once (all of them when None): prompts, or one prompt's
    samples, are split over calls (``plan_calls``); ``prefill_chunk`` bounds the prompt's
    attention memory. Same seed and ``max_rows``, same samples.
    """
    check_filters(temperature, top_k, top_p, min_p)
    if stream is not None and len(prompts) * num_samples != 1:
        raise ValueError("stream needs exactly one prompt and one sample")
    generator = make_generator(model, seed, generator)
    parts, offsets = [], []
    for first, count, copies in plan_calls(len(prompts), num_samples, max_rows):
        parts.append(generate_batch(model, prompts[first:first + count], copies, max_new_tokens, eos_id,
                               temperature, top_k, top_p, min_p, generator, prefill_chunk, stop, stream))
        offsets.append(first)
    return parts[0] if len(parts) == 1 else GenerationOutput.concat(parts, offsets)


@torch.inference_mode()
def generate_batch(model: Transformer, prompts: list[list[int]], num_samples: int, max_new_tokens: int,
              eos_id: int | None, temperature: float, top_k: int | None, top_p: float | None,
              min_p: float | None, generator: torch.Generator | None, prefill_chunk: int | None,
              stop: StopStrings | None, stream: Callable[[int], None] | None) -> GenerationOutput:
    """``generate`` without splitting: every row decodes together (the global samplers use it too)."""
    plain = temperature == 1.0 and top_k is None and top_p is None and min_p is None
    rollout = Rollout(model, prompts, num_samples, max_new_tokens, eos_id, prefill_chunk, stop)
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
