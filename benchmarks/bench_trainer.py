"""One DPO training step, ours (``spl.trainer.Trainer``) vs TRL's ``DPOTrainer``, on CPU: s/step, peak RSS.

The same work through both (issue 4):
- model: a tiny Mistral, dim 256, 4 layers, 8 query heads of 32, 2 KV heads, SwiGLU hidden 896
  (Mistral-7B's ratio 14336/4096 = 3.5), vocab 32000, untied, no sliding window, rope_theta 1e6;
  19.8M parameters, of which 16.4M are the embedding and the output projection. Random weights (HF's
  init, seed 0) written once as an HF checkpoint that both load, so both start from the same weights.
- data: 4 preference pairs a step; every sequence is a 128-token prompt + a 128-token response
  (exactly 256 tokens, no padding); random token ids (seed 0), identical for both. The dataset holds
  exactly one epoch (warmup + timed steps) x 4 pairs, so a precomputed reference covers what is trained.
  TRL gets the ids pre-tokenized (``prompt_ids``/``chosen_ids``/``rejected_ids``, what its own
  tokenization produces); its tokenizer is only asked for pad and eos ids.
- loss: DPO with beta 0.1 (ours: SPL with alpha = beta = 0.1, which is exactly DPO); response tokens only.
- optimizer: AdamW, lr 1e-5, constant schedule, no warmup, weight decay 0, grad-norm clip 1.0, no
  accumulation, fp32 throughout. Ours: ``torch.optim.AdamW`` (foreach); TRL: its default,
  ``adamw_torch_fused``.
- LoRA: r 16, alpha 16, dropout 0 on all 7 projections (ours ``spl.lora``, TRL through PEFT), or
  full fine-tuning.
- reference pass, included. LoRA: both run the same weights with adapters disabled under no_grad,
  every step. Full fine-tuning, TRL's default (``ref_model=None``, ``precompute_ref_log_probs=False``):
  a second model, loaded from the same checkpoint, runs a no-grad forward every step. Ours cannot keep
  a second model: full fine-tuning precomputes the reference log-probs of every training pair once,
  before the loop (``Trainer.precompute_reference``). That is the same number of reference forwards
  over one epoch, so for precomputing rows s/step = loop step + precompute time / steps. A
  ``trl-pre`` row runs TRL the same way (``precompute_ref_log_probs=True``).
- activation checkpointing off for both (ours' default). TRL's own default turns it on; the
  ``trl-gc`` row shows that setting.

Method. Each (implementation, mode) runs in a fresh Python process with ``torch.set_num_threads(2)``
and drives the library's real training loop (``Trainer.train()``, ``DPOTrainer.train()``). A clock
ticks after every optimizer step (ours: an optimizer step hook; TRL: ``on_step_end``), so the step
time is the whole cycle users wait for: collation, policy and reference forwards, backward, clipping,
the optimizer, metrics and logging. The first ``--warmup`` steps are dropped. Processes alternate
between implementations, so a busy shared machine slows both alike, and three views are reported
(``summarize``): the median of all timed steps; the median of the quietest process; and the least
CPU time (user + sys, all threads) of a step: other jobs only add to it, so the minimum is the
closest to the work itself (on 2 idle cores it is about twice the wall time). Ours writes a
checkpoint after its last step; it falls outside the clock and outside the memory figure.

Memory. "peak RSS" is the process's RSS high-water mark (``VmHWM``: what ``ru_maxrss`` reports, for a
process not forked from a bigger one) read at the last step, everything included (interpreter,
imports, model, optimizer, activations, glibc caches). "over imports" subtracts the same mark read
right after the imports, before the model is loaded: TRL's imports (transformers, accelerate,
datasets, pyarrow, pandas, peft) weigh more than ours, and that difference shows in the first
figure only. The max over processes is shown.

    python benchmarks/bench_trainer.py                       # the table (15-40 min on 2 busy cores)
    python benchmarks/bench_trainer.py --configs ours-lora,trl-lora --rounds 1 --steps 4  # quicker
    python benchmarks/bench_trainer.py --run ours-lora --model-dir DIR            # one process (JSON out)
    python benchmarks/bench_trainer.py --run trl-lora --model-dir DIR --profile   # + top ops to stderr
    python benchmarks/bench_trainer.py --checkpoint models/SmolLM2-135M-Instruct --configs ours-lora,trl-lora

``--checkpoint DIR`` runs the same comparison on a real HF-layout model instead of the random tiny
Mistral (SmolLM2-135M-Instruct from ``python -m spl.import_gguf``): its vocabulary, bos/eos ids and
architecture (TRL loads it with ``AutoModelForCausalLM``; its tokenizer supplies pad and eos only).
``--pairs``, ``--prompt-len`` and ``--response-len`` set the batch.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

DIM, N_LAYERS, N_HEADS, N_KV_HEADS, HIDDEN, VOCAB = 256, 4, 8, 2, 896, 32000
PAIRS, PROMPT_LEN, RESPONSE_LEN = 4, 128, 128
BETA, LR, LORA_RANK, LORA_ALPHA = 0.1, 1e-5, 16, 16
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BOS, EOS, PAD = 1, 2, 2  # Mistral's ids; TRL pads with eos, and no sequence needs padding anyway
THREADS = 2

# name: (implementation, mode, what is different from the shared settings)
CONFIGS = {
    "ours-lora": ("ours", "lora", "reference: adapters off, every step"),
    "trl-lora": ("trl", "lora", "reference: adapters off, every step"),
    "ours-full": ("ours", "full", "reference: precomputed once (the only full-FT option)"),
    "trl-full": ("trl", "full", "reference: 2nd model, every step (TRL default)"),
    "trl-pre-full": ("trl", "full", "reference: precomputed once (precompute_ref_log_probs=True)"),
    "ours-gc-lora": ("ours", "lora", "activation checkpointing on"),
    "trl-gc-lora": ("trl", "lora", "gradient_checkpointing=True (TRL default)"),
}
MAIN = ["ours-lora", "trl-lora", "ours-full", "trl-full"]


def peak_rss_mib() -> float:
    """This process's RSS high-water mark (VmHWM), MiB.

    Not ``getrusage(RUSAGE_SELF).ru_maxrss``: Linux carries that across ``execve`` from the forked
    parent (a child of a 550 MiB parent starts at 550 MiB), which would hide the child's imports.
    """
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"^VmHWM:\s+(\d+) kB", status, re.M)[1]) / 1024


class Clock:
    """Wall time, process CPU time (all threads) and peak RSS after each optimizer step."""

    def __init__(self, on_tick=None) -> None:
        self.ticks: list[tuple[float, float]] = []
        self.peak_mib = 0.0
        self.on_tick = on_tick  # called with the number of steps done

    def now(self) -> tuple[float, float]:
        return time.perf_counter(), time.process_time()

    def start(self) -> None:
        self.ticks = [self.now()]

    def tick(self) -> None:
        self.ticks.append(self.now())
        self.peak_mib = peak_rss_mib()
        if self.on_tick is not None:
            self.on_tick(len(self.ticks) - 1)

    def step_times(self, which: int) -> list[float]:
        """Per-step wall (which=0) or CPU (which=1) seconds."""
        return [b[which] - a[which] for a, b in zip(self.ticks[:-1], self.ticks[1:], strict=True)]


def use_checkpoint(model_dir: str) -> None:
    """Take vocabulary size and bos/eos from a real checkpoint's config.json (``--checkpoint``)."""
    global VOCAB, BOS, EOS, PAD
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    VOCAB, BOS, EOS = cfg["vocab_size"], cfg.get("bos_token_id", 1), cfg.get("eos_token_id", 2)
    PAD = EOS


def set_batch(pairs: int, prompt_len: int, response_len: int) -> None:
    global PAIRS, PROMPT_LEN, RESPONSE_LEN
    PAIRS, PROMPT_LEN, RESPONSE_LEN = pairs, prompt_len, response_len


def make_pairs(n: int) -> list[tuple[list[int], list[int], list[int]]]:
    """n (prompt, chosen, rejected) id lists: bos + PROMPT_LEN - 1 random prompt ids, RESPONSE_LEN
    random ids per response (ids above 3: no unk, bos or eos)."""
    g = torch.Generator().manual_seed(0)
    rand = lambda k: torch.randint(3, VOCAB, (k,), generator=g).tolist()  # skip unk, bos, eos
    return [([BOS] + rand(PROMPT_LEN - 1), rand(RESPONSE_LEN), rand(RESPONSE_LEN)) for _ in range(n)]


def write_model(out: Path) -> None:
    """The shared random weights, as an HF checkpoint (config.json + model.safetensors)."""
    import transformers

    cfg = transformers.MistralConfig(vocab_size=VOCAB, hidden_size=DIM, intermediate_size=HIDDEN,
                                     num_hidden_layers=N_LAYERS, num_attention_heads=N_HEADS,
                                     num_key_value_heads=N_KV_HEADS, head_dim=DIM // N_HEADS, rope_theta=1e6,
                                     sliding_window=None, rms_norm_eps=1e-5, max_position_embeddings=4096,
                                     tie_word_embeddings=False, bos_token_id=BOS, eos_token_id=EOS)
    torch.manual_seed(0)
    transformers.MistralForCausalLM(cfg).save_pretrained(out)


# ----------------------------------------------------------------------------- ours

def run_ours(model_dir: str, out_dir: str, mode: str, steps: int, gc: bool, clock: Clock) -> dict:
    from spl.checkpoint import load_model
    from spl.config import load_config
    from spl.data import PreferenceDataset, PreferencePair
    from spl.lora import apply_lora
    from spl.trainer import DistEnv, Trainer

    base_mib = peak_rss_mib()
    lora = mode == "lora"
    cfg = load_config(None, [
        "train.mode=spl", f"train.alpha={BETA}", f"train.beta={BETA}", f"train.lr={LR}",
        "train.weight_decay=0", "train.warmup_steps=0", "train.schedule=constant", f"train.max_steps={steps}",
        f"train.batch_size={PAIRS}", f"train.micro_batch_size={PAIRS}", "train.grad_clip=1.0",
        "train.precision=fp32", f"train.activation_checkpointing={str(gc).lower()}", "train.log_every=10",
        f"train.save_every={10**9}", f"train.eval_every={10**9}", f"train.out_dir={out_dir}",
        f"lora.enabled={str(lora).lower()}", f"lora.rank={LORA_RANK}", f"lora.alpha={LORA_ALPHA}",
        "lora.dropout=0.0"])
    model, _ = load_model(model_dir)  # fp32, CPU
    if lora:
        torch.manual_seed(0)
        apply_lora(model, rank=LORA_RANK, alpha=LORA_ALPHA, dropout=0.0, targets=TARGETS)
    else:
        model.requires_grad_(True)
    data = PreferenceDataset([PreferencePair(*p) for p in make_pairs(steps * PAIRS)], {}, PAD)
    trainer = Trainer(cfg, DistEnv(), model, data)
    trainer.optimizer.register_step_post_hook(lambda *_: clock.tick())
    precompute_s = [0.0, 0.0]  # wall, CPU
    precompute = trainer.attach_references

    def timed_precompute():
        t0 = clock.now()
        precompute()
        clock.start()  # the loop's first step starts after the precompute
        precompute_s[:] = [b - a for a, b in zip(t0, clock.ticks[0], strict=True)]

    trainer.attach_references = timed_precompute
    clock.start()
    last = trainer.train()
    return {"base_mib": base_mib, "precompute_s": precompute_s, "loss": last["loss"]}


# ----------------------------------------------------------------------------- TRL

def trl_tokenizer(model_dir: str, real: bool):
    """The tokenizer TRL is handed; the ids come pre-tokenized, so it only supplies pad and eos."""
    import transformers

    if real:  # the checkpoint's own
        tok = transformers.AutoTokenizer.from_pretrained(model_dir)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        return tok
    import mistral_common
    import sentencepiece

    # Mistral's vocabulary (v1 sentencepiece, shipped offline with mistral-common), without merges.
    sp = sentencepiece.SentencePieceProcessor(
        model_file=str(Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"))
    return transformers.LlamaTokenizer(vocab={sp.id_to_piece(i): i for i in range(sp.get_piece_size())})


def run_trl(model_dir: str, out_dir: str, mode: str, steps: int, gc: bool, precompute: bool,
            clock: Clock, real: bool = False) -> dict:
    import transformers
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    base_mib = peak_rss_mib()
    tok = trl_tokenizer(model_dir, real)
    assert tok.eos_token_id == EOS and len(tok) == VOCAB, (tok.eos_token_id, len(tok))

    class PreTokenizedDPOTrainer(DPOTrainer):
        def _prepare_dataset(self, dataset, *args, **kwargs):
            return dataset  # already what TRL's tokenization would produce

        def _precompute_ref_logps(self, *args, **kwargs):
            t0 = clock.now()
            out = super()._precompute_ref_logps(*args, **kwargs)
            precompute_s[:] = [b - a + p for a, b, p in zip(t0, clock.now(), precompute_s, strict=True)]
            return out

    class StepClock(transformers.TrainerCallback):
        def on_train_begin(self, *args, **kwargs):
            clock.start()

        def on_step_end(self, *args, **kwargs):
            clock.tick()

    precompute_s = [0.0, 0.0]  # wall, CPU
    pairs = make_pairs(steps * PAIRS)
    data = Dataset.from_dict({"prompt_ids": [p for p, _, _ in pairs], "chosen_ids": [c for _, c, _ in pairs],
                              "rejected_ids": [r for _, _, r in pairs]})
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                              attn_implementation="sdpa")
    args = DPOConfig(
        output_dir=out_dir, use_cpu=True, bf16=False, fp16=False, seed=0,
        per_device_train_batch_size=PAIRS, gradient_accumulation_steps=1, max_steps=steps,
        learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        beta=BETA, loss_type="sigmoid", gradient_checkpointing=gc, precompute_ref_log_probs=precompute,
        logging_steps=10, save_strategy="no", report_to="none", disable_tqdm=True,
        dataloader_num_workers=0)
    peft_config = LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=TARGETS,
                             task_type="CAUSAL_LM") if mode == "lora" else None
    trainer = PreTokenizedDPOTrainer(model=model, args=args, train_dataset=data, processing_class=tok,
                                     peft_config=peft_config, callbacks=[StepClock()])
    out = trainer.train()
    return {"base_mib": base_mib, "precompute_s": precompute_s, "loss": out.training_loss}


# ----------------------------------------------------------------------------- driver

def profiler_hook(warmup: int, n: int = 2):
    """An on_tick that profiles steps warmup+1 .. warmup+n and prints the top ops to stderr."""
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)

    def on_tick(done: int) -> None:
        if done == warmup:
            prof.start()
        elif done == warmup + n:
            prof.stop()
            table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
            print(f"profile of {n} steps, by self CPU time:\n{table}", file=sys.stderr)

    return on_tick


def child(name: str, model_dir: str, steps: int, profile_after: int | None = None,
          real: bool = False) -> dict:
    torch.set_num_threads(THREADS)
    impl, mode, _ = CONFIGS[name]
    gc = "-gc-" in name
    clock = Clock(profiler_hook(profile_after) if profile_after is not None else None)
    with tempfile.TemporaryDirectory(prefix="bench_trainer_run_") as out_dir:  # ours' final checkpoint
        if impl == "ours":
            out = run_ours(model_dir, out_dir, mode, steps, gc, clock)
        else:
            out = run_trl(model_dir, out_dir, mode, steps, gc, "-pre-" in name, clock, real)
    assert len(clock.ticks) == steps + 1, f"{name}: {len(clock.ticks) - 1} steps timed, expected {steps}"
    return {**out, "step_s": clock.step_times(0), "cpu_s": clock.step_times(1), "peak_mib": clock.peak_mib,
            "loadavg_1min": os.getloadavg()[0]}


def summarize(runs: list[dict], warmup: int) -> dict:
    """Three views of the timed steps, each step charged its process's share of a precomputed reference.

    median: all steps pooled (what a shared machine gave); quietest: the process with the lowest median
    (the least disturbed run of the whole loop); CPU least: the smallest CPU time of a step plus the
    smallest reference share, the work itself with the least interference (other jobs only add to it).
    """
    share = lambda r, i: r["precompute_s"][i] / len(r["step_s"])  # one epoch = the process's steps
    wall = [t + share(r, 0) for r in runs for t in r["step_s"][warmup:]]
    per_process = [statistics.median(r["step_s"][warmup:]) + share(r, 0) for r in runs]
    cpu = min(t for r in runs for t in r["cpu_s"][warmup:]) + min(share(r, 1) for r in runs)
    return {"median": statistics.median(wall), "quietest": min(per_process), "cpu": cpu,
            "pre": statistics.median(share(r, 0) for r in runs), "peak": max(r["peak_mib"] for r in runs),
            "delta": max(r["peak_mib"] - r["base_mib"] for r in runs)}


def measure(names: list[str], args: argparse.Namespace) -> dict[str, list[dict]]:
    """Run every configuration ``args.rounds`` times, interleaved, each in a fresh process."""
    root = Path(__file__).resolve().parents[1]  # so the children import spl from this checkout
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": str(THREADS), "TQDM_DISABLE": "1",
           "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    runs: dict[str, list[dict]] = {n: [] for n in names}
    with tempfile.TemporaryDirectory(prefix="bench_trainer_") as tmp:
        model_dir = args.checkpoint or tmp
        if not args.checkpoint:
            write_model(Path(tmp))
        for r in range(args.rounds):
            for name in names:
                cmd = [sys.executable, __file__, "--run", name, "--model-dir", str(model_dir),
                       "--warmup", str(args.warmup), "--steps", str(args.steps), *batch_args(args)]
                if args.checkpoint:
                    cmd.append("--real")
                out = subprocess.run(cmd, capture_output=True, text=True, cwd=root, env=env)
                if out.returncode:
                    sys.exit(f"{name} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
                res = json.loads(out.stdout.strip().splitlines()[-1])
                runs[name].append(res)
                print(f"round {r + 1} {name}: median {statistics.median(res['step_s'][args.warmup:]):.3f} "
                      f"s/step, best {min(res['step_s'][args.warmup:]):.3f}, precompute "
                      f"{res['precompute_s'][0]:.2f} s, peak {res['peak_mib']:.0f} MiB, load "
                      f"{res['loadavg_1min']:.1f}, loss {res['loss']:.4f}", file=sys.stderr, flush=True)
                if args.raw:
                    Path(args.raw).write_text(json.dumps(runs))
    return runs


def batch_args(args: argparse.Namespace) -> list[str]:
    return ["--pairs", str(args.pairs), "--prompt-len", str(args.prompt_len), "--response-len",
            str(args.response_len)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", choices=sorted(CONFIGS), help="run one configuration (JSON out)")
    parser.add_argument("--model-dir", help="the shared checkpoint (the parent writes it)")
    parser.add_argument("--configs", default=",".join(MAIN), help=f"comma-separated, of {sorted(CONFIGS)}")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per process")
    parser.add_argument("--rounds", type=int, default=2, help="processes per configuration, interleaved")
    parser.add_argument("--raw", help="also write every process's measurements here (JSON)")
    parser.add_argument("--profile", action="store_true", help="with --run: profile 2 steps after warm-up")
    parser.add_argument("--from-raw", nargs="+", help="tabulate earlier --raw files instead of measuring")
    parser.add_argument("--checkpoint", help="a real HF-layout model directory (not the random tiny Mistral)")
    parser.add_argument("--real", action="store_true", help=argparse.SUPPRESS)  # child: --model-dir is real
    parser.add_argument("--pairs", type=int, default=PAIRS, help=f"preference pairs a step ({PAIRS})")
    parser.add_argument("--prompt-len", type=int, default=PROMPT_LEN, help=f"prompt tokens ({PROMPT_LEN})")
    parser.add_argument("--response-len", type=int, default=RESPONSE_LEN,
                        help=f"tokens per response ({RESPONSE_LEN})")
    args = parser.parse_args()
    if min(args.pairs, args.prompt_len, args.response_len) < 1:
        parser.error("--pairs, --prompt-len and --response-len must be positive")
    if args.checkpoint and not (Path(args.checkpoint) / "config.json").is_file():
        parser.error(f"--checkpoint {args.checkpoint}: no config.json there (spl.import_gguf writes one)")
    set_batch(args.pairs, args.prompt_len, args.response_len)
    if args.checkpoint or args.real:
        use_checkpoint(args.checkpoint or args.model_dir)
    total = args.warmup + args.steps
    if args.run:
        print(json.dumps(child(args.run, args.model_dir, total, args.warmup if args.profile else None,
                               args.real)))
        return

    import peft
    import transformers
    import trl

    if args.from_raw:  # re-tabulate earlier measurements, merging files
        runs: dict[str, list[dict]] = {}
        for path in args.from_raw:
            for name, rs in json.loads(Path(path).read_text()).items():
                runs.setdefault(name, []).extend(rs)
        names = [n for n in CONFIGS if n in runs]
    else:
        names = args.configs.split(",")
        unknown = sorted(set(names) - set(CONFIGS))
        if unknown:
            parser.error(f"unknown configs {unknown}; known: {sorted(CONFIGS)}")
        runs = measure(names, args)

    model_name = args.checkpoint or f"random tiny Mistral (dim {DIM}, {N_LAYERS} layers, vocab {VOCAB})"
    print(f"model: {model_name}; CPU: {platform.machine()}, {os.cpu_count()} cores (shared), {THREADS} "
          f"threads; torch "
          f"{torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}, peft "
          f"{peft.__version__}; fp32; {PAIRS} pairs x {PROMPT_LEN}+{RESPONSE_LEN} tokens a step; "
          f"{min(len(runs[n]) for n in names)}-{max(len(runs[n]) for n in names)} processes per row, "
          f"{len(runs[names[0]][0]['step_s']) - args.warmup} timed steps each after {args.warmup} warm-up\n")
    print("| impl | mode | reference / setting | s/step median | s/step quietest process | CPU s/step least "
          "| of which ref precompute | peak RSS MiB | peak over imports MiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    rows = {n: summarize(runs[n], args.warmup) for n in names}
    for n, s in rows.items():
        impl, mode, note = CONFIGS[n]
        pre = f"{s['pre']:.3f}" if s["pre"] else "-"
        print(f"| {'spl' if impl == 'ours' else 'TRL'} | {mode} | {note} | {s['median']:.3f} | "
              f"{s['quietest']:.3f} | {s['cpu']:.3f} | {pre} | {s['peak']:.0f} | {s['delta']:.0f} |")
    print()
    for mode in ("lora", "full"):
        ours, theirs = rows.get(f"ours-{mode}"), rows.get(f"trl-{mode}")
        if ours and theirs:
            speed = ", ".join(f"{theirs[k] / ours[k]:.2f}x {k}" for k in ("median", "quietest", "cpu"))
            print(f"{mode}: TRL / spl time {speed} (goal >= 2); spl / TRL peak RSS "
                  f"{ours['peak'] / theirs['peak']:.2f}, over imports {ours['delta'] / theirs['delta']:.2f} "
                  "(goal <= 0.5)")


if __name__ == "__main__":
    main()
