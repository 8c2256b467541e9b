"""Configuration: nested dataclasses holding every default, validated in ``__post_init__``.

This file starts with the model's shape (``ModelConfig``) and its presets; the training, data, LoRA
and sampling sections live beside it so a YAML file or a ``key=value`` override can reach any field.
Names follow mistral-inference (``dim``, ``n_layers``, ``n_heads`` ...), so ``params.json`` maps
one to one; ``spl/checkpoint.py`` translates Hugging Face's ``config.json``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields


class ConfigError(ValueError):
    """An impossible or unknown configuration value; the message names the field."""


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
    tie_word_embeddings: bool = False  # Mistral never ties; kept so foreign configs load honestly

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
