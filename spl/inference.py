"""Reading a run back for sampling and evaluation: which directory, which weights, which tokenizer.

``sample.py``, ``evaluate.py`` and ``spl.export`` load what training wrote through this module, never
the trainer: a run directory means its latest checkpoint; a step holds an adapter over its base
model, or DCP shards of fully fine-tuned weights; anything else is a model directory (HF or
original layout). ``inference_source`` answers from config files alone, so scripts can check
prompts and budgets before any weights load.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from spl.checkpoint import (
    SHARDED_CONFIG,
    check_tokenizer_vocab,
    find_files,
    load_model,
    load_sharded_model,
)
from spl.config import ModelConfig
from spl.layouts import CheckpointError, model_config_from_hf, read_json
from spl.tokenizer import find_tokenizer


@dataclass
class Loaded:
    """A model ready for sampling or evaluation, and where each part came from."""

    model: torch.nn.Module
    tokenizer: object  # spl.tokenizer.Tokenizer
    source: Path  # the directory the weights were read from
    base: Path | None = None  # the base model under an adapter
    reward_head: torch.Tensor | None = None  # (1, D) scalar head of a reward model
    has_adapter: bool = False


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A run directory (``out_dir``) means its latest checkpoint; anything else is taken as given."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path} (train first: torchrun train.py)")
    pointer = path / "checkpoints" / "latest"
    if pointer.is_file():
        step = path / "checkpoints" / pointer.read_text().strip()
        if not step.is_dir():
            raise CheckpointError(f"{pointer} names {step.name}, which does not exist")
        return step
    return path


@dataclass
class InferenceSource:
    """What ``load_for_inference`` will read, found from config files alone (no weights)."""

    source: Path  # the resolved checkpoint directory
    kind: str  # adapter (over ``base``) | sharded (DCP) | merged (a run's model/) | model (HF / original)
    weights: Path  # the directory whose weights are loaded (the base, for an adapter)
    config: ModelConfig
    tokenizer: Path
    base: Path | None = None


def inference_source(path: str | os.PathLike, tokenizer: str | os.PathLike | None = None) -> InferenceSource:
    """Resolve a run, step or model directory and its tokenizer for inference, reading only config
    files, so scripts can check prompts and budgets before any weights load."""
    src = resolve_checkpoint(path)
    base = None
    trained = (src / "trainer_state.json").is_file()
    if trained and (src / "adapter").is_dir():
        adapter_config = src / "adapter" / "adapter_config.json"
        base = Path(read_json(adapter_config).get("base_model_name_or_path") or "")
        if not (base / "config.json").is_file() and not (base / "params.json").is_file():
            # A run moved to another machine: look for the base beside the run (the demo's reference).
            beside = src.parent.parent / "reference"
            if not (beside / "config.json").is_file():
                raise CheckpointError(f"{adapter_config}: base model {str(base)!r} not found; copy it back "
                                      "or pass the base as --checkpoint and the adapter as --adapter")
            base = beside
        kind, weights = "adapter", base
    elif trained and (src / "dcp").is_dir():
        kind, weights = "sharded", src
    elif trained and (src / "model").is_dir():  # merged weights: runs written before sharded saves
        kind, weights = "merged", src / "model"
    else:
        kind, weights = "model", src
    if kind == "sharded":
        cfg = model_config_from_hf(read_json(src / SHARDED_CONFIG), source=src / SHARDED_CONFIG)
    else:
        _, cfg, _ = find_files(weights)
    if tokenizer is not None:  # given: used as given, never replaced by the checkpoint's own
        tok_path = Path(tokenizer)
    else:
        tok_path = find_tokenizer(src, base) or src / "tokenizer.model"
    if not tok_path.is_file():
        raise CheckpointError(f"tokenizer not found: {tok_path} (pass --tokenizer)")
    return InferenceSource(src, kind, weights, cfg, tok_path, base)


def load_for_inference(path: str | os.PathLike, *, adapter: str | os.PathLike | None = None,
                       tokenizer: str | os.PathLike | None = None, device: torch.device | str = "cpu",
                       dtype: torch.dtype = torch.float32) -> Loaded:
    """Load one of: a run directory or one of its ``step_*`` checkpoints (adapter over its base, or
    sharded full weights), an HF-layout or original-layout model directory; then an optional extra
    PEFT-format ``adapter``. The tokenizer is the checkpoint's own (``tokenizer.model`` or
    ``tokenizer.json``) unless given,
    and its vocabulary must match the model's."""
    from spl.lora import load_adapter
    from spl.tokenizer import load_tokenizer

    found = inference_source(path, tokenizer)
    src, head = found.source, None
    if found.kind == "sharded":
        model, head = load_sharded_model(src, dtype=dtype, device=device)
    else:
        model, _ = load_model(found.weights, dtype=dtype, device=device)
    if found.kind == "adapter":
        load_adapter(model, src / "adapter")
    if (src / "reward_head.safetensors").is_file():
        head = load_file(src / "reward_head.safetensors")["weight"]
    if head is not None:
        head = head.to(device)
    if adapter is not None:
        load_adapter(model, adapter)
    tok = load_tokenizer(found.tokenizer)
    check_tokenizer_vocab(found.tokenizer, model.cfg.vocab_size, tok.vocab_size)
    return Loaded(model.eval(), tok, src, found.base, head, found.kind == "adapter" or adapter is not None)
