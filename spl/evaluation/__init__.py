"""Evaluation suite for SPL (paper §4 and Appendices B-E).

Most modules here are model-independent: they turn text and numbers into metrics, reports and
figures, so every formula can be tested on CPU without a model. These drive models:

- ``options``: ``EvalConfig`` (every evaluate.py setting, checked once) and ``plan_evaluation``
  (what will be evaluated, fixed before any model is loaded).
- ``runner``: ``run_evaluation``, what ``evaluate.py`` runs.
- ``scoring``: pose prompts, sample responses, score sequences (log-probs, rewards, option letters).
- ``suites``: diversity/quality, calibration, opinions (ours) and the demo, on a loaded model.
- ``bestofn``: best-of-N math (§4.2) and the GSM8K difficulty splits.
- ``political``: Political Compass stances (App. E).

And these do not:

- ``math_answers``: GSM8K/MATH few-shot prompts (App. C.4), answer extraction and equivalence.
- ``metrics``: pass@k, redundancy, calibration (ECE, Brier), opinion (KL, TV), text diversity,
  non-word tokens.
- ``datasets``: readers for the small data shipped in ``data/``.
- ``judge``: OpenAI-compatible LLM judge with the paper's diversity prompts (App. B.1) and stances.
- ``embeddings``: all-MiniLM-L6-v2 through sentence-transformers (an evaluation extra).
- ``plots``: the figures, through matplotlib (an evaluation extra).
- ``report``: one JSON with every number, a Markdown report, JSONL samples.
"""
