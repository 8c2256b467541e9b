"""Model-driven evaluation primitives: pose prompts, sample responses, score token sequences.

The suites (run by ``runner.py``) are built from four operations on a loaded model, all batched
and run under ``torch.inference_mode``:

- ``sample_responses``: N responses per prompt with token-level sampling (temperature, top-k/p,
  min-p) or a sequence-level global temperature (``spl/global_temperature.py``; eqs. 7-10).
- ``sequence_logprobs``: log pi(response | prompt) summed over response tokens, and the token
  count; the reference cross-entropy of §4.1 is ``-sum / count`` under the reference policy.
- ``reward_scores``: the Bradley-Terry head of a reward-mode run on the final-normed hidden state
  of each sequence's last real token, exactly as ``spl.trainer.Scorer`` computes it.
- ``option_logprobs``: log-probabilities of the option letters after a multiple-choice prompt
  (App. D): the next-token distribution when every letter is one token, else each letter's
  sequence log-prob; callers renormalize over the options.

The three scorers share one forward loop, ``_padded_forwards``: sequences sorted by length (a
batch wastes little compute on padding), right-padded (padding sits after every real token, so
causal attention never lets a real position see it and no attention mask is needed), results
put back in the callers' order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml
from tqdm import tqdm

from spl.data import hh_messages
from spl.evaluation.math_answers import truncate_at_stop
from spl.global_temperature import choose_method, default_num_candidates, sample_global_temperature
from spl.logprobs import sequence_logps
from spl.sampling import StopStrings, generate
from spl.tokenizer import Message, Tokenizer


class EvaluationError(RuntimeError):
    """The evaluation cannot run as asked (bad flags, incompatible files); the message says why."""


# ---------------------------------------------------------------------------------------------
# Prompts and the models that answer them
# ---------------------------------------------------------------------------------------------


@dataclass
class Prompt:
    """One prompt, as raw text (plain format, judge prompts) and as chat messages (chat format)."""

    id: str
    text: str
    messages: list[Message]

    @classmethod
    def user(cls, id: str, text: str) -> Prompt:
        """A single user turn."""
        return cls(id, text, [{"role": "user", "content": text}])

    @classmethod
    def hh_dialogue(cls, id: str, text: str) -> Prompt:
        """An HH-RLHF prompt ("\\n\\nHuman: ...\\n\\nAssistant:") as chat messages.

        The same reading as ``spl.data.parse_hh``: turns start at "\\n\\n"-led markers, empty
        turns (the final "Assistant:" slot among them) are dropped.
        """
        messages = hh_messages(text)
        if not messages or messages[0]["role"] != "user":
            raise EvaluationError(f"{id}: an HH-RLHF prompt must start with '\\n\\nHuman:'")
        return cls(id, text, messages)


def read_run_config(path: str | Path) -> dict | None:
    """The training config.yaml of a run or step directory (None for a bare model directory)."""
    from spl.inference import resolve_checkpoint

    for candidate in (resolve_checkpoint(path) / "config.yaml", Path(path) / "config.yaml"):
        if candidate.is_file():
            return yaml.safe_load(candidate.read_text())
    return None


def is_demo_config(config: dict | None) -> bool:
    """Whether a run is train.py's embedded opinion demo: it is the run without training data."""
    return config is not None and config.get("data", {}).get("train_path") is None


@dataclass
class EvalModel:
    """A loaded model, its tokenizer, and how prompts are posed to it."""

    name: str  # short label used in tables and plots
    path: Path  # what the user passed
    model: torch.nn.Module
    tokenizer: Tokenizer
    chat: bool  # True: the tokenizer's chat template poses prompts as messages; False: bos + raw text
    has_adapter: bool = False
    reward_head: torch.Tensor | None = None  # (1, D) for reward-mode runs
    config: dict | None = None  # the run's config.yaml, when it has one
    source: Path | None = None  # the directory the weights came from

    @property
    def device(self) -> torch.device:
        return self.model.lm_head.weight.device

    @property
    def max_len(self) -> int:
        return self.model.cfg.max_seq_len

    def encode_prompt(self, prompt: Prompt) -> list[int]:
        """Token ids to continue from: the chat template, or bos + the raw text."""
        if self.chat:
            return self.tokenizer.encode_prompt(prompt.messages)
        return self.tokenizer.encode(prompt.text, bos=True)

    def follow(self, policy: EvalModel) -> None:
        """Pose prompts as ``policy`` does, when this model's checkpoint did not say how."""
        from spl.chat_templates import ChatTemplateError

        if self.tokenizer.chat_template is None:
            try:
                self.tokenizer.chat_template = policy.tokenizer.chat_template.name
            except ChatTemplateError as e:
                raise EvaluationError(f"{self.name}: {e}") from None
            self.chat = policy.chat

    def same_encoding(self, other: EvalModel) -> bool:
        """Whether ``other`` turns text into the same ids (tokenizer file and prompt format)."""
        return (self.chat == other.chat and self.tokenizer.chat_template == other.tokenizer.chat_template
                and self.tokenizer.path.read_bytes() == other.tokenizer.path.read_bytes())


def load_eval_model(path: str | Path, *, name: str | None = None, adapter: str | Path | None = None,
                    tokenizer: str | Path | None = None, chat_template: str = "auto",
                    follows_policy: bool = False, device: torch.device | str = "cpu",
                    dtype: torch.dtype = torch.float32) -> EvalModel:
    """Load a run, step, HF or original model directory for evaluation (``load_for_inference``).

    ``chat_template`` (checked by ``EvalConfig``) is a name from spl.chat_templates or "auto": as
    the checkpoint was trained (its run's config.yaml, its tokenizer_config.json, its tokenizer's
    control tokens). Under "none" prompts are bos + raw text (HH-RLHF's "\\n\\nHuman: ...").
    With ``follows_policy`` (a reward model or reference) a checkpoint that says nothing is left
    without a template, for ``EvalModel.follow`` to give it the policy's.
    """
    from spl.chat_templates import ChatTemplateError, ChatTemplateUndecided, set_chat_template
    from spl.inference import load_for_inference

    loaded = load_for_inference(path, adapter=adapter, tokenizer=tokenizer, device=device, dtype=dtype)
    config = read_run_config(path)
    try:
        print(f"evaluate: {name or Path(path).name}: " + set_chat_template(
            loaded.tokenizer, chat_template, checkpoint=loaded.source, base=loaded.base, adapter=adapter))
    except ChatTemplateError as e:
        if not (follows_policy and isinstance(e, ChatTemplateUndecided)):
            raise EvaluationError(str(e)) from None
    tok = loaded.tokenizer
    return EvalModel(name or Path(path).name, Path(path), loaded.model, tok, tok.poses_chat,
                     loaded.has_adapter, loaded.reward_head, config, loaded.source)


def fit_prompt(ids: list[int], budget: int, bos_id: int) -> tuple[list[int], bool]:
    """Keep the last ``budget`` tokens of a prompt (bos kept in front); also say if it was cut.

    The end of a prompt (the question, the "Assistant:" cue) is what the response answers, so
    the left side goes, as in ``spl.data.truncate``.
    """
    if budget < 2:
        raise EvaluationError(f"no room for a prompt: {budget} tokens left in the context window")
    if len(ids) <= budget:
        return ids, False
    keep_bos = int(ids[0] == bos_id)
    return ids[:keep_bos] + ids[len(ids) - (budget - keep_bos):], True


# ---------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SamplingSetting:
    """One way of sampling: token-level (temperature and filters) or a global temperature."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    global_temp: float | None = None  # set: sample pi^(1/T) over whole sequences instead
    method: str = "auto"  # global-temperature sampler: auto, smc or resample
    num_candidates: int | None = None  # global-temperature candidates/particles per prompt

    @property
    def label(self) -> str:
        """Short name for tables and plots, e.g. "t=1.2 top_p=0.9" or "T_global=2 (smc)"."""
        if self.global_temp is not None:
            # "auto" named as what it resolves to.
            method = self.method if self.method != "auto" else choose_method(self.global_temp)
            return f"T_global={self.global_temp:g} ({method})"
        parts = [f"t={self.temperature:g}"]
        parts += [f"{k}={v:g}" for k, v in (("top_k", self.top_k), ("top_p", self.top_p),
                                             ("min_p", self.min_p)) if v is not None]
        return " ".join(parts)


@dataclass
class Samples:
    """Responses per prompt: ``tokens[i][j]`` is prompt i's j-th response (ids, eos included)."""

    tokens: list[list[list[int]]]
    finished: list[list[bool]]  # ended with eos (False: cut at max_new_tokens)
    ess: list[float] = field(default_factory=list)  # per prompt, global-temperature samplers only
    # Per prompt, global temperature only: GlobalSampleOutput.diagnostics (ESS, distinct samples,
    # lineages, resampling steps ...), to be reported next to every number computed from them.
    sampler: list[dict] = field(default_factory=list)

    def sampler_summary(self) -> dict:
        """The diagnostics averaged over prompts (lowest where lowest is what matters); {} if none."""
        if not self.sampler:
            return {}
        col = lambda key: [d[key] for d in self.sampler]
        first = self.sampler[0]
        return {"sampler_method": first["method"], "sampler_candidates": first["num_candidates"],
                "sampler_mean_ess": float(np.mean(col("ess"))), "sampler_min_ess": float(np.min(col("ess"))),
                "sampler_min_step_ess": float(np.min(col("min_step_ess"))),
                "sampler_mean_resamples": float(np.mean(col("resamples"))),
                "sampler_mean_distinct_samples": float(np.mean(col("distinct_samples"))),
                "sampler_mean_distinct_lineages": float(np.mean(col("distinct_lineages"))),
                "sampler_min_distinct_lineages": int(np.min(col("distinct_lineages")))}


def _batched(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def sample_responses(em: EvalModel, prompts: Sequence[list[int]], setting: SamplingSetting, *,
                     num_samples: int, max_new_tokens: int, batch_size: int,
                     generator: torch.Generator, desc: str = "sampling", stop: Sequence[str] = ()
                     ) -> Samples:
    """``num_samples`` responses to each prompt (ids), at most ``batch_size`` rows decoded at once.

    A group holds ``batch_size // rows`` prompts (at least one), rows being a prompt's samples, or
    its candidates under a global temperature; a prompt with more rows is split by the sampler
    (``max_rows``). A response ends at the first of ``stop`` (it stays in the text: callers cut
    it). One generator runs through all groups: same seed, same samples.
    """
    glob = setting.global_temp is not None
    rows = (setting.num_candidates or default_num_candidates(num_samples, setting.global_temp)) if glob \
        else num_samples
    per_call = max(1, batch_size // rows)
    out = Samples([], [])
    eos = em.tokenizer.eos_id
    common = dict(max_new_tokens=max_new_tokens, num_samples=num_samples, eos_id=eos, generator=generator,
                  max_rows=batch_size, stop=StopStrings(em.tokenizer, stop) if stop else None)
    bar = tqdm(total=len(prompts), desc=desc, unit="prompt", leave=False)
    for group in _batched(list(prompts), per_call):
        if glob:
            # The global samplers draw num_candidates per prompt and keep num_samples of them.
            result = sample_global_temperature(em.model, list(group), setting.global_temp,
                                               method=setting.method, num_candidates=setting.num_candidates,
                                               **common)
            out.ess += result.ess.tolist()
            out.sampler += [result.diagnostics(i) for i in range(len(group))]
        else:
            result = generate(em.model, list(group), temperature=setting.temperature, top_k=setting.top_k,
                              top_p=setting.top_p, min_p=setting.min_p, **common)
        finished = result.finished.tolist()
        # Outputs are prompt-major: rows [i * N, (i + 1) * N) answer the group's i-th prompt.
        for i in range(len(group)):
            rows = range(i * num_samples, (i + 1) * num_samples)
            out.tokens.append([result.tokens[r] for r in rows])
            out.finished.append([finished[r] for r in rows])
        bar.update(len(group))
    bar.close()
    return out


def response_text(tokenizer: Tokenizer, ids: list[int],
                  stops: Sequence[str] = ()) -> tuple[str, list[int], bool]:
    """A response's text cut at the first stop string, its ids, and whether it was cut.

    A cut response is re-encoded from its text (no eos: it did not end there on its own), so the
    scores of reward and reference models see what the text metrics see.
    """
    text = tokenizer.decode(ids)
    kept = truncate_at_stop(text, stops)
    if len(kept) == len(text):
        return text, ids, False
    return kept, tokenizer.encode(kept), True


# ---------------------------------------------------------------------------------------------
# Scoring token sequences
# ---------------------------------------------------------------------------------------------


def _padded_forwards(model: torch.nn.Module, seqs: Sequence[list[int]], batch_size: int, desc: str,
                     context: Callable[[], AbstractContextManager] = nullcontext
                     ) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor]]:
    """Final-normed hidden states of ``seqs`` in length-sorted, right-padded batches.

    Yields (indices into ``seqs``, ids (B, T), hidden (B, T, D)). ``context``, e.g.
    ``lambda: disable_adapters(model)`` for the reference of a LoRA run, is entered around each
    forward and stays entered while the caller works on the batch (the yield is inside it), so
    a head applied to ``hidden`` runs under it too.
    """
    device = model.lm_head.weight.device
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    for idx in tqdm(list(_batched(order, batch_size)), desc=desc, unit="batch", leave=False):
        T = max(len(seqs[i]) for i in idx)
        # Pad id 0 is a valid row of every embedding table; padded positions are never read.
        ids = torch.tensor([seqs[i] + [0] * (T - len(seqs[i])) for i in idx], device=device)  # (B, T)
        with context():
            yield list(idx), ids, model(ids, return_hidden=True)  # (B, T, D)


@torch.inference_mode()
def sequence_logprobs(model: torch.nn.Module, prompts: Sequence[list[int]], responses: Sequence[list[int]],
                      *, batch_size: int, context: Callable[[], AbstractContextManager] = nullcontext,
                      desc: str = "log-probs") -> tuple[list[float], list[int]]:
    """log pi(response | prompt) summed over response tokens, and the number of those tokens."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    logps, counts = [0.0] * len(prompts), [len(r) for r in responses]
    seqs = [p + r for p, r in zip(prompts, responses, strict=True)]
    for idx, ids, hidden in _padded_forwards(model, seqs, batch_size, desc, context):
        # Position t predicts token t + 1: response tokens are targets at [len(p) - 1, len(p) + len(r) - 1).
        targets = torch.cat([ids[:, 1:], torch.zeros_like(ids[:, :1])], dim=1)  # (B, T)
        mask = torch.zeros(ids.shape, dtype=torch.bool, device=ids.device)  # (B, T)
        for row, i in enumerate(idx):
            mask[row, len(prompts[i]) - 1:len(seqs[i]) - 1] = True
        out = sequence_logps(hidden, model.lm_head.weight, targets, mask)  # (B,)
        for row, i in enumerate(idx):
            logps[i] = float(out[row])
    return logps, counts


@torch.inference_mode()
def reward_scores(model: torch.nn.Module, head: torch.Tensor, seqs: Sequence[list[int]], *,
                  batch_size: int, desc: str = "rewards") -> list[float]:
    """Bradley-Terry reward of each full sequence (prompt + response): head @ h[last real token].

    The same computation as ``spl.trainer.Scorer`` in reward mode, where ``last_index`` is the
    position of each row's last real token (the response's eos when it finished).
    """
    rewards = [0.0] * len(seqs)
    for idx, ids, hidden in _padded_forwards(model, seqs, batch_size, desc):
        last = torch.tensor([len(seqs[i]) - 1 for i in idx], device=ids.device)  # (B,)
        h = hidden[torch.arange(len(idx), device=ids.device), last]  # (B, D)
        # F.linear(h, head) is Scorer's nn.Linear(D, 1, bias=False); fp32 like Scorer's output.
        scores = torch.nn.functional.linear(h, head.to(h.dtype)).squeeze(-1).float()  # (B,)
        for row, i in enumerate(idx):
            rewards[i] = float(scores[row])
    return rewards


def option_token_ids(tokenizer: Tokenizer, letters: Sequence[str]) -> list[list[int]] | None:
    """The ids a model writes to answer with each letter, or None if two letters look alike.

    After "Your answer:" (or "[/INST]") the answer is written " A", which SentencePiece encodes
    as ``encode("A")`` (its dummy prefix is the space). Letters that encode to the same ids (a
    tokenizer without them maps each to unk) cannot be told apart: the caller skips the question.
    """
    ids = [tokenizer.encode(letter) for letter in letters]
    if len({tuple(i) for i in ids}) != len(ids) or any(not i for i in ids):
        return None
    return ids


@torch.inference_mode()
def option_logprobs(model: torch.nn.Module, prompts: Sequence[list[int]],
                    options: Sequence[Sequence[list[int]]], *, batch_size: int,
                    desc: str = "options") -> list[list[float]]:
    """Per prompt, log pi(option | prompt) of each option's ids (letters; App. D).

    When every option is one token this is the next-token log-softmax at the prompt's last
    position, gathered at the option ids: one forward per prompt, over V only there. Otherwise
    each option is scored as a continuation (``sequence_logprobs``), one row per option.
    """
    if len(prompts) != len(options):
        raise ValueError(f"{len(prompts)} prompts but {len(options)} option lists")
    if any(len(o) != 1 for opts in options for o in opts):
        flat_prompts = [p for p, opts in zip(prompts, options, strict=True) for _ in opts]
        flat_options = [o for opts in options for o in opts]
        logps, _ = sequence_logprobs(model, flat_prompts, flat_options, batch_size=batch_size, desc=desc)
        out, start = [], 0
        for opts in options:
            out.append(logps[start:start + len(opts)])
            start += len(opts)
        return out
    result: list[list[float]] = [[] for _ in prompts]
    for idx, ids, hidden in _padded_forwards(model, prompts, batch_size, desc):
        last = torch.tensor([len(prompts[i]) - 1 for i in idx], device=ids.device)  # (B,)
        h = hidden[torch.arange(len(idx), device=ids.device), last]  # (B, D)
        # fp32 log-softmax over the vocabulary at one position per row: (B, V) is small.
        logp = model.lm_head(h).float().log_softmax(dim=-1)  # (B, V)
        for row, i in enumerate(idx):
            result[i] = logp[row, [o[0] for o in options[i]]].tolist()
    return result
