"""One LoRA SPL training step at Mistral-7B's shape on one GPU: tokens/s, model FLOPs utilization, memory.

The step is the trainer's own (``spl.trainer.Trainer``): ``compute_loss`` (the policy forward under
bf16 autocast, then the reference forward with adapters disabled under no_grad, then the SPL loss),
``backward``, grad-norm clipping, AdamW, the schedule, exactly as ``Trainer.train`` runs one optimizer
step without accumulation (its logging and checkpointing are left out; ``loss.item()`` keeps its one
host sync a step). Set-up (issue 4):
- model: preset ``mistral-7b-v0.2`` (7.24B parameters), random weights made directly on the GPU in
  bf16 (built on the meta device, ``to_empty``, then initialised in place: no fp32 copy anywhere);
- LoRA r 16, alpha 16, dropout 0.05 (the paper's §4.1 settings, ``configs/hh_rlhf_spl.yaml``) on all
  7 projections, adapters in fp32; activation checkpointing on; log-probs ``train.logprob_impl=auto``
  (the fused Triton kernel when triton is installed);
- data: 8 pairs a step, every sequence 256 prompt + 256 response tokens = 512 (no padding), so
  16 x 512 = 8192 tokens a step, 4096 of them in the loss; alpha 0.2, beta 0.1 (the cost does not
  depend on them);
- 2 warm-up steps (Triton compilation, allocator growth), then 5 timed steps.

FLOPs convention (one multiply-add = 2 FLOPs). P = parameters of the block projections (6.98B),
V D = the output projection (0.13B), applied only to the 4096 loss tokens because that is all the
log-prob kernel computes; the embedding is a lookup (0 FLOPs). Causal attention counts the half of
the T x T scores that is needed: forward 2 matmuls x 2 x H Dh T^2 / 2 per layer and sequence,
backward twice that. Per step, with N = 8192 tokens and N_loss = 4096:
    policy forward     2 P N + 2 V D N_loss + attention + LoRA 2 P_lora N
    policy backward    2 P N + 2 V D N_loss + 2 x attention + LoRA 4 P_lora N
                       (input gradients only: frozen weights get no weight gradient)
    reference forward  2 P N + 2 V D N_loss + attention   (the algorithm needs it: counted)
    recompute          2 P N + attention + LoRA 2 P_lora N (activation checkpointing: NOT counted)
Model FLOPs are the first three, about 6 P N: as much as full fine-tuning's forward + backward,
because LoRA drops the weight gradients but SPL adds a reference forward. MFU = model FLOPs / step
time / peak, where the peak is what a large bf16 matmul reaches on this card (measured here; H100
SXM's datasheet dense bf16 figure, 989 TFLOP/s, is printed for reference). HFU adds the recompute.

Peak memory is ``torch.cuda.max_memory_allocated`` over the timed steps (weights, adapters, AdamW
state, activations); the model's own bf16 weights are listed beside it.

    python benchmarks/bench_gpu_step.py                            # CUDA; writes $OUT/gpu_step.md
    python benchmarks/bench_gpu_step.py --device cpu --preset tiny  # exercises the code path on CPU
    python benchmarks/bench_gpu_step.py --pairs 4 --prompt-len 512 --response-len 512 --lora-rank 64 \
        --name gpu_step_ultrafeedback.md                            # configs/ultrafeedback_spl.yaml's step
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from spl.config import ModelConfig, load_config  # noqa: E402
from spl.data import PreferenceDataset, PreferencePair  # noqa: E402
from spl.logprobs import resolve_impl  # noqa: E402
from spl.lora import apply_lora, lora_modules  # noqa: E402
from spl.model import RMSNorm, Transformer  # noqa: E402
from spl.trainer import DistEnv, Trainer  # noqa: E402

H100_SXM_BF16_DENSE = 989e12  # FLOP/s, NVIDIA datasheet (the 1979 figure assumes 2:4 sparsity)
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_model(cfg: ModelConfig, device: torch.device, dtype: torch.dtype) -> Transformer:
    """Random weights allocated once, on ``device`` in ``dtype``: meta shell -> to_empty -> init in place."""
    with torch.device("meta"):
        model = Transformer(cfg).to(dtype)  # shapes and dtypes only, no memory
    model.to_empty(device=device)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, RMSNorm):
                module.weight.fill_(1.0)
            elif isinstance(module, nn.Linear | nn.Embedding):
                module.weight.normal_(0.0, 0.02)  # HF's initializer_range for Mistral
    return model


def make_data(cfg: ModelConfig, n_pairs: int, prompt_len: int, response_len: int) -> PreferenceDataset:
    """n_pairs random pairs; every sequence prompt_len + response_len tokens, so no padding."""
    g = torch.Generator().manual_seed(0)
    rand = lambda k: torch.randint(3, cfg.vocab_size, (k,), generator=g).tolist()  # skip unk/bos/eos
    pairs = [PreferencePair([1] + rand(prompt_len - 1), rand(response_len), rand(response_len))
             for _ in range(n_pairs)]
    return PreferenceDataset(pairs, {}, pad_id=2)


def step_flops(cfg: ModelConfig, lora_params: int, n_seq: int, seq_len: int, n_loss: int) -> dict[str, float]:
    """FLOPs of one step by part (see the module docstring for the convention)."""
    D, F, H, Hkv, Dh, L = cfg.dim, cfg.hidden_dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.n_layers
    N = n_seq * seq_len
    block = L * (D * H * Dh + 2 * D * Hkv * Dh + H * Dh * D + 3 * D * F)  # projection parameters, P
    head = cfg.vocab_size * D  # output projection
    window = min(seq_len, cfg.sliding_window or seq_len)
    # Causal scores actually needed per sequence: sum over queries of the keys each one sees.
    pairs = sum(min(i + 1, window) for i in range(seq_len))
    attn = L * n_seq * 2 * (2 * H * Dh * pairs)  # QK^T and PV, forward
    fwd_blocks = 2 * block * N + attn
    return {
        "policy forward": fwd_blocks + 2 * head * n_loss + 2 * lora_params * N,
        "policy backward": 2 * block * N + 2 * attn + 2 * head * n_loss + 4 * lora_params * N,
        "reference forward": fwd_blocks + 2 * head * n_loss,
        "recompute (not in MFU)": fwd_blocks + 2 * lora_params * N,
        "P": block, "VD": head,
    }


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int, iters: int) -> float:
    """FLOP/s of an (n, n) @ (n, n) matmul in ``dtype``: the practical peak of this card."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(iters):  # let clocks ramp up (10 products were not enough on an H200: 692 vs 792)
        a @ b
    best = float("inf")
    for _ in range(3):  # the fastest of three batches: the card's rate, not a stall
        sync(device)
        t0 = time.perf_counter()
        for _ in range(iters):
            a @ b
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 * iters / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (the benchmark) or cpu (a debug run)")
    parser.add_argument("--preset", default="mistral-7b-v0.2", help="model shape (spl.config.PRESETS)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="frozen base weights")
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--response-len", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--no-checkpointing", action="store_true", help="activation checkpointing off")
    parser.add_argument("--lora-rank", type=int, default=16,
                        help="LoRA rank (lora_alpha = rank, as both paper configs): 16 for §4.1, 64 for §4.2")
    parser.add_argument("--name", default=None, help="output file name under --out")
    parser.add_argument("--out", default=os.environ.get("OUT", "benchmarks/out"),
                        help="directory for gpu_step.md")
    args = parser.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            sys.exit("bench_gpu_step.py needs a CUDA GPU (none visible); for a CPU debug run pass "
                     "--device cpu --preset tiny")
        device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    dtype = DTYPES[args.dtype]
    mcfg = ModelConfig.preset(args.preset)
    seq_len = args.prompt_len + args.response_len
    if seq_len > mcfg.max_seq_len:
        sys.exit(f"sequences of {seq_len} tokens exceed {args.preset}'s max_seq_len {mcfg.max_seq_len}")
    total = args.warmup + args.steps
    ckpt = not args.no_checkpointing
    cfg = load_config(None, [
        "train.mode=spl", "train.alpha=0.2", "train.beta=0.1", "train.lr=1e-5", "train.warmup_steps=0",
        "train.schedule=constant", f"train.max_steps={total}", f"train.batch_size={args.pairs}",
        f"train.micro_batch_size={args.pairs}", "train.precision=bf16",
        f"train.activation_checkpointing={str(ckpt).lower()}", "train.logprob_impl=auto",
        f"train.out_dir={tempfile.gettempdir()}/bench_gpu_step",
        "lora.enabled=true", f"lora.rank={args.lora_rank}", f"lora.alpha={args.lora_rank}",
        "lora.dropout=0.05"])

    torch.manual_seed(0)
    model = build_model(mcfg, device, dtype)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    n_params = sum(p.numel() for p in model.parameters())
    apply_lora(model, rank=cfg.lora.rank, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout,
               targets=tuple(cfg.lora.targets))
    lora_params = sum(m.lora_a.numel() + m.lora_b.numel() for m in lora_modules(model).values())
    data = make_data(mcfg, args.pairs * total, args.prompt_len, args.response_len)
    trainer = Trainer(cfg, DistEnv(device=device), model, data)
    impl = resolve_impl(cfg.train.logprob_impl, torch.empty(0, device=device))
    batches = iter(trainer.batches)

    def step(instrument: bool = False) -> tuple[float, dict[str, float]]:
        """One optimizer step as Trainer.train runs it; ``instrument`` also times its parts."""
        marks: dict[str, float] = {}

        def mark(name: str) -> None:
            if instrument:  # the sync costs a little, so only the instrumented step pays it
                sync(device)
                marks[name] = time.perf_counter()

        trainer.wrapped.train()
        mark("start")
        batch = trainer._batch_to(next(batches))
        loss, _ = trainer.compute_loss(batch)  # policy forward, reference forward, SPL loss
        mark("loss")
        loss.backward()
        mark("backward")
        trainer._clip()
        trainer.optimizer.step()
        trainer.scheduler.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        value = loss.item()  # the host sync Trainer.train makes every step
        mark("end")
        return value, marks

    # Time the reference pass inside compute_loss in the instrumented step only.
    reference = trainer.reference_logps
    ref_marks: dict[str, float] = {}

    def timed_reference(batch):
        sync(device)
        ref_marks["t0"] = time.perf_counter()
        out = reference(batch)
        sync(device)
        ref_marks["t1"] = time.perf_counter()
        return out

    for _ in range(args.warmup):
        step()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, losses = [], []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        losses.append(step()[0])  # .item() has synchronized
        times.append(time.perf_counter() - t0)
    peak_mem = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    trainer.reference_logps = timed_reference
    _, marks = step(instrument=True)  # one more, instrumented (syncs between parts), not in the timing
    ref_s = ref_marks["t1"] - ref_marks["t0"]
    parts = {"policy forward + loss": marks["loss"] - marks["start"] - ref_s, "reference forward": ref_s,
             "backward (with recompute)": marks["backward"] - marks["loss"],
             "clip + AdamW + schedule": marks["end"] - marks["backward"]}

    n_seq, n_loss = 2 * args.pairs, args.pairs * args.response_len
    tokens = n_seq * seq_len
    fl = step_flops(mcfg, lora_params, n_seq, seq_len, n_loss)
    model_flops = fl["policy forward"] + fl["policy backward"] + fl["reference forward"]
    s = statistics.median(times)
    if device.type == "cuda":
        peak = matmul_peak(device, torch.bfloat16, 8192, 200)  # ~0.3 s on an H100
        card = torch.cuda.get_device_name(device)
    else:
        peak = matmul_peak(device, dtype, 1024, 5)
        card = f"CPU {platform.machine()}, {torch.get_num_threads()} threads"

    lines = [
        f"Device: {card}; torch {torch.__version__}; log-probs impl: {impl}; base {args.dtype}, "
        f"LoRA r{args.lora_rank} on 7 projections, activation checkpointing {'on' if ckpt else 'off'}",
        f"Model: preset {args.preset}, {n_params / 1e9:.3f}B parameters ({weight_bytes / 2**30:.2f} GiB), "
        f"{lora_params / 1e6:.1f}M LoRA parameters; {args.pairs} pairs x {seq_len} tokens "
        f"({args.prompt_len} prompt + {args.response_len} response) = {tokens} tokens/step, "
        f"{n_loss * 2} in the loss",
        f"Steps: {args.warmup} warm-up, {args.steps} timed: " + ", ".join(f"{t:.3f}" for t in times)
        + f" s; losses {losses[0]:.4f} .. {losses[-1]:.4f}",
        "",
        "| metric | value |",
        "|---|---|",
        f"| s/step (median) | {s:.3f} |",
        f"| tokens/s | {tokens / s:,.0f} |",
        f"| model TFLOPs/step (policy fwd + bwd + reference fwd) | {model_flops / 1e12:.1f} |",
        f"| achieved model TFLOP/s | {model_flops / s / 1e12:.1f} |",
        f"| measured bf16 matmul peak TFLOP/s | {peak / 1e12:.1f} |",
        f"| **MFU** (vs measured peak) | **{100 * model_flops / s / peak:.1f}%** |",
        f"| MFU vs H100 SXM spec 989 TFLOP/s | {100 * model_flops / s / H100_SXM_BF16_DENSE:.1f}% |",
        f"| HFU incl. checkpoint recompute (vs measured) | "
        f"{100 * (model_flops + (fl['recompute (not in MFU)'] if ckpt else 0)) / s / peak:.1f}% |",
        f"| peak memory allocated GiB | "
        f"{'n/a (CPU)' if peak_mem is None else f'{peak_mem / 2**30:.2f}'} |",
        f"| of which frozen base weights GiB | {weight_bytes / 2**30:.2f} |",
        "",
        "| FLOPs by part (TFLOP/step) | |",
        "|---|---|",
        *(f"| {k} | {v / 1e12:.2f} |" for k, v in fl.items() if k not in ("P", "VD")),
        f"| 6 P N (the usual estimate) | {6 * fl['P'] * tokens / 1e12:.2f} |",
        "",
        "| time by part, one instrumented step (synchronized between parts) | s |",
        "|---|---|",
        *(f"| {k} | {v:.3f} |" for k, v in parts.items()),
    ]
    text = "\n".join(lines)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = args.name or ("gpu_step.md" if ckpt else "gpu_step_no_checkpointing.md")
    (out / name).write_text(text + "\n")
    print(f"\nwrote {out / name}")


if __name__ == "__main__":
    main()
