"""Writing merged weights: the Hugging Face layout (sharded above a size) or the original one.

Everything is written into a temporary directory beside the target and renamed into place
(``spl.atomic.atomic_dir``): a crash leaves either the old checkpoint or the new one, never a mix of
shards. A tied output matrix is stored once, as transformers does. The formats are ``spl/layouts.py``'s.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from spl.atomic import atomic_dir
from spl.config import ModelConfig
from spl.layouts import (
    CheckpointError,
    model_config_to_hf,
    model_config_to_params,
    ours_to_hf,
    ours_to_original,
    permute_hf_to_original,
    rope_heads,
)
from spl.model import Transformer

# ----------------------------------------------------------------------------------------------
# Saving merged weights.


def _state_to_save(model: Transformer, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The model's weights under our names, refusing anything a plain ``Transformer(cfg)`` lacks."""
    state = model.state_dict()
    with torch.device("meta"):
        expected = Transformer(cfg).state_dict()
    extra, missing = sorted(set(state) - set(expected)), sorted(set(expected) - set(state))
    if extra or missing:
        raise CheckpointError(f"model does not match its config: unexpected {extra[:5]}, missing "
                              f"{missing[:5]} (merge LoRA adapters into the base weights first)")
    for name, t in state.items():
        if t.shape != expected[name].shape:
            raise CheckpointError(f"model tensor {name!r} has shape {list(t.shape)}, config implies "
                                  f"{list(expected[name].shape)}")
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight")
    return state


def save_model(model: Transformer, cfg: ModelConfig, out_dir: str | os.PathLike, *,
               max_shard_bytes: int = 5 * 2**30, overwrite: bool = False,
               config_extra: dict | None = None) -> None:
    """Write merged weights in the HF layout, sharded above ``max_shard_bytes``, atomically.

    ``config_extra``: more config.json fields (an importer's bos/eos ids). Shards are filled greedily
    in state-dict order and copied to CPU one shard at a time, so host memory holds at most one
    shard beyond the model.
    """
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        write_hf_model(model, cfg, tmp, max_shard_bytes=max_shard_bytes, config_extra=config_extra)


def write_hf_model(model: Transformer, cfg: ModelConfig, out_dir: Path, *, max_shard_bytes: int = 5 * 2**30,
                   config_extra: dict | None = None) -> None:
    """``save_model``'s files, written into the existing directory ``out_dir`` (not atomically: for
    callers that add files of their own inside one ``atomic_dir``)."""
    state = _state_to_save(model, cfg)
    # Plan shards from sizes alone first: file names carry the shard count ("-of-00003").
    shards: list[list[str]] = [[]]
    size = 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    hf_cfg = {**model_config_to_hf(cfg), **(config_extra or {})}
    # transformers 4.x reads torch_dtype, 5.x reads it too (as dtype): the dtype the weights are in.
    hf_cfg["torch_dtype"] = str(next(iter(state.values())).dtype).removeprefix("torch.")
    weight_map = {}
    for i, names in enumerate(shards):
        n = len(shards)
        file = f"model-{i + 1:05d}-of-{n:05d}.safetensors" if n > 1 else "model.safetensors"
        tensors = {ours_to_hf(k): state[k].detach().to("cpu").contiguous() for k in names}
        save_file(tensors, out_dir / file, metadata={"format": "pt"})  # transformers expects format=pt
        weight_map.update({name: file for name in tensors})
    if len(shards) > 1:  # the index is what transformers looks for first; one file needs none
        total = sum(t.numel() * t.element_size() for t in state.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (out_dir / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")


def save_original(model: Transformer, cfg: ModelConfig, out_dir: str | os.PathLike, *,
                  overwrite: bool = False) -> None:
    """Write params.json + consolidated.safetensors (mistral-inference layout), atomically."""
    state = _state_to_save(model, cfg)
    if cfg.tie_word_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]  # the original layout always has output
    tensors = {}
    for name, t in state.items():
        t = t.detach().to("cpu")
        heads = rope_heads(name, cfg)
        tensors[ours_to_original(name)] = (permute_hf_to_original(t, heads) if heads else t).contiguous()
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        save_file(tensors, tmp / "consolidated.safetensors", metadata={"format": "pt"})
        (tmp / "params.json").write_text(json.dumps(model_config_to_params(cfg), indent=2) + "\n")
