"""spl/losses.py: SPL's properties, a hand-computed example, and its optimal policy (Prop. 3.2, A.1).

The theory test minimizes the exact expected SPL loss over a small outcome set in float64 (LBFGS
on the policy's logits) and compares the minimizer with pi ∝ pi_ref^(beta/alpha) p_best^(1/alpha),
including the paper's 80/20 example. Tolerances are float64-level: LBFGS drives every gradient
entry below 1e-8 (checked), and the closed form is a softmax of exact values.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from spl.losses import bradley_terry_loss, dpo_loss, sft_nll, spl_loss


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


def random_logps(B: int = 6) -> list[torch.Tensor]:
    # Sequence log-probs are negative sums over tokens: -U(1, 40) in float64.
    return [-(1 + 39 * torch.rand(B, dtype=torch.float64)) for _ in range(4)]


# ---------------------------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------------------------


def test_hand_computed_example():
    """alpha = 2, beta = 1; log pi(y_w) = -1, log pi(y_l) = -3, log pi_ref(y_w) = log pi_ref(y_l) = -2.

    r(y_w) = 2 * (-1) - 1 * (-2) = 0;  r(y_l) = 2 * (-3) - 1 * (-2) = -4;  margin = 4.
    loss = -log sigmoid(4) = log(1 + e^-4) = log(1.0183156389) = 0.0181499279.
    d loss / d log pi(y_w) = -alpha * sigmoid(-4) = -2 * 0.0179862100 = -0.0359724199.
    """
    pc = torch.tensor([-1.0], dtype=torch.float64, requires_grad=True)
    losses, metrics = spl_loss(pc, torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0]),
                               alpha=2.0, beta=1.0)
    assert losses.item() == pytest.approx(0.0181499279, abs=1e-10)
    assert metrics["rewards/chosen"].item() == 0.0
    assert metrics["rewards/rejected"].item() == -4.0
    assert metrics["rewards/margins"].item() == 4.0
    assert metrics["rewards/accuracies"].item() == 1.0
    losses.sum().backward()
    assert pc.grad.item() == pytest.approx(-0.0359724199, abs=1e-10)


@pytest.mark.parametrize("beta", [0.01, 0.1, 0.5, 2.0])
def test_spl_equals_dpo_at_alpha_equals_beta(beta):
    pc, pr, rc, rr = random_logps()
    # DPO written independently: beta times the difference of policy/reference log-ratios.
    dpo = -F.logsigmoid(beta * ((pc - rc) - (pr - rr)))
    spl, _ = spl_loss(pc, pr, rc, rr, alpha=beta, beta=beta)
    torch.testing.assert_close(spl, dpo, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dpo_loss(pc, pr, rc, rr, beta=beta)[0], dpo, rtol=1e-12, atol=1e-12)


def test_swapping_chosen_and_rejected_negates_the_margin():
    pc, pr, rc, rr = random_logps()
    losses, m = spl_loss(pc, pr, rc, rr, alpha=1.3, beta=0.1)
    swapped, ms = spl_loss(pr, pc, rr, rc, alpha=1.3, beta=0.1)
    assert ms["rewards/margins"].item() == pytest.approx(-m["rewards/margins"].item(), abs=1e-12)
    assert ms["rewards/chosen"].item() == pytest.approx(m["rewards/rejected"].item(), abs=1e-12)
    # softplus(-x) - softplus(x) = -x, pair by pair: the per-pair margins negate too.
    margins = 1.3 * (pc - pr) - 0.1 * (rc - rr)
    torch.testing.assert_close(losses - swapped, -margins, rtol=0, atol=1e-12)


def test_zero_margin_gives_log2():
    pc, pr, _, _ = random_logps()
    # pi == pi_ref with alpha == beta: every implied reward is 0.
    losses, metrics = spl_loss(pc, pr, pc, pr, alpha=0.1, beta=0.1)
    torch.testing.assert_close(losses, torch.full_like(losses, math.log(2)), rtol=0, atol=1e-15)
    assert metrics["rewards/accuracies"].item() == 0.0  # ties do not count as correct
    # Equal log-probs for chosen and rejected give margin 0 for any alpha, beta.
    same, _ = spl_loss(pc, pc, pr, pr, alpha=3.0, beta=0.2)
    torch.testing.assert_close(same, torch.full_like(same, math.log(2)), rtol=0, atol=1e-15)


def test_metrics_are_detached_means():
    pc, pr, rc, rr = random_logps()
    pc.requires_grad_(True)
    _, m = spl_loss(pc, pr, rc, rr, alpha=1.5, beta=0.1)
    assert all(v.dim() == 0 and not v.requires_grad for v in m.values())
    assert m["logps/chosen"].item() == pytest.approx(pc.mean().item())
    assert m["logps/ref_rejected"].item() == pytest.approx(rr.mean().item())


def test_low_precision_inputs_are_computed_in_fp32():
    pc, pr, rc, rr = (x.bfloat16() for x in random_logps())
    losses, _ = spl_loss(pc, pr, rc, rr, alpha=1.0, beta=0.1)
    assert losses.dtype == torch.float32


@pytest.mark.parametrize("alpha, beta", [(0.0, 0.1), (-1.0, 0.1), (1.0, -0.1), (float("nan"), 0.1)])
def test_invalid_coefficients_are_rejected(alpha, beta):
    with pytest.raises(ValueError):
        spl_loss(*random_logps(), alpha=alpha, beta=beta)


def test_bradley_terry():
    chosen = torch.tensor([2.0, -1.0, 0.5])
    rejected = torch.tensor([1.0, 0.0, 0.5])
    losses, m = bradley_terry_loss(chosen, rejected)
    expected = torch.tensor([math.log1p(math.exp(-1)), math.log1p(math.exp(1)), math.log(2)])
    torch.testing.assert_close(losses, expected)
    assert m["rewards/accuracies"].item() == pytest.approx(1 / 3)
    # It is SPL with alpha = 1, beta = 0 on the same numbers.
    torch.testing.assert_close(spl_loss(chosen, rejected, rejected, chosen, alpha=1.0, beta=0.0)[0], losses)


def test_sft_nll_is_the_token_mean():
    token_logps = -torch.rand(3, 5, dtype=torch.float64)
    mask = torch.tensor([[0, 1, 1, 1, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], dtype=torch.bool)
    seq = torch.where(mask, token_logps, 0).sum(-1)
    expected = -token_logps[mask].mean()
    torch.testing.assert_close(sft_nll(seq, mask), expected)
    torch.testing.assert_close(sft_nll(seq, mask, num_tokens=22), -token_logps[mask].sum() / 22)
    assert sft_nll(seq * 0, mask * False).item() == 0.0


# ---------------------------------------------------------------------------------------------
# Theory: the minimizer of the expected loss (Prop. 3.1, 3.2, A.1)
# ---------------------------------------------------------------------------------------------


def expected_spl_loss(logits: torch.Tensor, log_ref: torch.Tensor, rewards: torch.Tensor,
                      pair_weights: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """Exact E[loss] when pair {i, j} is drawn with ``pair_weights`` and i wins w.p. sigmoid(r_i - r_j).

    Bradley-Terry pairwise preferences from Plackett-Luce rewards r; p_best = softmax(r).
    """
    log_pi = torch.log_softmax(logits, dim=0)  # (K,)
    i, j = torch.triu_indices(len(rewards), len(rewards), offset=1)  # (P,), (P,)
    p_i_wins = torch.sigmoid(rewards[i] - rewards[j])  # (P,)
    i_wins, _ = spl_loss(log_pi[i], log_pi[j], log_ref[i], log_ref[j], alpha, beta)  # (P,)
    j_wins, _ = spl_loss(log_pi[j], log_pi[i], log_ref[j], log_ref[i], alpha, beta)  # (P,)
    return (pair_weights * (p_i_wins * i_wins + (1 - p_i_wins) * j_wins)).sum()


def minimize_expected_loss(log_ref, rewards, pair_weights, alpha, beta) -> torch.Tensor:
    logits = torch.zeros(len(rewards), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([logits], lr=1, max_iter=1000, tolerance_grad=1e-12, tolerance_change=0,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = expected_spl_loss(logits, log_ref, rewards, pair_weights, alpha, beta)
        loss.backward()
        return loss

    opt.step(closure)
    assert logits.grad.abs().max() < 1e-8  # first-order optimal to float64 noise
    return torch.softmax(logits.detach(), dim=0)


def closed_form(log_ref: torch.Tensor, rewards: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """pi ∝ pi_ref^(beta/alpha) p_best^(1/alpha)  (Prop. A.1; Prop. 3.2 for two outcomes)."""
    log_p_best = torch.log_softmax(rewards, dim=0)
    return torch.softmax((beta * log_ref + log_p_best) / alpha, dim=0)


@pytest.mark.parametrize("alpha, beta",
                         [(0.1, 0.1), (0.5, 0.1), (1.0, 0.1), (1.0, 1.0), (2.0, 0.5), (0.3, 0.0)])
@pytest.mark.parametrize("K", [2, 3, 5])
def test_minimizer_matches_closed_form(alpha, beta, K):
    log_ref = torch.log_softmax(torch.randn(K, dtype=torch.float64), dim=0)
    rewards = torch.randn(K, dtype=torch.float64)
    # Any pair distribution with full support has the same minimizer; use a random one.
    pair_weights = torch.rand(K * (K - 1) // 2, dtype=torch.float64) + 0.1
    pi = minimize_expected_loss(log_ref, rewards, pair_weights / pair_weights.sum(), alpha, beta)
    torch.testing.assert_close(pi, closed_form(log_ref, rewards, alpha, beta), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("alpha, expected", [(0.1, 0.99999905), (1.0, 0.8)])
def test_paper_80_20_example(alpha, expected):
    """80% of raters prefer y to y', uniform reference, beta = 0.1 (Section 3.1).

    DPO (alpha = beta = 0.1): pi(y) = 0.8^10 / (0.8^10 + 0.2^10) = 4^10 / (4^10 + 1) = 0.99999904633,
    which the paper rounds to 0.99999905 ("99.9999%"). SPL with alpha = 1 gives 0.8: proportional.
    """
    log_ref = torch.log(torch.tensor([0.5, 0.5], dtype=torch.float64))
    rewards = torch.log(torch.tensor([0.8, 0.2], dtype=torch.float64))  # P(y > y') = 0.8
    pi = minimize_expected_loss(log_ref, rewards, torch.ones(1, dtype=torch.float64), alpha, beta=0.1)
    assert pi[0].item() == pytest.approx(expected, abs=5e-9)  # the paper's 8 decimals
    torch.testing.assert_close(pi, closed_form(log_ref, rewards, alpha, 0.1), rtol=1e-10, atol=1e-12)
