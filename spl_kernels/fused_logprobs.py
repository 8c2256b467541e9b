"""Softmax over rows of logits, fused with the target gather, ignore-index and dlogp/dz: Triton.

This is the one custom kernel of the fast log-prob path (``spl/logprobs.py`` holds the algorithm
and the reasons for its shape: cuBLAS for the three matmuls, this kernel for everything between
them). For a block of logits z (n, V), one row per token, and targets y (n,) it computes, with
one read of each row for the statistics and one read and write for the gradient:

    lse   = log sum_v exp(z_v)                       (online: running max and rescaled sum)
    logp  = z_y - lse                                 log p(y), paper eq. 5 per token
    delta = g * (onehot(y) - exp(z - lse))            dL/dz, written over z in z's dtype

``g`` is dL/dlogp per token (1 when the gradient is precomputed for a frozen weight). A target of
``IGNORE_INDEX`` (-100, as in torch's cross-entropy) gives logp = 0 and delta = 0 and its logits
are never read; any other target outside [0, V) gives logp = NaN and a NaN delta row, so a bad
label poisons the loss (and the trainer's finite-loss check stops) instead of reading out of
bounds; nothing here syncs with the host to check it.

Numerics: logits are read in their dtype and everything is computed in fp32. delta is rounded
once, to nearest-even, into z's dtype, as torch rounds g * (onehot - softmax) before its matmul.
That rounding is done with integer operations on the fp32 bits (``_round_to_bf16``) rather than
by the cast alone: on a GPU the cast rounds to nearest-even too, so the bits are the same, and
Triton's CPU interpreter, whose fp32 -> bf16 cast truncates, then runs exactly the GPU's
arithmetic, so the CPU tests check the numbers a GPU produces. Running maxima start at a large
finite negative, not -inf, so masked lanes never compute inf - inf.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from spl_kernels.heuristics import RowsConfig

IGNORE_INDEX = -100
# Compiled kernels may read only tl.constexpr globals (the interpreter allows any).
NEG_BIG = tl.constexpr(-1e30)  # exp(NEG_BIG - m) == 0 and NEG_BIG - NEG_BIG == 0
# No NaN among these: a compiled kernel checks at every launch that the globals it read still
# equal their values at compile time, and NaN != NaN, so a NaN global fails every launch after
# the first ("Global variable NAN has changed since we compiled this kernel", seen on an H200).
# The kernel makes its NaN by bitcasting the quiet-NaN bit pattern instead.
QUIET_NAN_BITS = tl.constexpr(0x7FC00000)
IGNORE = tl.constexpr(IGNORE_INDEX)
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _round_to_bf16(x):
    """fp32 -> bf16 rounded to nearest-even, as integer operations on the bits (finite x)."""
    bits = x.to(tl.uint32, bitcast=True)
    # Add half of the 16 dropped bits (minus one when the kept part is even: ties go to even),
    # then drop them; the cast that follows is then exact, truncating or not.
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16 << 16
    return bits.to(tl.float32, bitcast=True).to(tl.bfloat16)


@triton.jit
def _softmax_rows_kernel(
    z_ptr,  # (n, V) logits, row stride `stride`; overwritten by delta when DELTA
    y_ptr,  # (n,) int64 targets: IGNORE_INDEX = skip the row, outside [0, V) = invalid
    g_ptr,  # (n,) fp32 dL/dlogp per token, read when SCALED
    lse_ptr,  # (n,) fp32 logsumexp per row: written when STATS, else read
    logp_ptr,  # (n,) fp32 out when STATS: z_y - lse; 0 for ignored rows, NaN for invalid ones
    n, V, stride,  # rows, vocabulary size, elements between rows of z
    ROWS: tl.constexpr,  # rows per program
    BLOCK: tl.constexpr,  # vocabulary entries per step
    STATS: tl.constexpr,  # compute lse and logp (else lse comes from an earlier launch)
    DELTA: tl.constexpr,  # overwrite z with g * (onehot(y) - softmax(z))
    SCALED: tl.constexpr,  # delta scaled by g (else g = 1: the unscaled dlogp/dz)
    BF16: tl.constexpr,  # z holds bf16: round delta with _round_to_bf16
):
    # int64 row offsets: n * V passes 2^31 at V = 256000 and n = 8192.
    r = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)  # (ROWS,)
    c = tl.arange(0, BLOCK)  # (BLOCK,)
    row_ok = r < n
    rows = z_ptr + r[:, None] * stride  # (ROWS, 1) row starts
    y = tl.load(y_ptr + r, mask=row_ok, other=IGNORE)  # (ROWS,)
    ignored = y == IGNORE
    valid = (y >= 0) & (y < V)
    nan = tl.full((ROWS,), QUIET_NAN_BITS, tl.int32).to(tl.float32, bitcast=True)  # (ROWS,)
    read = row_ok & ~ignored  # ignored rows are never read: prompt and padding cost no traffic

    # 1. Online logsumexp over vocabulary blocks: per step, the block max m_j and a running sum
    #    rescaled to the new max, s = s exp(m - m') + sum exp(z - m').
    if STATS:
        m = tl.full((ROWS,), NEG_BIG, tl.float32)
        s = tl.zeros((ROWS,), tl.float32)
        for v0 in range(0, V, BLOCK):
            ok = read[:, None] & (c[None, :] < V - v0)
            z = tl.load(rows + v0 + c[None, :], mask=ok, other=0.0).to(tl.float32)  # (ROWS, BLOCK)
            z = tl.where(ok, z, NEG_BIG)  # after the upcast: NEG_BIG is -inf in fp16
            m_new = tl.maximum(m, tl.max(z, axis=1))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
            m = m_new
        lse = tl.where(read, m + tl.log(s), 0.0)  # (ROWS,) 0 for unread rows keeps step 3 finite
        # 2. The target's logit: one scalar load per row, before delta overwrites z.
        zy = tl.load(z_ptr + r * stride + tl.where(valid, y, 0), mask=read & valid, other=0.0).to(tl.float32)
        logp = tl.where(valid, zy - lse, tl.where(ignored, 0.0, nan))
        tl.store(lse_ptr + r, lse, mask=row_ok)
        tl.store(logp_ptr + r, logp, mask=row_ok)
    else:
        lse = tl.load(lse_ptr + r, mask=row_ok, other=0.0)

    # 3. delta = g (onehot(y) - exp(z - lse)), one exponential per entry, rounded once. Ignored
    #    rows get zeros (the matmuls after this read every row); invalid rows get NaN.
    if DELTA:
        if SCALED:
            g = tl.load(g_ptr + r, mask=row_ok, other=0.0)
        else:
            g = tl.full((ROWS,), 1.0, tl.float32)
        g = tl.where(valid, g, nan)
        for v0 in range(0, V, BLOCK):
            col_ok = c[None, :] < V - v0
            z = tl.load(rows + v0 + c[None, :], mask=read[:, None] & col_ok, other=0.0).to(tl.float32)
            # int32 column compare; an int32 wrap of a huge invalid target only touches a NaN row.
            onehot = c[None, :] == (y - v0).to(tl.int32)[:, None]  # (ROWS, BLOCK)
            delta = g[:, None] * (tl.where(onehot, 1.0, 0.0) - tl.exp(z - lse[:, None]))
            delta = tl.where(ignored[:, None], 0.0, delta)
            if BF16:
                out = _round_to_bf16(delta)
            else:
                out = delta.to(z_ptr.dtype.element_ty)
            tl.store(rows + v0 + c[None, :], out, mask=row_ok[:, None] & col_ok)


def softmax_rows(z: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, logp: torch.Tensor | None,
                 *, stats: bool, delta: bool, grad: torch.Tensor | None, config: RowsConfig) -> None:
    """One launch over the rows of ``z`` (n, V); see the module docstring for what each flag does.

    ``lse`` (n,) fp32 is written when ``stats``, else read; ``logp`` (n,) fp32 is written when
    ``stats``; ``grad`` (n,) fp32 scales delta (None: unscaled). ``z`` must have unit column stride.
    """
    n, V = z.shape
    if n == 0:
        return
    if z.dtype not in SUPPORTED_DTYPES or z.stride(1) != 1:
        raise ValueError(f"softmax_rows needs {SUPPORTED_DTYPES} logits with unit column stride, "
                         f"got {z.dtype} with strides {z.stride()}")
    _softmax_rows_kernel[(triton.cdiv(n, config.rows),)](
        z, targets, grad if grad is not None else lse, lse, logp if logp is not None else lse,
        n, V, z.stride(0), ROWS=config.rows, BLOCK=config.block, STATS=stats, DELTA=delta,
        SCALED=grad is not None, BF16=z.dtype == torch.bfloat16, num_warps=config.num_warps)
