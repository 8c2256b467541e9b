"""Tile sizes, warps and chunking for the fused log-prob kernels: the one place they are chosen.

The three kernels of ``fused_logprobs.py`` are GEMM-shaped, each with its own output tile (m x n)
and reduction step k:

    logits       (tokens x D) @ (D x V)        tile tokens x vocab,  k over model dims
    hidden grad  (tokens x V) @ (V x D)        tile tokens x dims,   k over vocab
    weight grad  (V x tokens) @ (tokens x D)   tile vocab x dims,    k over tokens

Where the numbers come from. No GPU was available to time them, so they are starting points,
chosen to compile pipelined and without register spills for sm_90 and sm_80 (checked offline
with ``benchmarks/compile_check.py``: Triton compiles to a cubin without a GPU, and cuobjdump
reports registers and spill stack):
- logits, bf16: 128 x 128, k = 64, 8 warps, 3 stages (150 registers). Triton's matmul tutorial
  (03-matrix-multiplication.py, ``get_cuda_autotune_config``) lists 128 x 256 x 64 / 8 warps /
  3 stages first for fp16; with the softmax epilogue keeping exp() of the fp32 tile live, 256
  columns hit the 255-register cap and spill.
- hidden grad and weight grad, bf16: 128 x 128, k = 64, 8 warps, 3 stages (174 and 186
  registers). Their left operand (delta = onehot - softmax) is built in registers from the stored
  fp32 logits at each k-step; 4 warps spill 264 bytes, 128 x 256 tiles spill (weight grad) or sit
  at 238 registers (hidden grad, k = 32), a candidate for the GPU sweep.
- fp32 on a GPU: 64 x 64, k = 32, 4 warps, 3 stages: fp32 tiles take twice the registers and
  shared memory, and at ``torch.get_float32_matmul_precision() == "highest"`` run without tensor
  cores, so small tiles lose little.
- Triton's CPU interpreter (tests): 16 x 32 (or 16 x 16), k = 16, the smallest ``tl.dot`` takes;
  the interpreter runs each program as numpy calls, so small tiles keep odd test shapes cheap.
- chunk_rows: the gradient path keeps one chunk of fp32 logits (chunk_rows x V). 128 MiB of it
  when the output weight is frozen (1024 rows at V = 32000: with the stored fp32 (N, D) hidden
  grad this stays under 10% of what the plain path holds at N = 8192). When the weight trains,
  each chunk also reads and writes the fp32 (V, D) weight-grad accumulator (1 GiB of traffic at
  Mistral-7B size), so chunks are 4x longer to amortize it.
``benchmarks/bench_logprobs.py --sweep`` times alternatives on a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

FROZEN_LOGITS_BYTES = 128 * 2**20
TRAINABLE_LOGITS_BYTES = 512 * 2**20


@dataclass(frozen=True)
class Tiles:
    """One kernel's launch shape: an m x n output tile, reduction steps of k, warps, stages."""

    m: int
    n: int
    k: int
    num_warps: int
    num_stages: int

    def __post_init__(self):
        for size in (self.m, self.n, self.k):
            # tl.dot needs every side >= 16, tl.arange needs powers of two.
            if size < 16 or size & (size - 1):
                raise ValueError(f"tile sides must be powers of two >= 16, got {self}")


@dataclass(frozen=True)
class KernelConfig:
    logits: Tiles  # m tokens x n vocab, k model dims
    hidden_grad: Tiles  # m tokens x n model dims, k vocab
    weight_grad: Tiles  # m vocab x n model dims, k tokens
    chunk_rows: int  # tokens per stored fp32 logits chunk in the gradient path

    def __post_init__(self):
        if self.chunk_rows < 1:
            raise ValueError(f"chunk_rows must be positive, got {self.chunk_rows}")

    def with_chunk_rows(self, chunk_rows: int) -> KernelConfig:
        return replace(self, chunk_rows=chunk_rows)


def kernel_config(device: torch.device, dtype: torch.dtype, vocab_size: int,
                  weight_trains: bool) -> KernelConfig:
    """The default launch parameters for ``dtype`` inputs on ``device`` (CPU = Triton's interpreter)."""
    device = torch.device(device)
    if device.type == "cpu":
        return KernelConfig(logits=Tiles(16, 32, 16, 1, 1), hidden_grad=Tiles(16, 16, 32, 1, 1),
                            weight_grad=Tiles(32, 16, 16, 1, 1), chunk_rows=32)
    if dtype == torch.float32:
        small = Tiles(64, 64, 32, num_warps=4, num_stages=3)
        tiles = dict(logits=small, hidden_grad=small, weight_grad=small)
    else:
        grads = Tiles(128, 128, 64, num_warps=8, num_stages=3)
        logits = Tiles(128, 128, 64, num_warps=8, num_stages=3)
        tiles = dict(logits=logits, hidden_grad=grads, weight_grad=grads)
    budget = TRAINABLE_LOGITS_BYTES if weight_trains else FROZEN_LOGITS_BYTES
    # Whole token tiles only: a ragged last tile in every chunk would waste a tile row each time.
    m = tiles["logits"].m
    rows = max(m, budget // (4 * vocab_size) // m * m)
    return KernelConfig(**tiles, chunk_rows=rows)
