"""Per-token and per-sequence log-probs from hidden states: the log pi(y | x) of paper eq. 5.

    log pi(y | x) = sum over response tokens t of log softmax(W h_t)[y_t]

where h_t (D,) is the model's final (normed) hidden state, W (V, D) the output projection
(``lm_head.weight``) and y_t the target token. Prompt and padding positions are excluded by
``loss_mask``; a target of ``IGNORE_INDEX`` (-100) is excluded too.

Alignment is the caller's job. ``targets[b, t]`` is the token predicted FROM ``hidden[b, t]``,
so for token ids ``ids`` (B, L) and a response mask over ids, pass
``hidden[:, :-1], targets=ids[:, 1:], loss_mask=response_mask[:, 1:]``. Masked-out targets may
hold anything (pad ids, -100): they are never read.

Three implementations of one function, chosen by ``impl``:
- "plain": full (B, T, V) logits and torch's log_softmax. The readable reference, for tests.
- "chunked": the algorithm below, its softmax step in torch ops. Any device.
- "triton": the same algorithm, its softmax step one Triton kernel (``spl_kernels/fused_logprobs.py``;
  CUDA with triton, or CPU under Triton's interpreter for tests).
"auto" is "triton" for GPU tensors (not fp64) when triton is installed, "chunked" otherwise.

The algorithm (the design rationale, stated once here). With z_t = W h_t and
delta_t = onehot(y_t) - softmax(z_t), a loss on sequence log-probs (SPL, DPO, SFT) sends one
g_seq (B,); every token t of sequence b gets g_t = g_seq[b], and
    dL/dh_t = g_t W^T delta_t        dL/dW = sum_t g_t delta_t h_t^T.
The matmul floor is 2 N D V FLOPs per product: logits, then W^T delta, then (W trains)
delta^T h. Everything else touches the (N, V) logits a few bytes per entry. So: the three
products are cuBLAS matmuls (``torch.mm``: the vendor's tuned kernels on every GPU, torch's own
fp32/TF32 setting, nothing to tune here), and everything between them is one pass over the
logits in their own dtype: the softmax-rows step, which computes the logsumexp and the target's
log-prob, and writes delta over the logits in place, one exponential per entry. A Triton GEMM
with the logsumexp in its epilogue would save one write and one read of the logits (4 bytes per
entry, ~5% of the matmul time at D = 4096) but would have to match cuBLAS on each architecture to
gain anything. Three cases, by what needs a gradient:
- Frozen W (LoRA): dlogp_t/dh_t = W^T delta_t needs no upstream gradient, so forward makes it per
  chunk of tokens: logits (chunk, V) -> softmax rows, delta in place -> W^T delta into a stored
  fp32 (N, D). Backward scales it by g: one elementwise op. 4 N D V FLOPs, the floor; memory one
  chunk of logits plus the (N, D) fp32 store.
- W trains, logits kept: forward computes all (N, V) logits and their statistics; backward turns
  them into g * delta in place and runs dh = delta W and dW = delta^T h over all tokens at once:
  6 N D V FLOPs, the floor, and dW needs no fp32 accumulation across chunks (one matmul, fp32
  accumulation inside, rounded once, as plain torch does). Memory: the logits, in the compute
  dtype.
- W trains, logits recomputed: per chunk in backward, logits again, delta in place, dh, and dW
  added into an fp32 (V, D) accumulator (bf16 sums across chunks diverge: Liger-Kernel #512).
  8 N D V FLOPs; memory the accumulator plus one chunk. Chosen over keeping when it takes less
  memory (``spl_kernels/heuristics.keep_logits``).
The no-grad pass (reference model) runs the forward chunks, computing the statistics only.
Chunk sizes and launch shapes: ``spl_kernels/heuristics.py``.

Dtype policy: the matmuls read the compute dtype (torch's autocast dtype when autocast is on,
else the promoted dtype of hidden and weight) and return logits in it, as plain torch does;
softmax statistics, log-probs and gradient accumulation are fp32 (fp64 for fp64 inputs). delta is
rounded to the compute dtype before its matmul (scaled by g first when W trains), as plain
torch's backward rounds it. The stored frozen-W gradient comes from a half-precision matmul with
fp32 output (``torch.mm(out_dtype=torch.float32)``, CUDA, torch >= 2.8), so it is rounded once,
after scaling by g. Outputs are fp32; gradients come back in each input's own dtype.

Host syncs: none on the hot path. Positions outside ``loss_mask`` become IGNORE_INDEX targets
(a (B, T) op), which the softmax step skips; on a GPU nothing is packed by a mask (on the CPU,
where a sync costs nothing, only masked-in rows are projected: ``token_logps``). A target outside
[0, V) under the mask makes that token's log-prob NaN (so the loss is NaN, which the trainer's
finite-loss check reports) rather than being checked on the host each call; set
``SPL_CHECK_TARGETS=1`` to check every call eagerly and raise a ValueError naming the bad value.
"plain" is the reference: an out-of-range target there fails inside torch's gather.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Iterator

import torch

import spl_kernels
from spl_kernels.heuristics import chunk_rows, device_spec, keep_logits, rows_config

IMPLS = ("auto", "plain", "chunked", "triton")
IGNORE_INDEX = -100  # the same value as spl_kernels.fused_logprobs.IGNORE_INDEX and torch's cross-entropy
# Debug switch, read once: check targets on the host every call (one sync each).
CHECK_TARGETS = os.environ.get("SPL_CHECK_TARGETS") == "1"
# Devices on which token_logps projects only the masked-in rows (a host sync for their count,
# free where nothing runs asynchronously). On a GPU the sync would cost more than the FLOPs.
PACK_DEVICES = frozenset({"cpu"})

TORCH_BLOCK_BYTES = 32 * 2**20  # softmax_rows_torch: fp32 temporaries per block of rows
# softmax_rows(z, targets, lse, logp, *, stats, delta, grad): the step between the matmuls.
SoftmaxRows = Callable[..., None]


def compute_dtype_for(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype the output projection runs in: autocast's if active, else the promoted one."""
    if torch.is_autocast_enabled(hidden.device.type):
        return torch.get_autocast_dtype(hidden.device.type)
    return torch.promote_types(hidden.dtype, weight.dtype)


# ---------------------------------------------------------------------------------------------
# (a) Plain reference
# ---------------------------------------------------------------------------------------------


def plain_token_logps(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                      loss_mask: torch.Tensor) -> torch.Tensor:
    """Token log-probs (B, T) via full logits; 0 where ``loss_mask`` is False or the target is -100."""
    cd = compute_dtype_for(hidden, weight)
    logits = hidden.to(cd) @ weight.to(cd).T  # (B, T, V)
    # log_softmax in fp32 at least; fp64 stays fp64 so tests can use this as an exact reference.
    logits = logits.to(torch.promote_types(cd, torch.float32))  # (B, T, V)
    keep = loss_mask & (targets != IGNORE_INDEX)  # (B, T)
    safe = torch.where(keep, targets, 0)  # (B, T) masked targets may be -100
    logps = torch.log_softmax(logits, dim=-1).gather(-1, safe[..., None]).squeeze(-1)  # (B, T)
    return torch.where(keep, logps, 0.0)


# ---------------------------------------------------------------------------------------------
# (b) The softmax-rows step in torch (the "chunked" path; spl_kernels/fused_logprobs.py is the Triton one)
# ---------------------------------------------------------------------------------------------


def softmax_rows_torch(z: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, logp: torch.Tensor | None,
                       *, stats: bool, delta: bool, grad: torch.Tensor | None) -> None:
    """The same contract as ``spl_kernels.fused_logprobs.softmax_rows``, in torch ops.

    z (n, V) logits; when ``stats``, lse (n,) and logp (n,) are written, else lse is read; when
    ``delta``, z is overwritten by grad * (onehot(targets) - softmax(z)) (grad None: 1). Ignored
    targets give logp 0 and a zero delta row; targets outside [0, V) give NaN.
    """
    V = z.shape[1]
    wide = torch.promote_types(z.dtype, torch.float32)
    nan = float("nan")  # a Python scalar: torch.tensor(nan, device=cuda) would copy and sync
    # Blocks of rows bound the fp32 temporaries (a copy of half-precision logits, or exp(z - m)
    # when z must survive); where z is overwritten anyway, fp32 work happens in place.
    step = max(1, TORCH_BLOCK_BYTES // (4 * V))
    for start in range(0, z.shape[0], step):
        rows = slice(start, start + step)
        y = targets[rows]  # (r,)
        ignored = y == IGNORE_INDEX
        valid = (y >= 0) & (y < V)
        safe = torch.where(valid, y, 0)[:, None]  # (r, 1)
        zb = z[rows].to(wide)  # (r, V) a copy, or z's own rows when z is fp32 already
        if stats:
            m = zb.amax(dim=1, keepdim=True)  # (r, 1)
            zy = zb.gather(1, safe).squeeze(1)  # (r,) target logit, before zb changes
            e = (zb.sub_(m) if delta else zb - m).exp_()  # (r, V) exp(z - m)
            total = e.sum(dim=1, keepdim=True)  # (r, 1)
            lse[rows] = (m + total.log()).squeeze(1)
            logp[rows] = torch.where(valid, zy - lse[rows], torch.where(ignored, 0.0, nan))
            p = e.div_(total) if delta else None  # softmax
        elif delta:
            p = zb.sub_(lse[rows, None].to(wide)).exp_()  # (r, V) softmax
        if delta:
            g = torch.where(valid, grad[rows] if grad is not None else 1.0, nan)  # (r,)
            p.neg_().scatter_add_(1, safe, valid[:, None].to(wide))  # onehot - softmax
            p.mul_(g[:, None].to(wide)).masked_fill_(ignored[:, None], 0.0)
            if p.data_ptr() != z[rows].data_ptr():
                z[rows] = p  # one rounding into z's dtype


# ---------------------------------------------------------------------------------------------
# (c) Matmuls: cuBLAS through torch, with fp32 output where one rounding matters
# ---------------------------------------------------------------------------------------------


@functools.cache
def _cuda_out_dtype_support(device: torch.device) -> tuple[bool, bool]:
    """(mm, addmm): whether torch here has half x half -> fp32 ``torch.mm(out_dtype=)`` (torch >=
    2.8) and fp32 accumulation with ``torch.addmm(acc, ..., out_dtype=, out=acc)`` (newer).
    Probed once per device on 16 x 16 inputs (one host sync, at first use)."""
    a = torch.full((16, 16), 1.0 + 2**-8, device=device, dtype=torch.bfloat16)  # exact in bf16
    exact = 16 * (1.0 + 2**-8) ** 2  # not representable in bf16: tells fp32 output from bf16
    out = torch.empty(16, 16, device=device)
    try:
        torch.mm(a, a, out_dtype=torch.float32, out=out)  # the out= form is the one used
        mm = bool((out == exact).all())
    except (TypeError, RuntimeError):
        mm = False
    acc = torch.ones(16, 16, device=device)
    try:
        torch.addmm(acc, a, a, out_dtype=torch.float32, out=acc)
        addmm = bool((acc == 1 + exact).all())
    except (TypeError, RuntimeError):
        addmm = False
    return mm, addmm


def _mm(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype,
        out: torch.Tensor | None = None) -> torch.Tensor:
    """a @ b, accumulated in fp32 (or wider) inside the matmul and rounded once to ``out_dtype``."""
    if out_dtype == a.dtype:
        return torch.mm(a, b, out=out)
    if out_dtype == torch.float32 and a.dtype in (torch.bfloat16, torch.float16):
        if a.device.type == "cuda" and _cuda_out_dtype_support(a.device)[0]:
            return torch.mm(a, b, out_dtype=torch.float32, out=out)
        if a.device.type == "cpu":
            # The same numbers: products of half values are exact in fp32, summed in fp32.
            return torch.mm(a.float(), b.float(), out=out)
    result = torch.mm(a, b).to(out_dtype)  # older torch on CUDA: rounded twice
    return out.copy_(result) if out is not None else result


def _add_mm_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b with ``acc`` in fp32 (or wider), a and b in the compute dtype."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif a.device.type == "cuda" and _cuda_out_dtype_support(a.device)[1]:
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)  # no (V, D) temporary
    else:
        acc += _mm(a, b, acc.dtype)


# ---------------------------------------------------------------------------------------------
# (d) The chunked algorithm (module docstring), one autograd.Function for both softmax steps
# ---------------------------------------------------------------------------------------------


def _logit_chunks(h: torch.Tensor, w: torch.Tensor, chunk: int) -> Iterator[tuple[slice, torch.Tensor]]:
    """(rows, logits (n, V)) for equal chunks of at most ``chunk`` tokens, in one reused buffer."""
    M = h.shape[0]
    n = math.ceil(M / math.ceil(M / chunk)) if M else 0  # balanced: no short last chunk
    buf = torch.empty(n, w.shape[0], device=h.device, dtype=h.dtype)  # (n, V)
    for start in range(0, M, max(n, 1)):
        sl = slice(start, min(start + n, M))
        yield sl, torch.mm(h[sl], w.T, out=buf[: sl.stop - sl.start])  # (n, V)


def _forward_chunks(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor, chunk: int, softmax_rows: SoftmaxRows,
                    grad_h: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(logp (M,) fp32, lse (M,)) chunk by chunk; fills ``grad_h`` (M, D) with dlogp/dh if given."""
    wide = torch.promote_types(h.dtype, torch.float32)
    logp = torch.empty(h.shape[0], device=h.device, dtype=torch.float32)  # (M,)
    lse = torch.empty(h.shape[0], device=h.device, dtype=wide)  # (M,)
    for sl, z in _logit_chunks(h, w, chunk):
        softmax_rows(z, y[sl], lse[sl], logp[sl], stats=True, delta=grad_h is not None, grad=None)
        if grad_h is not None:
            _mm(z, w, grad_h.dtype, out=grad_h[sl])  # (n, D) W^T delta, fp32 out
    return logp, lse


class ChunkedTokenLogps(torch.autograd.Function):
    """Token log-probs (M,) fp32 from hidden (M, D), weight (V, D), targets (M,) (-100: ignored)."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                compute_dtype: torch.dtype, chunk: int, softmax_rows: SoftmaxRows) -> torch.Tensor:
        h = hidden.to(compute_dtype).contiguous()  # (M, D)
        w = weight.to(compute_dtype).contiguous()  # (V, D)
        M, D = h.shape
        need_h, need_w = ctx.needs_input_grad[:2]
        wide = torch.promote_types(compute_dtype, torch.float32)
        ctx.softmax_rows, ctx.chunk = softmax_rows, chunk
        ctx.hidden_dtype, ctx.weight_dtype = hidden.dtype, weight.dtype
        ctx.frozen = need_h and not need_w
        ctx.keep = need_w and keep_logits(M, D, chunk, h.element_size())
        if ctx.frozen:
            # dlogp/dh now, from the logits at hand: one matmul, instead of two in backward.
            grad_h = torch.empty(M, D, device=h.device, dtype=wide)  # (M, D)
            logp, _ = _forward_chunks(h, w, targets, chunk, softmax_rows, grad_h)
            ctx.save_for_backward(grad_h)
        elif ctx.keep:
            z = torch.mm(h, w.T)  # (M, V) all logits, kept for backward
            logp = torch.empty(M, device=h.device, dtype=torch.float32)  # (M,)
            lse = torch.empty(M, device=h.device, dtype=wide)  # (M,)
            softmax_rows(z, targets, lse, logp, stats=True, delta=False, grad=None)
            ctx.save_for_backward(z, lse, h, w, targets)
        else:
            logp, lse = _forward_chunks(h, w, targets, chunk, softmax_rows)
            ctx.save_for_backward(lse, h, w, targets)
        return logp

    @staticmethod
    def backward(ctx, grad_logps: torch.Tensor):
        g = grad_logps.float().contiguous()  # (M,) dL/dlogp_t
        if ctx.frozen:
            (stored,) = ctx.saved_tensors
            grad_h = torch.empty(stored.shape, device=g.device, dtype=ctx.hidden_dtype)  # (M, D)
            torch.mul(stored, g[:, None], out=grad_h)  # in the wide dtype, rounded once into grad_h
            return grad_h, None, None, None, None, None
        need_h = ctx.needs_input_grad[0]
        rows = ctx.softmax_rows
        if ctx.keep:
            z, lse, h, w, y = ctx.saved_tensors
            # In place: z becomes g * delta. A second backward (retain_graph=True) then fails
            # torch's own check of saved tensors ("modified by an inplace operation").
            rows(z, y, lse, None, stats=False, delta=True, grad=g)  # (M, V)
            grad_h = _mm(z, w, ctx.hidden_dtype) if need_h else None  # (M, D)
            return grad_h, _mm(z.T, h, ctx.weight_dtype), None, None, None, None  # (V, D)
        lse, h, w, y = ctx.saved_tensors
        M, D = h.shape
        grad_h = torch.empty(M, D, device=h.device, dtype=ctx.hidden_dtype) if need_h else None  # (M, D)
        grad_w = torch.zeros(w.shape, device=w.device, dtype=lse.dtype)  # (V, D) fp32 accumulator
        for sl, z in _logit_chunks(h, w, ctx.chunk):
            # The same matmul shapes as forward, so these logits (and lse) match it bitwise.
            rows(z, y[sl], lse[sl], None, stats=False, delta=True, grad=g[sl])  # z := g * delta
            if need_h:
                _mm(z, w, grad_h.dtype, out=grad_h[sl])  # (n, D)
            _add_mm_(grad_w, z.T, h[sl])  # (V, D)
        return grad_h, grad_w.to(ctx.weight_dtype), None, None, None, None


# ---------------------------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------------------------


def resolve_impl(impl: str, hidden: torch.Tensor) -> str:
    """The implementation "auto" stands for on ``hidden``'s device."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        # The kernel takes fp32, bf16 and fp16 logits; fp64 (tests, references) stays in torch.
        fast = hidden.is_cuda and spl_kernels.HAS_TRITON and hidden.dtype != torch.float64
        return "triton" if fast else "chunked"
    if impl == "triton" and not spl_kernels.HAS_TRITON:
        raise RuntimeError("impl='triton' needs the triton package")
    return impl


def _softmax_rows_for(impl: str, device: torch.device, dtype: torch.dtype) -> SoftmaxRows:
    if impl == "chunked":
        return softmax_rows_torch
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("Triton kernels take CPU tensors only under its interpreter: set "
                           "TRITON_INTERPRET=1 before triton is first imported")
    from spl_kernels.fused_logprobs import SUPPORTED_DTYPES, softmax_rows

    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"impl='triton' supports {SUPPORTED_DTYPES}, got {dtype}")
    return functools.partial(softmax_rows, config=rows_config(device, dtype))


def _check_targets(targets: torch.Tensor, vocab_size: int) -> None:
    """SPL_CHECK_TARGETS=1: every target is IGNORE_INDEX or in [0, V) (a host sync)."""
    bad = (targets != IGNORE_INDEX) & ((targets < 0) | (targets >= vocab_size))
    if bool(bad.any()):
        raise ValueError(f"targets under loss_mask must lie in [0, {vocab_size}) or be {IGNORE_INDEX}; "
                         f"found {targets[bad][0].item()}")


def token_logps(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, loss_mask: torch.Tensor,
                *, impl: str = "auto", chunk_size: int | None = None) -> torch.Tensor:
    """log p(targets[b, t] | hidden[b, t]) as (B, T) fp32, 0 where ``loss_mask`` is False.

    hidden (B, T, D) or (B*T, D); weight (V, D); targets (B, T) int64, already aligned with
    hidden (see the module docstring); loss_mask (B, T) bool. ``chunk_size`` is tokens per chunk
    for "chunked" and "triton" (default: ``spl_kernels.heuristics.chunk_rows``).
    """
    B, T = targets.shape
    if hidden.shape[:-1] not in ((B, T), (B * T,)) or loss_mask.shape != (B, T):
        raise ValueError(f"hidden {tuple(hidden.shape)}, targets {(B, T)} and loss_mask "
                         f"{tuple(loss_mask.shape)} do not line up")
    if loss_mask.dtype != torch.bool:
        raise ValueError(f"loss_mask must be bool, got {loss_mask.dtype}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    impl = resolve_impl(impl, hidden)
    if impl == "plain":
        return plain_token_logps(hidden.reshape(B, T, -1), weight, targets, loss_mask)

    V, D = weight.shape
    # The mask becomes ignored targets. On a GPU every position then goes through the matmuls:
    # packing the masked-in rows would skip prompt FLOPs but sync with the host for the packed
    # size. On the CPU there is no asynchrony to lose, so only masked-in rows are projected: prompt
    # and padding positions (half the tokens of a typical preference batch) cost no logits.
    y = torch.where(loss_mask, targets, IGNORE_INDEX).reshape(-1).to(torch.int64)  # (B*T,)
    if CHECK_TARGETS:
        _check_targets(y, V)
    h = hidden.reshape(B * T, D)  # (B*T, D) a copy only if hidden is a strided view
    packed = None
    if hidden.device.type in PACK_DEVICES:
        packed = (y != IGNORE_INDEX).nonzero().squeeze(1)  # (M,) positions that are scored
        h, y = h.index_select(0, packed), y.index_select(0, packed)  # (M, D), (M,)
    cd = compute_dtype_for(hidden, weight)
    rows = _softmax_rows_for(impl, hidden.device, cd)
    itemsize = torch.tensor([], dtype=cd).element_size()
    chunk = chunk_size or chunk_rows(device_spec(hidden.device), V, D, itemsize)
    # The Function runs its own dtype policy; autocast must not recast inside it.
    with torch.autocast(hidden.device.type, enabled=False):
        if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
            out = ChunkedTokenLogps.apply(h, weight, y, cd, chunk, rows)  # (B*T,)
        else:
            # No graph (reference model, evaluation): statistics only, nothing stored.
            out, _ = _forward_chunks(h.to(cd).contiguous(), weight.to(cd).contiguous(), y, chunk, rows)
    if packed is not None:  # back to (B*T,), zeros elsewhere; differentiable (index_put)
        out = out.new_zeros(B * T).index_put((packed,), out)
    return out.view(B, T)


def sequence_logps(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, loss_mask: torch.Tensor,
                   *, impl: str = "auto", chunk_size: int | None = None) -> torch.Tensor:
    """log pi(y | x) per sequence: (B,) fp32, the sum of ``token_logps`` over masked-in positions.

    Typical use for a preference batch (chosen rows first, then rejected):
        hidden = model(ids, return_hidden=True)[:, :-1]
        logps = sequence_logps(hidden, model.lm_head.weight, ids[:, 1:], response_mask[:, 1:])
        policy_chosen_logps, policy_rejected_logps = logps.chunk(2)
    """
    return token_logps(hidden, weight, targets, loss_mask, impl=impl, chunk_size=chunk_size).sum(dim=-1)
