"""Forward throughput and peak memory: spl's Transformer vs transformers' MistralForCausalLM (CPU, fp32).

Shape: dim 512, 8 layers, 8 heads of 64, 2 KV heads (GQA group 4), SwiGLU hidden 1792 (3.5 x dim,
Mistral-7B's 14336/4096), vocab 32000, no sliding window (v0.2 style), ~60M parameters. Input: batch 4
of 512 tokens; the full (4, 512, 32000) fp32 logits come out of both models (250 MiB), as a training
forward needs them (transformers: ``use_cache=False`` so it builds no KV cache; attention "sdpa", its
default and fastest path, as ours uses). Both run under ``torch.inference_mode()`` with
``torch.set_num_threads(2)``.

Time. Both models live in one process and their forwards alternate (ours, theirs, ours, ...) after
``--warmup`` untimed forwards each, so a busy shared machine slows both alike; we report the median and
the best of ``--repeats`` forwards, and the median of the per-pair time ratio, the number least moved
by background load.

Memory, in a fresh process per implementation (neither sees the other's allocator state), two ways:
- live tensors: the most bytes of tensors alive at once in one forward, summed from the profiler's
  allocation events. It isolates what the code holds, independent of the allocator.
- RSS: after building the model and inputs, one 8-token forward (which pages in the kernels' code
  and starts the thread pool) and ``malloc_trim``, we reset the kernel's high-water mark
  (``clear_refs`` 5, Linux) and read ``VmHWM`` after two forwards, so "forward peak" is the most
  memory the process held above the warmed-up model, including what glibc keeps cached after frees.
  That part depends on the process's allocation history (glibc's mmap threshold adapts to past
  frees), not just on the forward, so we measure it twice: with glibc's defaults (range over
  ``--rounds`` processes) and with a fixed mmap threshold, under which RSS follows live memory.
  "Total peak" adds the model and the interpreter with its imports (transformers imports more).

    python benchmarks/bench_model.py                     # everything, prints a markdown table
    python benchmarks/bench_model.py --memory-of ours    # one memory process, as JSON
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

DIM, N_LAYERS, N_HEADS, N_KV_HEADS, HIDDEN, VOCAB = 512, 8, 8, 2, 1792, 32000
BATCH, SEQ = 4, 512


def proc_status_kib(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)[1])


def build(impl: str) -> torch.nn.Module:
    if impl == "ours":
        from spl.config import ModelConfig
        from spl.model import Transformer

        cfg = ModelConfig(dim=DIM, n_layers=N_LAYERS, head_dim=DIM // N_HEADS, hidden_dim=HIDDEN,
                          n_heads=N_HEADS, n_kv_heads=N_KV_HEADS, vocab_size=VOCAB, rope_theta=1e6,
                          sliding_window=None)
        return Transformer(cfg).eval()
    import transformers

    cfg = transformers.MistralConfig(vocab_size=VOCAB, hidden_size=DIM, intermediate_size=HIDDEN,
                                     num_hidden_layers=N_LAYERS, num_attention_heads=N_HEADS,
                                     num_key_value_heads=N_KV_HEADS, head_dim=DIM // N_HEADS, rope_theta=1e6,
                                     sliding_window=None, rms_norm_eps=1e-5, use_cache=False,
                                     attn_implementation="sdpa")
    return transformers.MistralForCausalLM(cfg).eval()


def peak_live_tensor_bytes(forward) -> int:
    """Most bytes of tensors alive at once during one forward, from the profiler's allocation events.

    Unlike RSS this ignores what the allocator keeps cached after a free, so it isolates what the
    code itself holds; the two together separate code effects from allocator effects.
    """
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        logits = forward()  # (B, T, V)
        del logits
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())  # each carries +bytes (alloc) or -bytes (free)
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def forward_fn(impl: str, model: torch.nn.Module, tokens: torch.Tensor):
    if impl == "ours":
        return lambda: model(tokens)  # (B, T, V) fp32
    return lambda: model(tokens, use_cache=False).logits  # (B, T, V) in the model's dtype, fp32 here


def measure_memory(impl: str) -> dict:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = build(impl)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ))  # (B, T)
    forward = forward_fn(impl, model, tokens)
    with torch.inference_mode():
        forward_fn(impl, model, tokens[:1, :8])()  # page in kernels' code and start threads: not data
    # Return the heap that construction freed (weight init temporaries, imports) to the kernel: else
    # a forward reuses it without growing RSS, and the import-heavier process would look leaner.
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    rss_built = proc_status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS, so construction peaks don't count
    with torch.inference_mode():
        for _ in range(2):
            logits = forward()
            del logits
    peak = proc_status_kib("VmHWM")
    return {"params_mib": sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20,
            "live_peak_mib": peak_live_tensor_bytes(forward) / 2**20,
            "forward_peak_mib": (peak - rss_built) / 1024, "total_peak_mib": peak / 1024}


def measure_time(warmup: int, repeats: int) -> dict[str, list[float]]:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ))  # (B, T), the same input for both
    forwards = {impl: forward_fn(impl, build(impl), tokens) for impl in ("ours", "hf")}
    times: dict[str, list[float]] = {impl: [] for impl in forwards}
    with torch.inference_mode():
        for i in range(warmup + repeats):
            for impl, forward in forwards.items():
                t0 = time.perf_counter()
                logits = forward()
                elapsed = time.perf_counter() - t0
                assert logits.shape == (BATCH, SEQ, VOCAB) and logits.dtype == torch.float32
                del logits
                if i >= warmup:
                    times[impl].append(elapsed)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--memory-of", choices=["ours", "hf"], help="run one memory process (JSON out)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3, help="memory processes per implementation")
    args = parser.parse_args()
    if args.memory_of:
        print(json.dumps(measure_memory(args.memory_of)))
        return

    import transformers

    root = Path(__file__).resolve().parents[1]  # import spl from this checkout, here and in children
    sys.path.insert(0, str(root))
    # glibc's default mmap threshold adapts to past frees, so how much freed memory stays resident
    # depends on the process's history; a fixed threshold makes every tensor >= 128 KiB its own
    # mapping, returned on free, so RSS then follows live memory.
    allocators = {"default": {}, "fixed": {"MALLOC_MMAP_THRESHOLD_": "131072"}}
    memory = {(impl, alloc): [] for impl in ("ours", "hf") for alloc in allocators}
    for _ in range(args.rounds):
        for impl, alloc in memory:
            env = {**os.environ, "PYTHONPATH": str(root), **allocators[alloc]}
            out = subprocess.run([sys.executable, __file__, "--memory-of", impl], capture_output=True,
                                 text=True, check=True, cwd=root, env=env)
            memory[impl, alloc].append(json.loads(out.stdout.strip().splitlines()[-1]))
    times = measure_time(args.warmup, args.repeats)
    ratio = statistics.median(h / o for o, h in zip(times["ours"], times["hf"], strict=True))

    print(f"CPU: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, transformers "
          f"{transformers.__version__}; 2 threads, fp32, batch {BATCH} x {SEQ} tokens; {args.repeats} "
          f"alternating timed forwards each after {args.warmup} warmup; memory: {args.rounds} processes "
          "per implementation and allocator setting, ranges are min-max\n")
    print("| implementation | forward s (median) | forward s (best) | tokens/s (best) | params MiB | "
          "forward peak: live tensors MiB | forward peak: RSS, fixed mmap threshold MiB | "
          "forward peak: RSS, default glibc MiB | total peak RSS, default glibc MiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    names = {"ours": "spl Transformer", "hf": "transformers MistralForCausalLM (sdpa)"}

    def span(runs: list[dict], key: str) -> str:
        lo, hi = min(r[key] for r in runs), max(r[key] for r in runs)
        return f"{lo:.0f}" if round(lo) == round(hi) else f"{lo:.0f}-{hi:.0f}"

    for impl, name in names.items():
        t, default, fixed = times[impl], memory[impl, "default"], memory[impl, "fixed"]
        print(f"| {name} | {statistics.median(t):.2f} | {min(t):.2f} | {BATCH * SEQ / min(t):.0f} | "
              f"{default[0]['params_mib']:.0f} | {max(r['live_peak_mib'] for r in default):.1f} | "
              f"{span(fixed, 'forward_peak_mib')} | {span(default, 'forward_peak_mib')} | "
              f"{span(default, 'total_peak_mib')} |")
    print(f"\nmedian per-pair time ratio transformers / spl: {ratio:.3f} (> 1: spl is faster)")


if __name__ == "__main__":
    main()
