"""``torchrun train.py`` on a GPU: DDP (LoRA) and FSDP2 (full fine-tuning) over NCCL start, save, resume.

    python benchmarks/gpu_train_smoke.py --tokenizer path/to/tokenizer.model [--nproc 1]

A small random Mistral (dim 256, 4 layers, Mistral's 32000-token vocabulary) in the HF layout,
the HH-RLHF sample in tests/fixtures, 20 optimizer steps with a checkpoint every 10. Then the run
is rolled back to its step-10 checkpoint (as if killed right after writing it), resumed with
``train.resume=true``, and its step-20 weights are compared with the uninterrupted run's. On CPU
the resume is exact (tests/test_trainer.py); on a GPU, bf16 autocast and non-deterministic
kernels (atomics in some backward passes) may leave rounding-level differences, so the table
reports the largest absolute difference rather than asserting equality. Exit status 1 if any
run failed or a difference exceeds 1e-2.
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
COMMON = ["data.chat_template=mistral-v1", "data.format=hh", "data.max_len=256", "data.max_prompt_len=192",
          "train.batch_size=8", "train.micro_batch_size=4",
          "train.max_steps=20", "train.save_every=10", "train.warmup_steps=2", "train.log_every=5",
          "train.lr=1e-5", "train.alpha=0.2", "lora.dropout=0.0"]


def make_model(out: Path, tokenizer: Path) -> Path:
    from spl.checkpoint import save_model
    from spl.config import ModelConfig
    from spl.model import Transformer

    cfg = ModelConfig(dim=256, n_layers=4, head_dim=64, hidden_dim=768, n_heads=4, n_kv_heads=2,
                      vocab_size=32000, rope_theta=1e4, max_seq_len=1024)
    torch.manual_seed(0)
    save_model(Transformer(cfg), cfg, out)
    shutil.copyfile(tokenizer, out / "tokenizer.model")
    return out


def torchrun(args: list[str], nproc: int, log: Path) -> tuple[int, float]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           str(ROOT / "train.py"), *args]
    t0 = time.perf_counter()
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        rc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}).returncode
    return rc, time.perf_counter() - t0


def weights(step_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor in the step's safetensors files (adapter, full model, reward head)."""
    out = {}
    for f in sorted(step_dir.rglob("*.safetensors")):
        if f.name.startswith(("optimizer", "rng")):
            continue
        out.update({f"{f.relative_to(step_dir)}:{k}": v for k, v in load_file(f).items()})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", required=True, help="a Mistral v1 SentencePiece tokenizer.model")
    parser.add_argument("--nproc", type=int, default=1)
    parser.add_argument("--out", default=os.environ.get("OUT", "benchmarks/out"))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "gpu_train_smoke.log"
    log.write_text("")
    tmp = Path(tempfile.mkdtemp(prefix="spl_smoke_"))
    model = make_model(tmp / "model", Path(args.tokenizer))
    rows, failed = [], False
    for name, extra in (("LoRA, DDP", []), ("full, FSDP2", ["lora.enabled=false"])):
        run = tmp / name.split(",")[0].lower()
        base = [f"model.checkpoint={model}", f"data.train_path={HH}", f"train.out_dir={run}", *COMMON, *extra]
        rc, secs = torchrun(base, args.nproc, log)
        if rc != 0:
            rows.append(f"| {name} | exit {rc} | {secs:.0f} | - | - |")
            failed = True
            continue
        metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        losses = [m["loss"] for m in metrics if "loss" in m]
        ckpts = run / "checkpoints"
        final = weights(ckpts / "step_0000020")
        shutil.rmtree(ckpts / "step_0000020")
        (ckpts / "latest").write_text("step_0000010\n")
        rc2, secs2 = torchrun([*base, "train.resume=true"], args.nproc, log)
        if rc2 != 0:
            loss = f"{losses[0]:.4f} -> {losses[-1]:.4f}"
            rows.append(f"| {name} | resume exit {rc2} | {secs:.0f} | {loss} | - |")
            failed = True
            continue
        again = weights(ckpts / "step_0000020")
        diff = max((final[k].float() - again[k].float()).abs().max().item() for k in final)
        failed |= diff > 1e-2 or set(final) != set(again)
        loss = f"{losses[0]:.4f} -> {losses[-1]:.4f}"
        rows.append(f"| {name} | ok | {secs:.0f} + {secs2:.0f} | {loss} | {diff:.2e} |")
    card = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    text = "\n".join([f"Device: {card}; torch {torch.__version__}; torchrun --nproc_per_node {args.nproc}; "
                      "20 steps, rolled back to step 10 and resumed", "",
                      "| run | status | seconds (run + resume) | loss first -> last "
                      "| max abs diff at step 20 |",
                      "|---|---|---|---|---|", *rows])
    print(text)
    (out / "gpu_train_smoke.md").write_text(text + "\n")
    shutil.rmtree(tmp, ignore_errors=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
