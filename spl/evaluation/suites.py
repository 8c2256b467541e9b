"""The evaluation suites on a loaded model, built on the primitives of ``scoring.py``.

- ``diversity_suite`` (§4.1, App. B): N responses per HH-RLHF prompt; embedding cosine distance
  (eq. 44), distinct-n, self-BLEU, fraction unique, non-word token rate; average reward under a
  Bradley-Terry reward model; per-token cross-entropy under the reference policy; LLM-judge
  diversity (App. B.1) when an endpoint is configured.
- ``calibration_suite`` (§4.3, App. D): option-letter probabilities renormalized over the options;
  accuracy, ECE, Brier and reliability bins.
- ``opinions_suite`` (ours, not the paper's): GlobalOpinionQA answer distributions against a
  population's (KL, TV), the multiple-choice form of Cor. 3.2's claim.
- ``demo_suite``: the embedded demo's answer distributions against the population and against
  SPL's optimal policy (Prop. A.1) for the run's own alpha and beta.

Best-of-N math lives in ``bestofn.py`` and the Political Compass suite (App. E) in ``political.py``.

Every suite returns plain dicts of numbers: a ``summary`` (what the report tables show) and
``details`` (per-prompt or per-question values, kept in results.json only).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from spl.evaluation import metrics
from spl.evaluation.datasets import LETTERS, MultipleChoice, OpinionQuestion
from spl.evaluation.judge import JudgeClient, judge_diversity
from spl.evaluation.scoring import (
    EvalModel,
    EvaluationError,
    Prompt,
    SamplingSetting,
    fit_prompt,
    option_logprobs,
    option_token_ids,
    response_text,
    reward_scores,
    sample_responses,
    sequence_logprobs,
)

HH_STOP = ("\n\nHuman:",)  # a plain-text model continues the dialogue with the next user turn


def _summaries(per_prompt: dict[str, list[float | None]]) -> tuple[dict[str, float], dict[str, float]]:
    """{metric: per-prompt values} -> ({metric: mean}, {metric: standard error of the mean}).

    Two rows rather than one with twice the columns, so the report's tables stay readable.
    """
    stats = {name: metrics.summarize(values) for name, values in per_prompt.items()}
    return {k: s["mean"] for k, s in stats.items()}, {k: s["stderr"] for k, s in stats.items()}


# ---------------------------------------------------------------------------------------------
# Diversity and quality (§4.1)
# ---------------------------------------------------------------------------------------------


@dataclass
class Scorers:
    """What scores a policy's responses beyond the text metrics; any part may be missing."""

    reward: EvalModel | None = None  # a reward-mode run (its reward_head is set)
    reference: EvalModel | None = None  # a separately loaded reference policy
    embedder: object | None = None  # a sentence embedder with .encode(texts) and .name
    judge: JudgeClient | None = None
    words: frozenset[str] | None = None  # the English word list of the non-word token rate


def reference_for(policy: EvalModel, scorers: Scorers
                  ) -> tuple[EvalModel, Callable[[], AbstractContextManager], str]:
    """The reference policy for the cross-entropy metric, how to enter it, and its description.

    ``--reference`` if given; else the same weights with LoRA adapters disabled (the SPL/DPO
    reference of a LoRA run); else the policy itself (then the "cross-entropy" is the policy's
    own per-token entropy estimate, which the report says).
    """
    if scorers.reference is not None:
        return scorers.reference, nullcontext, f"separate model {scorers.reference.path}"
    if policy.has_adapter:
        from spl.lora import disable_adapters
        return policy, lambda: disable_adapters(policy.model), "the policy with its LoRA adapters disabled"
    return policy, nullcontext, "the policy itself (no adapter and no --reference given)"


def _pair_for(target: EvalModel, same: bool, prompt: Prompt, prompt_ids: list[int], resp_ids: list[int],
              text: str, finished: bool) -> tuple[list[int], list[int]]:
    """(prompt, response) ids as ``target`` reads them: the policy's ids when it encodes the same
    way (``same``), else re-encoded from the text; cut to fit its context window."""
    if not same:
        prompt_ids = target.encode_prompt(prompt)
        resp_ids = target.tokenizer.encode(text) + ([target.tokenizer.eos_id] if finished else [])
    resp_ids = resp_ids[:target.max_len - 2]
    prompt_ids, _ = fit_prompt(prompt_ids, target.max_len - len(resp_ids), target.tokenizer.bos_id)
    return prompt_ids, resp_ids


def diversity_suite(policy: EvalModel, prompts: Sequence[Prompt], setting: SamplingSetting,
                    scorers: Scorers, *, num_samples: int, max_new_tokens: int, batch_size: int,
                    seed: int) -> dict:
    """Diversity and quality of ``num_samples`` responses to each prompt under one sampling setting."""
    tok = policy.tokenizer
    budget = policy.max_len - max_new_tokens  # prompt tokens that leave room for a full response
    encoded = [fit_prompt(policy.encode_prompt(p), budget, tok.bos_id) for p in prompts]
    prompt_ids = [ids for ids, _ in encoded]
    generator = torch.Generator(device=policy.device).manual_seed(seed)
    # Responses end where a plain-text model starts the next "Human:" turn; text and ids are cut there.
    stops = () if policy.chat else HH_STOP
    samples = sample_responses(policy, prompt_ids, setting, num_samples=num_samples,
                               max_new_tokens=max_new_tokens, batch_size=batch_size, generator=generator,
                               desc=f"diversity {policy.name} {setting.label}", stop=stops)
    texts, resp_ids, finished = [], [], []
    for toks, fins in zip(samples.tokens, samples.finished, strict=True):
        cut = [response_text(tok, t, stops) for t in toks]
        texts.append([c[0] for c in cut])
        resp_ids.append([c[1] for c in cut])
        finished.append([f and not c[2] for f, c in zip(fins, cut, strict=True)])
    n = num_samples
    flat = [(i, j) for i in range(len(prompts)) for j in range(n)]
    per_prompt: dict[str, list[float | None]] = {
        "distinct_1": [metrics.distinct_n(t, 1) for t in texts],
        "distinct_2": [metrics.distinct_n(t, 2) for t in texts],
        "self_bleu": [metrics.self_bleu(t) for t in texts],
        "fraction_unique": [metrics.fraction_unique(t) for t in texts],
        "response_tokens": [float(np.mean([len(r) for r in rs])) for rs in resp_ids],
    }
    if scorers.words is not None:  # an evaluation extra; the runner notes when it is missing
        per_prompt["non_word_token_rate"] = [metrics.non_word_token_rate(t, scorers.words) for t in texts]
    # Embedding cosine distance (eq. 44) with a sentence encoder (an extra; else skipped, not faked).
    if scorers.embedder is not None:
        emb = scorers.embedder.encode([texts[i][j] for i, j in flat]).reshape(len(prompts), n, -1)
        per_prompt["embedding_cosine_distance"] = [metrics.mean_pairwise_cosine_distance(e) for e in emb]
    # Average reward (§4.1's second quality metric).
    if scorers.reward is not None:
        same = scorers.reward.same_encoding(policy)
        pairs = [_pair_for(scorers.reward, same, prompts[i], prompt_ids[i], resp_ids[i][j], texts[i][j],
                           finished[i][j]) for i, j in flat]
        rewards = np.array(reward_scores(scorers.reward.model, scorers.reward.reward_head,
                                         [p + r for p, r in pairs], batch_size=batch_size)).reshape(-1, n)
        per_prompt["reward"] = rewards.mean(axis=1).tolist()
    # Per-token cross-entropy under the reference: -(sum of log pi_ref) / (number of tokens), per prompt.
    ref, ref_context, ref_name = reference_for(policy, scorers)
    same = ref is policy or ref.same_encoding(policy)
    pairs = [_pair_for(ref, same, prompts[i], prompt_ids[i], resp_ids[i][j], texts[i][j], finished[i][j])
             for i, j in flat]
    logps, counts = sequence_logprobs(ref.model, [p for p, _ in pairs], [r for _, r in pairs],
                                      batch_size=batch_size, context=ref_context, desc="reference log-probs")
    logps, counts = np.array(logps).reshape(-1, n), np.array(counts).reshape(-1, n)
    per_prompt["reference_cross_entropy"] = [-lp.sum() / c.sum() if c.sum() else None
                                             for lp, c in zip(logps, counts, strict=True)]
    # LLM-judge diversity (App. B.1), pools of 4 (2 for logical agreement).
    if scorers.judge is not None:
        judged: dict[str, list[float | None]] = {}
        pools = list(zip(prompts, texts, strict=True))
        for p, t in tqdm(pools, desc="LLM judge", unit="prompt", leave=False):
            for name, r in judge_diversity(scorers.judge, p.text, t).items():
                judged.setdefault(f"judge_{name}", []).append(r["mean"])
        per_prompt.update(judged)
    means, stderr = _summaries(per_prompt)
    summary = {"prompts": len(prompts), "samples_per_prompt": n,
               "prompts_truncated": sum(cut for _, cut in encoded), **means}
    summary.update(samples.sampler_summary())  # how the global-temperature samples were drawn
    records = [{"prompt_id": prompts[i].id, "sample": j, "response": texts[i][j], "finished": finished[i][j]}
               for i, j in flat]
    details = {"prompt_ids": [p.id for p in prompts], **per_prompt}
    if samples.sampler:
        details["sampler"] = samples.sampler  # each prompt's global-temperature diagnostics
    return {"summary": summary, "stderr": stderr, "details": details, "reference": ref_name,
            "samples": records}


# ---------------------------------------------------------------------------------------------
# Multiple choice: calibration (§4.3) and opinions (ours)
# ---------------------------------------------------------------------------------------------


@dataclass
class OptionScores:
    """Renormalized option probabilities of the questions that could be scored."""

    kept: list[int]  # indices of the scored questions
    probs: list[list[float]]  # one row per kept question
    truncated: int  # prompts cut on the left to fit the context window
    skipped: int  # questions whose option letters the tokenizer cannot tell apart


def option_probabilities(policy: EvalModel, prompts: Sequence[Prompt], letters: Sequence[Sequence[str]], *,
                         batch_size: int, desc: str) -> OptionScores:
    """Option-letter log-probs after each prompt, renormalized over the options (App. D)."""
    tok = policy.tokenizer
    options = [option_token_ids(tok, ls) for ls in letters]
    kept = [i for i, o in enumerate(options) if o is not None]
    if not kept:
        raise EvaluationError(f"tokenizer {tok.path} gives no question's option letters distinct ids "
                              f"(e.g. {letters[0]} -> {[tok.encode(x) for x in letters[0]]})")
    encoded = [fit_prompt(policy.encode_prompt(prompts[i]), policy.max_len - max(map(len, options[i])),
                          tok.bos_id) for i in kept]
    logps = option_logprobs(policy.model, [ids for ids, _ in encoded], [options[i] for i in kept],
                            batch_size=batch_size, desc=desc)
    return OptionScores(kept, [metrics.softmax_over_options(lp) for lp in logps],
                        sum(cut for _, cut in encoded), len(prompts) - len(kept))


def calibration_suite(policy: EvalModel, dataset: str, questions: Sequence[MultipleChoice], *,
                      batch_size: int, n_bins: int) -> dict:
    """App. D: accuracy, ECE over ``n_bins`` equal-width bins, multi-class Brier, reliability bins."""
    prompts = [Prompt.user(q.id, q.prompt()) for q in questions]
    scores = option_probabilities(policy, prompts, [q.letters for q in questions], batch_size=batch_size,
                                  desc=f"{dataset} {policy.name}")
    questions = [questions[i] for i in scores.kept]
    correct = [q.correct_index for q in questions]
    result = metrics.calibration_metrics(scores.probs, correct, n_bins)
    reliability = result.pop("reliability")
    result.pop("brier_form")  # one sentence for the whole report (the runner's notes), not a column
    summary = {**result, "prompts_truncated": scores.truncated, "questions_skipped": scores.skipped}
    details = {"question_ids": [q.id for q in questions], "correct_index": correct,
               "predicted_index": [int(np.argmax(p)) for p in scores.probs],
               "probabilities": [[round(x, 6) for x in p] for p in scores.probs]}
    return {"summary": summary, "reliability": reliability, "details": details}


def opinions_suite(policy: EvalModel, questions: Sequence[OpinionQuestion], *, population: str,
                   batch_size: int) -> dict:
    """The model's renormalized answer-letter distribution against the population's, per question.

    Our suite, not one of the paper's: GlobalOpinionQA (Durmus et al. 2023) asks whether the
    model's answer distribution matches a population's, the multiple-choice reading of Cor. 3.2.
    KL(population || model) (nats, model floored at 1e-6) and total variation, averaged over
    questions, beside a uniform-answer baseline and the rate at which the model's top answer is
    the population's. Every question must carry ``population`` (the runner selects them).
    """
    prompts = [Prompt.user(q.id, q.prompt()) for q in questions]
    scores = option_probabilities(policy, prompts, [list(LETTERS[:len(q.options)]) for q in questions],
                                  batch_size=batch_size, desc=f"opinions {policy.name}")
    questions = [questions[i] for i in scores.kept]
    pops, probs = [q.distributions[population] for q in questions], scores.probs
    uniform = [[1.0 / len(p)] * len(p) for p in pops]
    pairs = list(zip(pops, probs, strict=True))
    per_question = {
        "kl": [metrics.kl_divergence(p, m) for p, m in pairs],
        "tv": [metrics.total_variation(p, m) for p, m in pairs],
        "uniform_kl": [metrics.kl_divergence(p, u) for p, u in zip(pops, uniform, strict=True)],
        "uniform_tv": [metrics.total_variation(p, u) for p, u in zip(pops, uniform, strict=True)],
        "top_answer_agrees": [float(np.argmax(p) == np.argmax(m)) for p, m in pairs],
    }
    means, stderr = _summaries(per_question)
    summary = {"questions": len(questions), "questions_skipped": scores.skipped, "population": population,
               "prompts_truncated": scores.truncated, **means}
    details = {"question_ids": [q.id for q in questions], **per_question,
               "model": [[round(x, 6) for x in m] for m in probs]}
    return {"summary": summary, "stderr": stderr, "details": details}


# ---------------------------------------------------------------------------------------------
# The embedded demo (§3, Prop. A.1)
# ---------------------------------------------------------------------------------------------


def demo_suite(policy: EvalModel) -> dict:
    """The demo questions' answer distributions: trained model, reference, population, theory.

    The questions are the run's own (its questions.jsonl), else the default demo's. The trained
    distribution is the model's option-letter probabilities renormalized over the options
    (``spl.demo_answers.answer_distributions``); the reference is the same weights with
    adapters disabled. SPL's optimum ``ref^(beta/alpha) * p^(1/alpha)`` uses alpha and beta from
    the run's config.yaml, and is left out when the checkpoint has none.
    """
    from spl.demo_answers import answer_distributions, demo_questions, run_questions, theory

    train = (policy.config or {}).get("train", {})
    alpha, beta = train.get("alpha"), train.get("beta")
    has_theory = train.get("mode") == "spl" and alpha is not None and beta is not None
    questions = run_questions(policy.source or policy.path) or demo_questions()  # what the run trained on
    trained = answer_distributions(policy.model, policy.tokenizer, questions)
    reference = answer_distributions(policy.model, policy.tokenizer, questions, adapters=False)
    rows, per_question = [], {"kl_population_trained": [], "tv_population_trained": [],
                              "kl_population_reference": [], "tv_population_reference": []}
    if has_theory:
        per_question.update({"tv_spl_theory_trained": [], "kl_spl_theory_trained": []})
    for q, got, ref in zip(questions, trained, reference, strict=True):
        question, options, pop = q.text, q.options, q.population
        pop_t = torch.tensor(pop, dtype=torch.float64)
        per_question["kl_population_trained"].append(metrics.kl_divergence(pop, got.tolist()))
        per_question["tv_population_trained"].append(metrics.total_variation(pop, got.tolist()))
        per_question["kl_population_reference"].append(metrics.kl_divergence(pop, ref.tolist()))
        per_question["tv_population_reference"].append(metrics.total_variation(pop, ref.tolist()))
        spl = dpo = None
        if has_theory:
            spl, dpo = theory(ref, pop_t, alpha, beta), theory(ref, pop_t, beta, beta)
            per_question["tv_spl_theory_trained"].append(metrics.total_variation(spl.tolist(), got.tolist()))
            per_question["kl_spl_theory_trained"].append(metrics.kl_divergence(spl.tolist(), got.tolist()))
        for k, option in enumerate(options):
            row = {"question": question, "option": option, "population": pop[k], "reference": float(ref[k])}
            if has_theory:
                row.update({"spl_theory": float(spl[k]), "dpo_theory": float(dpo[k])})
            rows.append({**row, "trained": float(got[k])})
    summary = {"alpha": alpha, "beta": beta, "global_temperature": alpha / beta if has_theory else math.nan,
               **{name: float(np.mean(v)) for name, v in per_question.items()}}
    return {"summary": summary, "answers": rows, "details": per_question}
