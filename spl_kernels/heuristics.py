"""Launch parameters and chunk sizes for the log-prob path: the one place they are chosen.

Two kinds of numbers, both derived below from the device rather than measured (no GPU was at hand
when they were set; ``benchmarks/bench_logprobs.py --sweep`` times the chunk size on one):

1. The softmax-rows kernel (``spl_kernels/fused_logprobs.py``) streams rows of a (tokens, V) block,
   ``BLOCK`` entries per step, one row per program. It is bound by memory bandwidth, so the
   block only has to keep enough bytes in flight: 8 KiB per program (4096 bf16 / fp16 entries, or
   2048 fp32) over 8 warps is one 16-byte load per thread per step, and with ~8 programs resident
   per SM that is ~64 KiB in flight per SM, above what Little's law asks of HBM3 (~30 KiB per SM
   at 4.8 TB/s and ~0.8 us latency). Its shared memory is a few hundred bytes of reduction
   scratch, far below every architecture's limit; ``benchmarks/compile_check.py`` compiles it
   for sm_80, sm_86, sm_89 and sm_90 in CI and fails if that ever changes or it spills.
   Triton's CPU interpreter (tests) runs each program as numpy calls, so there the tiles are small
   and cover several rows, to keep odd test shapes crossing every boundary cheaply.
2. Tokens per chunk. The matmuls are cuBLAS's; what the chunk size decides is whether they fill
   the GPU and how much memory the (chunk, V) logits block takes. The narrowest matmul is the
   hidden-state gradient, (chunk, V) @ (V, D) -> (chunk, D): with cuBLAS's large Hopper/Ampere
   tiles (128 x 256 outputs) it fills ``2 * SMs`` tiles, two full waves, at
   chunk >= 2 * SMs * 128 * 256 / D tokens (2112 on an H100/H200 at D = 4096; 2048 on an
   RTX 4090). Fewer chunks mean fewer launches; more mean less memory: at two waves the logits
   block is 2 * chunk * V bytes (131 MB at V = 32000, 525 MB at 128256, chunk 2048), a few percent of what
   the plain path holds at 8192 tokens. A cap keeps it under 1 GiB for the largest vocabularies.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

# Largest shared memory one block may use (the opt-in limit, bytes), by compute capability x 10.
# From CUDA's programming guide, "Features and Technical Specifications"; sm_86 and sm_89 are the
# consumer and workstation parts (RTX 30xx/40xx, A10, A40, L4, L40S) with the smaller limit.
SHARED_MEMORY_LIMIT = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448}
TILE_OUTPUTS = 128 * 256  # outputs per cuBLAS tile assumed when counting waves
WAVES = 2  # full waves of tiles the hidden-gradient matmul should fill
MAX_CHUNK_BYTES = 2**30  # cap on one chunk's logits block
CPU_CHUNK_BYTES = 64 * 2**20  # CPU: one chunk of fp32 logits (512 tokens at V = 32000)


@dataclass(frozen=True)
class DeviceSpec:
    """What the heuristics need to know about a GPU."""

    arch: int  # compute capability x 10 (80 = A100, 86 = RTX 30xx / A10, 89 = L40S / RTX 40xx, 90 = H100)
    sm_count: int  # streaming multiprocessors
    shared_memory: int  # bytes one block may use


@functools.cache
def device_spec(device: torch.device) -> DeviceSpec | None:
    """The CUDA device's spec; None for CPU tensors (Triton's interpreter, or the torch path)."""
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    arch = 10 * props.major + props.minor
    # torch exposes the opt-in limit as shared_memory_per_block_optin; the table covers old torch.
    smem = getattr(props, "shared_memory_per_block_optin", 0) or SHARED_MEMORY_LIMIT.get(arch, 49152)
    return DeviceSpec(arch=arch, sm_count=props.multi_processor_count, shared_memory=smem)


@dataclass(frozen=True)
class RowsConfig:
    """Launch shape of ``_softmax_rows_kernel``."""

    rows: int  # rows (tokens) per program
    block: int  # vocabulary entries per step
    num_warps: int

    def __post_init__(self):
        for size in (self.rows, self.block):
            if size < 1 or size & (size - 1):  # tl.arange needs powers of two
                raise ValueError(f"rows and block must be powers of two, got {self}")


def rows_config(device: torch.device, dtype: torch.dtype) -> RowsConfig:
    """The softmax-rows kernel's launch shape for ``dtype`` logits on ``device``."""
    if torch.device(device).type == "cpu":
        return RowsConfig(rows=4, block=32, num_warps=1)  # interpreter: see the module docstring
    itemsize = torch.tensor([], dtype=dtype).element_size()
    return RowsConfig(rows=1, block=8192 // itemsize, num_warps=8)  # 8 KiB per step


def chunk_rows(spec: DeviceSpec | None, vocab_size: int, dim: int, itemsize: int) -> int:
    """Tokens per chunk of logits (see the module docstring) on ``spec``'s GPU, or on CPU (None)."""
    if spec is None:
        # CPU: memory is the only concern; a power of two >= 16.
        rows = max(16, CPU_CHUNK_BYTES // (4 * vocab_size))
        return 1 << (rows.bit_length() - 1)
    waves = math.ceil(WAVES * spec.sm_count * TILE_OUTPUTS / dim / 128) * 128
    cap = max(128, MAX_CHUNK_BYTES // (itemsize * vocab_size) // 128 * 128)
    return min(waves, cap)


def keep_logits(tokens: int, dim: int, chunk: int, itemsize: int) -> bool:
    """Trainable weight: keep all logits from forward to backward, rather than recompute them?

    Keeping them costs ``itemsize * tokens * V`` bytes and saves a third of the matmuls (6 N D V
    instead of 8), and the weight gradient becomes one matmul over all tokens, with no fp32
    (V, D) accumulator across chunks. Recomputing costs that accumulator (4 V D bytes) plus one
    chunk. Keep whenever keeping takes no more memory than recomputing would.
    """
    return itemsize * tokens <= 4 * dim + itemsize * chunk
