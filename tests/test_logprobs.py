"""spl/logprobs.py: the chunked path (and plain, and dispatch) against float64, forward and backward.

Tolerance tables and cases: tests/logprob_cases.py. The Triton path has the same checks in
tests/test_kernels.py.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import spl.logprobs
from spl.logprobs import IGNORE_INDEX, plain_token_logps, resolve_impl, sequence_logps, token_logps
from spl_kernels.heuristics import chunk_rows
from tests.logprob_cases import (
    DTYPES,
    MODES,
    SHAPES,
    assert_bitwise_equal,
    assert_matches_reference,
    assert_spl_composes,
    make_batch,
    run,
    use_mode,
)


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


def chunked(chunk_size: int | None):
    return lambda *args: token_logps(*args, impl="chunked", chunk_size=chunk_size)


class OpRecorder(TorchDispatchMode):
    """Records every aten op (with its tensor arguments' dtypes) and the largest tensor any op produced."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []
        self.calls: list[tuple[str, list]] = []
        self.max_numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.append(func.__name__)
        self.calls.append((func.__name__, list(args)))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.max_numel = max(self.max_numel, t.numel())
        return out


def host_syncs(rec: OpRecorder) -> list[str]:
    """Ops whose result the host must wait for: .item()/bool(), and shapes that depend on data."""
    syncs = []
    for name, args in rec.calls:
        if name.startswith(("_local_scalar_dense", "nonzero", "masked_select", "unique")):
            syncs.append(name)
        # Indexing with a boolean mask (hidden[loss_mask]) sizes its output from the mask.
        indices = args[1] if name.startswith("index.") and len(args) > 1 else []
        if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or []):
            syncs.append(name + " (bool mask)")
    return syncs


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("chunk_size", [5, None], ids=["chunk5", "default"])
def test_chunked_matches_float64_reference(shape, dtype, mode, chunk_size, monkeypatch):
    weight_trains = use_mode(monkeypatch, mode)
    batch = make_batch(*shape, dtype)
    assert_matches_reference(run(chunked(chunk_size), batch, weight_trains), batch, weight_trains)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_plain_matches_float64_reference(dtype):
    batch = make_batch(*SHAPES[1], dtype)
    assert_matches_reference(run(plain_token_logps, batch, True), batch, True)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_chunked_is_bitwise_repeatable(dtype, mode, monkeypatch):
    weight_trains = use_mode(monkeypatch, mode)
    batch = make_batch(*SHAPES[2], dtype)
    assert_bitwise_equal(run(chunked(4), batch, weight_trains), run(chunked(4), batch, weight_trains))


def test_weight_grad_accumulates_in_fp32_across_chunks(monkeypatch):
    """96 chunks of 1 token. Summing the (V, D) partials in bf16 instead (each partial exact, then
    rounded) measured 3.2x plain bf16's error on this batch, so the 2x rule catches it."""
    use_mode(monkeypatch, "recompute")
    batch = make_batch(2, 48, 16, 47, torch.bfloat16)
    batch.loss_mask[:] = True
    batch.targets = torch.randint(0, 47, (2, 48))
    assert_matches_reference(run(chunked(1), batch, True), batch, True)


@pytest.mark.parametrize("impl", ["plain", "chunked"])
def test_masked_positions_change_nothing(impl):
    batch = make_batch(*SHAPES[1], torch.float32)
    fn = lambda *args: token_logps(*args, impl=impl, chunk_size=4)
    out = run(fn, batch, True)
    # Rewrite everything under the mask: hidden states, and targets to other valid ids.
    masked = ~batch.loss_mask
    batch.hidden[masked] = torch.randn(int(masked.sum()), batch.hidden.shape[-1]) * 100
    batch.targets[masked] = torch.randint(0, batch.weight.shape[0], (int(masked.sum()),))
    changed = run(fn, batch, True)
    assert_bitwise_equal(out, changed)
    assert (out["token_logps"][masked] == 0).all()
    assert (out["grad_hidden"][masked] == 0).all()


@pytest.mark.parametrize("impl", ["plain", "chunked"])
@pytest.mark.parametrize("mode", MODES)
def test_ignore_index_inside_the_mask_is_masked_out(impl, mode, monkeypatch):
    """A -100 target under loss_mask counts as masked out: same log-probs, same gradients."""
    weight_trains = use_mode(monkeypatch, mode)
    batch = make_batch(*SHAPES[1], torch.float32)
    ignored = batch.loss_mask.clone()
    ignored[:, ::3] = False  # every third position becomes an ignored target instead
    fn = lambda *args: token_logps(*args, impl=impl, chunk_size=4)
    masked = run(fn, type(batch)(batch.hidden, batch.weight, batch.targets, ignored, batch.grad_seq),
                 weight_trains)
    targets = batch.targets.clone()
    targets[batch.loss_mask & ~ignored] = IGNORE_INDEX
    assert_bitwise_equal(masked, run(fn, type(batch)(batch.hidden, batch.weight, targets, batch.loss_mask,
                                                    batch.grad_seq), weight_trains))


@pytest.mark.parametrize("mode", MODES)
def test_out_of_range_target_poisons_only_its_token(mode, monkeypatch):
    """No host check: a bad target gives that token (and its sequence) NaN, the rest stays exact."""
    weight_trains = use_mode(monkeypatch, mode)
    batch = make_batch(*SHAPES[1], torch.float32)
    good = run(chunked(4), batch, weight_trains)
    b, t = batch.loss_mask.nonzero()[0].tolist()
    for bad_target in (batch.weight.shape[0], -1):
        batch.targets[b, t] = bad_target
        out = run(chunked(4), batch, weight_trains)
        assert out["token_logps"][b, t].isnan()
        others = torch.ones_like(batch.loss_mask)
        others[b, t] = False
        assert torch.equal(out["token_logps"][others], good["token_logps"][others])
        assert out["sequence_logps"][b].isnan() and not out["sequence_logps"][1 - b].isnan()
    # The debug switch checks on the host and names the value.
    monkeypatch.setattr(spl.logprobs, "CHECK_TARGETS", True)
    with pytest.raises(ValueError, match=r"targets under loss_mask must lie in \[0, 123\).*found -1"):
        token_logps(batch.hidden, batch.weight, batch.targets, batch.loss_mask, impl="chunked")


@pytest.mark.parametrize("mode", MODES)
def test_no_host_sync(mode, monkeypatch):
    """Forward and backward wait on no device value: no .item(), no mask-sized packing. This is
    the path a GPU takes; the CPU packs masked-in rows (test_cpu_packs_only_scored_rows)."""
    weight_trains = use_mode(monkeypatch, mode)
    monkeypatch.setattr(spl.logprobs, "PACK_DEVICES", frozenset())
    batch = make_batch(*SHAPES[1], torch.float32)
    hidden = batch.hidden.clone().requires_grad_(True)
    weight = batch.weight.clone().requires_grad_(weight_trains)
    rec = OpRecorder()
    with rec:
        seq = sequence_logps(hidden, weight, batch.targets, batch.loss_mask, impl="chunked", chunk_size=8)
        seq.backward(batch.grad_seq)
    assert host_syncs(rec) == []


def test_sequence_logps_is_the_masked_token_sum():
    batch = make_batch(*SHAPES[1], torch.float32)
    args = (batch.hidden, batch.weight, batch.targets, batch.loss_mask)
    token = token_logps(*args, impl="chunked")
    assert torch.equal(sequence_logps(*args, impl="chunked"), token.sum(-1))
    # Flat hidden states (B*T, D) are the same thing.
    flat = token_logps(batch.hidden.flatten(0, 1), *args[1:], impl="chunked")
    assert torch.equal(flat, token)


@pytest.mark.parametrize("mode", ["keep", "recompute"])
def test_no_grad_forward_equals_grad_forward(mode, monkeypatch):
    use_mode(monkeypatch, mode)
    batch = make_batch(*SHAPES[2], torch.bfloat16)
    out = run(chunked(4), batch, True)
    with torch.no_grad():
        plain = token_logps(batch.hidden, batch.weight, batch.targets, batch.loss_mask, impl="chunked",
                            chunk_size=4)
    assert torch.equal(plain.double(), out["token_logps"])


def test_memory_is_one_chunk_unless_logits_are_kept(monkeypatch):
    B, T, D, V, chunk = 4, 64, 8, 1000, 16
    batch = make_batch(B, T, D, V, torch.float32)
    batch.loss_mask[:] = True
    batch.targets = torch.randint(0, V, (B, T))
    for mode, largest in (("frozen", chunk * V), ("recompute", chunk * V), ("keep", B * T * V)):
        rec = OpRecorder()
        with rec:
            run(chunked(chunk), batch, use_mode(monkeypatch, mode))
        # The largest tensor of the whole forward + backward is one chunk's logits (V * D < that),
        # or, when the trainable weight's logits are kept for backward, all of them.
        assert rec.max_numel == largest, (mode, rec.max_numel)
    rec = OpRecorder()
    with rec:
        run(plain_token_logps, batch, True)
    assert rec.max_numel == B * T * V


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_frozen_weight_backward_recomputes_nothing(dtype):
    batch = make_batch(*SHAPES[1], dtype)
    hidden = batch.hidden.clone().requires_grad_(True)
    for weight_trains, expect_matmuls in ((False, False), (True, True)):
        weight = batch.weight.clone().requires_grad_(weight_trains)
        seq = sequence_logps(hidden, weight, batch.targets, batch.loss_mask, impl="chunked", chunk_size=8)
        rec = OpRecorder()
        with rec:
            seq.backward(batch.grad_seq)
        # Frozen W: backward is g * stored (elementwise); the logits are never made again.
        assert any(op.startswith(("mm", "addmm")) for op in rec.ops) == expect_matmuls, rec.ops


@pytest.mark.parametrize("mode", ["keep", "recompute", "frozen"])
def test_cpu_packs_only_scored_rows(mode, monkeypatch):
    """On the CPU only masked-in positions are projected: M scored rows get logits, not B*T,
    with values and gradients equal to the unpacked path (which is what a GPU runs)."""
    weight_trains = use_mode(monkeypatch, mode)
    batch = make_batch(*SHAPES[1], torch.float32)
    scored = int(batch.loss_mask.sum())
    assert 0 < scored < batch.loss_mask.numel()

    def go(pack):
        monkeypatch.setattr(spl.logprobs, "PACK_DEVICES", frozenset({"cpu"}) if pack else frozenset())
        hidden = batch.hidden.clone().requires_grad_(True)
        weight = batch.weight.clone().requires_grad_(weight_trains)
        rec = OpRecorder()
        with rec:
            tok = token_logps(hidden, weight, batch.targets, batch.loss_mask, impl="chunked", chunk_size=8)
        tok.sum(-1).backward(batch.grad_seq)
        V = batch.weight.shape[0]
        logit_rows = sum(a[-2].shape[0] for name, a in rec.calls  # (rows, D) @ (D, V) products
                         if name.startswith(("mm", "addmm")) and a[-1].shape[-1] == V)
        return tok.detach(), hidden.grad, weight.grad, logit_rows

    tok_p, gh_p, gw_p, mm_p = go(True)
    tok_u, gh_u, gw_u, mm_u = go(False)
    torch.testing.assert_close(tok_p, tok_u, rtol=1e-6, atol=1e-6)
    assert torch.all(tok_p[~batch.loss_mask] == 0)
    torch.testing.assert_close(gh_p, gh_u, rtol=1e-5, atol=1e-6)
    if weight_trains:
        torch.testing.assert_close(gw_p, gw_u, rtol=1e-5, atol=1e-6)
    assert (mm_p, mm_u) == (scored, batch.loss_mask.numel())  # rows given logits, packed vs not


def test_matmuls_run_in_torch_at_the_compute_dtype(monkeypatch):
    """Every product of the frozen-W path is an aten matmul on fp32 operands for fp32 inputs, so
    on a GPU it follows torch's own fp32 matmul setting (IEEE unless TF32 is allowed), as plain
    torch does. The old Triton path ran its own tl.dot in TF32 and failed 2x-plain on a GPU."""
    monkeypatch.setattr(spl.logprobs, "PACK_DEVICES", frozenset())  # the GPU's row count
    batch = make_batch(*SHAPES[1], torch.float32)
    rec = OpRecorder()
    with rec:
        run(chunked(8), batch, False)
    mms = [args for name, args in rec.calls if name.startswith(("mm", "addmm"))]
    chunks = -(-batch.loss_mask.numel() // 8)
    assert len(mms) == 2 * chunks  # logits and W^T delta per chunk; nothing in backward
    assert all(a.dtype == torch.float32 for args in mms for a in args if isinstance(a, torch.Tensor))


def test_second_backward_through_kept_logits_fails_loudly(monkeypatch):
    use_mode(monkeypatch, "keep")
    batch = make_batch(*SHAPES[1], torch.float32)
    weight = batch.weight.clone().requires_grad_(True)
    seq = sequence_logps(batch.hidden, weight, batch.targets, batch.loss_mask, impl="chunked")
    seq.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        seq.sum().backward()


def test_spl_loss_through_chunked_path():
    """The loss composes on (B,) log-probs; its gradient reaches hidden states exactly."""
    assert_spl_composes("chunked")


def test_autocast_computes_in_bf16_and_keeps_fp32_gradients():
    batch = make_batch(*SHAPES[1], torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = run(chunked(4), batch, True)
    expected = run(chunked(4), make_batch_like(batch, torch.bfloat16), True)
    torch.testing.assert_close(out["token_logps"], expected["token_logps"], rtol=0, atol=0)
    # fp32 master weights get their fp32-accumulated gradient, not a bf16 round trip.
    hidden = batch.hidden.clone().requires_grad_(True)
    weight = batch.weight.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sequence_logps(hidden, weight, batch.targets, batch.loss_mask, impl="chunked").sum().backward()
    assert hidden.grad.dtype == torch.float32 and weight.grad.dtype == torch.float32


def make_batch_like(batch, dtype):
    return type(batch)(batch.hidden.to(dtype), batch.weight.to(dtype), batch.targets, batch.loss_mask,
                       batch.grad_seq)


def test_dispatch_and_validation():
    batch = make_batch(*SHAPES[0], torch.float32)
    assert resolve_impl("auto", batch.hidden) == "chunked"  # CPU tensors
    with pytest.raises(ValueError, match="impl"):
        resolve_impl("fast", batch.hidden)
    with pytest.raises(ValueError, match="bool"):
        token_logps(batch.hidden, batch.weight, batch.targets, batch.loss_mask.long(), impl="chunked")
    with pytest.raises(ValueError, match="chunk_size"):
        token_logps(batch.hidden, batch.weight, batch.targets, batch.loss_mask, impl="chunked", chunk_size=0)
    # CPU chunks: ~64 MiB of fp32 logits, a power of two.
    assert chunk_rows(None, 32000, 4096, 2) == 512 and chunk_rows(None, 10, 8, 4) == 1 << 20
