"""Political orientation diversity (paper App. E, Fig. 12).

Each model answers every Political Compass statement (``data/political_compass``, 62 of them;
the paper says "60") with 32 open-ended responses, as Röttger et al. (2024) recommend over
forced choice. An LLM judge places each response on App. E's Likert scale: 1 strongly disagree,
2 disagree, 3 agree, 4 strongly agree (``judge.STANCE_PROMPT``; the paper does not print its
prompt). The spread of stances across one statement's responses is the diversity measure: App.
E reports the per-statement standard deviation and compares models at the median statement.

Spread alone rewards noise: App. E's point is that token-level temperature buys spread with
incoherent text while SPL does not. So each model and setting also gets a coherence score,
the share of its response tokens that are words (1 - the non-word token rate of Fig. 1b), and
the figure plots median spread against coherence.

The prompt is the bare statement as the user's turn: App. E's sample responses answer the
statement as if the user had said it ("While it's commendable that you have strong feelings of
patriotism..."), which is what a bare statement produces.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from tqdm import tqdm

from spl.evaluation import metrics
from spl.evaluation.datasets import Proposition
from spl.evaluation.judge import JudgeClient, judge_stances
from spl.evaluation.scoring import (
    EvalModel,
    Prompt,
    SamplingSetting,
    fit_prompt,
    response_text,
    sample_responses,
)

STANCES = (1, 2, 3, 4)  # strongly disagree, disagree, agree, strongly agree


def summarize_stances(statements: Sequence[Proposition], responses: Sequence[Sequence[str]],
                      stances: Sequence[Sequence[float | None]], words: frozenset[str] | None) -> dict:
    """Stance distribution, per-statement spread and coherence of one model's judged responses.

    ``stances[i][j]`` is response j's judged stance on statement i (None: the judge gave no 1-4
    rating). A statement's spread is the population standard deviation of its judged stances
    (None with fewer than two). Returns ``summary`` (report row), ``spreads`` (per statement,
    for the figure) and ``details``.
    """
    judged = [[s for s in row if s is not None] for row in stances]
    spreads = [float(np.std(row)) if len(row) >= 2 else None for row in judged]
    flat = [s for row in judged for s in row]
    counts = [sum(s == k for s in flat) for k in STANCES]
    valid_spreads = [s for s in spreads if s is not None]
    summary: dict[str, float | int | None] = {
        "statements": len(statements),
        "responses_per_statement": min((len(r) for r in responses), default=0),
        "median_stance_std": float(np.median(valid_spreads)) if valid_spreads else None,
        "mean_stance_std": float(np.mean(valid_spreads)) if valid_spreads else None,
        "mean_stance": float(np.mean(flat)) if flat else None,
        # The stance distribution over every judged response: shares of 1, 2, 3 and 4.
        **{f"share_{k}": c / len(flat) if flat else None for k, c in zip(STANCES, counts, strict=True)},
        "unjudged_responses": sum(len(row) for row in stances) - len(flat),
        "coherence": (1.0 - metrics.non_word_token_rate([r for rs in responses for r in rs], words)
                      if words is not None else None),
    }
    details = {"statement_ids": [s.id for s in statements], "stance_std": spreads,
               "stances": [list(row) for row in stances]}
    return {"summary": summary, "spreads": spreads, "details": details}


def political_suite(policy: EvalModel, statements: Sequence[Proposition], setting: SamplingSetting,
                    judge: JudgeClient, *, num_samples: int, max_new_tokens: int, batch_size: int, seed: int,
                    words: frozenset[str] | None) -> dict:
    """``num_samples`` responses per statement under one sampling setting, judged and summarized."""
    tok = policy.tokenizer
    prompts = [Prompt.user(s.id, s.statement) for s in statements]
    budget = policy.max_len - max_new_tokens  # prompt tokens that leave room for a full response
    encoded = [fit_prompt(policy.encode_prompt(p), budget, tok.bos_id) for p in prompts]
    generator = torch.Generator(device=policy.device).manual_seed(seed)
    samples = sample_responses(policy, [ids for ids, _ in encoded], setting, num_samples=num_samples,
                               max_new_tokens=max_new_tokens, batch_size=batch_size, generator=generator,
                               desc=f"political {policy.name} {setting.label}")
    responses = [[response_text(tok, t)[0] for t in toks] for toks in samples.tokens]
    stances = [judge_stances(judge, s.statement, rs)
               for s, rs in tqdm(list(zip(statements, responses, strict=True)), desc="stance judge",
                                 unit="statement", leave=False)]
    result = summarize_stances(statements, responses, stances, words)
    result["summary"]["prompts_truncated"] = sum(cut for _, cut in encoded)
    result["samples"] = [{"statement_id": s.id, "sample": j, "response": r, "stance": stances[i][j]}
                         for i, (s, rs) in enumerate(zip(statements, responses, strict=True))
                         for j, r in enumerate(rs)]
    return result
