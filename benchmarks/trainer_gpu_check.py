"""The trainer's GPU checks: ``torchrun train.py`` over NCCL starts, saves, resumes and exports.

    python benchmarks/trainer_gpu_check.py --tokenizer path/to/tokenizer.model [--nproc 1]
    python benchmarks/trainer_gpu_check.py --tokenizer ... --quick     # CPU dry run (gloo), smaller

1. LoRA under DDP and full fine-tuning under FSDP2 (bf16 autocast on CUDA), 20 optimizer steps
   with a checkpoint every 10; the run is then rolled back to its step-10 checkpoint (as if killed
   right after writing it) and resumed with ``train.resume=true``; the step-20 weights (adapter
   safetensors, or the DCP shards read back whole) are compared with the uninterrupted run's.
2. Every shipped config runs 2 LoRA steps with a tiny model and its held-out evaluation.
3. ``python -m spl.export`` merges the full fine-tuning run into an HF directory equal to its shards.
4. Host memory while saving: ``benchmarks/bench_checkpoint.py`` (~0.9 B parameters on one GPU; DCP
   should copy the GPU-resident shards to the host a tensor at a time).

The model: a random Mistral (dim 256, 4 layers, Mistral's 32000-token vocabulary) in the HF layout
with a real Mistral v1 tokenizer beside it (``--tokenizer``; mistral-common ships one), and the
HH-RLHF sample in tests/fixtures. Prints PASS/FAIL per check and a table; writes
``trainer_gpu_check.md`` under ``--out``. On CPU the resume is exact (tests/test_trainer.py and
tests/test_train_checkpoint.py); on a GPU the same kernels run in the same order, so the check
allows only 1e-5. Exit status 1 if any check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

HH = ROOT / "tests" / "fixtures" / "hh_rlhf_sample.jsonl"
SPLIT = ROOT / "tests" / "fixtures" / "hh_rlhf_sample_split.jsonl"
LOG: Path | None = None


def sh(args: list[str], nproc: int | None, timeout: float = 300) -> bool:
    """``python args`` (under ``torchrun --nproc_per_node nproc`` when given); output to the log."""
    cmd = [sys.executable, *args]
    if nproc is not None:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               *args]
    t0 = time.perf_counter()
    with open(LOG, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        rc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, timeout=timeout,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}).returncode
    print(f"  $ {' '.join(args)[:140]}  ({time.perf_counter() - t0:.1f} s, exit {rc})", flush=True)
    return rc == 0


def make_model(out: Path, tokenizer: Path, quick: bool) -> Path:
    from spl.config import ModelConfig
    from spl.model import Transformer
    from spl.saving import save_model

    dim, layers = (64, 2) if quick else (256, 4)
    cfg = ModelConfig(dim=dim, n_layers=layers, head_dim=dim // 4, hidden_dim=3 * dim, n_heads=4,
                      n_kv_heads=2, vocab_size=32000, rope_theta=1e4, max_seq_len=1024)
    torch.manual_seed(0)
    save_model(Transformer(cfg), cfg, out)
    shutil.copyfile(tokenizer, out / "tokenizer.model")
    return out


def step_weights(step_dir: Path) -> dict[str, torch.Tensor]:
    """The trained tensors of a checkpoint: the adapter (LoRA) or the whole model read from DCP shards."""
    if (step_dir / "dcp").is_dir():
        from spl.checkpoint import load_sharded_model

        model, head = load_sharded_model(step_dir)
        return {**model.state_dict(), **({"reward_head": head} if head is not None else {})}
    return load_file(step_dir / "adapter" / "adapter_model.safetensors")


def resume_check(name: str, base: list[str], run: Path, nproc: int, steps: int) -> tuple[bool, str]:
    """Train ``steps``, roll back to the midpoint checkpoint, resume; compare the final weights."""
    t0 = time.perf_counter()
    if not sh(["train.py", *base, f"train.out_dir={run}"], nproc):
        return False, f"| {name} | run failed | - | - | - |"
    secs = time.perf_counter() - t0
    records = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
    losses = [r["loss"] for r in records if "loss" in r]
    ckpts = run / "checkpoints"
    last, mid = f"step_{steps:07d}", f"step_{steps // 2:07d}"
    final = step_weights(ckpts / last)
    shutil.rmtree(ckpts / last)
    (ckpts / "latest").write_text(mid + "\n")
    t0 = time.perf_counter()
    if not sh(["train.py", *base, f"train.out_dir={run}", "train.resume=true"], nproc):
        return False, f"| {name} | resume failed | {secs:.0f} | - | - |"
    again = step_weights(ckpts / last)
    diff = max((final[k].float() - again[k].float()).abs().max().item() for k in final)
    ok = set(final) == set(again) and diff <= 1e-5 and all(map(lambda x: x == x, losses))
    row = (f"| {name} | {'ok' if ok else 'MISMATCH'} | {secs:.0f} + {time.perf_counter() - t0:.0f} "
           f"| {losses[0]:.4f} -> {losses[-1]:.4f} | {diff:.2e} |")
    return ok, row


def main() -> int:
    global LOG
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokenizer", required=True, help="a Mistral v1 SentencePiece tokenizer.model")
    p.add_argument("--nproc", type=int, default=1)
    p.add_argument("--out", default=os.environ.get("OUT", "benchmarks/out"))
    p.add_argument("--quick", action="store_true", help="smaller model, fewer steps (a CPU dry run)")
    p.add_argument("--mem-dim", type=int, default=2048, help="model width for the memory check (4.)")
    p.add_argument("--mem-layers", type=int, default=16)
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    LOG = out / "trainer_gpu_check.log"
    LOG.write_text("")
    tmp = Path(tempfile.mkdtemp(prefix="spl_trainer_check_"))
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU (dry run)"
    model = make_model(tmp / "model", Path(args.tokenizer), args.quick)
    steps = 4 if args.quick else 20
    common = [f"model.checkpoint={model}", f"data.train_path={HH}", "data.format=hh",
              "data.chat_template=mistral-v1", "data.max_len=256", "data.max_prompt_len=192",
              "train.batch_size=8", "train.warmup_steps=2", "train.log_every=5",
              "train.lr=1e-5", "train.alpha=0.2", "lora.dropout=0.0", f"train.max_steps={steps}",
              f"train.save_every={steps // 2}"]
    results: dict[str, bool] = {}
    rows = []

    print(f"1. torchrun --nproc_per_node {args.nproc}: {steps} steps, roll back to step {steps // 2}, resume",
          flush=True)
    for name, extra in (("LoRA, DDP", []), ("full, FSDP2 (DCP)", ["lora.enabled=false"])):
        ok, row = resume_check(name, [*common, *extra], tmp / name.split(",")[0].lower(), args.nproc, steps)
        results[f"{name} resume"] = ok
        rows.append(row)

    print("2. shipped configs, 2 LoRA steps each, tiny model, held-out evaluation", flush=True)
    for config in sorted((ROOT / "configs").glob("*.yaml")):
        data = HH if "hh_rlhf" in config.name else SPLIT
        run = tmp / config.stem
        ok = sh([str(ROOT / "train.py"), str(config), f"model.checkpoint={model}", f"data.train_path={data}",
                 "data.max_len=96", "data.max_prompt_len=64", "data.eval_size=4", "train.max_steps=2",
                 "train.log_every=1", f"train.out_dir={run}"], args.nproc)
        records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()] if ok else []
        evaluated = any("eval_loss" in r for r in records)
        results[config.name] = bool(records) and evaluated and records[0]["step"] == 1

    print("3. export of the full fine-tuning run", flush=True)
    full = tmp / "full"
    ok = sh(["-m", "spl.export", str(full), "--out", str(tmp / "exported")], None)
    if ok:
        from spl.checkpoint import load_model, load_sharded_model

        exported, _ = load_model(tmp / "exported")
        sharded, _ = load_sharded_model(full / "checkpoints" / f"step_{steps:07d}")
        ok = all(torch.equal(exported.state_dict()[k], v) for k, v in sharded.state_dict().items())
    results["export equals shards"] = ok

    mem_text = ""
    if not args.quick:
        print("4. host memory while saving (~0.9 B parameters: weights + AdamW ~11 GB on the GPU)",
              flush=True)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
               "benchmarks/bench_checkpoint.py", "--dim", str(args.mem_dim), "--layers", str(args.mem_layers)]
        mem = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
        mem_text = mem.stdout.strip()
        with open(LOG, "a") as f:
            f.write(mem.stdout + mem.stderr)
        results["memory benchmark ran"] = mem.returncode == 0

    lines = [f"Device: {device}; torch {torch.__version__}; torchrun --nproc_per_node {args.nproc}", "",
             "| run | status | seconds (run + resume) | loss first -> last | max abs diff at the last step |",
             "|---|---|---|---|---|", *rows, "",
             *(f"{'PASS' if v else 'FAIL'}  {k}" for k, v in results.items())]
    if mem_text:
        lines += ["", "Host memory while saving (bench_checkpoint.py):", "", mem_text]
    text = "\n".join(lines)
    print(text)
    (out / "trainer_gpu_check.md").write_text(text + "\n")
    shutil.rmtree(tmp, ignore_errors=True)
    return 0 if all(results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
