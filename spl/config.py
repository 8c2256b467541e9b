"""Configuration: nested dataclasses holding every default, validated in ``__post_init__``.

This file starts with the model's shape (``ModelConfig``) and its presets; the training, data, LoRA
and sampling sections live beside it so a YAML file or a ``key=value`` override can reach any field.
Names follow mistral-inference (``dim``, ``n_layers``, ``n_heads`` ...), so ``params.json`` maps
one to one; ``spl/layouts.py`` translates Hugging Face's ``config.json``.
"""

from __future__ import annotations

import importlib.util
import sys
import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from pathlib import Path

import yaml

from spl.chat_templates import CHOICES as CHAT_TEMPLATES

# The losses spl/losses.py implements (kept in step by tests/test_losses.py; importing it would pull
# torch into every config check) and the logging backends spl/reporting.py drives.
DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
REPORT_TO = ("tensorboard", "wandb")


class ConfigError(ValueError):
    """An impossible or unknown configuration value; the message names the field."""


MODEL_FAMILIES = ("mistral", "llama")  # decoder families spl/model.py runs (spl/layouts.py MODEL_TYPES)


@dataclass
class ModelConfig:
    """Shape of a Mistral decoder. Defaults are Mistral-7B v0.2."""

    dim: int = 4096  # D: residual stream width
    n_layers: int = 32
    head_dim: int = 128  # Dh
    hidden_dim: int = 14336  # SwiGLU inner width
    n_heads: int = 32  # H: query heads
    n_kv_heads: int = 8  # Hkv: key/value heads (grouped-query attention)
    norm_eps: float = 1e-5
    vocab_size: int = 32000  # V
    rope_theta: float = 1e6  # v0.1 used 1e4, v0.2 uses 1e6
    # Token i attends to keys j with i - W < j <= i (W keys, itself included), as in transformers.
    sliding_window: int | None = None
    max_seq_len: int = 32768  # longest position the model was trained for (HF max_position_embeddings)
    tie_word_embeddings: bool = False  # one tensor for embed_tokens and lm_head (SmolLM2, Llama 3.2)
    # The checkpoint family, written back as its config.json model_type: "llama" is Mistral without a
    # sliding window (spl/layouts.py MODEL_TYPES); the computation is the same for both.
    family: str = "mistral"

    def __post_init__(self) -> None:
        for name in ("dim", "n_layers", "head_dim", "hidden_dim", "n_heads", "n_kv_heads", "vocab_size",
                     "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"model.{name} must be a positive integer, got {value!r}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"model.n_heads ({self.n_heads}) must be a multiple of model.n_kv_heads "
                              f"({self.n_kv_heads}) for grouped-query attention")
        if self.head_dim % 2:
            raise ConfigError(f"model.head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ConfigError(f"model.sliding_window must be positive or null, got {self.sliding_window}")
        if not self.norm_eps > 0 or not self.rope_theta > 0:
            raise ConfigError("model.norm_eps and model.rope_theta must be positive")
        if self.family not in MODEL_FAMILIES:
            raise ConfigError(f"model.family must be one of {list(MODEL_FAMILIES)}, got {self.family!r}")
        if self.family == "llama" and self.sliding_window is not None:
            raise ConfigError("model.family 'llama' has no sliding window; use 'mistral' for one")

    @classmethod
    def preset(cls, name: str) -> ModelConfig:
        """A named shape: ``mistral-7b-v0.1``, ``mistral-7b-v0.2`` or ``tiny`` (tests, demo)."""
        if name not in PRESETS:
            raise ConfigError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
        return cls(**PRESETS[name])

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown model config keys {unknown}; known: {sorted(known)}")
        return cls(**d)


PRESETS: dict[str, dict] = {
    # Mistral-7B v0.1: rope_theta 1e4 and a 4096-token sliding window.
    "mistral-7b-v0.1": dict(rope_theta=1e4, sliding_window=4096),
    # Mistral-7B v0.2 (and Instruct-v0.2): rope_theta 1e6, full attention.
    "mistral-7b-v0.2": dict(rope_theta=1e6, sliding_window=None),
    # A few-hundred-thousand-parameter model with Mistral's vocabulary: tests and the CPU demo.
    "tiny": dict(dim=64, n_layers=2, head_dim=16, hidden_dim=128, n_heads=4, n_kv_heads=2,
                 vocab_size=32000, rope_theta=1e4, max_seq_len=2048),
}


@dataclass
class ModelSection:
    """Which weights to start from: ``checkpoint``, an HF- or original-layout directory. The embedded
    demo (no checkpoint, no data) builds the ``preset`` shape with random weights instead."""

    checkpoint: str | None = None
    tokenizer: str | None = None  # default: tokenizer.model or tokenizer.json in the checkpoint directory
    preset: str = "tiny"
    dtype: str = "auto"  # auto: bf16 weights on CUDA, fp32 on CPU; or fp32 / bf16

    def __post_init__(self) -> None:
        _choice("model.dtype", self.dtype, ("auto", "fp32", "bf16"))
        if self.checkpoint is None and self.preset not in PRESETS:
            raise ConfigError(f"model.preset must be one of {sorted(PRESETS)}, got {self.preset!r}")
        for name in ("checkpoint", "tokenizer"):
            path = getattr(self, name)
            if path is not None and not Path(path).exists():
                raise ConfigError(f"model.{name}: no such file or directory: {path}")


@dataclass
class LoRAConfig:
    """Low-rank adapters (spl/lora.py). Disabled means full fine-tuning (FSDP2 across ranks)."""

    enabled: bool = True
    rank: int = 8
    alpha: float = 16.0  # scale = alpha / rank
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])

    def __post_init__(self) -> None:
        _positive("lora.rank", self.rank)
        _positive("lora.alpha", self.alpha)
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"lora.dropout must lie in [0, 1), got {self.dropout}")
        if not self.targets:
            raise ConfigError("lora.targets must name at least one module")


@dataclass
class DataConfig:
    """Training data. Without ``train_path`` the embedded opinion demo generates its own."""

    train_path: str | None = None
    eval_path: str | None = None
    format: str = "auto"  # auto | preference | hh | sft
    # auto (read what the checkpoint carries), mistral-v1, mistral-v3, zephyr or none (plain text):
    # spl/chat_templates.py. A run saves the resolved name; the demo always uses none.
    chat_template: str = "auto"
    max_len: int = 512  # prompt + response tokens
    max_prompt_len: int = 256  # prompts are cut from the left first, then responses from the right
    # > 0: hold out this many training records (seeded by train.seed) as the eval set; needs no eval_path
    eval_size: int = 0

    def __post_init__(self) -> None:
        _choice("data.format", self.format, ("auto", "preference", "hh", "sft"))
        _choice("data.chat_template", self.chat_template, CHAT_TEMPLATES)
        if self.eval_size < 0:
            raise ConfigError(f"data.eval_size must be >= 0, got {self.eval_size}")
        if self.eval_size and self.eval_path is not None:
            raise ConfigError("data.eval_size and data.eval_path both name an eval set; set only one")
        _positive("data.max_len", self.max_len)
        _positive("data.max_prompt_len", self.max_prompt_len)
        if self.max_prompt_len >= self.max_len:
            raise ConfigError(f"data.max_prompt_len ({self.max_prompt_len}) must be below data.max_len "
                              f"({self.max_len}) so a response token fits")
        for name in ("train_path", "eval_path"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ConfigError(f"data.{name}: no such file: {path}")


@dataclass
class TrainConfig:
    """The optimisation. Defaults run the embedded demo; configs/ hold the paper's settings."""

    mode: str = "spl"  # sft | spl (DPO when alpha == beta) | reward
    alpha: float = 1.0  # SPL entropy weight (paper eq. 5); alpha/beta is the global temperature
    beta: float = 0.1  # SPL cross-entropy weight toward the reference
    # reverse_kl: SPL (above). Any other is f-DPO (App. B baseline, spl/losses.py), alpha == beta.
    divergence: str = "reverse_kl"  # reverse_kl | forward_kl | js_divergence | alpha_divergence
    divergence_alpha: float = 0.5  # alpha_divergence's a: 0 reverse KL ... 1 forward KL (TRL's coef is 1 - a)
    lr: float = 1e-3
    weight_decay: float = 0.0
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW (beta1, beta2)
    warmup_steps: int = 20
    max_steps: int = 3000
    schedule: str = "cosine"  # cosine | linear | constant, after linear warmup
    min_lr_ratio: float = 0.1  # decay floor as a fraction of lr
    batch_size: int = 64  # pairs (or sequences) per optimizer step, over all ranks
    # Pairs per forward on each rank; accumulation makes up the rest. "auto": the whole per-rank
    # share (batch_size / ranks) in one forward; an integer must divide that share (bounds memory).
    micro_batch_size: int | str = "auto"
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    seed: int = 0
    precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU; or fp32 / bf16
    activation_checkpointing: bool = False
    logprob_impl: str = "auto"  # auto | plain | chunked | triton (spl/logprobs.py)
    ref_cache: str | None = None  # file of precomputed reference log-probs, shared by a sweep
    eval_every: int = 100
    save_every: int = 100
    log_every: int = 10
    keep_checkpoints: int = 2
    out_dir: str = "runs/demo"
    resume: bool = False  # continue from out_dir's latest checkpoint
    overwrite: bool = False  # start afresh in an out_dir that already holds a run (deletes its checkpoints)
    report_to: list[str] = field(default_factory=list)  # also log to: tensorboard, wandb (spl/reporting.py)

    def __post_init__(self) -> None:
        _choice("train.mode", self.mode, ("sft", "spl", "reward"))
        self._check_divergence()
        self._check_report_to()
        _choice("train.schedule", self.schedule, ("cosine", "linear", "constant"))
        _choice("train.precision", self.precision, ("auto", "fp32", "bf16"))
        _choice("train.logprob_impl", self.logprob_impl, ("auto", "plain", "chunked", "triton"))
        _positive("train.alpha", self.alpha)
        if not self.beta >= 0:
            raise ConfigError(f"train.beta must be >= 0, got {self.beta}")
        _positive("train.lr", self.lr)
        for name in ("max_steps", "batch_size", "log_every", "eval_every", "save_every", "keep_checkpoints"):
            _positive(f"train.{name}", getattr(self, name))
        if self.micro_batch_size != "auto":
            if isinstance(self.micro_batch_size, str):
                raise ConfigError(f"train.micro_batch_size must be 'auto' or a positive integer, got "
                                  f"{self.micro_batch_size!r}")
            _positive("train.micro_batch_size", self.micro_batch_size)
        if self.resume and self.overwrite:
            raise ConfigError("train.resume and train.overwrite contradict each other; set one")
        if self.warmup_steps < 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise ConfigError("train.warmup_steps, train.weight_decay and train.grad_clip must be >= 0")
        if (len(self.adam_betas) != 2 or isinstance(self.adam_betas, str)
                or not all(isinstance(b, int | float) and 0 <= b < 1 for b in self.adam_betas)):
            raise ConfigError(f"train.adam_betas must be two numbers in [0, 1), got {self.adam_betas}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"train.min_lr_ratio must lie in [0, 1], got {self.min_lr_ratio}")

    def _check_divergence(self) -> None:
        _choice("train.divergence", self.divergence, DIVERGENCES)
        if not 0 <= self.divergence_alpha <= 1:
            raise ConfigError(f"train.divergence_alpha must lie in [0, 1] (0: reverse KL, 1: forward KL), "
                              f"got {self.divergence_alpha}")
        if self.divergence == "reverse_kl":
            return
        if self.mode != "spl":
            raise ConfigError(f"train.divergence={self.divergence} is a preference loss (f-DPO); "
                              f"train.mode={self.mode} has none, so leave train.divergence=reverse_kl")
        if self.alpha != self.beta:
            # SPL splits the reverse KL into entropy (alpha) and cross-entropy (beta); an f-divergence
            # has no such split, so f-DPO has one weight. Refuse rather than ignore alpha.
            raise ConfigError(f"train.divergence={self.divergence} is f-DPO, whose only weight is "
                              f"train.beta; set train.alpha equal to train.beta (got alpha={self.alpha}, "
                              f"beta={self.beta}). SPL's separate alpha needs train.divergence=reverse_kl")

    def _check_report_to(self) -> None:
        for name in self.report_to:
            _choice("train.report_to entry", name, REPORT_TO)
        if len(set(self.report_to)) != len(self.report_to):
            raise ConfigError(f"train.report_to lists a backend twice: {self.report_to}")
        # Checked here, before any weights load; the package is imported only when the run starts.
        missing = [name for name in self.report_to if importlib.util.find_spec(name) is None]
        if missing:
            raise ConfigError(f"train.report_to={self.report_to}: {', '.join(missing)} not installed; "
                              f"pip install {' '.join(missing)}, or remove it from train.report_to")


@dataclass
class Config:
    model: ModelSection = field(default_factory=ModelSection)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ConfigError(f"{name} must be positive, got {value!r}")


def _choice(name: str, value, options: tuple) -> None:
    if value not in options:
        raise ConfigError(f"{name} must be one of {list(options)}, got {value!r}")


def _check_type(name: str, value, annotation):
    """Coerce ``value`` to a dataclass field's annotation (int -> float is allowed) or raise."""
    hint = (annotation if not isinstance(annotation, tuple)  # a list's item type
            else typing.get_type_hints(annotation[0], globalns=vars(sys.modules[__name__]))[annotation[1]])
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    args = typing.get_args(hint) if union else ()  # list[str]'s args are its items' type, not choices
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), hint) if args else hint
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{name} may not be null")
    others = [a for a in args if a not in (type(None), base)]
    if others and isinstance(value, tuple(others)):  # int | str: "auto" or a count
        return value
    if typing.get_origin(base) is list:
        item = typing.get_args(base)[0]
        if not isinstance(value, list):
            kind = {str: "strings", int: "integers", float: "numbers"}.get(item, item.__name__)
            raise ConfigError(f"{name} must be a list of {kind}, got {value!r}")
        return [_check_type(f"{name}[{i}]", v, item) for i, v in enumerate(value)]
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if base is float and isinstance(value, str):  # YAML reads 1e-5 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if not isinstance(value, base) or (base is int and isinstance(value, bool)):
        raise ConfigError(f"{name} must be of type {base.__name__}, got {value!r}")
    return value


def _build(cls, values: dict, prefix: str):
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"unknown config key(s) {[f'{prefix}{k}' for k in unknown]}; "
                          f"known in {prefix.rstrip('.') or 'top level'}: {sorted(known)}")
    kwargs = {}
    for name, f in known.items():
        if name not in values:
            continue
        value = values[name]
        sub = f.default_factory if f.default_factory is not MISSING else None
        if sub is not None and is_dataclass(sub):  # a nested section (not a list default)
            if not isinstance(value, dict):
                raise ConfigError(f"{prefix}{name} must be a mapping, got {value!r}")
            kwargs[name] = _build(sub, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _check_type(f"{prefix}{name}", value, (cls, name))
    return cls(**kwargs)


def parse_overrides(overrides: list[str]) -> dict:
    """``["train.lr=1e-5", "lora.enabled=false"]`` -> nested dict; values read by yaml.safe_load."""
    nested: dict = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = yaml.safe_load(raw) if raw != "" else None
    return nested


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Defaults <- YAML file (only what differs) <- dotted overrides, validated."""
    values: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML: {e}") from e
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
        values = loaded
    values = _merge(values, parse_overrides(list(overrides)))
    try:
        return _build(Config, values, "")
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path is not None else str(e)) from None
