"""The SPL optimum reached through the real training path (model -> LoRA -> log-probs -> loss).

A tiny Mistral answers one prompt with one token out of four. The exact expected SPL loss over all
ordered pairs, weighted by the population's Bradley-Terry preferences, is minimized through
``Transformer`` hidden states, ``sequence_logps`` (chunked path) and ``spl_loss``, with the reference
taken from the same weights with adapters disabled. The learned answer distribution must match
Prop. A.1: pi ∝ ref^(beta/alpha) * p_best^(1/alpha) (renormalized over the four answers, the only
tokens the loss sees).
"""

import pytest
import torch

from spl.config import ModelConfig
from spl.logprobs import sequence_logps
from spl.lora import apply_lora, disable_adapters
from spl.losses import spl_loss
from spl.model import Transformer

POPULATION = torch.tensor([0.5, 0.25, 0.15, 0.10], dtype=torch.float64)  # p_best of answers 0..3
ANSWERS = torch.tensor([5, 6, 7, 8])  # token ids of the four one-token answers
PROMPT = [1, 9, 10, 11]


def answer_logps(model: Transformer) -> torch.Tensor:
    """(4,) log pi(answer | prompt) through the real path: hidden states + sequence_logps."""
    ids = torch.tensor([PROMPT + [a] for a in ANSWERS.tolist()])  # (4, T)
    targets = torch.cat([ids[:, 1:], torch.zeros(4, 1, dtype=torch.long)], dim=1)  # (4, T)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[:, len(PROMPT) - 1] = True  # only the answer token is scored
    h = model(ids, return_hidden=True)  # (4, T, D)
    return sequence_logps(h, model.lm_head.weight, targets, mask, impl="chunked")


@pytest.mark.parametrize("alpha,beta", [(1.0, 0.1), (0.5, 0.25), (0.3, 0.3)])
def test_lora_training_reaches_spl_optimum(alpha, beta):
    cfg = ModelConfig(dim=32, n_layers=2, head_dim=8, hidden_dim=64, n_heads=4, n_kv_heads=2,
                      vocab_size=16, rope_theta=1e4, max_seq_len=16)
    torch.manual_seed(0)
    model = Transformer(cfg)
    with torch.no_grad():  # a non-uniform reference over the answers makes ref^(beta/alpha) matter
        model.lm_head.weight[ANSWERS] += torch.randn(4, cfg.dim) * 0.5
    apply_lora(model, rank=4, alpha=8, dropout=0.0)
    with torch.no_grad(), disable_adapters(model):
        ref = answer_logps(model)  # (4,)
    # Every ordered pair (i, j), i preferred with Bradley-Terry probability p_i / (p_i + p_j).
    i, j = torch.triu_indices(4, 4, offset=1)
    i, j = torch.cat([i, j]), torch.cat([j, i])  # (12,) both orders
    weight = (POPULATION[i] / (POPULATION[i] + POPULATION[j])).float()  # (12,)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    for _ in range(150):
        logps = answer_logps(model)
        losses, _ = spl_loss(logps[i], logps[j], ref[i], ref[j], alpha=alpha, beta=beta)
        loss = (weight * losses).sum() / weight.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        learned = torch.softmax(answer_logps(model).double(), dim=0)
    ref_dist = torch.softmax(ref.double(), dim=0)
    theory = torch.softmax((beta / alpha) * ref_dist.log() + POPULATION.log() / alpha, dim=0)
    tv = 0.5 * (learned - theory).abs().sum().item()
    print(f"alpha={alpha} beta={beta}: TV(learned, theory) = {tv:.4f}")
    assert tv <= 0.02, (learned.tolist(), theory.tolist())
    # The target is not the reference: training had to move the policy to get there.
    assert 0.5 * (ref_dist - theory).abs().sum().item() > 0.1
