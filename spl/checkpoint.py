"""Loading checkpoints: Mistral and Llama weights in either published layout, and the trainer's shards.

Two published layouts are read (``spl/layouts.py`` describes them), both safetensors only (pickle
files can run code when loaded, so ``*.bin`` and ``*.pth`` are refused rather than unpickled):
Hugging Face (config.json + model.safetensors, or shards listed by model.safetensors.index.json) and
original (params.json + consolidated.safetensors, whose q/k rows are permuted at load).

Loading builds the model on the meta device and assigns each tensor as it is read, converted to the
requested dtype and device one at a time: a 7B model never exists twice in memory. Headers (names,
shapes, dtypes) are all checked before any data is read, so a bad checkpoint fails fast with a
``CheckpointError`` that names the file and the tensor. A tied output matrix (``tie_word_embeddings``)
is one tensor: ``lm_head.weight`` IS ``embed_tokens.weight`` after loading.

The trainer's own layout: full fine-tuning writes each rank's FSDP2 shards with
``torch.distributed.checkpoint`` (``step_XXXXXXX/dcp/``, written by ``spl/train_checkpoint.py``).
``load_sharded_model`` reads one back whole, on one process, for inference and ``spl.export``; the
DCP index is unpickled through an allow-list.

Writing is ``spl/saving.py``; reading a run for sampling and evaluation is ``spl/inference.py``.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from spl.config import ModelConfig
from spl.layouts import (
    IGNORED_SUFFIXES,
    CheckpointError,
    hf_to_ours,
    model_config_from_hf,
    model_config_from_params,
    original_to_ours,
    ours_to_hf,
    ours_to_original,
    permute_original_to_hf,
    read_json,
    rope_heads,
)
from spl.model import Transformer

__all__ = ["CheckpointError", "check_tokenizer_vocab", "dcp_load", "dcp_reader", "find_files", "load_model",
           "load_sharded_model", "read_dcp_metadata", "SHARDED_CONFIG"]


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


def find_files(root: Path) -> tuple[str, ModelConfig, dict[Path, list[str] | None]]:
    """Detect the layout; return it, the config, and {weight file: tensor names it should hold}."""
    if not root.is_dir():
        raise CheckpointError(f"{root}: not a checkpoint directory")
    hf_config, index = root / "config.json", root / "model.safetensors.index.json"
    single = root / "model.safetensors"
    params, consolidated = root / "params.json", root / "consolidated.safetensors"
    # HF first: mistralai repositories ship both layouts side by side; either gives the same model.
    if hf_config.is_file() and (index.is_file() or single.is_file()):
        cfg = model_config_from_hf(read_json(hf_config), source=hf_config)
        if not index.is_file():
            return "hf", cfg, {single: None}
        weight_map = read_json(index).get("weight_map")
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
        return "original", model_config_from_params(read_json(params), source=params), {consolidated: None}
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
    to_ours = hf_to_ours if layout == "hf" else original_to_ours
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
                if name.endswith(IGNORED_SUFFIXES):
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
        stored = [ours_to_hf(m) if layout == "hf" else ours_to_original(m) for m in missing]
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
    layout, cfg, files = find_files(root)
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
                heads = rope_heads(ours, cfg) if layout == "original" else None
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
        from spl.tokenizer import load_tokenizer  # sentencepiece only when actually checking a file

        tokenizer_vocab_size = load_tokenizer(tokenizer_path).vocab_size
    if tokenizer_vocab_size != model_vocab_size:
        raise CheckpointError(f"{tokenizer_path}: tokenizer has {tokenizer_vocab_size} tokens but the "
                              f"model's vocab_size is {model_vocab_size}; use the checkpoint's own tokenizer")


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
    cfg = model_config_from_hf(read_json(step / SHARDED_CONFIG), source=step / SHARDED_CONFIG)
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
