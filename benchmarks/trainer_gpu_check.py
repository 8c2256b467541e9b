"""The trainer's checks that need a GPU, on one GPU in a few minutes (CPU works too, for a dry run).

    python benchmarks/trainer_gpu_check.py [--out /tmp/trainer_gpu_check]

1. Full fine-tuning on CUDA (bf16 autocast, fp32 master weights) writes sharded (DCP) checkpoints
   from GPU memory; resuming from step 2 ends where the uninterrupted run ends.
2. Every shipped config runs 2 LoRA steps on CUDA with a tiny model (bf16 frozen base), with its
   held-out evaluation.
3. ``python -m spl.export`` merges the full fine-tuning run into an HF directory.
4. Host memory while saving: ``benchmarks/bench_checkpoint.py`` at ~0.9 B parameters on one GPU
   (the shards live on the GPU; DCP should copy them to the host a tensor at a time).
Prints PASS/FAIL per check and the memory table. Needs the test requirements (mistral-common ships
the tokenizer) and 1 GPU; multi-GPU runs are the same commands under torchrun.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
HH = ROOT / "tests" / "fixtures" / "hh_rlhf_sample.jsonl"
SPLIT = ROOT / "tests" / "fixtures" / "hh_rlhf_sample_split.jsonl"
SMALL = ["data.chat_template=mistral-v1", "data.max_len=96", "data.max_prompt_len=64", "train.batch_size=4",
         "train.warmup_steps=0", "train.log_every=1"]


def sh(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=timeout)
    print(f"  $ python {' '.join(args)[:150]}  ({time.perf_counter() - t0:.1f} s, exit {out.returncode})")
    if out.returncode:
        print(out.stderr[-3000:])
    return out


def tiny_model(out: Path) -> Path:
    import mistral_common
    import torch

    from spl.checkpoint import save_model
    from spl.config import ModelConfig
    from spl.model import Transformer

    cfg = ModelConfig(dim=64, n_layers=2, head_dim=16, hidden_dim=128, n_heads=4, n_kv_heads=2,
                      vocab_size=32000, rope_theta=1e4, max_seq_len=512)
    torch.manual_seed(0)
    save_model(Transformer(cfg), cfg, out / "model", overwrite=True)
    tokenizer = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    shutil.copyfile(tokenizer, out / "model" / "tokenizer.model")
    return out / "model"


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="/tmp/trainer_gpu_check")
    p.add_argument("--mem-dim", type=int, default=2048, help="model width for the memory check (4.)")
    p.add_argument("--mem-layers", type=int, default=16)
    args = p.parse_args()
    import torch

    from spl.checkpoint import load_model, load_sharded_model

    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU (dry run)"
    print(f"device: {device}; torch {torch.__version__}")
    model = tiny_model(out)
    results = {}

    print("1. full fine-tuning: sharded save from the GPU, resume equals uninterrupted")
    full = ["train.py", f"model.checkpoint={model}", f"data.train_path={HH}", *SMALL, "lora.enabled=false",
            "train.max_steps=4", "train.save_every=2"]
    ok = sh([*full, f"train.out_dir={out / 'full'}"]).returncode == 0
    if ok:
        shutil.copytree(out / "full", out / "resumed")
        shutil.rmtree(out / "resumed" / "checkpoints" / "step_0000004")
        (out / "resumed" / "checkpoints" / "latest").write_text("step_0000002\n")
        ok = sh([*full, f"train.out_dir={out / 'resumed'}", "train.resume=true"]).returncode == 0
    if ok:
        a, _ = load_sharded_model(out / "full" / "checkpoints" / "step_0000004")
        b, _ = load_sharded_model(out / "resumed" / "checkpoints" / "step_0000004")
        diff = max((a.state_dict()[k] - v).abs().max().item() for k, v in b.state_dict().items())
        print(f"  max |uninterrupted - resumed| = {diff:.3g} (expect <= 1e-5; bf16 autocast, same kernels)")
        ok = diff <= 1e-5
    results["full fine-tuning resume"] = ok

    print("2. shipped configs, 2 LoRA steps each, tiny model")
    for config in sorted((ROOT / "configs").glob("*.yaml")):
        data = HH if "hh_rlhf" in config.name else SPLIT
        run = sh(["train.py", str(config), f"model.checkpoint={model}", f"data.train_path={data}",
                  "data.max_len=96", "data.max_prompt_len=64", "data.eval_size=4", "train.max_steps=2",
                  "train.log_every=1", f"train.out_dir={out / config.stem}"])
        records = [json.loads(x) for x in (out / config.stem / "metrics.jsonl").read_text().splitlines()] \
            if run.returncode == 0 else []
        results[config.name] = any("eval_loss" in r for r in records) and records[0]["step"] == 1

    print("3. export")
    ok = sh(["-m", "spl.export", str(out / "full"), "--out", str(out / "exported")]).returncode == 0
    if ok:
        exported, _ = load_model(out / "exported")
        sharded, _ = load_sharded_model(out / "full" / "checkpoints" / "step_0000004")
        ok = all(torch.equal(exported.state_dict()[k], v) for k, v in sharded.state_dict().items())
    results["export"] = ok

    print("4. host memory while saving (default ~0.9 B parameters: weights + AdamW ~11 GB on the GPU)")
    mem = sh(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
              "benchmarks/bench_checkpoint.py", "--dim", str(args.mem_dim), "--layers", str(args.mem_layers)],
             timeout=600)
    print("\n".join(mem.stdout.strip().splitlines()[:-1]))
    results["memory benchmark ran"] = mem.returncode == 0

    print("\n".join(f"{'PASS' if v else 'FAIL'}  {k}" for k, v in results.items()))
    return 0 if all(results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
