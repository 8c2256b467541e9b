"""Shared cases, reference and tolerance tables for tests/test_logprobs.py and tests/test_kernels.py.

Every log-prob implementation is checked against ``plain_token_logps`` run in float64 on the same
(already rounded) inputs, forward and backward, with one upstream gradient per sequence, the way
SPL's loss hands it back.

Tolerances, fp32 inputs (absolute; observed errors are ~10x below each):
    token_logps     1e-5  |log p| <= ~15; each logit is a fp32 dot of D <= 64 products, so its
                          error is ~sqrt(D) u |z| ~ 1e-6 (u = 6e-8); logsumexp adds as much.
    sequence_logps  5e-5  a sum of <= 23 token errors of ~1e-6 (observed <= 8e-6).
    grad_hidden     1e-5  W^T delta with |entries| <= ~2, a fp32 sum over V <= 257 terms (<= 1e-6).
    grad_weight     2e-5  a sum over <= 69 tokens of delta h^T, entries <= ~7 (observed <= 2e-6).
bf16 and fp16 inputs: the error of every output against float64 may be at most 2x that of plain
torch computing in that dtype (logits rounded to it, as torch's matmul returns them), measured as
the Frobenius norm of the error. Not the max-abs: both error fields are dominated by the same bf16
roundings, and their max-abs ratio swings from 0.6 to 1.8 across seeds with no change in
accuracy, while the norm ratio stays within 3% (12 seeds, both tested shapes).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import spl.logprobs
from spl.logprobs import plain_token_logps

# (B, T, D, V): tiny, and odd sizes that are no multiple of any block.
SHAPES = [(1, 3, 3, 47), (2, 23, 47, 123), (3, 7, 64, 257)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# The three gradient strategies of spl/logprobs.py: frozen weight (dlogp/dh precomputed), and a
# trainable weight with its logits kept for backward or recomputed there.
MODES = ("frozen", "keep", "recompute")
FP32_TOL = {"token_logps": 1e-5, "sequence_logps": 5e-5, "grad_hidden": 1e-5, "grad_weight": 2e-5}
NORM_FACTOR = 2.0  # bf16 (and fp32 at large sizes): error norm <= 2x plain torch's in that dtype


@dataclass
class Batch:
    hidden: torch.Tensor  # (B, T, D)
    weight: torch.Tensor  # (V, D)
    targets: torch.Tensor  # (B, T) int64, -100 where masked out
    loss_mask: torch.Tensor  # (B, T) bool
    grad_seq: torch.Tensor  # (B,) upstream gradient per sequence


def use_mode(monkeypatch, mode: str) -> bool:
    """Force ``mode`` (MODES) whatever the memory rule would pick; returns whether W trains."""
    monkeypatch.setattr(spl.logprobs, "keep_logits", lambda *args: mode == "keep")
    return mode != "frozen"


def make_batch(B: int, T: int, D: int, V: int, dtype: torch.dtype, device: str = "cpu") -> Batch:
    """Random batch with a prompt, a response and right padding per row; a third row masks all."""
    hidden = torch.randn(B, T, D)  # (B, T, D)
    # Logits of std ~2, like a trained LM head's.
    weight = torch.randn(V, D) * 2 / D**0.5  # (V, D)
    targets = torch.randint(0, V, (B, T))  # (B, T)
    pos = torch.arange(T)
    prompt = torch.randint(0, max(1, T // 2), (B, 1))  # (B, 1)
    end = torch.randint(T // 2 + 1, T + 1, (B, 1))  # (B, 1)
    loss_mask = (pos >= prompt) & (pos < end)  # (B, T)
    if B >= 3:
        loss_mask[2] = False  # a row with no response tokens at all
    targets[~loss_mask] = -100  # never read: a gather from it would fail loudly
    return Batch(hidden.to(device, dtype), weight.to(device, dtype), targets.to(device), loss_mask.to(device),
                 torch.randn(B).to(device))


def run(fn, batch: Batch, weight_trains: bool, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Forward, then backward of sum_b g_b * logpi_b; everything returned as float64 (None if frozen)."""
    hidden = batch.hidden.detach().to(dtype or batch.hidden.dtype).requires_grad_(True)
    weight = batch.weight.detach().to(dtype or batch.weight.dtype).requires_grad_(weight_trains)
    token = fn(hidden, weight, batch.targets, batch.loss_mask)  # (B, T)
    seq = token.sum(dim=-1)  # (B,)
    seq.backward(batch.grad_seq.to(seq.dtype))
    return {"token_logps": token.detach().double(), "sequence_logps": seq.detach().double(),
            "grad_hidden": hidden.grad.double(),
            "grad_weight": weight.grad.double() if weight_trains else None}


def reference(batch: Batch, weight_trains: bool) -> dict[str, torch.Tensor]:
    return run(plain_token_logps, batch, weight_trains, dtype=torch.float64)


def assert_matches_reference(out: dict, batch: Batch, weight_trains: bool, vs_plain: bool = False) -> None:
    """Apply the dtype's tolerance table (module docstring) to every output and gradient.

    ``vs_plain``: hold fp32 to the 2x-plain-torch rule as well, for sizes beyond the fp32 table's
    (D <= 64, V <= 257, T <= 23), where rounding errors grow with the sums.
    """
    ref = reference(batch, weight_trains)
    if batch.hidden.dtype == torch.float32 and not vs_plain:
        for key, tol in FP32_TOL.items():
            if ref[key] is not None:
                torch.testing.assert_close(out[key], ref[key], rtol=0, atol=tol, msg=key)
        return
    plain = run(plain_token_logps, batch, weight_trains)
    for key, expected in ref.items():
        if expected is None:
            continue
        err = (out[key] - expected).norm().item()
        plain_err = (plain[key] - expected).norm().item()
        assert err <= NORM_FACTOR * plain_err, f"{key}: error {err:.3g} vs plain {plain_err:.3g}"


def assert_bitwise_equal(a: dict, b: dict) -> None:
    for key in a:
        if a[key] is not None:
            assert torch.equal(a[key], b[key]), key


def assert_spl_composes(impl: str, device: str = "cpu") -> None:
    """SPL (alpha 1.5, beta 0.1) on top of ``impl``'s (B,) log-probs: loss and dL/dh match float64.

    -logsigmoid is 1-Lipschitz in the margin alpha * dlogpi - beta * dlogref, and dL/dh is
    alpha * sigmoid(-margin) / B times dlogpi/dh: the fp32 table scaled by alpha + beta.
    """
    from spl.logprobs import sequence_logps
    from spl.losses import spl_loss

    batch = make_batch(4, 9, 16, 77, torch.float32, device)
    batch.loss_mask[:, 2:] = True
    targets = batch.targets.clamp(min=0)

    def loss_grad(impl: str, dtype: torch.dtype):
        hidden = batch.hidden.detach().to(dtype).requires_grad_(True)
        weight = batch.weight.to(dtype)
        logps = sequence_logps(hidden, weight, targets, batch.loss_mask, impl=impl)
        with torch.no_grad():
            ref = sequence_logps(hidden, weight + 0.01, targets, batch.loss_mask, impl=impl)
        losses, _ = spl_loss(*logps.chunk(2), *ref.chunk(2), alpha=1.5, beta=0.1)
        losses.mean().backward()
        return losses.double(), hidden.grad.double()

    (loss, grad), (loss64, grad64) = loss_grad(impl, torch.float32), loss_grad("plain", torch.float64)
    torch.testing.assert_close(loss, loss64, rtol=0, atol=2 * (1.5 + 0.1) * FP32_TOL["sequence_logps"])
    torch.testing.assert_close(grad, grad64, rtol=0, atol=(1.5 + 0.1) * FP32_TOL["grad_hidden"])
