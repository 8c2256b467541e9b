"""Export a training run as one merged Hugging Face-layout model directory.

    python -m spl.export RUN_DIR                      # latest checkpoint -> RUN_DIR/export/step_XXXXXXX
    python -m spl.export RUN_DIR --step 2000 --out /models/spl-T2 --dtype bf16

Full fine-tuning checkpoints hold each rank's shards (``torch.distributed.checkpoint``), LoRA ones
an adapter over a base model; either way the export is ``config.json`` + safetensors that
``MistralForCausalLM.from_pretrained``, ``sample.py`` and ``evaluate.py`` load directly, with the
run's ``tokenizer.model`` and, for reward models, ``reward_head.safetensors`` beside them. Adapters
are merged into the base weights (in fp32, rounded once to ``--dtype``). Runs on one process, with
the whole model in host memory once.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

DTYPES = ("fp32", "bf16")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m spl.export", description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="a run directory (train.out_dir) or one of its checkpoints/step_* directories")
    p.add_argument("--step", type=int, help="export checkpoints/step_<STEP> instead of the latest")
    p.add_argument("--out", help="output directory (default: RUN/export/<step name>)")
    p.add_argument("--dtype", choices=DTYPES, default="fp32", help="weights' dtype on disk (default fp32)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    return p.parse_args(argv)


def export(run: str | Path, *, step: int | None = None, out: str | Path | None = None, dtype: str = "fp32",
           overwrite: bool = False) -> Path:
    """Write the merged model of ``run``'s latest (or ``step``) checkpoint; return its directory."""
    import torch
    from safetensors.torch import save_file

    from spl.checkpoint import CheckpointError
    from spl.inference import load_for_inference, resolve_checkpoint
    from spl.lora import lora_modules, merge
    from spl.saving import save_model
    from spl.tokenizer import copy_tokenizer

    run = Path(run)
    if step is not None:
        src = run / "checkpoints" / f"step_{step:07d}"
        if not src.is_dir():
            raise CheckpointError(f"{src}: no such checkpoint")
    else:
        src = resolve_checkpoint(run)
    if not (src / "trainer_state.json").is_file():
        raise CheckpointError(f"{src}: not a training checkpoint (no trainer_state.json); it is already a "
                              "model directory")
    out = Path(out) if out else (src.parent.parent / "export" / src.name)
    if out.exists() and not overwrite:
        raise CheckpointError(f"{out} exists; pass --overwrite to replace it")
    loaded = load_for_inference(src, dtype=torch.float32)  # merge in fp32, round once below
    model = loaded.model
    if lora_modules(model):
        merge(model)
        model = _without_adapters(model)
    model.to({"fp32": torch.float32, "bf16": torch.bfloat16}[dtype])
    save_model(model, model.cfg, out, overwrite=overwrite)
    copy_tokenizer(loaded.tokenizer.path, out)
    if (src / "config.yaml").is_file():  # says which chat template it was trained with (auto reads it)
        shutil.copyfile(src / "config.yaml", out / "config.yaml")
    if loaded.reward_head is not None:
        head = loaded.reward_head.detach().cpu().contiguous()
        save_file({"weight": head}, str(out / "reward_head.safetensors"))
    return out


def _without_adapters(model):
    """A plain Transformer holding the merged weights (the LoRA wrappers' extra factors dropped)."""
    import torch

    from spl.model import Transformer

    state = {k: v for k, v in model.state_dict().items() if not k.endswith((".lora_a", ".lora_b"))}
    with torch.device("meta"):
        plain = Transformer(model.cfg)
    plain.load_state_dict(state, assign=True)
    if model.cfg.tie_word_embeddings:
        plain.lm_head.weight = plain.embed_tokens.weight
    return plain


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from spl.checkpoint import CheckpointError

    try:
        out = export(args.run, step=args.step, out=args.out, dtype=args.dtype, overwrite=args.overwrite)
    except (CheckpointError, ValueError, FileNotFoundError) as e:
        print(f"spl.export: {e}", file=sys.stderr)
        return 1
    print(f"exported {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
