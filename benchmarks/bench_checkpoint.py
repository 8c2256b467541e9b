"""Host memory of saving a full fine-tuning checkpoint: sharded (DCP) against gathering on rank 0.

    torchrun --nproc_per_node 2 benchmarks/bench_checkpoint.py [--dim 512 --layers 8]
    torchrun --nproc_per_node 1 benchmarks/bench_checkpoint.py --dim 2048 --layers 16   # one GPU

Each rank holds a shard of the weights and AdamW moments (FSDP2; gloo on CPU, NCCL on CUDA, where
the shards live in GPU memory and DCP copies them to the host a tensor at a time). We measure the peak
resident memory each rank adds while (a) ``spl.train_checkpoint.save_checkpoint`` writes its shards
with torch.distributed.checkpoint, and (b) the previous design's full state dict is gathered onto
rank 0 (``full_state_dict=True, cpu_offload=True``, as spl did before; gathering only, nothing is
written). Peak RSS comes from /proc/self/status (VmHWM), reset before each phase through
/proc/self/clear_refs. Prints one table row per rank.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spl.config import ModelConfig, load_config  # noqa: E402
from spl.data import PreferenceDataset, PreferencePair  # noqa: E402
from spl.distributed import init_distributed  # noqa: E402
from spl.model import Transformer  # noqa: E402
from spl.train_checkpoint import save_checkpoint  # noqa: E402
from spl.trainer import Trainer  # noqa: E402

MiB = 2**20


def status(key: str) -> int:
    """A /proc/self/status field in bytes (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def peak_added(fn) -> int:
    """Peak RSS above the starting RSS while ``fn`` runs (all ranks run it together)."""
    dist.barrier()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    start = status("VmRSS")
    fn()
    dist.barrier()
    return status("VmHWM") - start


def local_bytes(trainer) -> int:
    """Bytes of this rank's shards: weights and optimizer state."""
    local = lambda t: t.to_local() if hasattr(t, "to_local") else t  # noqa: E731
    params = [local(p) for p in trainer.scorer.parameters()]
    states = [local(v) for s in trainer.optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    return sum(t.numel() * t.element_size() for t in params + states)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    args = p.parse_args()
    env = init_distributed()
    if not dist.is_initialized():  # one rank (a single GPU): a group anyway, for the barriers below
        dist.init_process_group("nccl" if env.device.type == "cuda" else "gloo")
    torch.manual_seed(0)
    mcfg = ModelConfig(dim=args.dim, n_layers=args.layers, head_dim=64, hidden_dim=3 * args.dim,
                       n_heads=args.dim // 64, n_kv_heads=max(1, args.dim // 256), vocab_size=32000,
                       rope_theta=1e4, max_seq_len=256)
    model = Transformer(mcfg).to(env.device).requires_grad_(True)
    full = sum(t.numel() * t.element_size() for t in model.parameters()) * 3  # weights + 2 AdamW moments
    out = tempfile.mkdtemp(prefix="bench_checkpoint_") if env.is_main else ""
    shared = [out]
    dist.broadcast_object_list(shared)
    cfg = load_config(None, ["lora.enabled=false", "train.batch_size=2", "train.micro_batch_size=1",
                             "train.max_steps=1", "train.warmup_steps=0", f"train.out_dir={shared[0]}"])
    pairs = [PreferencePair([1, 5, 6], [7, 8, 2], [9, 10, 2]) for _ in range(4)]
    trainer = Trainer(cfg, env, model, PreferenceDataset(pairs, {}, 0))
    trainer.train_data.ref_logps = torch.zeros(len(pairs), 2)  # SPL needs one; its values do not matter
    trainer.train_step(next(trainer.batches.indices()))  # creates the AdamW moments
    shard = local_bytes(trainer)
    sharded = peak_added(lambda: save_checkpoint(trainer))

    def gather():
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_sd = get_model_state_dict(trainer.wrapped, options=opts)
        optim_sd = get_optimizer_state_dict(trainer.wrapped, trainer.optimizer, options=opts)
        del model_sd, optim_sd

    gathered = peak_added(gather)
    rows = [None] * env.world_size
    dist.all_gather_object(rows, {"rank": env.rank, "shard": shard, "sharded": sharded, "gathered": gathered})
    if env.is_main:
        print(f"model + AdamW state: {full / MiB:.0f} MiB over {env.world_size} ranks "
              f"(dim {args.dim}, {args.layers} layers, vocab 32000, fp32); torch {torch.__version__}")
        print("| rank | its shard (weights + AdamW) | peak added: DCP save | peak added: gather on rank 0 |")
        print("|---|---|---|---|")
        for r in rows:
            print(f"| {r['rank']} | {r['shard'] / MiB:.0f} MiB | {r['sharded'] / MiB:.0f} MiB | "
                  f"{r['gathered'] / MiB:.0f} MiB |")
        print(json.dumps(rows))
    dist.destroy_process_group()
    if env.is_main:
        shutil.rmtree(shared[0], ignore_errors=True)


if __name__ == "__main__":
    from spl.distributed import exit_process

    main()
    exit_process(0)  # without interpreter finalization (gloo teardown, pytorch#179291)
