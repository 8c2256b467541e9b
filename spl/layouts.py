"""Checkpoint layouts as data: configs, tensor names and the RoPE row permutation of each format.

    Hugging Face   config.json (``model_type`` mistral or llama) + safetensors; tensor names
                   ``model.layers.0.self_attn.q_proj.weight`` (ours minus the ``model.`` prefix)
    original       params.json + consolidated.safetensors (mistral-inference); names
                   ``layers.0.attention.wq.weight``, ``feed_forward.w1`` (gate), ``w2`` (down), ``w3`` (up)

The original layout differs in one numerical way: its RoPE rotates interleaved pairs (2i, 2i+1) of
each head while ours (and HF's) rotates halves (i, i + Dh/2), so the rows of ``wq`` and ``wk`` are
permuted at load (``permute_original_to_hf``, the transformers conversion script's ``permute``) and
back at save. llama.cpp's GGUF files store q/k rows in the same interleaved order
(``spl/import_gguf.py``).

Reading lives in ``spl/checkpoint.py``, writing in ``spl/saving.py``; both read this table. A new
model family is one more entry of ``MODEL_TYPES`` (and what its config needs below).
"""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path

import torch

from spl.config import ConfigError, ModelConfig


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked; the message names the file and the tensor."""


def read_json(path: Path) -> dict:
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: cannot read JSON ({err})") from err
    if not isinstance(d, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return d


# ----------------------------------------------------------------------------------------------
# Configs: HF config.json and original params.json <-> ModelConfig.

# model_type -> the transformers class that reads it. Llama-family checkpoints (SmolLM2, TinyLlama,
# Llama 2/3 without RoPE scaling) are Mistral with the sliding window off.
MODEL_TYPES = {"mistral": "MistralForCausalLM", "llama": "LlamaForCausalLM"}


def _require(d: dict, key: str, source: str | os.PathLike):
    if key not in d or d[key] is None:
        raise CheckpointError(f"{source}: required field {key!r} is missing")
    return d[key]


def model_config_from_hf(hf: dict, *, source: str | os.PathLike = "config.json") -> ModelConfig:
    """ModelConfig from a Hugging Face ``config.json`` dict (transformers 4.x or 5.x style).

    Accepts Mistral and bias-free Llama configs; refuses what the model cannot represent (other
    activations, biases, RoPE scaling, quantization) instead of silently computing something else.
    """
    model_type = hf.get("model_type")
    if model_type not in MODEL_TYPES:
        raise CheckpointError(f"{source}: model_type {model_type!r} is not supported (need one of "
                              f"{sorted(MODEL_TYPES)})")
    if hf.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{source}: hidden_act {hf['hidden_act']!r} is not supported (SwiGLU needs "
                              "'silu')")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            raise CheckpointError(f"{source}: {key}=true is not supported (the model has no biases)")
    if hf.get("quantization_config"):
        raise CheckpointError(f"{source}: quantized checkpoints are not supported")
    # transformers 5 nests RoPE settings in rope_parameters; 4.x had rope_theta + rope_scaling.
    rope = hf.get("rope_parameters") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default" or hf.get("rope_scaling"):
        raise CheckpointError(f"{source}: RoPE scaling ({rope_type!r}, {hf.get('rope_scaling')!r}) is not "
                              "supported")
    rope_theta = rope.get("rope_theta", hf.get("rope_theta", 1e4))  # 1e4 is transformers' default too
    if hf.get("attention_dropout"):
        # Some community Mistral-7B-Instruct-v0.2 configs ship 0.6, a training leftover (DESIGN.md).
        warnings.warn(f"{source}: attention_dropout={hf['attention_dropout']} ignored; the model has no "
                      "dropout", stacklevel=2)
    dim, n_heads = _require(hf, "hidden_size", source), _require(hf, "num_attention_heads", source)
    try:
        return ModelConfig(
            dim=dim,
            n_layers=_require(hf, "num_hidden_layers", source),
            head_dim=hf.get("head_dim") or dim // n_heads,  # absent or null in older configs
            hidden_dim=_require(hf, "intermediate_size", source),
            n_heads=n_heads,
            n_kv_heads=hf.get("num_key_value_heads") or n_heads,
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)),  # MistralConfig's default, not ours
            vocab_size=_require(hf, "vocab_size", source),
            rope_theta=float(rope_theta),
            sliding_window=hf.get("sliding_window") if model_type == "mistral" else None,
            max_seq_len=hf.get("max_position_embeddings", 131072),  # MistralConfig's default
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            family=model_type,
        )
    except ConfigError as err:
        raise CheckpointError(f"{source}: {err}") from err


def model_config_to_hf(cfg: ModelConfig) -> dict:
    """A ``config.json`` dict that transformers 4.x and 5.x both read (``MistralForCausalLM`` or
    ``LlamaForCausalLM``, by ``cfg.family``)."""
    hf = {
        "architectures": [MODEL_TYPES[cfg.family]],
        "model_type": cfg.family,
        "hidden_size": cfg.dim,
        "num_hidden_layers": cfg.n_layers,
        "head_dim": cfg.head_dim,
        "intermediate_size": cfg.hidden_dim,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "rms_norm_eps": cfg.norm_eps,
        "vocab_size": cfg.vocab_size,
        "rope_theta": cfg.rope_theta,  # 5.x folds a top-level rope_theta into rope_parameters
        "sliding_window": cfg.sliding_window,
        "max_position_embeddings": cfg.max_seq_len,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "hidden_act": "silu",
        "attention_dropout": 0.0,
    }
    if cfg.family == "llama":  # LlamaConfig has no sliding window, and biases it would otherwise infer
        del hf["sliding_window"]
        hf.update(attention_bias=False, mlp_bias=False)
    return hf


_PARAMS_FIELDS = ("dim", "n_layers", "head_dim", "hidden_dim", "n_heads", "n_kv_heads", "norm_eps",
                  "vocab_size")
_PARAMS_IGNORED = {"max_batch_size", "model_type"}  # serving settings, no effect on the weights


def model_config_from_params(params: dict, *, source: str | os.PathLike = "params.json") -> ModelConfig:
    """ModelConfig from an original-layout ``params.json``.

    A missing ``rope_theta`` means 1e4, with a warning: Mistral-7B v0.1's params.json is the one
    release known to omit it, and its reference code (mistral-src) hard-coded 1e4. Later files state
    1e6 explicitly. (Current mistral-inference falls back to 1e6 instead, so the choice is flagged.)
    """
    for key in ("moe", "vision_encoder", "quantization"):
        if params.get(key):
            raise CheckpointError(f"{source}: {key!r} models are not supported")
    unknown = sorted(set(params) - set(_PARAMS_FIELDS) - _PARAMS_IGNORED - {"rope_theta", "sliding_window",
                                                                           "max_seq_len"})
    if unknown:
        warnings.warn(f"{source}: ignoring unknown fields {unknown}", stacklevel=2)
    if "rope_theta" not in params:
        warnings.warn(f"{source}: no rope_theta; assuming 1e4 (Mistral-7B v0.1). Add it to the file if "
                      "that is wrong", stacklevel=2)
    d = {key: params[key] for key in _PARAMS_FIELDS if key in params}
    d.setdefault("n_kv_heads", _require(params, "n_heads", source))
    d.setdefault("head_dim", _require(params, "dim", source) // params["n_heads"])
    for key in _PARAMS_FIELDS:
        _require(d, key, source)
    d.update(rope_theta=float(params.get("rope_theta", 1e4)), sliding_window=params.get("sliding_window"))
    if "max_seq_len" in params:
        d["max_seq_len"] = params["max_seq_len"]
    try:
        return ModelConfig(**d)
    except ConfigError as err:
        raise CheckpointError(f"{source}: {err}") from err


def model_config_to_params(cfg: ModelConfig) -> dict:
    """An original-layout ``params.json`` dict (rope_theta always written, see above)."""
    d = {key: getattr(cfg, key) for key in _PARAMS_FIELDS}
    d.update(rope_theta=cfg.rope_theta, max_seq_len=cfg.max_seq_len)
    if cfg.sliding_window is not None:
        d["sliding_window"] = cfg.sliding_window
    return d


# ----------------------------------------------------------------------------------------------
# Names and the RoPE row permutation.

_ORIGINAL_TOP = {"tok_embeddings.weight": "embed_tokens.weight", "norm.weight": "norm.weight",
                 "output.weight": "lm_head.weight"}
_ORIGINAL_LAYER = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
                   "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
                   "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
                   "feed_forward.w3": "mlp.up_proj", "attention_norm": "input_layernorm",
                   "ffn_norm": "post_attention_layernorm"}
_LAYER_RE = re.compile(r"layers\.(\d+)\.(.+)\.weight")
# Buffers older transformers versions saved; ours are recomputed, so they are skipped, not errors.
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


def original_to_ours(name: str) -> str | None:
    if name in _ORIGINAL_TOP:
        return _ORIGINAL_TOP[name]
    m = _LAYER_RE.fullmatch(name)
    if m and m[2] in _ORIGINAL_LAYER:
        return f"layers.{m[1]}.{_ORIGINAL_LAYER[m[2]]}.weight"
    return None


def ours_to_original(name: str) -> str:
    top = {ours: orig for orig, ours in _ORIGINAL_TOP.items()}
    if name in top:
        return top[name]
    m = _LAYER_RE.fullmatch(name)
    layer = {ours: orig for orig, ours in _ORIGINAL_LAYER.items()}
    return f"layers.{m[1]}.{layer[m[2]]}.weight"


def hf_to_ours(name: str) -> str | None:
    if name == "lm_head.weight":
        return name
    return name.removeprefix("model.") if name.startswith("model.") else None


def ours_to_hf(name: str) -> str:
    return name if name == "lm_head.weight" else "model." + name


def permute_original_to_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of ``wq``/``wk`` (n_heads * Dh, D): interleaved RoPE pairs -> rotate-half pairs.

    Within each head, output rows (2i, 2i+1) become rows (i, i + Dh/2). Attention scores are
    unchanged because q and k get the same permutation and RoPE rotates the same pairs.
    """
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)  # (H*Dh, D)


def permute_hf_to_original(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of ``permute_original_to_hf``."""
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)  # (H*Dh, D)


def rope_heads(name: str, cfg: ModelConfig) -> int | None:
    """Heads to permute over for q/k projections (our names); None for every other tensor."""
    if name.endswith("self_attn.q_proj.weight"):
        return cfg.n_heads
    if name.endswith("self_attn.k_proj.weight"):
        return cfg.n_kv_heads
    return None
