"""spl/losses.py: SPL's properties, a hand-computed example, and its optimal policy (Prop. 3.2, A.1);
f-DPO (App. B's baseline) against Wang et al.'s table, its optimality condition, and TRL.

The theory test minimizes the exact expected SPL loss over a small outcome set in float64 (LBFGS
on the policy's logits) and compares the minimizer with pi ∝ pi_ref^(beta/alpha) p_best^(1/alpha),
including the paper's 80/20 example. Tolerances are float64-level: LBFGS drives every gradient
entry below 1e-8 (checked), and the closed form is a softmax of exact values. f-DPO's per-pair
losses and gradients must equal TRL's DPOTrainer (a test-only dependency) on the same log-probs, to
a bound on TRL's own fp32 rounding derived in ``trl_fp32_tolerance``.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F

from spl.config import DIVERGENCES as config_divergences
from spl.config import ConfigError, load_config
from spl.losses import (
    DIVERGENCES,
    bradley_terry_loss,
    dpo_loss,
    f_dpo_loss,
    f_prime,
    preference_loss,
    sft_nll,
    spl_loss,
)


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


def expected_loss(logits: torch.Tensor, log_ref: torch.Tensor, rewards: torch.Tensor,
                  pair_weights: torch.Tensor, loss_fn) -> torch.Tensor:
    """Exact E[loss] when pair {i, j} is drawn with ``pair_weights`` and i wins w.p. sigmoid(r_i - r_j).

    Bradley-Terry pairwise preferences from Plackett-Luce rewards r; p_best = softmax(r).
    ``loss_fn(pc, pr, rc, rr)`` is a per-pair preference loss (SPL, f-DPO).
    """
    log_pi = torch.log_softmax(logits, dim=0)  # (K,)
    i, j = torch.triu_indices(len(rewards), len(rewards), offset=1)  # (P,), (P,)
    p_i_wins = torch.sigmoid(rewards[i] - rewards[j])  # (P,)
    i_wins, _ = loss_fn(log_pi[i], log_pi[j], log_ref[i], log_ref[j])  # (P,)
    j_wins, _ = loss_fn(log_pi[j], log_pi[i], log_ref[j], log_ref[i])  # (P,)
    return (pair_weights * (p_i_wins * i_wins + (1 - p_i_wins) * j_wins)).sum()


def minimize_expected_loss(log_ref, rewards, pair_weights, alpha=None, beta=None,
                           loss_fn=None) -> torch.Tensor:
    """The policy minimizing the expected loss: SPL(alpha, beta) unless ``loss_fn`` is given."""
    loss_fn = loss_fn or functools.partial(spl_loss, alpha=alpha, beta=beta)
    logits = torch.zeros(len(rewards), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([logits], lr=1, max_iter=1000, tolerance_grad=1e-12, tolerance_change=0,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = expected_loss(logits, log_ref, rewards, pair_weights, loss_fn)
        loss.backward()
        return loss

    opt.step(closure)
    # LBFGS's line search compares loss values, which float64 resolves only to ~1e-16, so it stalls
    # with gradients near sqrt(1e-16) = 1e-8. Newton steps use the gradient and Hessian themselves
    # and converge quadratically from there. The loss is invariant to adding a constant to every
    # logit, so the Hessian is singular along ones: pinv takes the minimum-norm step.
    x = logits.detach()
    objective = lambda z: expected_loss(z, log_ref, rewards, pair_weights, loss_fn)
    for _ in range(5):
        grad = torch.autograd.functional.jacobian(objective, x)
        x = x - torch.linalg.pinv(torch.autograd.functional.hessian(objective, x), hermitian=True) @ grad
    grad = torch.autograd.functional.jacobian(objective, x)
    assert grad.abs().max() < 1e-13  # first-order optimal to float64 noise
    return torch.softmax(x, dim=0)


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


# ---------------------------------------------------------------------------------------------
# f-DPO (Wang et al. 2023; the paper's App. B baseline)
# ---------------------------------------------------------------------------------------------

PAPER_ALPHAS = [0.0, 0.001, 0.1, 0.3, 0.5, 0.9, 1.0]  # App. B: reverse KL (0) ... forward KL (1)
EPS32 = torch.finfo(torch.float32).eps


def wang_f_prime(x: float, divergence: str, a: float = 0.5) -> float:
    """f'(u) at u = e^x written from Wang et al. (2023), Table 1, in Python floats."""
    u = math.exp(x)
    if divergence == "reverse_kl" or (divergence == "alpha_divergence" and a == 0):
        return math.log(u)  # f(u) = u log u, up to the constant 1 that cancels in the margin
    if divergence == "forward_kl":
        return 1 - 1 / u  # f(u) = -log u, shifted by 1
    if divergence == "js_divergence":
        return math.log(2 * u / (1 + u))
    return (1 - u ** -a) / a  # f(u) = (u^(1-a) - (1-a) u - a) / (a (a - 1))


DIVERGENCE_CASES = [("reverse_kl", 0.5), ("forward_kl", 0.5), ("js_divergence", 0.5),
                    *[("alpha_divergence", a) for a in PAPER_ALPHAS]]


@pytest.mark.parametrize("divergence, a", DIVERGENCE_CASES)
def test_f_prime_matches_wang_table(divergence, a):
    x = torch.linspace(-20, 20, 81, dtype=torch.float64)
    expected = torch.tensor([wang_f_prime(v, divergence, a) for v in x.tolist()], dtype=torch.float64)
    # float64 throughout; (1 - u^-a) / a cancels to ~1e-16 / a absolute in the closed form itself.
    torch.testing.assert_close(f_prime(x, divergence, a), expected, rtol=1e-12, atol=1e-12 / max(a, 1e-3))


def test_alpha_divergence_endpoints_are_the_kls():
    pc, pr, rc, rr = random_logps()
    dpo, _ = spl_loss(pc, pr, rc, rr, alpha=0.1, beta=0.1)
    # Equal up to the order of float64 roundings: beta (x_w - x_l) against alpha pc - beta rc - ...
    exact = dict(rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(f_dpo_loss(pc, pr, rc, rr, 0.1, "alpha_divergence", 0.0)[0], dpo, **exact)
    torch.testing.assert_close(f_dpo_loss(pc, pr, rc, rr, 0.1, "reverse_kl")[0], dpo, **exact)
    torch.testing.assert_close(f_dpo_loss(pc, pr, rc, rr, 0.1, "alpha_divergence", 1.0)[0],
                               f_dpo_loss(pc, pr, rc, rr, 0.1, "forward_kl")[0], rtol=0, atol=0)
    # Continuity at a -> 0: -expm1(-a x) / a = x - a x^2 / 2 + O(a^2 x^3).
    x = torch.linspace(-5, 5, 11, dtype=torch.float64)
    torch.testing.assert_close(f_prime(x, "alpha_divergence", 1e-9), x, rtol=0, atol=1e-7)


def test_f_dpo_hand_computed_example():
    """a = 0.5, beta = 0.1; log-ratios x_w = 0 (pi == pi_ref), x_l = 2 ln 2 (pi = 4 pi_ref).

    f'(u) = (1 - u^-0.5) / 0.5: f'(1) = 0, f'(4) = (1 - 1/2) / 0.5 = 1;  margin = 0.1 (0 - 1) = -0.1.
    loss = log(1 + e^0.1) = 0.7443966600735709.  TRL's rewards: 0.1 x = 0 and 0.1 * 2 ln 2.
    """
    values = (-3.0, -5.0 + 2 * math.log(2), -3.0, -5.0)
    pc, pr, rc, rr = (torch.tensor([v], dtype=torch.float64) for v in values)
    loss, m = f_dpo_loss(pc, pr, rc, rr, beta=0.1, divergence_alpha=0.5)
    assert loss.item() == pytest.approx(0.7443966600735709, abs=1e-14)
    assert m["rewards/margins"].item() == pytest.approx(-0.2 * math.log(2), abs=1e-14)
    assert m["rewards/accuracies"].item() == 0.0


def test_f_dpo_caps_the_exponent_instead_of_overflowing():
    """A policy 1000 nats below its reference on both sides: e^(a * 1000) is inf in any float; capped at
    e^80 both sides' f' are equal, so the loss is log 2 with no gradient, not inf - inf = NaN."""
    pc = torch.tensor([-1010.0], requires_grad=True)
    loss, _ = f_dpo_loss(pc, torch.tensor([-1020.0]), torch.tensor([-10.0]), torch.tensor([-20.0]), beta=0.1)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    loss.sum().backward()
    assert pc.grad.item() == 0.0


def test_preference_loss_dispatch_and_validation():
    pc, pr, rc, rr = random_logps()
    spl, _ = spl_loss(pc, pr, rc, rr, alpha=1.3, beta=0.1)
    torch.testing.assert_close(preference_loss(pc, pr, rc, rr, alpha=1.3, beta=0.1)[0], spl, rtol=0, atol=0)
    f, _ = f_dpo_loss(pc, pr, rc, rr, 0.1, "js_divergence")
    js, _ = preference_loss(pc, pr, rc, rr, alpha=0.1, beta=0.1, divergence="js_divergence")
    torch.testing.assert_close(js, f, rtol=0, atol=0)
    with pytest.raises(ValueError, match="set alpha == beta"):
        preference_loss(pc, pr, rc, rr, alpha=1.3, beta=0.1, divergence="alpha_divergence")
    with pytest.raises(ValueError, match="divergence must be one of"):
        f_dpo_loss(pc, pr, rc, rr, 0.1, "chi_squared")
    with pytest.raises(ValueError, match=r"divergence_alpha must lie in \[0, 1\]"):
        f_dpo_loss(pc, pr, rc, rr, 0.1, "alpha_divergence", 1.5)


@pytest.mark.parametrize("overrides, message", [
    (["train.divergence=alpha_divergence"], "set train.alpha equal to train.beta"),
    (["train.divergence=kl"], "train.divergence must be one of"),
    (["train.divergence=js_divergence", "train.alpha=0.1", "train.mode=reward"],
     "train.mode=reward has none"),
    (["train.divergence_alpha=-0.1"], r"train.divergence_alpha must lie in \[0, 1\]"),
])
def test_config_validates_the_divergence(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_config_and_losses_agree_on_the_divergences():
    assert config_divergences == DIVERGENCES
    cfg = load_config(None, ["train.divergence=alpha_divergence", "train.alpha=0.1",
                             "train.divergence_alpha=0.3"])
    assert (cfg.train.divergence, cfg.train.divergence_alpha) == ("alpha_divergence", 0.3)


@pytest.mark.parametrize("divergence, a, K", [("alpha_divergence", 0.001, 3), ("alpha_divergence", 0.5, 5),
                                              ("forward_kl", 0.5, 3), ("js_divergence", 0.5, 3)])
def test_f_dpo_minimizer_satisfies_wang_optimality(divergence, a, K):
    """Wang et al. (2023), Thm 1: the optimal policy has beta f'(pi / pi_ref) = r + const, so the
    expected f-DPO loss under Bradley-Terry preferences with rewards r is minimized there."""
    log_ref = torch.log_softmax(torch.randn(K, dtype=torch.float64), dim=0)
    rewards = torch.randn(K, dtype=torch.float64)
    pair_weights = torch.rand(K * (K - 1) // 2, dtype=torch.float64) + 0.1
    loss_fn = functools.partial(f_dpo_loss, beta=0.5, divergence=divergence, divergence_alpha=a)
    pi = minimize_expected_loss(log_ref, rewards, pair_weights / pair_weights.sum(), loss_fn=loss_fn)
    implied = 0.5 * f_prime(pi.log() - log_ref, divergence, a) - rewards  # (K,) constant at the optimum
    assert (implied - implied.mean()).abs().max() < 1e-7


# ----------------------------------------------------------------------- TRL as the oracle

@pytest.fixture(scope="module")
def trl_dpo():
    trl = pytest.importorskip("trl", reason="trl (test-only oracle) is not installed: "
                                            "pip install -r requirements-test.txt")
    from packaging.version import Version
    if Version(trl.__version__) < Version("0.29"):
        pytest.skip(f"trl {trl.__version__} writes alpha-divergence with the old coefficient; need >= 0.29")
    from trl.trainer.dpo_trainer import DPOTrainer
    return DPOTrainer


def trl_f_dpo(DPOTrainer, pc, pr, rc, rr, beta: float, divergence: str, a: float):
    """TRL's DPOTrainer._compute_loss (trl/trainer/dpo_trainer.py, 1.16.0) on given sequence log-probs.

    The stand-in model returns per-token log-probs of one completion token per sequence equal to the
    sequence log-probs; the reference log-probs go in as precomputed, as TRL's precompute does.
    Returns (mean loss, gradient of it w.r.t. [pc, pr], TRL's logged metrics).
    """
    from collections import defaultdict
    from types import SimpleNamespace

    B = pc.shape[0]
    logps = torch.cat([pc, pr]).float().requires_grad_(True)  # (2B,) chosen rows, then rejected
    token_logps = torch.stack([torch.zeros_like(logps), logps], dim=1)  # (2B, 2): prompt, completion
    zeros = torch.zeros(2 * B, 2)
    outputs = SimpleNamespace(log_probs=token_logps, entropy=zeros, mean_logits=zeros,
                              is_top1=zeros.bool())
    accelerator = SimpleNamespace(device=torch.device("cpu"), gather=lambda t: t,
                                  gather_for_metrics=lambda t: t)
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=accelerator, aux_loss_enabled=False, ld_alpha=None,
        precompute_ref_logps=True, loss_types=["sigmoid"], loss_weights=[1.0], use_weighting=False, beta=beta,
        f_divergence_type=divergence, f_alpha_divergence_coef=1 - a,  # TRL >= 0.29: coefficient 1 - a
        label_smoothing=0.0, _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0,
        _tp_size=1)
    inputs = {"input_ids": torch.zeros(2 * B, 2, dtype=torch.long), "attention_mask": torch.ones(2 * B, 2),
              "completion_mask": torch.tensor([[0, 1]] * (2 * B)),
              "ref_chosen_logps": rc.float(), "ref_rejected_logps": rr.float()}
    loss = DPOTrainer._compute_loss(trainer, lambda **_: outputs, inputs, return_outputs=False)
    loss.backward()
    return loss.detach(), logps.grad, {k: v[0] for k, v in trainer._metrics["train"].items()}


def trl_fp32_tolerance(x_w, x_l, divergence: str, a: float, beta: float, loss) -> torch.Tensor:
    """A per-pair bound on TRL's fp32 rounding (ours runs in float64, exact by comparison).

    One side's f'(x) in fp32 is off by about eps32 * (|x| + 2 / a) * max(e^t, 1), t = -a x capped at 80:
    x itself is rounded (times f'' = e^t), exp rounds, and exp - 1 cancels (absolute eps e^t, over a).
    Reverse KL and JS have f'' <= 1, so |x| + 2. The margin scales this by beta, log-sigmoid is
    1-Lipschitz, the final loss rounds by eps32 |loss|; 4x covers the handful of operations.
    """
    def side(x):
        if divergence in ("reverse_kl", "js_divergence") or a == 0:
            return x.abs() + 2
        k = 1.0 if divergence == "forward_kl" else a
        return (x.abs() + 2 / k) * (-k * x).clamp(max=80).exp().clamp(min=1)
    return 4 * EPS32 * (beta * (side(x_w) + side(x_l)) + loss.abs())


def oracle_logps(B: int = 32) -> list[torch.Tensor]:
    """fp32-representable log-probs: references in [-40, -1], log-ratios mostly N(0, 3^2) plus extremes
    up to where TRL's unclamped forward KL still fits fp32 (e^79)."""
    rc, rr = (-(1 + 39 * torch.rand(B)) for _ in range(2))
    xw, xl = 3 * torch.randn(B), 3 * torch.randn(B)
    xw[:4] = torch.tensor([-79.0, -40.0, 30.0, 0.0])
    xl[:4] = torch.tensor([20.0, -60.0, -79.0, 0.0])
    return [(rc + xw).double(), (rr + xl).double(), rc.double(), rr.double()]  # exactly the fp32 values


@pytest.mark.parametrize("divergence, a", DIVERGENCE_CASES)
@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_f_dpo_equals_trl_per_pair(trl_dpo, divergence, a, beta):
    pc, pr, rc, rr = oracle_logps()
    pc.requires_grad_(True)
    ours, metrics = f_dpo_loss(pc, pr, rc, rr, beta, divergence, a)  # float64
    ours.sum().backward()
    for i in range(len(pc)):  # TRL averages over the batch: one pair per call gives per-pair values
        pair = pc[i:i + 1].detach(), pr[i:i + 1], rc[i:i + 1], rr[i:i + 1]
        trl_loss, trl_grad, _ = trl_f_dpo(trl_dpo, *pair, beta, divergence, a)
        tol = trl_fp32_tolerance(pc[i] - rc[i], pr[i] - rr[i], divergence, a, beta, ours[i]).item()
        assert abs(trl_loss.item() - ours[i].item()) <= tol, (i, trl_loss.item(), ours[i].item(), tol)
        # d loss / d log pi(y_w) = -sigmoid(-m) beta f''(x_w): fp32 exp and sigmoid, relative error
        # eps32 (2 + |t|) plus the margin's absolute error (sigmoid's log-derivative is at most 1).
        t = abs((1.0 if divergence == "forward_kl" else a) * (pc[i] - rc[i]).item())
        rel = 4 * EPS32 * (2 + t) + tol
        assert abs(trl_grad[0].item() - pc.grad[i].item()) <= rel * abs(pc.grad[i].item()) + 1e-30, i
    # Batch metrics, as TRL logs them (fp32 means of fp32 values).
    _, _, trl_metrics = trl_f_dpo(trl_dpo, pc.detach(), pr, rc, rr, beta, divergence, a)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected"):
        assert metrics[key].item() == pytest.approx(trl_metrics[key], rel=1e-5, abs=1e-5), key


def test_f_dpo_cap_equals_trl(trl_dpo):
    """Past the cap (log-ratio -1000 at a = 0.5) TRL clamps the same exponent at 80: equal losses."""
    pc, pr, rc, rr = (torch.tensor([v], dtype=torch.float64) for v in (-1010.0, -15.0, -10.0, -20.0))
    ours, _ = f_dpo_loss(pc, pr, rc, rr, 0.1, "alpha_divergence", 0.5)
    theirs, _, _ = trl_f_dpo(trl_dpo, pc, pr, rc, rr, 0.1, "alpha_divergence", 0.5)
    assert theirs.item() == pytest.approx(ours.item(), rel=4 * EPS32)
