"""Fused output projection + log-softmax + target gather in Triton, forward and backward.

This computes the log pi(y | x) of SPL's objective (paper eq. 5) without a (tokens, V) logits
tensor in the forward pass. For a token with hidden state h (D,), output weight W (V, D) and
target y, with logits z = W h (V,):

    log p(y) = z[y] - logsumexp(z)                      per token
    log pi(y | x) = sum of log p(y_t) over response tokens   per sequence

Gradients. With delta = onehot(y) - softmax(z) (V,), the derivative of log p(y) is
    d log p(y) / dz = delta
    d log p(y) / dh = W^T delta = W[y] - softmax(z) @ W                     (D,)
    d log p(y) / dW = delta h^T                                             (V, D)
A loss on sequence log-probs (SPL, DPO, SFT) hands back one number per sequence, g_seq (B,), and
every token t of sequence b gets g_t = g_seq[b]; so
    dL/dh_t = g_t W^T delta_t          dL/dW = sum_t g_t delta_t h_t^T.
Composing the SPL loss on top therefore costs a (B,)-sized op forward and a (tokens,)-sized
broadcast backward: no extra (tokens, V) traffic, whichever loss sits on top.

Two gradient strategies, chosen per call from what needs a gradient:
- Frozen W (LoRA): dlogp_t/dh_t = W^T delta_t does not depend on g, so the forward pass computes
  it (unscaled, fp32, (tokens, D)) from the logits it has just made, and backward is the
  elementwise g_t * stored. 4 N D V FLOPs in all, the matmul floor; the plain path needs the same
  two matmuls plus (tokens, V) traffic, and recomputing in backward would cost a third matmul.
- W trains (full fine-tuning): dL/dW needs g_t inside a (V, D) sum, so nothing useful can be
  precomputed; forward computes only the log-probs (2 N D V), and backward recomputes each
  chunk's logits (2 N D V) before both gradient matmuls (4 N D V): 8 N D V versus the plain
  path's 6 N D V, the price of never storing (tokens, V).
The same forward, storing nothing, serves the no-grad reference pass.

Three kernels, each a GEMM with its softmax work fused into it:
- ``_logits_kernel``: one (tokens, vocab) tile of z = h W^T per program, reduced in its epilogue
  to the tile's max, sum of exp and (if present) the target's logit: the online log-softmax,
  whose per-tile (max, sum) pairs the launcher merges across tiles, m = max_j m_j,
  lse = m + log sum_j s_j exp(m_j - m), as one (tokens, V / BLOCK_V) torch op. Optionally stores
  the fp32 tile for the gradient kernels.
- ``_hidden_grad_kernel``: g_t W^T delta_t, building delta tiles from the stored logits.
- ``_weight_grad_kernel``: sum_t g_t delta_t h_t^T, added into a fp32 (V, D) accumulator.

Why the gradient path stores one chunk of fp32 logits: W^T delta needs softmax(z), i.e. the
logsumexp over all of V, before the second matmul. A flash-attention-style single pass would
carry a (BLOCK_N, D) accumulator per program, 1 MiB at D = 4096, which fits no on-chip memory;
splitting D across programs would recompute the logits D / BLOCK_D times; atomics across vocab
tiles would make results vary run to run. So logits go to a (chunk_rows, V) fp32 scratch once
(written by the logits kernel, read by the gradient kernels), and every result is bitwise
repeatable.

Numerics: all accumulation in fp32 (logits, softmax statistics, both gradient matmuls, and the
(V, D) weight gradient across chunks). On a GPU, bf16 inputs feed tl.dot as bf16 with fp32
accumulation, and delta is rounded to the input dtype before its matmul, as plain torch does.
Under Triton's CPU interpreter, bf16 arithmetic and tl.dot on bf16 are wrong and fp32 -> bf16
casts truncate, so there operands are upcast to fp32 right after loading (bf16 values and their
products are exact in fp32, so this matches the tensor-core result up to summation order) and
kernels write fp32 only; torch rounds the final gradients. Running maxima start at -1e30, not
-inf, so masked lanes never compute inf - inf.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from kernels.heuristics import KernelConfig, kernel_config

# "Minus infinity" that stays finite: exp(NEG_BIG - m) == 0 and NEG_BIG - NEG_BIG == 0. A
# tl.constexpr, because compiled kernels may read no other kind of global (the interpreter allows it).
NEG_BIG = tl.constexpr(-1e30)
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _logits_kernel(
    h_ptr,  # (N, D) hidden states of this chunk, row-major
    w_ptr,  # (V, D) output projection, row-major
    y_ptr,  # (N,) int64 targets, all in [0, V)
    m_ptr,  # (N, TILES) fp32 out: each row's max logit within each vocabulary tile
    s_ptr,  # (N, TILES) fp32 out: sum of exp(logit - that max) within each tile
    zy_ptr,  # (N,) fp32 out: the target's logit, written by the one tile that holds it
    z_ptr,  # (N, V) fp32 out: the logits themselves, written only when STORE_LOGITS
    N, V, D,  # tokens, vocabulary size, model dim
    BLOCK_N: tl.constexpr,  # tokens per tile
    BLOCK_V: tl.constexpr,  # vocabulary entries per tile
    BLOCK_D: tl.constexpr,  # model dims per reduction step
    STORE_LOGITS: tl.constexpr,  # the gradient path keeps this chunk's logits for its matmuls
    UPCAST: tl.constexpr,  # upcast operands to fp32 (interpreter), else dot in the input dtype
    PRECISION: tl.constexpr,  # tl.dot input_precision for fp32 operands: "ieee" or "tf32"
):
    # Grid (token tiles, vocab tiles), token tiles fastest: programs running together read the
    # same W tile and share it through L2. Offsets: scalar int64 bases per program plus int32
    # in-tile offsets; (BLOCK, BLOCK) tensors of 64-bit pointers would cost registers (spills).
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    r = tl.arange(0, BLOCK_N)
    c = tl.arange(0, BLOCK_V)
    dd = tl.arange(0, BLOCK_D)
    row0 = pid_n.to(tl.int64) * BLOCK_N
    col0 = pid_v.to(tl.int64) * BLOCK_V
    row_ok = r < N - row0
    col_ok = c < V - col0

    # 1. The (BLOCK_N, BLOCK_V) logits tile, fp32 accumulation over D.
    h_base = h_ptr + row0 * D
    w_base = w_ptr + col0 * D
    h_offs = r[:, None] * D + dd[None, :]  # (BLOCK_N, BLOCK_D)
    w_offs = dd[:, None] + c[None, :] * D  # (BLOCK_D, BLOCK_V), W^T read in place
    z = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d_ok = dd < D - d0
        h = tl.load(h_base + h_offs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        w = tl.load(w_base + w_offs, mask=d_ok[:, None] & col_ok[None, :], other=0.0)
        if UPCAST:
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        z = tl.dot(h, w, z, input_precision=PRECISION)
        h_base += BLOCK_D
        w_base += BLOCK_D
    if STORE_LOGITS:
        tl.store(z_ptr + row0 * V + col0 + (r[:, None] * V + c[None, :]), z,
                 mask=row_ok[:, None] & col_ok[None, :])

    # 2. This tile's share of the log-softmax: its max and sum of exp. Columns past V must not
    #    count; a finite -1e30 gives exp(...) == 0 without any inf - inf.
    z = tl.where(col_ok[None, :], z, NEG_BIG)
    m = tl.max(z, axis=1)  # (BLOCK_N,)
    s = tl.sum(tl.exp(z - m[:, None]), axis=1)  # (BLOCK_N,)
    tiles = tl.num_programs(1)
    tl.store(m_ptr + (row0 + r) * tiles + pid_v, m, mask=row_ok)
    tl.store(s_ptr + (row0 + r) * tiles + pid_v, s, mask=row_ok)

    # 3. Gather the target logit; int32 targets keep the (BLOCK_N, BLOCK_V) compare cheap.
    y = (tl.load(y_ptr + row0 + r, mask=row_ok, other=-1) - col0).to(tl.int32)  # target's column here
    zy = tl.sum(tl.where(c[None, :] == y[:, None], z, 0.0), axis=1)
    tl.store(zy_ptr + row0 + r, zy, mask=row_ok & (y >= 0) & (y < BLOCK_V))


@triton.jit
def _hidden_grad_kernel(
    z_ptr,  # (N, V) fp32 logits of this chunk
    lse_ptr,  # (N,) fp32 logsumexp of each row
    w_ptr,  # (V, D) output projection
    y_ptr,  # (N,) int64 targets
    g_ptr,  # (N,) fp32 per-token scale: dL/dlogp_t in backward, 1 in the frozen-W forward
    out_ptr,  # (N, D) fp32 out: g_t * W^T (onehot(y_t) - softmax(z_t))
    N, V, D,  # tokens, vocabulary size, model dim
    BLOCK_N: tl.constexpr,  # tokens per output tile
    BLOCK_D: tl.constexpr,  # model dims per output tile
    BLOCK_V: tl.constexpr,  # vocabulary entries per reduction step
    UPCAST: tl.constexpr,  # see _logits_kernel
    PRECISION: tl.constexpr,  # see _logits_kernel
):
    # dlogp_t/dh_t = W^T delta_t, delta_t = onehot(y_t) - exp(z_t - lse_t): a (N, V) @ (V, D)
    # GEMM whose left operand is built in registers from the stored logits, never stored itself.
    pid_n = tl.program_id(0)
    pid_d = tl.program_id(1)
    r = tl.arange(0, BLOCK_N)
    dd = tl.arange(0, BLOCK_D)
    v = tl.arange(0, BLOCK_V)
    row0 = pid_n.to(tl.int64) * BLOCK_N
    row_ok = r < N - row0
    d_ok = dd < D - pid_d * BLOCK_D
    lse = tl.load(lse_ptr + row0 + r, mask=row_ok, other=0.0)
    y = tl.load(y_ptr + row0 + r, mask=row_ok, other=-1).to(tl.int32)
    g = tl.load(g_ptr + row0 + r, mask=row_ok, other=0.0)

    z_base = z_ptr + row0 * V
    w_base = w_ptr + pid_d * BLOCK_D
    z_offs = r[:, None] * V + v[None, :]  # (BLOCK_N, BLOCK_V)
    w_offs = v[:, None] * D + dd[None, :]  # (BLOCK_V, BLOCK_D)
    acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        col_ok = v < V - v0
        # 1. delta tile, scaled by g before any rounding, as autograd would.
        z = tl.load(z_base + z_offs, mask=row_ok[:, None] & col_ok[None, :], other=NEG_BIG)
        onehot = tl.where(v[None, :] == (y - v0)[:, None], 1.0, 0.0)
        delta = g[:, None] * (onehot - tl.exp(z - lse[:, None]))  # (BLOCK_N, BLOCK_V)
        # 2. delta @ W tile; on a GPU delta is rounded to W's dtype for the tensor cores.
        w = tl.load(w_base + w_offs, mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:
            w = w.to(tl.float32)
        else:
            delta = delta.to(w.dtype)
        acc = tl.dot(delta, w, acc, input_precision=PRECISION)
        z_base += BLOCK_V
        w_base += BLOCK_V * D
    out = out_ptr + row0 * D + pid_d * BLOCK_D
    tl.store(out + (r[:, None] * D + dd[None, :]), acc, mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _weight_grad_kernel(
    z_ptr,  # (N, V) fp32 logits of this chunk
    lse_ptr,  # (N,) fp32 logsumexp of each row
    h_ptr,  # (N, D) hidden states of this chunk
    y_ptr,  # (N,) int64 targets
    g_ptr,  # (N,) fp32 per-token dL/dlogp_t
    gw_ptr,  # (V, D) fp32 in/out: weight-gradient accumulator, += this chunk's sum
    N, V, D,  # tokens, vocabulary size, model dim
    BLOCK_V: tl.constexpr,  # vocabulary entries per output tile
    BLOCK_D: tl.constexpr,  # model dims per output tile
    BLOCK_N: tl.constexpr,  # tokens per reduction step
    UPCAST: tl.constexpr,  # see _logits_kernel
    PRECISION: tl.constexpr,  # see _logits_kernel
):
    # dL/dW = sum_t g_t delta_t h_t^T: a (V, N) @ (N, D) GEMM over this chunk's tokens. Each
    # program owns one (BLOCK_V, BLOCK_D) tile of the fp32 accumulator, so the read-add-write at
    # the end races with nothing and sums chunks in a fixed order: bitwise repeatable, and fp32
    # across chunks (bf16 accumulation there diverges; Liger-Kernel #512).
    pid_v = tl.program_id(0)
    pid_d = tl.program_id(1)
    c = tl.arange(0, BLOCK_V)
    dd = tl.arange(0, BLOCK_D)
    t = tl.arange(0, BLOCK_N)
    col0 = pid_v * BLOCK_V
    col_ok = c < V - col0
    d_ok = dd < D - pid_d * BLOCK_D

    z_base = z_ptr + col0
    h_base = h_ptr + pid_d * BLOCK_D
    zt_offs = t[None, :] * V + c[:, None]  # (BLOCK_V, BLOCK_N): delta^T read from row-major z
    h_offs = t[:, None] * D + dd[None, :]  # (BLOCK_N, BLOCK_D)
    acc = tl.zeros((BLOCK_V, BLOCK_D), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        row_ok = t < N - n0
        lse = tl.load(lse_ptr + n0 + t, mask=row_ok, other=0.0)
        y = tl.load(y_ptr + n0 + t, mask=row_ok, other=-1).to(tl.int32) - col0  # target's row here
        g = tl.load(g_ptr + n0 + t, mask=row_ok, other=0.0)
        # 1. delta^T tile (BLOCK_V, BLOCK_N).
        zt = tl.load(z_base + zt_offs, mask=col_ok[:, None] & row_ok[None, :], other=NEG_BIG)
        onehot = tl.where(c[:, None] == y[None, :], 1.0, 0.0)
        delta_t = g[None, :] * (onehot - tl.exp(zt - lse[None, :]))
        # 2. delta^T @ h tile.
        h = tl.load(h_base + h_offs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:
            h = h.to(tl.float32)
        else:
            delta_t = delta_t.to(h.dtype)
        acc = tl.dot(delta_t, h, acc, input_precision=PRECISION)
        z_base += BLOCK_N * V
        h_base += BLOCK_N * D
    gw = gw_ptr + col0.to(tl.int64) * D + pid_d * BLOCK_D
    offs = c[:, None] * D + dd[None, :]
    tile_ok = col_ok[:, None] & d_ok[None, :]
    acc += tl.load(gw + offs, mask=tile_ok, other=0.0)
    tl.store(gw + offs, acc, mask=tile_ok)


# ---------------------------------------------------------------------------------------------
# Launchers (one chunk of tokens each)
# ---------------------------------------------------------------------------------------------


def _dot_flags(x: torch.Tensor) -> dict:
    # CPU tensors reach Triton only through its interpreter, whose bf16 arithmetic is wrong.
    upcast = x.device.type == "cpu"
    # fp32 dots follow torch's own matmul setting, so "highest" means IEEE fp32 here too.
    precision = "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"
    return dict(UPCAST=upcast, PRECISION=precision)


def _logsumexp_chunk(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor, cfg: KernelConfig,
                     z_out: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(lse, target logit), both (n,) fp32, for one chunk; fills ``z_out`` (n, V) when given."""
    n, D = h.shape
    V = w.shape[0]
    t = cfg.logits
    tiles = triton.cdiv(V, t.n)
    m = torch.empty(n, tiles, device=h.device, dtype=torch.float32)  # (n, tiles)
    s = torch.empty(n, tiles, device=h.device, dtype=torch.float32)  # (n, tiles)
    zy = torch.empty(n, device=h.device, dtype=torch.float32)  # (n,)
    _logits_kernel[(triton.cdiv(n, t.m), tiles)](
        h, w, y, m, s, zy, z_out if z_out is not None else m, n, V, D,
        BLOCK_N=t.m, BLOCK_V=t.n, BLOCK_D=t.k, STORE_LOGITS=z_out is not None, **_dot_flags(h),
        num_warps=t.num_warps, num_stages=t.num_stages)
    # The online-softmax merge of the tiles' (max, sum) pairs: one (n, tiles) op, no atomics.
    m_all = m.amax(dim=1, keepdim=True)  # (n, 1)
    lse = m_all.squeeze(1) + torch.log(torch.sum(s * torch.exp(m - m_all), dim=1))  # (n,)
    return lse, zy


def _hidden_grad_chunk(z: torch.Tensor, lse: torch.Tensor, w: torch.Tensor, y: torch.Tensor,
                       g: torch.Tensor, out: torch.Tensor, cfg: KernelConfig) -> None:
    """out (n, D) fp32 = g * W^T (onehot(y) - softmax(z)) for one chunk."""
    n, V = z.shape
    D = w.shape[1]
    t = cfg.hidden_grad
    _hidden_grad_kernel[(triton.cdiv(n, t.m), triton.cdiv(D, t.n))](
        z, lse, w, y, g, out, n, V, D, BLOCK_N=t.m, BLOCK_D=t.n, BLOCK_V=t.k, **_dot_flags(z),
        num_warps=t.num_warps, num_stages=t.num_stages)


def _weight_grad_chunk(z: torch.Tensor, lse: torch.Tensor, h: torch.Tensor, y: torch.Tensor,
                       g: torch.Tensor, gw: torch.Tensor, cfg: KernelConfig) -> None:
    """gw (V, D) fp32 += sum over the chunk of g_t (onehot(y_t) - softmax(z_t)) h_t^T."""
    n, V = z.shape
    D = h.shape[1]
    t = cfg.weight_grad
    _weight_grad_kernel[(triton.cdiv(V, t.m), triton.cdiv(D, t.n))](
        z, lse, h, y, g, gw, n, V, D, BLOCK_V=t.m, BLOCK_D=t.n, BLOCK_N=t.k, **_dot_flags(z),
        num_warps=t.num_warps, num_stages=t.num_stages)


def _forward(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor, cfg: KernelConfig,
             with_hidden_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token log-probs (M,) fp32 and, if asked, the unscaled dlogp/dh (M, D) fp32."""
    M, D = h.shape
    V = w.shape[0]
    logps = torch.empty(M, device=h.device, dtype=torch.float32)  # (M,)
    grad_h = torch.empty(M, D, device=h.device, dtype=torch.float32) if with_hidden_grad else None  # (M, D)
    if with_hidden_grad:
        rows = min(cfg.chunk_rows, M)
        z = torch.empty(rows, V, device=h.device, dtype=torch.float32)  # (chunk, V), reused by every chunk
        ones = torch.ones(rows, device=h.device, dtype=torch.float32)  # (chunk,) g = 1: unscaled gradient
    # Without a gradient to precompute, the whole batch is one chunk: no scratch, one launch.
    step = cfg.chunk_rows if with_hidden_grad else max(M, 1)
    for start in range(0, M, step):
        sl = slice(start, min(start + step, M))
        n = sl.stop - sl.start
        lse, zy = _logsumexp_chunk(h[sl], w, y[sl], cfg, z[:n] if with_hidden_grad else None)
        logps[sl] = zy - lse
        if with_hidden_grad:
            _hidden_grad_chunk(z[:n], lse, w, y[sl], ones[:n], grad_h[sl], cfg)
    return logps, grad_h


# ---------------------------------------------------------------------------------------------
# autograd.Function
# ---------------------------------------------------------------------------------------------


class FusedTokenLogps(torch.autograd.Function):
    """Packed token log-probs (M,) fp32 from hidden (M, D), weight (V, D), targets (M,)."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                compute_dtype: torch.dtype, cfg: KernelConfig) -> torch.Tensor:
        h = hidden.to(compute_dtype).contiguous()  # (M, D)
        w = weight.to(compute_dtype).contiguous()  # (V, D)
        y = targets.contiguous()  # (M,)
        need_h, need_w = ctx.needs_input_grad[:2]
        # Frozen W: the hidden gradient costs one matmul now against two (recompute + matmul) later.
        ctx.precomputed = need_h and not need_w
        logps, grad_h = _forward(h, w, y, cfg, with_hidden_grad=ctx.precomputed)
        if ctx.precomputed:
            ctx.save_for_backward(grad_h)
        else:
            ctx.save_for_backward(h, w, y)
        ctx.cfg = cfg
        ctx.hidden_dtype, ctx.weight_dtype = hidden.dtype, weight.dtype
        return logps

    @staticmethod
    def backward(ctx, grad_logps: torch.Tensor):
        g = grad_logps.float().contiguous()  # (M,) dL/dlogp_t
        if ctx.precomputed:
            (grad_h,) = ctx.saved_tensors
            # fp32 product, one rounding to the hidden dtype.
            return (grad_h * g[:, None]).to(ctx.hidden_dtype), None, None, None, None
        h, w, y = ctx.saved_tensors
        cfg = ctx.cfg
        need_h, need_w = ctx.needs_input_grad[:2]
        M, D = h.shape
        V = w.shape[0]
        rows = min(cfg.chunk_rows, M)
        z = torch.empty(rows, V, device=h.device, dtype=torch.float32)  # (chunk, V)
        f32 = dict(device=h.device, dtype=torch.float32)
        grad_hidden = torch.empty(M, D, device=h.device, dtype=ctx.hidden_dtype) if need_h else None  # (M, D)
        grad_chunk = torch.empty(rows, D, **f32) if need_h else None  # (chunk, D)
        gw = torch.zeros(V, D, **f32) if need_w else None  # (V, D)
        for start in range(0, M, cfg.chunk_rows):
            sl = slice(start, min(start + cfg.chunk_rows, M))
            n = sl.stop - sl.start
            # Recompute this chunk's logits; its logsumexp is bitwise the forward's.
            lse, _ = _logsumexp_chunk(h[sl], w, y[sl], cfg, z[:n])
            if need_h:
                _hidden_grad_chunk(z[:n], lse, w, y[sl], g[sl], grad_chunk[:n], cfg)
                grad_hidden[sl] = grad_chunk[:n]
            if need_w:
                _weight_grad_chunk(z[:n], lse, h[sl], y[sl], g[sl], gw, cfg)
        grad_weight = gw.to(ctx.weight_dtype) if need_w else None
        return grad_hidden, grad_weight, None, None, None


# ---------------------------------------------------------------------------------------------
# Functional wrappers
# ---------------------------------------------------------------------------------------------


def fused_token_logps(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                      compute_dtype: torch.dtype | None = None, chunk_rows: int | None = None,
                      config: KernelConfig | None = None) -> torch.Tensor:
    """log p(targets[t] | hidden[t]) for packed tokens: hidden (M, D), targets (M,) -> (M,) fp32.

    Every row counts (pack away prompt and padding first; ``fused_sequence_logps`` does). Targets
    must lie in [0, V): the kernels do not check. ``compute_dtype`` (default: the promoted dtype
    of the inputs) is what the matmuls read; gradients come back in each input's own dtype.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"expected hidden (M, D) and weight (V, D), got {tuple(hidden.shape)}, "
                         f"{tuple(weight.shape)}")
    if targets.shape != hidden.shape[:1] or targets.dtype != torch.int64:
        raise ValueError(f"expected int64 targets of shape ({hidden.shape[0]},), got {targets.dtype} "
                         f"{tuple(targets.shape)}")
    compute_dtype = compute_dtype or torch.promote_types(hidden.dtype, weight.dtype)
    if compute_dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"fused log-probs support {SUPPORTED_DTYPES}, got {compute_dtype}")
    if hidden.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("Triton kernels take CPU tensors only under its interpreter: set "
                           "TRITON_INTERPRET=1 before triton is first imported")
    if config is None:
        config = kernel_config(hidden.device, compute_dtype, weight.shape[0], weight.requires_grad)
    if chunk_rows is not None:
        config = config.with_chunk_rows(chunk_rows)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return FusedTokenLogps.apply(hidden, weight, targets, compute_dtype, config)
    # No graph (reference model, evaluation): the online logsumexp alone, nothing stored.
    h = hidden.to(compute_dtype).contiguous()  # (M, D)
    w = weight.to(compute_dtype).contiguous()  # (V, D)
    return _forward(h, w, targets.contiguous(), config, with_hidden_grad=False)[0]


def fused_sequence_logps(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         loss_mask: torch.Tensor, **kwargs) -> torch.Tensor:
    """Sum of log p(targets[b, t]) over positions where ``loss_mask`` is True: (B,) fp32.

    hidden (B, T, D), targets and loss_mask (B, T), already aligned: targets[b, t] is the token
    predicted from hidden[b, t]. Masked-out targets may hold anything (e.g. -100). The sum per
    sequence is a (B, T) torch op, not an in-kernel atomic, so it is bitwise repeatable.
    ``spl.logprobs.sequence_logps`` is the entry point the library uses; this one keeps kernels/
    usable on its own.
    """
    # Boolean indexing syncs with the host once (its size depends on the mask); it lets the
    # kernels skip prompt and padding tokens entirely.
    packed = fused_token_logps(hidden[loss_mask], weight, targets[loss_mask], **kwargs)  # (M,)
    token_logps = torch.zeros(targets.shape, device=packed.device).masked_scatter(loss_mask, packed)  # (B, T)
    return token_logps.sum(dim=-1)
