"""Checkpoints: load Mistral weights in either published layout, save merged weights, write atomically.

Two layouts are read, both safetensors only (pickle files can run code when loaded, so ``*.bin`` and
``*.pth`` are refused rather than unpickled):

    Hugging Face   config.json + model.safetensors, or shards model-0000i-of-0000n.safetensors listed
                   by model.safetensors.index.json; names ``model.layers.0.self_attn.q_proj.weight``.
    original       params.json + consolidated.safetensors (mistral-inference); names
                   ``layers.0.attention.wq.weight``, ``feed_forward.w1`` (gate), ``w2`` (down), ``w3`` (up).

Our module names are Hugging Face's minus the ``model.`` prefix (see ``spl/model.py``). The original
layout differs in one numerical way: its RoPE rotates interleaved pairs (2i, 2i+1) of each head while
ours (and HF's) rotates halves (i, i + Dh/2), so the rows of ``wq`` and ``wk`` are permuted at load
(``permute_original_to_hf``, the transformers conversion script's ``permute``) and back at save.

Loading builds the model on the meta device and assigns each tensor as it is read, converted to the
requested dtype and device one at a time: a 7B model never exists twice in memory. Headers (names,
shapes, dtypes) are all checked before any data is read, so a bad checkpoint fails fast with a
``CheckpointError`` that names the file and the tensor.

Saving writes the HF layout (loadable by ``MistralForCausalLM.from_pretrained``) or the original one
into a temporary directory beside the target and renames it into place (``atomic_dir``): a crash
leaves either the old checkpoint or the new one, never a mix of shards. ``atomic_save_file`` and
``atomic_write_text`` do the same for single files (trainer state, adapters, logs).

A third layout is the trainer's own: full fine-tuning writes each rank's FSDP2 shards with
``torch.distributed.checkpoint`` (``step_XXXXXXX/dcp/``, written by ``spl/train_checkpoint.py``).
``load_sharded_model`` reads one back whole, on one process, for inference and ``spl.export``.

Reading a run (``resolve_checkpoint``, ``load_for_inference``) lives here too, so ``sample.py`` and
the evaluation load what training wrote without importing the trainer.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from spl.config import ConfigError, ModelConfig
from spl.model import Transformer


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked; the message names the file and the tensor."""


# ----------------------------------------------------------------------------------------------
# Atomic writes: write beside the target, flush to disk, then rename (atomic within one filesystem).


def fsync_path(path: Path) -> None:
    """fsync one file or directory (a directory's entries: a rename in it becomes durable).
    Without it a power loss right after a rename can leave a renamed but empty file."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def _atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in ``path``'s directory; on success it replaces ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        fsync_path(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` so readers see the old content or the new, never a torn file."""
    with _atomic_file(path) as tmp:
        tmp.write_text(text)


def atomic_save_file(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                     metadata: dict[str, str] | None = None) -> None:
    """``safetensors.torch.save_file``, atomically; tensors may live on any device."""
    # safetensors wants contiguous CPU tensors that do not share storage with one another.
    cpu = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    with _atomic_file(path) as tmp:
        save_file(cpu, tmp, metadata={"format": "pt", **(metadata or {})})


@contextmanager
def atomic_dir(out_dir: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary directory that replaces ``out_dir`` when the block succeeds.

    A directory cannot be renamed over a non-empty one, so an existing ``out_dir`` is first renamed
    aside, then deleted: there is a moment with no ``out_dir``, but never a half-written one. Files
    already in ``out_dir`` are not carried over. On failure the temporary directory is removed.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} exists; pass overwrite=True to replace it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        yield tmp
        for f in tmp.iterdir():
            fsync_path(f)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private (0o700)
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".old", dir=out_dir.parent))
            os.replace(out_dir, old)  # onto the empty directory mkdtemp just made
            os.replace(tmp, out_dir)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ----------------------------------------------------------------------------------------------
# Configs: HF config.json and original params.json <-> ModelConfig.


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
    if model_type not in ("mistral", "llama"):
        raise CheckpointError(f"{source}: model_type {model_type!r} is not supported (need 'mistral' or "
                              "a Llama-compatible 'llama')")
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
            sliding_window=hf.get("sliding_window"),
            max_seq_len=hf.get("max_position_embeddings", 131072),  # MistralConfig's default
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        )
    except ConfigError as err:
        raise CheckpointError(f"{source}: {err}") from err


def model_config_to_hf(cfg: ModelConfig) -> dict:
    """A ``config.json`` dict that transformers 4.x and 5.x both read as ``MistralForCausalLM``."""
    return {
        "architectures": ["MistralForCausalLM"],
        "model_type": "mistral",
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
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


def _original_to_ours(name: str) -> str | None:
    if name in _ORIGINAL_TOP:
        return _ORIGINAL_TOP[name]
    m = _LAYER_RE.fullmatch(name)
    if m and m[2] in _ORIGINAL_LAYER:
        return f"layers.{m[1]}.{_ORIGINAL_LAYER[m[2]]}.weight"
    return None


def _ours_to_original(name: str) -> str:
    top = {ours: orig for orig, ours in _ORIGINAL_TOP.items()}
    if name in top:
        return top[name]
    m = _LAYER_RE.fullmatch(name)
    layer = {ours: orig for orig, ours in _ORIGINAL_LAYER.items()}
    return f"layers.{m[1]}.{layer[m[2]]}.weight"


def _hf_to_ours(name: str) -> str | None:
    if name == "lm_head.weight":
        return name
    return name.removeprefix("model.") if name.startswith("model.") else None


def _ours_to_hf(name: str) -> str:
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


def _rope_heads(name: str, cfg: ModelConfig) -> int | None:
    """Heads to permute over for q/k projections (our names); None for every other tensor."""
    if name.endswith("self_attn.q_proj.weight"):
        return cfg.n_heads
    if name.endswith("self_attn.k_proj.weight"):
        return cfg.n_kv_heads
    return None


# ----------------------------------------------------------------------------------------------
# Reading.


def _read_json(path: Path) -> dict:
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: cannot read JSON ({err})") from err
    if not isinstance(d, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return d


def _diagnose(path: Path) -> str:
    """Why safetensors refused ``path``: parse its header ourselves to name a tensor if we can."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        n = int.from_bytes(head, "little")  # safetensors: u64 header length, then a JSON header
        if len(head) < 8 or 8 + n > size:
            return (f"its {size} bytes hold no complete safetensors header: the file is truncated, or is not "
                    "safetensors (pickle files from torch.save are refused, never unpickled)")
        try:
            header = json.loads(fh.read(n))
            ends = {k: 8 + n + v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"}
        except (ValueError, KeyError, TypeError, AttributeError):
            return "its header is not a safetensors header"
    past = [k for k, end in ends.items() if end > size]
    if past:
        return f"tensor {past[0]!r} ends past the end of the file ({size} bytes): the file is truncated"
    return "safetensors could not read it"


@contextmanager
def _open(path: Path, expected: str = "") -> Iterator:
    """``safe_open`` on CPU, turning safetensors' file-less errors into ones naming the file."""
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            yield f
    except SafetensorError as err:
        raise CheckpointError(f"{path}: {_diagnose(path)}{expected} [{err}]") from err


def _find_files(root: Path) -> tuple[str, ModelConfig, dict[Path, list[str] | None]]:
    """Detect the layout; return it, the config, and {weight file: tensor names it should hold}."""
    if not root.is_dir():
        raise CheckpointError(f"{root}: not a checkpoint directory")
    hf_config, index = root / "config.json", root / "model.safetensors.index.json"
    single = root / "model.safetensors"
    params, consolidated = root / "params.json", root / "consolidated.safetensors"
    # HF first: mistralai repositories ship both layouts side by side; either gives the same model.
    if hf_config.is_file() and (index.is_file() or single.is_file()):
        cfg = model_config_from_hf(_read_json(hf_config), source=hf_config)
        if not index.is_file():
            return "hf", cfg, {single: None}
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: no 'weight_map' object")
        files: dict[Path, list[str]] = {}
        for name, shard in weight_map.items():
            files.setdefault(root / shard, []).append(name)
        for shard, names in files.items():
            if not shard.is_file():
                raise CheckpointError(f"{index} maps tensor {names[0]!r} (and {len(names) - 1} more) to "
                                      f"shard {shard.name}, which does not exist in {root}")
        return "hf", cfg, files
    if params.is_file() and consolidated.is_file():
        return "original", model_config_from_params(_read_json(params), source=params), {consolidated: None}
    pickles = sorted(p.name for ext in ("bin", "pth", "pt") for p in root.glob(f"*.{ext}"))
    if pickles:
        raise CheckpointError(f"{root}: only pickle weight files {pickles}; spl loads safetensors only "
                              "(unpickling can run arbitrary code). Convert them to safetensors first")
    if hf_config.is_file():
        raise CheckpointError(f"{root}: config.json but neither model.safetensors nor "
                              "model.safetensors.index.json")
    if params.is_file():
        raise CheckpointError(f"{root}: params.json but no consolidated.safetensors")
    raise CheckpointError(f"{root}: no config.json (Hugging Face layout) or params.json (original layout)")


def _plan(layout: str, files: dict[Path, list[str] | None], expected: dict[str, torch.Size],
          root: Path, optional: frozenset[str] = frozenset()) -> dict[str, tuple[Path, str]]:
    """Check every header against the model; return {our name: (file, stored name)} to read.

    Only headers are touched (safetensors keeps shapes and dtypes in a JSON prefix), so a 14 GB
    checkpoint with one bad tensor fails in milliseconds, before any data is read.
    """
    to_ours = _hf_to_ours if layout == "hf" else _original_to_ours
    plan: dict[str, tuple[Path, str]] = {}
    for path, listed in files.items():
        # With an index we know what a shard should hold, which names a tensor even when the shard
        # itself is unreadable; without one the file's own header is the list.
        hint = f" (expected to hold {listed[0]!r})" if listed else ""
        with _open(path, hint) as f:
            present = set(f.keys())
            for name in listed or sorted(present):
                if name not in present:
                    raise CheckpointError(f"{path}: tensor {name!r} is listed in the index but not in this "
                                          "file")
                if name.endswith(_IGNORED_SUFFIXES):
                    continue
                ours = to_ours(name)
                if ours is None or ours not in expected:
                    raise CheckpointError(f"{path}: unexpected tensor {name!r}: not part of this model's "
                                          "config")
                if ours in plan:
                    raise CheckpointError(f"{path}: tensor {name!r} also found in {plan[ours][0]}")
                t = f.get_slice(name)
                shape, dtype = torch.Size(t.get_shape()), t.get_dtype()
                if shape != expected[ours]:
                    raise CheckpointError(f"{path}: tensor {name!r} has shape {list(shape)}, but the config "
                                          f"implies {list(expected[ours])}")
                # Integer or fp8 tensors would be cast silently by .to(dtype); refuse them instead.
                if dtype not in ("F64", "F32", "F16", "BF16"):
                    raise CheckpointError(f"{path}: tensor {name!r} has dtype {dtype}; expected floating "
                                          "point")
                plan[ours] = (path, name)
    missing = [name for name in expected if name not in plan and name not in optional]
    if missing:
        # A missing tensor has no file of its own: blame the file (or index) that should list it.
        where = next(iter(files)) if len(files) == 1 else root / "model.safetensors.index.json"
        stored = [_ours_to_hf(m) if layout == "hf" else _ours_to_original(m) for m in missing]
        raise CheckpointError(f"{where}: missing tensor {stored[0]!r}"
                              + (f" and {len(stored) - 1} more: {stored[1:6]}" if len(stored) > 1 else ""))
    return plan


def load_model(path: str | os.PathLike, *, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu",
               tokenizer_path: str | os.PathLike | None = None) -> tuple[Transformer, ModelConfig]:
    """Load a checkpoint directory (either layout) as a ``Transformer`` in ``dtype`` on ``device``.

    The model comes back in eval mode. With ``tokenizer_path`` the tokenizer's vocabulary is checked
    against the model's (see ``check_tokenizer_vocab``).
    """
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be floating point, got {dtype}")
    root = Path(path)
    layout, cfg, files = _find_files(root)
    if tokenizer_path is not None:
        check_tokenizer_vocab(tokenizer_path, cfg.vocab_size)
    with torch.device("meta"):  # shapes only: no memory, no random init
        model = Transformer(cfg)
    expected = {name: t.shape for name, t in model.state_dict().items()}
    # HF omits the tied output matrix when saving; some tools store it anyway, and then it is ignored.
    optional = frozenset({"lm_head.weight"} if cfg.tie_word_embeddings else ())
    plan = _plan(layout, files, expected, root, optional)
    by_file: dict[Path, list[tuple[str, str]]] = {}
    for ours, (file, name) in plan.items():
        if ours not in optional:
            by_file.setdefault(file, []).append((ours, name))
    # Read file by file, one tensor at a time: peak host memory is the model plus one tensor.
    state: dict[str, torch.Tensor] = {}
    for file, names in by_file.items():
        with _open(file) as f:
            for ours, name in names:
                t = f.get_tensor(name)  # (rows, cols) on CPU, in the stored dtype
                heads = _rope_heads(ours, cfg) if layout == "original" else None
                if heads is not None:
                    t = permute_original_to_hf(t, heads)
                state[ours] = t.to(device=device, dtype=dtype)
    if cfg.tie_word_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    # assign=True adopts our tensors as the parameters instead of copying into meta storage.
    model.load_state_dict(state, strict=True, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight  # assign made two Parameters; share one again
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"spl bug: tensors left on the meta device after loading: {left}")
    return model.eval(), cfg


def check_tokenizer_vocab(tokenizer_path: str | os.PathLike, model_vocab_size: int,
                          tokenizer_vocab_size: int | None = None) -> None:
    """Raise unless the tokenizer's vocabulary is exactly the model's (wrong tokenizer file otherwise).

    ``tokenizer_vocab_size`` defaults to loading ``tokenizer_path`` with ``spl.tokenizer.Tokenizer``.
    """
    if tokenizer_vocab_size is None:
        from spl.tokenizer import Tokenizer  # sentencepiece only when actually checking a file

        tokenizer_vocab_size = Tokenizer(tokenizer_path).vocab_size
    if tokenizer_vocab_size != model_vocab_size:
        raise CheckpointError(f"{tokenizer_path}: tokenizer has {tokenizer_vocab_size} tokens but the "
                              f"model's vocab_size is {model_vocab_size}; use the checkpoint's own tokenizer")


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
               max_shard_bytes: int = 5 * 2**30, overwrite: bool = False) -> None:
    """Write merged weights in the HF layout, sharded above ``max_shard_bytes``, atomically.

    Shards are filled greedily in state-dict order and copied to CPU one shard at a time, so host
    memory holds at most one shard beyond the model.
    """
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
    hf_cfg = model_config_to_hf(cfg)
    # transformers 4.x reads torch_dtype, 5.x reads it too (as dtype): the dtype the weights are in.
    hf_cfg["torch_dtype"] = str(next(iter(state.values())).dtype).removeprefix("torch.")
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        weight_map = {}
        for i, names in enumerate(shards):
            n = len(shards)
            file = f"model-{i + 1:05d}-of-{n:05d}.safetensors" if n > 1 else "model.safetensors"
            tensors = {_ours_to_hf(k): state[k].detach().to("cpu").contiguous() for k in names}
            save_file(tensors, tmp / file, metadata={"format": "pt"})  # transformers expects format=pt
            weight_map.update({name: file for name in tensors})
        if len(shards) > 1:  # the index is what transformers looks for first; one file needs none
            total = sum(t.numel() * t.element_size() for t in state.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")


def save_original(model: Transformer, cfg: ModelConfig, out_dir: str | os.PathLike, *,
                  overwrite: bool = False) -> None:
    """Write params.json + consolidated.safetensors (mistral-inference layout), atomically."""
    state = _state_to_save(model, cfg)
    if cfg.tie_word_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]  # the original layout always has output
    tensors = {}
    for name, t in state.items():
        t = t.detach().to("cpu")
        heads = _rope_heads(name, cfg)
        tensors[_ours_to_original(name)] = (permute_hf_to_original(t, heads) if heads else t).contiguous()
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        save_file(tensors, tmp / "consolidated.safetensors", metadata={"format": "pt"})
        (tmp / "params.json").write_text(json.dumps(model_config_to_params(cfg), indent=2) + "\n")


# ----------------------------------------------------------------------------------------------
# Sharded training checkpoints (torch.distributed.checkpoint, "DCP").

# DCP pickles its index (``dcp/.metadata``) and loads tensors with ``torch.load(weights_only=True)``.
# The index is unpickled here through an allow-list of DCP's own metadata classes, so even a
# tampered checkpoint cannot run code; the trainer stores only tensors in DCP (no pickled bytes).
_DCP_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")
_DCP_GLOBALS = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
                ("pathlib", "Path"), ("pathlib", "PosixPath"), ("pathlib", "WindowsPath")}


def _dcp_metadata_unpickler(file):
    import pickle

    inert = (torch.dtype, torch.layout, torch.memory_format)

    class Unpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str):
            # Only plain names (a dotted one could reach any attribute of an allowed module) of
            # torch, pathlib and collections are even looked up; then only the allow-list passes.
            found = None
            if "." not in name and module.split(".")[0] in ("torch", "pathlib", "collections"):
                found = super().find_class(module, name)
            dcp_class = module in _DCP_MODULES and isinstance(found, type) and found.__module__ == module
            allowed = (module, name) in _DCP_GLOBALS or (module == "torch" and isinstance(found, inert))
            if dcp_class or allowed:
                return found
            raise CheckpointError(f"{getattr(file, 'name', file)}: refusing to unpickle {module}.{name}: "
                                  "not part of a torch.distributed.checkpoint index")
    return Unpickler(file)


def read_dcp_metadata(dcp_dir: str | os.PathLike):
    """The index (``torch.distributed.checkpoint.metadata.Metadata``) of a DCP directory."""
    index = Path(dcp_dir) / ".metadata"
    if not index.is_file():
        raise CheckpointError(f"{index}: missing; the sharded checkpoint is incomplete")
    with open(index, "rb") as f:
        return _dcp_metadata_unpickler(f).load()


def dcp_reader(path: str | os.PathLike):
    """A ``torch.distributed.checkpoint`` FileSystemReader whose index is unpickled safely."""
    from torch.distributed.checkpoint import FileSystemReader

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):  # the signature changed across torch versions
            metadata = read_dcp_metadata(self.path)
            meta = getattr(metadata, "storage_meta", None)
            if meta is not None and hasattr(self, "load_id"):
                meta.load_id = self.load_id
            return metadata

    return SafeReader(str(path))


def dcp_load(state: dict, path: str | os.PathLike, **kwargs) -> None:
    """``torch.distributed.checkpoint.load`` in place into ``state`` through ``dcp_reader``; run on
    every rank of a process group, or alone without one."""
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message=".*single process")
        dcp.load(state, storage_reader=dcp_reader(path), **kwargs)


SHARDED_CONFIG = "model_config.json"  # beside dcp/: the model shape, as an HF config.json


def load_sharded_model(step_dir: str | os.PathLike, *, dtype: torch.dtype = torch.float32,
                       device: str | torch.device = "cpu") -> tuple[Transformer, torch.Tensor | None]:
    """The whole model (and a reward head, if the run trained one) from a full fine-tuning step.

    Every tensor is allocated once at its full size in ``dtype`` and DCP copies each rank's shards
    into it: host memory is the model in ``dtype`` plus one stored chunk.
    """
    step = Path(step_dir)
    cfg = model_config_from_hf(_read_json(step / SHARDED_CONFIG), source=step / SHARDED_CONFIG)
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    stored = read_dcp_metadata(step / "dcp").state_dict_metadata  # {flattened key: metadata}
    with torch.device("meta"):
        model = Transformer(cfg)
    names = [n for n in model.state_dict() if not (cfg.tie_word_embeddings and n == "lm_head.weight")]
    want = {f"model.{n}": model.state_dict()[n].shape for n in names}  # Scorer's names: model.<ours>
    if "model.score.weight" in stored:  # the reward head of a reward-mode run
        want["score.weight"] = stored["model.score.weight"].size
    for key, shape in want.items():
        meta = stored.get(f"model.{key}")
        if not isinstance(meta, TensorStorageMetadata):
            raise CheckpointError(f"{step / 'dcp'}: missing tensor {key!r}")
        if tuple(meta.size) != tuple(shape):
            raise CheckpointError(f"{step / 'dcp'}: tensor {key!r} has shape {list(meta.size)}, but "
                                  f"{SHARDED_CONFIG} implies {list(shape)}")
    state = {"model": {k: torch.empty(shape, dtype=dtype, device=device) for k, shape in want.items()}}
    dcp_load(state, step / "dcp")
    weights = {k.removeprefix("model."): v for k, v in state["model"].items() if k.startswith("model.")}
    if cfg.tie_word_embeddings:
        weights["lm_head.weight"] = weights["embed_tokens.weight"]
    model.load_state_dict(weights, strict=True, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    return model.eval(), state["model"].get("score.weight")


# ----------------------------------------------------------------------------------------------
# Reading a run back for sampling and evaluation.


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
        base = Path(_read_json(adapter_config).get("base_model_name_or_path") or "")
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
        cfg = model_config_from_hf(_read_json(src / SHARDED_CONFIG), source=src / SHARDED_CONFIG)
    else:
        _, cfg, _ = _find_files(weights)
    if tokenizer is not None:  # given: used as given, never replaced by the checkpoint's own
        tok_path = Path(tokenizer)
    else:
        tok_path = next((d / "tokenizer.model" for d in (src, base) if d is not None
                         and (d / "tokenizer.model").is_file()), src / "tokenizer.model")
    if not tok_path.is_file():
        raise CheckpointError(f"tokenizer not found: {tok_path} (pass --tokenizer)")
    return InferenceSource(src, kind, weights, cfg, tok_path, base)


def load_for_inference(path: str | os.PathLike, *, adapter: str | os.PathLike | None = None,
                       tokenizer: str | os.PathLike | None = None, device: torch.device | str = "cpu",
                       dtype: torch.dtype = torch.float32) -> Loaded:
    """Load one of: a run directory or one of its ``step_*`` checkpoints (adapter over its base, or
    sharded full weights), an HF-layout or original-layout model directory; then an optional extra
    PEFT-format ``adapter``. The tokenizer is the checkpoint's own ``tokenizer.model`` unless given,
    and its vocabulary must match the model's."""
    from spl.lora import load_adapter
    from spl.tokenizer import Tokenizer

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
    tok = Tokenizer(found.tokenizer)
    check_tokenizer_vocab(found.tokenizer, model.cfg.vocab_size, tok.vocab_size)
    return Loaded(model.eval(), tok, src, found.base, head, found.kind == "adapter" or adapter is not None)
