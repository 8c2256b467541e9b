"""LoRA: low-rank adapters on frozen linear layers (Hu et al. 2021), written by hand.

A wrapped projection computes ``y = x W^T + scale * (dropout(x) A^T) B^T`` with ``A`` (r, in) =
``lora_a``, ``B`` (out, r) = ``lora_b`` and ``scale = alpha / rank``. ``B`` starts at zero, so a
fresh adapter is exactly the base model; that is also what makes SPL's reference policy cheap:
``disable_adapters`` skips the low-rank branch and the same weights give ``pi_ref`` (no second
model copy in memory).

State-dict design: ``LoRALinear`` *is* an ``nn.Linear`` that holds the base ``weight`` itself
(the same Parameter object, not a copy) plus two new parameters. Keys therefore stay
``layers.0.self_attn.q_proj.weight`` and only ``...q_proj.lora_a`` / ``...q_proj.lora_b`` are added,
so plain checkpoints load unchanged (load the base first, then ``apply_lora``; or load with
``strict=False``). On disk adapters use PEFT's format, so ``PeftModel.from_pretrained`` reads ours
and ``load_adapter`` reads PEFT's: ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``.

The output projection ``lm_head`` is never wrapped: every log-prob path (``spl/logprobs.py``:
training, scoring, the reference pass) reads ``lm_head.weight`` directly to fuse it with the
log-softmax, so an adapter there would train nothing and score differently from sampling, which
calls the module. ``apply_lora`` and ``load_adapter`` refuse it with a clear error.

Dtypes: ``lora_a``/``lora_b`` are kept in fp32 whatever the base dtype (as PEFT's
``autocast_adapter_dtype``), so AdamW updates of small adapters are not lost to bf16 rounding; the
branch itself is computed in the input's dtype. Merging adds ``scale * B @ A`` in fp32 and rounds
once; in bf16 ``unmerge`` therefore restores weights only to within one rounding per element.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from spl.atomic import atomic_save_file, atomic_write_text

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
OUTPUT_HEAD = "lm_head"  # refused as a target (module docstring)
HEAD_REFUSED = ("LoRA on lm_head is not supported: the log-prob paths read lm_head.weight directly "
                "(spl/logprobs.py), so its adapter would be ignored in training and scoring")
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PeftModel -> LoraModel -> MistralForCausalLM
# PEFT options that change the forward pass; we implement only their defaults and refuse the rest.
UNSUPPORTED = {"use_rslora": False, "use_dora": False, "bias": "none", "fan_in_fan_out": False,
               "lora_bias": False, "use_qalora": False, "rank_pattern": {}, "alpha_pattern": {},
               "modules_to_save": None, "layer_replication": None, "trainable_token_indices": None,
               "target_parameters": None, "alora_invocation_tokens": None, "arrow_config": None}


class LoRALinear(nn.Linear):
    """A linear layer with a frozen base ``weight`` and a trainable low-rank update."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        if rank <= 0 or alpha <= 0 or not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRA needs rank > 0, alpha > 0 and 0 <= dropout < 1; "
                             f"got rank={rank}, alpha={alpha}, dropout={dropout}")
        # Allocate on meta (no memory, no init cost), then adopt the base's own parameters.
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        self.weight, self.bias = base.weight, base.bias
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        self.dropout_p = dropout
        # Dropout on the branch input only, as PEFT; Identity keeps eval/dropout-0 paths free.
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # fp32 adapters even on a bf16 base (see module docstring); fp64 stays fp64.
        dtype = torch.promote_types(base.weight.dtype, torch.float32)
        kw = dict(device=base.weight.device, dtype=dtype)
        self.lora_a = nn.Parameter(torch.empty(rank, self.in_features, **kw))  # (r, in)
        self.lora_b = nn.Parameter(torch.zeros(self.out_features, rank, **kw))  # (out, r)
        # Same init as PEFT (and nn.Linear): A random so B receives gradient, B zero so y = base.
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.merged = False  # True while scale * B @ A is folded into weight
        self.enabled = True  # False inside disable_adapters

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)  # (..., out)
        if self.merged or not self.enabled:
            return y
        a, b = self.lora_a.to(x.dtype), self.lora_b.to(x.dtype)
        # Two thin matmuls through the rank-r bottleneck; never form the (out, in) product here.
        # The scale goes on the small (out, r) B rather than on the (..., out) output: one pass less.
        return y + F.linear(F.linear(self.dropout(x), a), b * self.scale)  # (..., out)

    def delta_weight(self) -> torch.Tensor:
        """``scale * B @ A`` in fp32, (out, in)."""
        return self.scale * (self.lora_b.float() @ self.lora_a.float())

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            # Add in fp32 and round once: the sum, not the delta, is what must survive bf16.
            self.weight.copy_((self.weight.float() + self.delta_weight()).to(self.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.weight.copy_((self.weight.float() - self.delta_weight()).to(self.weight.dtype))
            self.merged = False

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha}, dropout={self.dropout_p}"


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def _matches(name: str, target: str) -> bool:
    # PEFT's rule for a list of targets: the full module name, or its dotted suffix.
    return name == target or name.endswith("." + target)


def apply_lora(model: nn.Module, rank: int = 16, alpha: float = 16, dropout: float = 0.05,
               targets: Sequence[str] = DEFAULT_TARGETS) -> list[str]:
    """Wrap every ``nn.Linear`` whose name ends in one of ``targets``; freeze all other parameters.

    Returns the wrapped module names. ``lm_head`` is refused (module docstring).
    """
    if lora_modules(model):
        raise ValueError("model already has LoRA adapters; apply_lora must be called once")
    if isinstance(targets, str):
        targets = (targets,)  # a bare string would otherwise be iterated character by character
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    replaced = [n for n in linears if any(_matches(n, t) for t in targets)]
    if OUTPUT_HEAD in replaced:
        raise ValueError(f"{HEAD_REFUSED}; remove it from the LoRA targets")
    unmatched = [t for t in targets if not any(_matches(n, t) for n in linears)]
    if unmatched:
        raise ValueError(f"LoRA targets {unmatched} match no nn.Linear module; "
                         f"linear modules are e.g. {sorted(linears)[:8]}")
    for name in replaced:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        # New modules start in train mode; inherit the base's so an eval() model stays dropout-free.
        setattr(parent, child, LoRALinear(linears[name], rank, alpha, dropout).train(linears[name].training))
    # Only adapters train; frozen base weights get no .grad and no optimizer state.
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith((".lora_a", ".lora_b")))
    return replaced


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[None]:
    """Run the base model (SPL's reference policy) by skipping every LoRA branch.

    Refuses merged adapters rather than unmerging for a moment: in bf16, merge/unmerge round-trips
    are lossy, and the reference pass runs every step, so the base weights would drift.
    """
    modules = list(lora_modules(model).values())
    if any(m.merged for m in modules):
        raise RuntimeError("disable_adapters needs unmerged adapters; call unmerge(model) first")
    previous = [m.enabled for m in modules]
    for m in modules:
        m.enabled = False
    try:
        yield
    finally:
        for m, state in zip(modules, previous, strict=True):
            m.enabled = state


def merge(model: nn.Module) -> None:
    """Fold every adapter into its base weight (inference and export; adapters then get no grad)."""
    for m in lora_modules(model).values():
        m.merge()


def unmerge(model: nn.Module) -> None:
    for m in lora_modules(model).values():
        m.unmerge()


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter tensors only, under our names (``layers.0.self_attn.q_proj.lora_a``)."""
    return {k: v for k, v in model.state_dict().items() if k.endswith((".lora_a", ".lora_b"))}


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Parameters with ``requires_grad`` (what the optimizer should see), by name."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def parameter_summary(model: nn.Module) -> str:
    """One line for the log: trainable / total parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in trainable_parameters(model).values())
    return f"trainable params {trainable:,} / {total:,} ({100 * trainable / max(total, 1):.3f}%)"


def _peft_name(module_name: str) -> str:
    # Our names are HF's minus "model." (except lm_head, which sits outside it in HF too).
    hf = module_name if module_name.startswith("lm_head") else "model." + module_name
    return PEFT_PREFIX + hf


def save_adapter(model: nn.Module, out_dir: str | os.PathLike,
                 base_model_name_or_path: str | None = None) -> None:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` in PEFT's format.

    Pass the bare model, not a DDP/compiled wrapper (their prefixes would leak into the keys).
    Merged adapters are saved as they are (A and B are kept when merging).
    """
    modules = lora_modules(model)
    if not modules:
        raise ValueError("model has no LoRA adapters to save")
    hparams = {(m.rank, m.alpha, m.dropout_p) for m in modules.values()}
    if len(hparams) > 1:
        raise ValueError(f"modules differ in (rank, alpha, dropout) {sorted(hparams)}; PEFT would need a "
                         "rank_pattern, which save_adapter does not write")
    rank, alpha, dropout = hparams.pop()
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "revision": None, "inference_mode": True, "r": rank, "lora_alpha": alpha, "lora_dropout": dropout,
        # The wrapped modules' last name components, sorted, as PEFT writes its target set.
        "target_modules": sorted({n.rpartition(".")[2] for n in modules}),
        "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
        "init_lora_weights": True, "modules_to_save": None, "layers_to_transform": None,
        "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
    }
    tensors = {}
    for name, m in modules.items():
        # PEFT stores nn.Linear weights: lora_A.weight (r, in), lora_B.weight (out, r), no adapter name.
        tensors[_peft_name(name) + ".lora_A.weight"] = m.lora_a.detach().contiguous().cpu()
        tensors[_peft_name(name) + ".lora_B.weight"] = m.lora_b.detach().contiguous().cpu()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Each file goes to a temp name and is renamed: readers never see a half-written adapter file.
    atomic_save_file(tensors, out / WEIGHTS_FILE)
    atomic_write_text(out / CONFIG_FILE, json.dumps(config, indent=2) + "\n")


def load_adapter(model: nn.Module, adapter_dir: str | os.PathLike) -> list[str]:
    """Load a PEFT LoRA adapter into ``model``, applying LoRA first if it has none; returns module names.

    The modules to wrap are read from the tensor keys (exact, whatever the config's target pattern);
    r, lora_alpha and lora_dropout come from the config. Options we do not implement are refused.
    """
    adapter_dir = Path(adapter_dir)
    config_path, weights_path = adapter_dir / CONFIG_FILE, adapter_dir / WEIGHTS_FILE
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"adapter file {path} not found")
    config = json.loads(config_path.read_text())
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{config_path}: peft_type {config.get('peft_type')!r} is not 'LORA'")
    for key, default in UNSUPPORTED.items():
        if config.get(key, default) not in (default, None, {}, []):
            raise ValueError(f"{config_path}: unsupported LoRA option {key}={config[key]!r} "
                             f"(only {key}={default!r} is implemented)")
    if "r" not in config or "lora_alpha" not in config:
        raise ValueError(f"{config_path}: needs 'r' and 'lora_alpha'")
    rank, alpha, dropout = config["r"], config["lora_alpha"], config.get("lora_dropout") or 0.0

    # Group tensors by module: "base_model.model.model.layers.0.mlp.up_proj.lora_B.weight" ->
    # ("layers.0.mlp.up_proj", "lora_b").
    found: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(weights_path).items():
        hf_name, _, kind = key.removeprefix(PEFT_PREFIX).rpartition(".lora_")
        if key.removeprefix(PEFT_PREFIX).startswith(OUTPUT_HEAD + "."):  # PEFT also saves its base_layer
            raise ValueError(f"{weights_path}: has an adapter on {OUTPUT_HEAD}. {HEAD_REFUSED}")
        if not key.startswith(PEFT_PREFIX) or kind not in ("A.weight", "B.weight"):
            raise ValueError(f"{weights_path}: unexpected tensor {key!r} (want "
                             f"'{PEFT_PREFIX}<module>.lora_A.weight' / '.lora_B.weight')")
        found.setdefault(hf_name.removeprefix("model."), {})["lora_" + kind[0].lower()] = tensor
    for name, pair in found.items():
        if len(pair) != 2:
            missing = ("lora_A" if "lora_a" not in pair else "lora_B") + ".weight"
            raise ValueError(f"{weights_path}: missing tensor {_peft_name(name)}.{missing}")

    modules = lora_modules(model)
    if not modules:
        linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        unknown = sorted(set(found) - linears)
        if unknown:
            raise ValueError(f"{weights_path}: tensors for modules the model lacks: "
                             f"{[_peft_name(n) for n in unknown]}")
        apply_lora(model, rank, alpha, dropout, targets=sorted(found))
        modules = lora_modules(model)
    if set(modules) != set(found):
        missing, unexpected = sorted(set(modules) - set(found)), sorted(set(found) - set(modules))
        raise ValueError(f"{weights_path}: model adapters and file disagree; modules missing from the "
                         f"file {missing}, unexpected in the file {unexpected}")
    # Validate everything before copying anything, so a bad file leaves the model untouched.
    for name, m in modules.items():
        if (m.rank, m.alpha) != (rank, alpha):
            raise ValueError(f"{config_path}: r={rank}, lora_alpha={alpha} but module {name} has "
                             f"rank={m.rank}, alpha={m.alpha}")
        if m.merged:
            raise RuntimeError(f"cannot load into merged module {name}; call unmerge(model) first")
        for attr, tensor in found[name].items():
            if tensor.shape != getattr(m, attr).shape:
                peft_key = f"{_peft_name(name)}.lora_{attr[-1].upper()}.weight"
                raise ValueError(f"{weights_path}: tensor {peft_key} has shape {tuple(tensor.shape)}, "
                                 f"model expects {tuple(getattr(m, attr).shape)}")
    with torch.no_grad():
        for name, m in modules.items():
            m.lora_a.copy_(found[name]["lora_a"])  # copy_ casts to the adapter's fp32
            m.lora_b.copy_(found[name]["lora_b"])
    return sorted(modules)
