"""The Triton path (spl_kernels/fused_logprobs.py through spl.logprobs) against float64, on odd shapes.

Without a GPU the kernel runs under Triton's CPU interpreter, which must be switched on before
the kernel module is imported (``@triton.jit`` picks interpreter or compiler when it decorates);
this module does that first, so it does not depend on test order. The kernel rounds to bf16 with
integer operations, so the interpreter computes the same bits a GPU does (see its docstring).
With a GPU the same tests compile the kernel (``benchmarks/gpu.sh``), and one more runs a
realistic vocabulary. Tolerance tables and cases: tests/logprob_cases.py.
"""

from __future__ import annotations

import os

import pytest
import torch

import spl.logprobs

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

import spl_kernels.fused_logprobs as fl  # noqa: E402  (after the interpreter switch above)
from spl.logprobs import IGNORE_INDEX, sequence_logps, softmax_rows_torch, token_logps  # noqa: E402
from spl_kernels.heuristics import DeviceSpec, RowsConfig, chunk_rows, keep_logits, rows_config  # noqa: E402
from tests.logprob_cases import (  # noqa: E402
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

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
GPU = torch.cuda.is_available()


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


def triton_path(chunk_size: int | None):
    return lambda *args: token_logps(*args, impl="triton", chunk_size=chunk_size)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_triton_matches_float64_reference(shape, dtype, mode, monkeypatch):
    weight_trains = use_mode(monkeypatch, mode)
    batch = make_batch(*shape, dtype, DEVICE)
    out = run(triton_path(chunk_size=5), batch, weight_trains)
    assert_matches_reference(out, batch, weight_trains)


@pytest.mark.parametrize("weight_trains", [False, True], ids=["frozen", "trainable"])
def test_default_config_and_dispatch(weight_trains):
    # The heuristics' own chunk size and launch shape for this device.
    batch = make_batch(*SHAPES[1], torch.bfloat16, DEVICE)
    out = run(triton_path(None), batch, weight_trains)
    assert_matches_reference(out, batch, weight_trains)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_triton_is_bitwise_repeatable(dtype, mode, monkeypatch):
    weight_trains = use_mode(monkeypatch, mode)
    batch = make_batch(*SHAPES[2], dtype, DEVICE)
    fn = triton_path(chunk_size=4)
    assert_bitwise_equal(run(fn, batch, weight_trains), run(fn, batch, weight_trains))


def test_weight_grad_accumulates_in_fp32_across_chunks(monkeypatch):
    """24 chunks of 4 tokens. Summing the (V, D) partials in bf16 instead (each partial exact, then
    rounded) measured 3.2x plain bf16's error on this batch at 1-token chunks; see test_logprobs."""
    use_mode(monkeypatch, "recompute")
    batch = make_batch(2, 48, 16, 47, torch.bfloat16, DEVICE)
    batch.loss_mask[:] = True
    batch.targets = torch.randint(0, 47, (2, 48), device=DEVICE)
    assert_matches_reference(run(triton_path(4), batch, True), batch, True)


@pytest.mark.parametrize("mode", MODES)
def test_masked_and_ignored_positions_change_nothing(mode, monkeypatch):
    weight_trains = use_mode(monkeypatch, mode)
    batch = make_batch(*SHAPES[1], torch.float32, DEVICE)
    fn = triton_path(chunk_size=4)
    out = run(fn, batch, weight_trains)
    masked = ~batch.loss_mask
    batch.hidden[masked] = torch.randn(int(masked.sum()), batch.hidden.shape[-1], device=DEVICE) * 100
    batch.targets[masked] = torch.randint(0, batch.weight.shape[0], (int(masked.sum()),), device=DEVICE)
    assert_bitwise_equal(out, run(fn, batch, weight_trains))
    assert (out["grad_hidden"][masked] == 0).all()
    # The same positions as -100 targets under an all-true mask: ignored inside the kernel.
    batch.targets[masked] = IGNORE_INDEX
    batch.loss_mask[:] = True
    assert_bitwise_equal(out, run(fn, batch, weight_trains))


def test_no_grad_forward_equals_grad_forward(monkeypatch):
    use_mode(monkeypatch, "recompute")
    batch = make_batch(*SHAPES[2], torch.bfloat16, DEVICE)
    out = run(triton_path(4), batch, True)
    with torch.no_grad():
        no_grad = token_logps(batch.hidden, batch.weight, batch.targets, batch.loss_mask, impl="triton",
                              chunk_size=4)
    assert torch.equal(no_grad.double(), out["token_logps"])


def test_frozen_weight_backward_launches_no_kernel(monkeypatch):
    batch = make_batch(*SHAPES[1], torch.bfloat16, DEVICE)
    hidden = batch.hidden.clone().requires_grad_(True)
    seq = sequence_logps(hidden, batch.weight, batch.targets, batch.loss_mask, impl="triton", chunk_size=8)
    launches = []
    monkeypatch.setattr(fl, "_softmax_rows_kernel", launches)  # any launch would fail here
    monkeypatch.setattr(torch, "mm", lambda *a, **k: launches.append("mm"))
    seq.backward(batch.grad_seq)
    # dlogp/dh was computed in the forward pass; backward only scaled it by g per sequence.
    assert launches == [] and hidden.grad is not None


def test_matmuls_run_in_torch_not_in_the_kernel():
    """fp32 products go through torch.mm, so on a GPU they follow torch's fp32 matmul setting
    (IEEE unless TF32 is allowed), as plain torch does: the old Triton path ran tl.dot in TF32 and
    failed the 2x-plain rule on an H200. The kernel itself has no dot."""
    assert "tl.dot" not in open(fl.__file__).read()
    calls = []
    mm = torch.mm

    def recording_mm(a, b, **kwargs):
        calls.append((a.dtype, b.dtype))
        return mm(a, b, **kwargs)

    batch = make_batch(*SHAPES[1], torch.float32, DEVICE)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch, "mm", recording_mm)
        patch.setattr(spl.logprobs, "PACK_DEVICES", frozenset())  # every row, as on a GPU
        run(triton_path(8), batch, False)
    assert len(calls) == 2 * -(-batch.loss_mask.numel() // 8)  # logits, W^T delta per chunk
    assert set(calls) == {(torch.float32, torch.float32)}


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("rows, block", [(4, 32), (1, 16)])
def test_kernel_equals_the_torch_softmax_rows(dtype, rows, block):
    """The kernel's contract, step by step, against softmax_rows_torch: statistics, unscaled and
    scaled delta, ignored rows (zeros) and invalid targets (NaN), on a width no block divides."""
    n, V = 11, 77
    z = (torch.randn(n, V, device=DEVICE) * 3).to(dtype)  # (n, V)
    y = torch.randint(0, V, (n,), device=DEVICE)
    y[2], y[5], y[7] = IGNORE_INDEX, V, -3  # ignored, too large, negative
    g = torch.randn(n, device=DEVICE)
    cfg = RowsConfig(rows=rows, block=block, num_warps=1)
    outs = {}
    kernel = lambda *a, **k: fl.softmax_rows(*a, **k, config=cfg)
    for name, fn in (("triton", kernel), ("torch", softmax_rows_torch)):
        lse, logp = torch.empty(n, device=DEVICE), torch.empty(n, device=DEVICE)
        stats_delta = z.clone()
        fn(stats_delta, y, lse, logp, stats=True, delta=True, grad=None)
        scaled = z.clone()
        fn(scaled, y, lse, None, stats=False, delta=True, grad=g)
        outs[name] = (lse, logp, stats_delta, scaled)
    (lse, logp, unscaled, scaled), (lse_t, logp_t, unscaled_t, scaled_t) = outs["triton"], outs["torch"]
    valid = (y >= 0) & (y < V)
    torch.testing.assert_close(lse[valid], lse_t[valid], rtol=0, atol=2e-6)
    torch.testing.assert_close(logp, logp_t, rtol=0, atol=2e-6, equal_nan=True)
    assert logp[2] == 0 and logp[5].isnan() and logp[7].isnan()
    # At most one rounding step apart (the two exps differ in the last fp32 bits): relative
    # spacing of the dtype's values is at most 2^-7 (bf16), 2^-10 (fp16).
    step = {torch.float32: 1e-6, torch.bfloat16: 2**-7, torch.float16: 2**-10}[dtype]
    for ours, ref in ((unscaled, unscaled_t), (scaled, scaled_t)):
        assert (ours[2] == 0).all() and ours[5].isnan().all() and ours[7].isnan().all()
        torch.testing.assert_close(ours[valid].float(), ref[valid].float(), rtol=step, atol=1e-7)


def test_bf16_rounding_is_to_nearest_even_in_the_interpreter_too():
    """``_round_to_bf16`` matches torch's fp32 -> bf16 cast bit for bit, ties included; the
    interpreter's own cast truncates, which this would catch if the kernel relied on it."""

    @triton.jit
    def round_kernel(x_ptr, out_ptr, N: tl.constexpr):
        i = tl.arange(0, N)
        tl.store(out_ptr + i, fl._round_to_bf16(tl.load(x_ptr + i)))

    x = torch.randn(1024, device=DEVICE) * 10.0 ** torch.randint(-6, 6, (1024,), device=DEVICE)
    # Exact ties between two bf16 neighbours: the lower 16 bits are 0x8000.
    ties = (x.view(torch.int32) & ~0xFFFF | 0x8000).view(torch.float32)
    x = torch.cat([x, ties])  # (2048,)
    out = torch.empty_like(x, dtype=torch.bfloat16)
    round_kernel[(1,)](x, out, N=x.numel())
    assert torch.equal(out.view(torch.int16), x.bfloat16().view(torch.int16))


def test_spl_loss_composes_on_the_kernel():
    """SPL on top of the fused log-probs: loss and dL/dh match float64."""
    assert_spl_composes("triton", DEVICE)


def test_empty_and_invalid_inputs():
    batch = make_batch(*SHAPES[0], torch.float32, DEVICE)
    batch.loss_mask[:] = False
    hidden = batch.hidden.clone().requires_grad_(True)
    seq = sequence_logps(hidden, batch.weight, batch.targets, batch.loss_mask, impl="triton")
    seq.sum().backward()
    assert (seq == 0).all() and (hidden.grad == 0).all()
    with pytest.raises(ValueError, match="supports"):
        token_logps(batch.hidden.double(), batch.weight.double(), batch.targets, batch.loss_mask,
                    impl="triton")
    with pytest.raises(ValueError, match="unit column stride"):
        z = torch.zeros(4, 6, device=DEVICE).T  # (6, 4), column stride 6
        y, lse = torch.zeros(6, dtype=torch.long, device=DEVICE), torch.empty(6, device=DEVICE)
        fl.softmax_rows(z, y, lse, None, stats=False, delta=True, grad=None, config=RowsConfig(1, 16, 1))


def test_kernel_globals_equal_themselves():
    """A compiled kernel re-checks at every launch that each global it read still equals its
    compile-time value; a NaN global never does, so every launch after the first raised
    "Global variable NAN has changed since we compiled this kernel" on an H200 (Triton 3.6), while
    the CPU interpreter, which skips that check, passed. Guard the invariant here, on CPU."""
    consts = {name: v for name, v in vars(fl).items() if isinstance(v, tl.constexpr)}
    assert consts, "expected the kernel module's constexpr globals"
    for name, value in consts.items():
        assert not (value != value), f"spl_kernels.fused_logprobs.{name} = {value} does not equal itself"
    # The bit pattern the kernel bitcasts is a quiet NaN, so invalid targets still read as NaN.
    bits = torch.tensor([fl.QUIET_NAN_BITS.value], dtype=torch.int32)
    assert bits.view(torch.float32).isnan().all()


def test_heuristics():
    assert rows_config(torch.device("cpu"), torch.bfloat16).rows == 4
    with pytest.raises(ValueError, match="powers of two"):
        RowsConfig(rows=3, block=32, num_warps=1)
    # Two waves of 128 x 256 output tiles in the (chunk, D) hidden-gradient matmul, at D = 4096.
    h100, rtx4090 = DeviceSpec(90, 132, 232448), DeviceSpec(89, 128, 101376)
    assert chunk_rows(h100, 32000, 4096, 2) == 2176 and chunk_rows(rtx4090, 32000, 4096, 2) == 2048
    assert chunk_rows(h100, 256000, 4096, 2) == 2048  # the 1 GiB cap on one chunk of logits
    # Keep a trainable weight's logits when they take no more memory than recomputing would.
    assert keep_logits(8192, 4096, 2176, 2) and not keep_logits(16384, 4096, 2176, 2)


@pytest.mark.skipif(not GPU, reason="compiled kernels at a realistic vocabulary need a GPU")
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_realistic_shape_on_gpu(dtype, mode, monkeypatch):
    # The GPU launch shape, several chunks, Mistral's vocabulary, a smaller D.
    weight_trains = use_mode(monkeypatch, mode)
    batch = make_batch(4, 700, 512, 32000, dtype, DEVICE)
    out = run(triton_path(1024), batch, weight_trains)
    assert_matches_reference(out, batch, weight_trains, vs_plain=True)
