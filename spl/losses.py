"""Losses on sequence log-probs: SPL (paper eq. 5; DPO is alpha == beta), f-DPO, Bradley-Terry, SFT NLL.

SPL, per preference pair (y_w preferred to y_l), with implied reward r(y) = alpha log pi(y)
- beta log pi_ref(y):

    loss = -log sigmoid(r(y_w) - r(y_l))
         = -log sigmoid(alpha (log pi(y_w) - log pi(y_l)) - beta (log pi_ref(y_w) - log pi_ref(y_l)))

alpha weighs the policy's entropy, beta the cross-entropy to the reference (paper eq. 4). The
minimizer over a population with Plackett-Luce preferences is (Prop. 3.2, A.1)
    pi(y) ∝ pi_ref(y)^(beta / alpha) p_best(y)^(1 / alpha),
so alpha == beta is DPO (pi ∝ pi_ref p^(1/beta), Prop. 3.1), alpha = 1 reproduces the
population's preferences, and alpha / beta is a sequence-level temperature on the DPO policy
(eq. 7-10). Unlike DPO's, the SPL rewards are not zero when pi == pi_ref: r(y) =
(alpha - beta) log pi(y) there, so initial margins and accuracies need not be 0 and 1/2.

f-DPO (Wang et al. 2023, "Beyond reverse KL"; the baseline of the paper's App. B) swaps DPO's
reverse KL for another f-divergence D_f(pi || pi_ref) = E_ref[f(pi / pi_ref)]. The optimal policy
then satisfies r(y) = beta f'(u(y)) + const with u = pi / pi_ref, so with x = log u:

    loss = -log sigmoid(beta (f'(u(y_w)) - f'(u(y_l))))

    divergence          f'(u) as a function of x = log u
    reverse_kl          x                                  (DPO)
    forward_kl          1 - e^(-x)                         (alpha-divergence at alpha = 1)
    js_divergence       log 2 + log sigmoid(x)
    alpha_divergence    (1 - u^(-a)) / a = -expm1(-a x) / a,   a in [0, 1]; a -> 0 is reverse KL

a follows Wang et al. and the paper (0: reverse KL, mode-seeking; 1: forward KL, mass-covering;
App. B sweeps {0, 0.001, 0.1, 0.3, 0.5, 0.9, 1}). TRL >= 0.29 writes the same family as
f'(t) = (t^(c-1) - 1) / (c - 1), so its ``f_alpha_divergence_coef`` c is 1 - a; TRL < 0.29 used a.
SPL's decoupling of entropy and cross-entropy is a property of the KL divergence, so f-DPO has one
weight, beta: ``preference_loss`` refuses alpha != beta for any divergence but reverse KL.

All losses are per example, fp32 or wider, from (B,) sequence log-probs (``spl/logprobs.py``);
the caller reduces (mean over pairs, or a sum normalized across gradient-accumulation steps).
Metrics are detached batch means as 0-dim tensors, so logging them costs no host sync until the
trainer chooses to read them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _wide(x: torch.Tensor) -> torch.Tensor:
    # Losses in fp32 at least (bf16 logsigmoid of a margin loses the small losses entirely);
    # fp64 inputs stay fp64 so the theory tests can optimize exactly.
    return x.to(torch.promote_types(x.dtype, torch.float32))


def spl_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, alpha: float,
             beta: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-pair SPL losses (B,) and the metrics DPO trainers log (paper eq. 5)."""
    if not alpha > 0:
        raise ValueError(f"alpha (entropy weight) must be > 0, got {alpha}")
    if not beta >= 0:
        raise ValueError(f"beta (cross-entropy weight) must be >= 0, got {beta}")
    pc, pr = _wide(policy_chosen_logps), _wide(policy_rejected_logps)  # (B,), (B,)
    rc, rr = _wide(ref_chosen_logps), _wide(ref_rejected_logps)  # (B,), (B,)
    chosen_rewards = alpha * pc - beta * rc  # (B,)
    rejected_rewards = alpha * pr - beta * rr  # (B,)
    margins = chosen_rewards - rejected_rewards  # (B,)
    # -logsigmoid is softplus(-x): stable for margins of either sign, log 2 at 0.
    losses = -F.logsigmoid(margins)  # (B,)
    with torch.no_grad():
        metrics = {
            "rewards/chosen": chosen_rewards.mean(),
            "rewards/rejected": rejected_rewards.mean(),
            "rewards/accuracies": (margins > 0).float().mean(),
            "rewards/margins": margins.mean(),
            "logps/chosen": pc.mean(),
            "logps/rejected": pr.mean(),
            "logps/ref_chosen": rc.mean(),
            "logps/ref_rejected": rr.mean(),
        }
    return losses, metrics


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor,
             beta: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DPO: SPL with alpha == beta, loss -log sigmoid(beta (log-ratio margin))."""
    return spl_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                    alpha=beta, beta=beta)


DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
# e^80 ~ 5.5e34 fits fp32; the exponent -a x is capped there (as TRL does), so a policy far below
# its reference gives a finite loss, not inf - inf = NaN, with zero gradient through that side.
_MAX_EXPONENT = 80.0


def f_prime(logratios: torch.Tensor, divergence: str, divergence_alpha: float = 0.5) -> torch.Tensor:
    """f'(u) of the divergence at u = pi / pi_ref, from log-ratios x = log u (B,) (table above)."""
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {list(DIVERGENCES)}, got {divergence!r}")
    if divergence == "alpha_divergence" and not 0 <= divergence_alpha <= 1:
        raise ValueError(f"divergence_alpha must lie in [0, 1] (0: reverse KL, 1: forward KL), "
                         f"got {divergence_alpha}")
    x = _wide(logratios)  # (B,)
    if divergence == "js_divergence":
        return math.log(2) + F.logsigmoid(x)
    a = {"reverse_kl": 0.0, "forward_kl": 1.0}.get(divergence, divergence_alpha)
    if a == 0:
        return x
    # expm1, not exp - 1: at a = 0.001 the exponent is ~1e-3 x and exp - 1 would cancel to noise.
    return -torch.expm1((-a * x).clamp(max=_MAX_EXPONENT)) / a


def f_dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
               ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, beta: float,
               divergence: str = "alpha_divergence",
               divergence_alpha: float = 0.5) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-pair f-DPO losses (B,) -log sigmoid(beta (f'(u_w) - f'(u_l))), with TRL's metrics.

    The rewards logged are TRL's, beta log(pi / pi_ref) whatever the divergence, so runs share a
    dashboard with TRL's DPOTrainer; f' is increasing, so reward accuracy is the loss's too.
    """
    if not beta > 0:
        raise ValueError(f"f-DPO needs beta > 0, got {beta}")
    pc, pr = _wide(policy_chosen_logps), _wide(policy_rejected_logps)  # (B,), (B,)
    rc, rr = _wide(ref_chosen_logps), _wide(ref_rejected_logps)  # (B,), (B,)
    chosen_logratios, rejected_logratios = pc - rc, pr - rr  # (B,), (B,)
    margins = beta * (f_prime(chosen_logratios, divergence, divergence_alpha)
                      - f_prime(rejected_logratios, divergence, divergence_alpha))  # (B,)
    losses = -F.logsigmoid(margins)  # (B,)
    with torch.no_grad():
        chosen_rewards, rejected_rewards = beta * chosen_logratios, beta * rejected_logratios  # (B,), (B,)
        metrics = {
            "rewards/chosen": chosen_rewards.mean(),
            "rewards/rejected": rejected_rewards.mean(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
            "logps/chosen": pc.mean(),
            "logps/rejected": pr.mean(),
            "logps/ref_chosen": rc.mean(),
            "logps/ref_rejected": rr.mean(),
        }
    return losses, metrics


def preference_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
                    ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, *, alpha: float,
                    beta: float, divergence: str = "reverse_kl",
                    divergence_alpha: float = 0.5) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The trainer's preference loss: SPL under reverse KL (DPO at alpha == beta), else f-DPO."""
    logps = (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    if divergence == "reverse_kl":
        return spl_loss(*logps, alpha=alpha, beta=beta)
    if alpha != beta:
        raise ValueError(f"divergence {divergence!r} is f-DPO, which has one weight (beta): SPL's separate "
                         f"entropy weight exists only for reverse KL; set alpha == beta (got alpha={alpha}, "
                         f"beta={beta})")
    return f_dpo_loss(*logps, beta=beta, divergence=divergence, divergence_alpha=divergence_alpha)


def bradley_terry_loss(chosen_rewards: torch.Tensor,
                       rejected_rewards: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Reward-model loss -log sigmoid(r(y_w) - r(y_l)) per pair (B,), with accuracy and margin."""
    margins = _wide(chosen_rewards) - _wide(rejected_rewards)  # (B,)
    losses = -F.logsigmoid(margins)  # (B,)
    with torch.no_grad():
        metrics = {"rewards/accuracies": (margins > 0).float().mean(), "rewards/margins": margins.mean()}
    return losses, metrics


def sft_nll(sequence_logps: torch.Tensor, loss_mask: torch.Tensor,
            num_tokens: int | torch.Tensor | None = None) -> torch.Tensor:
    """Mean negative log-likelihood per response token: -sum(log pi) / number of tokens.

    ``sequence_logps`` (B,) from ``spl.logprobs.sequence_logps``; ``loss_mask`` (B, T) counts the
    tokens. Pass ``num_tokens`` to normalize by a count over several micro-batches or ranks (so
    the accumulated gradient is that of the whole batch's token mean).
    """
    count = loss_mask.sum() if num_tokens is None else num_tokens
    # clamp: a batch with no response tokens gives 0, not 0 / 0.
    return -_wide(sequence_logps).sum() / torch.as_tensor(count, device=sequence_logps.device).clamp(min=1)
