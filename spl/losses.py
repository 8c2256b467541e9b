"""Losses on sequence log-probs: SPL (paper eq. 5; DPO is alpha == beta), Bradley-Terry, SFT NLL.

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

All losses are per example, fp32 or wider, from (B,) sequence log-probs (``spl/logprobs.py``);
the caller reduces (mean over pairs, or a sum normalized across gradient-accumulation steps).
Metrics are detached batch means as 0-dim tensors, so logging them costs no host sync until the
trainer chooses to read them.
"""

from __future__ import annotations

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
