"""Sequence log-probs, forward + backward: plain vs chunked vs Triton, time and peak extra memory.

    python benchmarks/bench_logprobs.py                                  # CPU defaults
    python benchmarks/bench_logprobs.py --dtype bf16 --n 2048 8192 16384 --d 4096 --matmul-rate
    python benchmarks/bench_logprobs.py --sweep --v 32000 128256         # GPU: chunk sizes, ~30 s
    python benchmarks/bench_logprobs.py --check --n 2048 --v 32000       # accuracy vs float64

Each row runs ``spl.logprobs.sequence_logps(impl=...)`` on B sequences of T tokens (B * T = N,
all tokens in the loss), then backward from a random (B,) gradient, as SPL's loss would send.
"frozen" trains only the hidden states (LoRA); "trainable" also the (V, D) output weight.

Peak extra memory is what the call adds on top of its inputs, gradients included:
- CUDA: ``torch.cuda.max_memory_allocated()`` minus the allocation before the call.
- CPU: peak resident set size minus the RSS before the call (the peak is reset through
  /proc/self/clear_refs; glibc's mmap threshold is pinned at 64 KiB, so freed blocks leave the
  RSS instead of lingering in the heap).
The matmul floor is 4 N D V FLOPs (forward logits and the hidden-state gradient) for frozen, and
6 N D V for trainable, at the bf16 (or fp32) rate torch.matmul reaches on this device for an
(N, D) @ (D, V) product (``--matmul-rate``).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import itertools
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from spl.logprobs import sequence_logps  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# ---------------------------------------------------------------------------------------------
# Memory and time measurement
# ---------------------------------------------------------------------------------------------


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


class PeakMemory:
    """Peak bytes allocated above the level at entry, on ``device``."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            gc.collect()
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
            self.base = _rss_kib("VmRSS") * 1024
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.base
        else:
            self.peak = _rss_kib("VmHWM") * 1024 - self.base


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int, d: int, v: int, repeat: int) -> float:
    """FLOP/s of torch.matmul for (n, d) @ (d, v) in ``dtype``: the denominator of the floor."""
    a = torch.randn(n, d, device=device, dtype=dtype)
    b = torch.randn(v, d, device=device, dtype=dtype)
    for _ in range(2):
        a @ b.T
    sync(device)
    start = time.perf_counter()
    for _ in range(repeat):
        a @ b.T
    sync(device)
    return 2 * n * d * v * repeat / (time.perf_counter() - start)


# ---------------------------------------------------------------------------------------------
# One measurement
# ---------------------------------------------------------------------------------------------


def make_inputs(n: int, d: int, v: int, dtype: torch.dtype, device: torch.device, trainable: bool):
    seq_len = min(n, 1024)
    B, T = n // seq_len, seq_len
    hidden = torch.randn(B, T, d, device=device, dtype=dtype).requires_grad_(True)
    weight = (torch.randn(v, d, device=device, dtype=dtype) * 2 / d**0.5).requires_grad_(trainable)
    targets = torch.randint(0, v, (B, T), device=device)
    mask = torch.ones(B, T, dtype=torch.bool, device=device)
    grad = torch.randn(B, device=device)
    return hidden, weight, targets, mask, grad


def measure(step, inputs, device: torch.device, repeat: int) -> tuple[float, int]:
    """(mean ms of fwd+bwd, peak extra bytes of one call)."""
    hidden, weight = inputs[0], inputs[1]

    def run():
        hidden.grad = weight.grad = None
        step()

    run()  # warm-up: Triton compiles, allocators settle
    sync(device)
    with PeakMemory(device) as mem:
        run()
        hidden.grad = weight.grad = None  # counted at their peak, then freed like the others
    sync(device)
    start = time.perf_counter()
    for _ in range(repeat):
        run()
    sync(device)
    return (time.perf_counter() - start) / repeat * 1e3, mem.peak


def bench_row(impl: str, n: int, d: int, v: int, dtype: torch.dtype, device: torch.device, trainable: bool,
              repeat: int, chunk_size: int | None = None) -> tuple[float, int]:
    inputs = make_inputs(n, d, v, dtype, device, trainable)
    hidden, weight, targets, mask, grad = inputs

    def step():
        sequence_logps(hidden, weight, targets, mask, impl=impl, chunk_size=chunk_size).backward(grad)

    return measure(step, inputs, device, repeat)


# ---------------------------------------------------------------------------------------------
# Accuracy at real shapes (GPU): every impl against a float64 reference
# ---------------------------------------------------------------------------------------------


def check(device: torch.device, dtype: torch.dtype, n: int, d: int, vs: list[int], impls: list[str]) -> None:
    """Relative error ||out - ref|| / ||ref|| of log-probs and both gradients, against float64.

    Plain torch in the same dtype is the yardstick: a fused path should err no more than ~2x as
    much as it (STYLE.md's rule for bf16)."""
    print(f"Machine: {machine(device)}")
    print(f"\nAccuracy vs float64: N={n} D={d}, {dtype}, one random (B,) upstream gradient\n")
    print("| impl | V | weight | logps rel err | d hidden rel err | d weight rel err |")
    print("|---|---|---|---|---|---|")
    rel = lambda a, b: ((a.double() - b).norm() / b.norm()).item()
    for v, trainable in itertools.product(vs, (False, True)):
        hidden, weight, targets, mask, grad = make_inputs(n, d, v, dtype, device, trainable)
        h64 = hidden.detach().double().requires_grad_(True)
        w64 = weight.detach().double().requires_grad_(trainable)
        ref = sequence_logps(h64, w64, targets, mask, impl="plain")
        ref.backward(grad.double())
        for impl in impls:
            hidden.grad = weight.grad = None
            out = sequence_logps(hidden, weight, targets, mask, impl=impl)
            out.backward(grad)
            dw = f"{rel(weight.grad, w64.grad):.2e}" if trainable else "-"
            kind = "trainable" if trainable else "frozen"
            print(f"| {impl} | {v} | {kind} | {rel(out.detach(), ref.detach()):.2e} "
                  f"| {rel(hidden.grad, h64.grad):.2e} | {dw} |", flush=True)
        del hidden, weight, h64, w64, ref
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------
# Chunk-size sweep (GPU)
# ---------------------------------------------------------------------------------------------


def sweep(device: torch.device, dtype: torch.dtype, n: int, d: int, vs: list[int], repeat: int) -> None:
    """Time the Triton path's choices; update spl_kernels/heuristics.py from it.

    Frozen weight: tokens per chunk (the heuristic's own pick last). Trainable weight: all logits
    kept for backward against recomputed per chunk (``spl_kernels.heuristics.keep_logits``)."""
    import spl.logprobs as lp
    from spl_kernels.heuristics import chunk_rows, device_spec

    print(f"Machine: {machine(device)}")
    print(f"\nTriton path sweep: N={n} D={d} {dtype}, fwd+bwd ms, peak extra MB\n")
    print("| V | weight | chunk tokens | trainable logits | fwd+bwd ms | peak extra MB |")
    print("|---|---|---|---|---|---|")
    keep_logits = lp.keep_logits
    for v in vs:
        default = chunk_rows(device_spec(device), v, d, torch.tensor([], dtype=dtype).element_size())
        cases = [("frozen", rows, "-") for rows in (1024, 2048, 4096)] + [("frozen", None, "-")]
        cases += [("trainable", None, "kept"), ("trainable", None, "recomputed")]
        for weight, rows, logits in cases:
            lp.keep_logits = keep_logits if logits == "-" else (lambda *a, keep=logits == "kept": keep)
            try:
                ms, peak = bench_row("triton", n, d, v, dtype, device, weight == "trainable", repeat, rows)
                cells = f"{ms:.2f} | {peak / 2**20:.0f}"
            except Exception as e:  # e.g. out of memory: a result too
                cells = f"failed: {type(e).__name__} | -"
            finally:
                lp.keep_logits = keep_logits
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            label = f"{rows}" if rows else f"{default} (default)"
            print(f"| {v} | {weight} | {label} | {logits} | {cells} |", flush=True)


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}; torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    return f"{cpu}, {torch.get_num_threads()} threads; torch {torch.__version__}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, choices=list(DTYPES),
                        help="default: bf16 on GPU, fp32 on CPU")
    parser.add_argument("--n", type=int, nargs="+", default=None,
                        help="tokens (default: GPU 2048 8192 16384, CPU 2048 8192)")
    parser.add_argument("--d", type=int, default=None, help="model dim (default: GPU 4096, CPU 512)")
    parser.add_argument("--v", type=int, nargs="+", default=[32000], help="vocabulary sizes")
    parser.add_argument("--impl", nargs="+", default=None, help="default: plain chunked (+ triton on GPU)")
    parser.add_argument("--weight", nargs="+", default=["frozen", "trainable"],
                        choices=["frozen", "trainable"])
    parser.add_argument("--repeat", type=int, default=None,
                        help="timed calls per row (default: GPU 10, CPU 1)")
    parser.add_argument("--matmul-rate", action="store_true", help="measure the matmul floor")
    parser.add_argument("--sweep", action="store_true",
                        help="time the Triton path's chunk sizes and kept vs recomputed logits, then exit")
    parser.add_argument("--check", action="store_true",
                        help="accuracy of every impl against float64 at the first N, then exit")
    args = parser.parse_args()

    device = torch.device(args.device)
    gpu = device.type == "cuda"
    dtype = DTYPES[args.dtype or ("bf16" if gpu else "fp32")]
    ns = args.n or ([2048, 8192, 16384] if gpu else [2048, 8192])
    d = args.d or (4096 if gpu else 512)
    impls = args.impl or (["plain", "chunked", "triton"] if gpu else ["plain", "chunked"])
    repeat = args.repeat or (10 if gpu else 1)
    if not gpu:
        # mallopt(M_MMAP_THRESHOLD = -3, 64 KiB): big blocks go straight back to the OS on free.
        ctypes.CDLL("libc.so.6").mallopt(-3, 64 * 1024)
    if args.check:
        check(device, dtype, ns[0], d, args.v, impls)
        return
    if args.sweep:
        sweep(device, dtype, args.n[0] if args.n else 8192, d, args.v, repeat)
        return

    name = "bf16" if dtype == torch.bfloat16 else "fp32"
    rate = None
    if args.matmul_rate:
        rate = matmul_rate(device, dtype, 8192 if gpu else 2048, d, args.v[0], repeat)
    print(f"Machine: {machine(device)}")
    if rate:
        print(f"torch.matmul {name} rate: {rate / 1e12:.3g} TFLOP/s ((N, {d}) @ ({d}, {args.v[0]}))")
    print("\n| impl | N | D | V | dtype | weight | fwd+bwd ms | peak extra MB | speed-up vs plain "
          "| memory vs plain |" + (" matmul floor ms | time / floor |" if rate else ""))
    print("|---|---|---|---|---|---|---|---|---|---|" + ("---|---|" if rate else ""))
    for v, n, weight in itertools.product(args.v, ns, args.weight):
        plain = None
        for impl in impls:
            ms, peak = bench_row(impl, n, d, v, dtype, device, weight == "trainable", repeat)
            gc.collect()  # this row's tensors are gone before the next row measures
            if gpu:
                torch.cuda.empty_cache()
            if impl == "plain":
                plain = (ms, peak)
            rel = f"{plain[0] / ms:.2f}x | {peak / max(plain[1], 1):.1%}" if plain else "- | -"
            row = (f"| {impl} | {n} | {d} | {v} | {name} | {weight} | {ms:.1f} "
                   f"| {peak / 2**20:.0f} | {rel} |")
            if rate:
                floor = (6 if weight == "trainable" else 4) * n * d * v / rate * 1e3
                row += f" {floor:.1f} | {ms / floor:.2f} |"
            print(row, flush=True)


if __name__ == "__main__":
    main()
