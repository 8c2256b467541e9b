"""Per-token and per-sequence log-probs from hidden states: the log pi(y | x) of paper eq. 5.

    log pi(y | x) = sum over response tokens t of log softmax(W h_t)[y_t]

where h_t (D,) is the model's final (normed) hidden state, W (V, D) the output projection
(``lm_head.weight``) and y_t the target token. Prompt and padding positions are excluded by
``loss_mask``.

Alignment is the caller's job. ``targets[b, t]`` is the token predicted FROM ``hidden[b, t]``,
so for token ids ``ids`` (B, L) and a response mask over ids, pass
``hidden[:, :-1], targets=ids[:, 1:], loss_mask=response_mask[:, 1:]``. Masked-out targets may
hold anything (pad ids, -100): they are never read.

Three implementations of one function, chosen by ``impl``:
- "plain": full (B, T, V) logits and torch's log_softmax. The readable reference, for tests.
- "chunked": an autograd.Function over chunks of tokens that never holds more than one chunk of
  (tokens, V), forward or backward. Any device.
- "triton": the fused kernels in ``kernels/fused_logprobs.py`` (CUDA with triton, or CPU under
  Triton's interpreter for tests).
"auto" is "triton" for GPU tensors when triton is installed, "chunked" otherwise.

Gradients of the chunked and Triton paths, with delta_t = onehot(y_t) - softmax(W h_t):
    dlogp_t/dh_t = W^T delta_t             dlogp_t/dW = delta_t h_t^T
When W is frozen (LoRA) the first needs no upstream gradient, so the forward pass computes it per
token from the logits it already has, and backward only scales it: a loss on sequence log-probs
sends g_seq (B,), token t of sequence b gets g_seq[b], and dL/dh_t = g_seq[b] * stored_t. No
logits are recomputed (Triton path: any dtype; chunked path: fp32, see ChunkedTokenLogps). When
W trains, dL/dW = sum_t g_t delta_t h_t^T needs g inside the sum,
so backward recomputes each chunk's logits and accumulates dL/dW in fp32 across chunks.

Dtype policy: the matmuls read the compute dtype (torch's autocast dtype when autocast is on,
else the promoted dtype of hidden and weight); softmax statistics, log-probs and gradient
accumulation are fp32 (fp64 for fp64 inputs in the plain path). Outputs are fp32; gradients
come back in each input's own dtype. The chunked path keeps torch's matmul rounding (its logits
pass through the compute dtype, as plain torch does); the Triton path keeps logits in fp32.
"""

from __future__ import annotations

import torch

import kernels

IMPLS = ("auto", "plain", "chunked", "triton")
CHUNK_LOGITS_BYTES = 64 * 2**20  # fp32 logits per chunk in the chunked path: 512 tokens at V = 32000


def default_chunk_size(vocab_size: int) -> int:
    """Tokens per chunk so one fp32 (chunk, V) logits block is ~64 MiB (a power of two, >= 16)."""
    rows = max(16, CHUNK_LOGITS_BYTES // (4 * vocab_size))
    return 1 << (rows.bit_length() - 1)


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
    """Token log-probs (B, T) via full logits; 0 where ``loss_mask`` is False."""
    cd = compute_dtype_for(hidden, weight)
    logits = hidden.to(cd) @ weight.to(cd).T  # (B, T, V)
    # log_softmax in fp32 at least; fp64 stays fp64 so tests can use this as an exact reference.
    logits = logits.to(torch.promote_types(cd, torch.float32))  # (B, T, V)
    safe = torch.where(loss_mask, targets, 0)  # (B, T) masked targets may be -100
    logps = torch.log_softmax(logits, dim=-1).gather(-1, safe[..., None]).squeeze(-1)  # (B, T)
    return torch.where(loss_mask, logps, 0.0)


# ---------------------------------------------------------------------------------------------
# (b) Chunked PyTorch path
# ---------------------------------------------------------------------------------------------


def _chunk_softmax(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs (n,) fp32 and softmax (n, V) fp32 of one chunk, with a single (n, V) fp32 buffer."""
    z = (h @ w.T).float()  # (n, V) a copy for bf16, the matmul's own output for fp32
    zy = z.gather(1, y[:, None]).squeeze(1)  # (n,) target logit, before z is overwritten
    m = z.amax(dim=1, keepdim=True)  # (n, 1)
    p = z.sub_(m).exp_()  # (n, V) unnormalized, in place: no second (n, V) buffer
    s = p.sum(dim=1, keepdim=True)  # (n, 1)
    logps = zy - (m + s.log()).squeeze(1)  # (n,)
    return logps, p.div_(s)


def _delta_(p: torch.Tensor, y: torch.Tensor, g: torch.Tensor | None) -> torch.Tensor:
    """In place: softmax p (n, V) -> g * (onehot(y) - p), dlogp/dz scaled by the upstream gradient."""
    delta = p.neg_().scatter_add_(1, y[:, None], torch.ones_like(y, dtype=p.dtype)[:, None])  # (n, V)
    return delta if g is None else delta.mul_(g[:, None])


class ChunkedTokenLogps(torch.autograd.Function):
    """Packed token log-probs (M,) fp32 from hidden (M, D), weight (V, D), targets (M,)."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                compute_dtype: torch.dtype, chunk_size: int) -> torch.Tensor:
        h, w = hidden.to(compute_dtype), weight.to(compute_dtype)  # (M, D), (V, D)
        need_h, need_w = ctx.needs_input_grad[:2]
        # Frozen W: store dlogp/dh now (one matmul) instead of recomputing logits in backward.
        # Only in fp32: torch's bf16 matmul returns bf16, so a stored bf16 gradient would be
        # rounded twice (here and after scaling by g), up to 2.5x plain bf16's error in tests.
        # The Triton path stores fp32 and precomputes in every dtype.
        ctx.precomputed = need_h and not need_w and compute_dtype == torch.float32
        M, D = h.shape
        logps = torch.empty(M, device=h.device, dtype=torch.float32)  # (M,)
        if ctx.precomputed:
            grad_h = torch.empty(M, D, device=h.device, dtype=torch.float32)  # (M, D)
        for start in range(0, M, chunk_size):
            sl = slice(start, start + chunk_size)
            logps[sl], p = _chunk_softmax(h[sl], w, targets[sl])
            if ctx.precomputed:
                grad_h[sl] = _delta_(p, targets[sl], None) @ w  # (n, D)
            del p  # free this chunk's (n, V) before the next one is made
        ctx.save_for_backward(*((grad_h,) if ctx.precomputed else (h, w, targets)))
        ctx.chunk_size = chunk_size
        ctx.hidden_dtype, ctx.weight_dtype = hidden.dtype, weight.dtype
        return logps

    @staticmethod
    def backward(ctx, grad_logps: torch.Tensor):
        g = grad_logps.float()  # (M,) dL/dlogp_t
        if ctx.precomputed:
            (grad_h,) = ctx.saved_tensors
            return (grad_h * g[:, None]).to(ctx.hidden_dtype), None, None, None, None
        h, w, y = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[:2]
        grad_hidden = torch.empty_like(h, dtype=ctx.hidden_dtype) if need_h else None  # (M, D)
        grad_w = torch.zeros(w.shape, device=w.device, dtype=torch.float32) if need_w else None  # (V, D)
        for start in range(0, h.shape[0], ctx.chunk_size):
            sl = slice(start, start + ctx.chunk_size)
            _, p = _chunk_softmax(h[sl], w, y[sl])
            delta = _delta_(p, y[sl], g[sl])  # (n, V) fp32
            if need_h:
                # delta rounded to the compute dtype for the matmul, exactly as plain torch does.
                grad_hidden[sl] = delta.to(w.dtype) @ w  # (n, D)
            if need_w:
                # fp32 matmul into the fp32 accumulator: torch has no portable bf16 x bf16 -> fp32
                # matmul, and rounding each chunk's (V, D) partial to bf16 before summing measured
                # up to 1.9x plain bf16's error. Exact, but at fp32 matmul speed: on GPUs the
                # Triton path is the fast one. bf16 sums across chunks diverge (Liger-Kernel #512).
                grad_w.addmm_(delta.T, h[sl].float())
            del p, delta
        return grad_hidden, grad_w.to(ctx.weight_dtype) if need_w else None, None, None, None


def chunked_token_logps(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                        compute_dtype: torch.dtype | None = None,
                        chunk_size: int | None = None) -> torch.Tensor:
    """Packed token log-probs: hidden (M, D), targets (M,) all valid -> (M,) fp32."""
    compute_dtype = compute_dtype or torch.promote_types(hidden.dtype, weight.dtype)
    chunk_size = chunk_size or default_chunk_size(weight.shape[0])
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return ChunkedTokenLogps.apply(hidden, weight, targets, compute_dtype, chunk_size)
    h, w = hidden.to(compute_dtype), weight.to(compute_dtype)  # (M, D), (V, D)
    # No graph: one chunk at a time, log-probs only.
    out = [_chunk_softmax(h[s:s + chunk_size], w, targets[s:s + chunk_size])[0]
           for s in range(0, h.shape[0], chunk_size)]
    return torch.cat(out) if out else h.new_zeros(0, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------------------------


def resolve_impl(impl: str, hidden: torch.Tensor) -> str:
    """The implementation "auto" stands for on ``hidden``'s device."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        return "triton" if hidden.is_cuda and kernels.HAS_TRITON else "chunked"
    if impl == "triton" and not kernels.HAS_TRITON:
        raise RuntimeError("impl='triton' needs the triton package")
    return impl


def token_logps(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, loss_mask: torch.Tensor,
                *, impl: str = "auto", chunk_size: int | None = None) -> torch.Tensor:
    """log p(targets[b, t] | hidden[b, t]) as (B, T) fp32, 0 where ``loss_mask`` is False.

    hidden (B, T, D) or (B*T, D); weight (V, D); targets (B, T) int64, already aligned with
    hidden (see the module docstring); loss_mask (B, T) bool. ``chunk_size`` is tokens per chunk
    for "chunked" and "triton" (default: a memory-based heuristic).
    """
    B, T = targets.shape
    if hidden.shape[:-1] not in ((B, T), (B * T,)) or loss_mask.shape != (B, T):
        raise ValueError(f"hidden {tuple(hidden.shape)}, targets {(B, T)} and loss_mask "
                         f"{tuple(loss_mask.shape)} do not line up")
    if loss_mask.dtype != torch.bool:
        raise ValueError(f"loss_mask must be bool, got {loss_mask.dtype}")
    impl = resolve_impl(impl, hidden)
    if impl == "plain":
        return plain_token_logps(hidden.reshape(B, T, -1), weight, targets, loss_mask)

    keep = loss_mask.reshape(-1)  # (B*T,)
    # Pack the response tokens: prompt and padding cost nothing downstream. Boolean indexing is
    # one host sync per call (the packed size depends on the mask); so is the range check, which
    # the kernels need because an out-of-range target would read out of bounds there.
    h = hidden[loss_mask] if hidden.dim() == 3 else hidden[keep]  # (M, D), no copy of the rest
    y = targets[loss_mask]  # (M,)
    if y.numel() and not bool(((y >= 0) & (y < weight.shape[0])).all()):
        raise ValueError(f"targets under loss_mask must lie in [0, {weight.shape[0]})")
    cd = compute_dtype_for(hidden, weight)
    # The Functions run their own dtype policy; autocast must not recast inside them.
    with torch.autocast(hidden.device.type, enabled=False):
        if impl == "chunked":
            packed = chunked_token_logps(h, weight, y, compute_dtype=cd, chunk_size=chunk_size)  # (M,)
        else:
            from kernels.fused_logprobs import fused_token_logps

            packed = fused_token_logps(h, weight, y, compute_dtype=cd, chunk_rows=chunk_size)  # (M,)
    # Scatter back to (B, T): a deterministic op, unlike an index_add over sequences would be.
    return packed.new_zeros(B * T).masked_scatter(keep, packed).view(B, T)


def sequence_logps(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, loss_mask: torch.Tensor,
                   *, impl: str = "auto", chunk_size: int | None = None) -> torch.Tensor:
    """log pi(y | x) per sequence: (B,) fp32, the sum of ``token_logps`` over masked-in positions.

    Typical use for a preference batch (chosen rows first, then rejected):
        hidden = model(ids, return_hidden=True)[:, :-1]
        logps = sequence_logps(hidden, model.lm_head.weight, ids[:, 1:], response_mask[:, 1:])
        policy_chosen_logps, policy_rejected_logps = logps.chunk(2)
    """
    return token_logps(hidden, weight, targets, loss_mask, impl=impl, chunk_size=chunk_size).sum(dim=-1)
