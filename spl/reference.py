"""Reference log-probs log pi_ref(y | x), carried with the data: the pi_ref terms of paper eq. 5.

Under LoRA the reference is the same weights with the adapters disabled, computed beside each policy
forward. Full fine-tuning moves the base weights, so the reference of every pair is computed once,
before the first step; an alpha/beta sweep over one data set and base model may share such a file
for LoRA too (``train.ref_cache``).

Precomputed values are a column of their dataset, ``dataset.ref_logps`` (N, 2) = (chosen, rejected)
per pair, which ``collate`` hands on as ``batch["ref_logps"]`` (2B,) in the batch's row order. A
pair can therefore only meet its own reference log-probs: the eval set has its own column and its
own file, never indices into the training set's.

A cache file (safetensors) holds that column and, as metadata, everything its values depend on:
the token ids (which cover the data file, tokenizer, chat template and truncation), the tokenizer
file, ``max_len``/``max_prompt_len``, the autocast precision and a checksum of every base tensor.
A file whose fields differ is refused, naming them. Rank 0 alone decides to load or compute, so
ranks cannot split into loaders and computers (a hang under FSDP's collectives).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from torch import nn
from tqdm import tqdm

from spl.atomic import atomic_save_file
from spl.distributed import DistEnv, TrainingError, decide_on_rank0, print0
from spl.lora import disable_adapters

_HASH_CHUNK = 1 << 22  # elements per step of the checksum: bounds its temporaries to ~64 MB


@torch.no_grad()
def _tensor_checksum(t: torch.Tensor) -> torch.Tensor:
    """(2,) int64: the sum and a position-weighted sum of the tensor's bit patterns.

    Integer sums wrap modulo 2^64, so they are exact and independent of reduction order: the same
    weights give the same checksum on any device or rank count, and any single changed element
    changes it. The position weights make moved or swapped values count too.
    """
    ints = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    flat = t.detach().reshape(-1).view(ints)  # (n,) the raw bits
    total = torch.zeros(2, dtype=torch.int64, device=t.device)
    for start in range(0, flat.numel(), _HASH_CHUNK):
        bits = flat[start:start + _HASH_CHUNK].long()  # (c,)
        weights = torch.arange(start, start + bits.numel(), device=t.device) % 65521 + 1  # (c,)
        total += torch.stack([bits.sum(), (bits * weights).sum()])
    return total


def base_fingerprint(model: nn.Module) -> str:
    """A checksum of every base weight (LoRA factors excluded: they start random and are disabled
    in the reference), with names, shapes and dtypes. Call it before FSDP shards the model."""
    names, sums = [], []
    for name, t in model.state_dict().items():
        if name.endswith((".lora_a", ".lora_b")):
            continue
        names.append(f"{name}:{tuple(t.shape)}:{t.dtype}")
        sums.append(_tensor_checksum(t))
    digest = hashlib.sha256("\n".join(names).encode())
    digest.update(torch.stack(sums).cpu().numpy().tobytes())  # one host sync for the whole model
    return digest.hexdigest()[:16]


def cache_fields(dataset, *, base: str, tokenizer_path: str | None, max_len: int, max_prompt_len: int,
                 chat_template: object, precision: str) -> dict[str, str]:
    """What a dataset's reference log-probs depend on, as the strings stored beside them."""
    tokenizer = hashlib.sha256(Path(tokenizer_path).read_bytes()).hexdigest()[:16] if tokenizer_path else ""
    return {"data": dataset.fingerprint(), "pairs": str(len(dataset)), "base_weights": base,
            "tokenizer": tokenizer, "max_len": str(max_len), "max_prompt_len": str(max_prompt_len),
            "chat_template": str(chat_template), "precision": precision}


def _read_cache(path: Path, fields: dict[str, str]) -> torch.Tensor:
    try:
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
            tensor = f.get_tensor("ref_logps") if "ref_logps" in f.keys() else None
    except (SafetensorError, OSError) as err:
        raise TrainingError(f"{path}: cannot read the reference cache ({err}); delete it") from None
    stored = json.loads(meta.get("fields", "{}"))
    differ = sorted(k for k in fields if stored.get(k) != fields[k])
    if differ:
        raise TrainingError(f"{path}: reference cache was computed for other data or another base model "
                            f"(differs in: {', '.join(differ)}); delete it or point train.ref_cache "
                            "elsewhere")
    if tensor is None or tuple(tensor.shape) != (int(fields["pairs"]), 2):
        raise TrainingError(f"{path}: reference cache holds no (pairs, 2) tensor 'ref_logps'; delete it")
    return tensor.float()


def attach_reference(dataset, path: Path | None, fields: dict[str, str], env: DistEnv,
                     compute: Callable[[], torch.Tensor], name: str) -> None:
    """Set ``dataset.ref_logps`` from the cache at ``path`` if it matches ``fields``, else by
    ``compute()`` (collective: every rank calls it) and write the file on rank 0."""
    def decide():
        if path is None or not path.is_file():
            return None
        return _read_cache(path, fields)  # rank 0 reads; the tensor (N, 2) travels to the others

    loaded = decide_on_rank0(env, decide)
    if loaded is not None:
        dataset.ref_logps = loaded
        print0(env, f"reference log-probs ({name}): loaded {len(loaded)} pairs from {path}")
        return
    dataset.ref_logps = compute()
    if path is not None and env.is_main:
        try:
            atomic_save_file({"ref_logps": dataset.ref_logps}, path, metadata={"fields": json.dumps(fields)})
        except OSError as err:
            raise TrainingError(f"{path}: cannot write the reference cache ({err})") from None
        print0(env, f"reference log-probs ({name}): wrote {len(dataset)} pairs to {path}")


@torch.no_grad()
def compute_reference(scorer: nn.Module, dataset, env: DistEnv, micro_batch_size: int, autocast,
                      adapters_off: bool) -> torch.Tensor:
    """(N, 2) float32 log pi_ref of (chosen, rejected) for every pair, pairs split across ranks."""
    n = len(dataset)
    cache = torch.zeros(n, 2, dtype=torch.float64)  # float64 so the cross-rank sum is exact
    order = list(range(env.rank, n, env.world_size))
    # Every rank runs the same number of forwards (FSDP's all-gathers are collective): a short
    # rank repeats its last pair (or pair 0), which writes the same value twice.
    per_rank = math.ceil(n / env.world_size)
    order += (order[-1:] or [0]) * (per_rank - len(order))
    writes = torch.zeros(n, dtype=torch.float64)
    ctx = disable_adapters(scorer.model) if adapters_off else nullcontext()
    with ctx, autocast():
        starts = range(0, len(order), micro_batch_size)
        for s in tqdm(starts, desc="reference log-probs", disable=not env.is_main):
            idx = order[s:s + micro_batch_size]
            batch = dataset.collate(idx)
            inputs = (batch[k].to(env.device) for k in ("input_ids", "targets", "loss_mask", "last_index"))
            out = scorer(*inputs)
            out = out.double().cpu()  # (2b,) chosen rows, then rejected rows
            cache[idx, 0], cache[idx, 1] = out[:len(idx)], out[len(idx):]
            writes[idx] = 1.0  # a repeated pair is written once per rank either way
    if env.distributed:
        # Each pair was computed by exactly one rank, or by one rank twice (the same value), unless a
        # rank had none at all and repeated pair 0: divide by how many ranks wrote each pair.
        both = torch.cat([cache, writes[:, None]], dim=1).to(env.device)
        dist.all_reduce(both)
        both = both.cpu()
        cache = both[:, :2] / both[:, 2:]
    return cache.float()
