"""The training loop for SFT, SPL (DPO when alpha == beta) and Bradley-Terry reward models.

One step of SPL (paper eq. 5) on a batch of B preference pairs:
    1. chosen and rejected sequences go through the policy in one (2B, T) forward;
    2. ``spl/logprobs.py`` turns hidden states into per-sequence log-probs without ever holding
       (2B, T, V) logits; 3. the reference log-probs come from the same weights with the LoRA
       adapters disabled (no second model copy), or from a precomputed cache; 4. ``spl/losses.py``.
Parallelism: DDP when LoRA trains (gloo on CPU, NCCL on CUDA), FSDP2 (``fully_shard``) for full
fine-tuning. The loss is computed inside the wrapped module's forward (``Scorer``), so FSDP2 has
the output projection unsharded exactly when the fused log-prob kernel reads it.

Checkpoints (``out_dir/checkpoints/step_XXXXXXX``, with ``latest`` naming the newest complete one)
hold the trainable weights (a PEFT-format adapter, or merged HF-layout weights), the optimizer,
scheduler, RNG and data position, all as safetensors or JSON (never pickle). Each is written to a
temporary directory and renamed into place, so a killed run always leaves its last good one.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from spl.checkpoint import atomic_save_file, atomic_write_text, load_model, save_model
from spl.config import Config
from spl.data import BatchIterator
from spl.logprobs import sequence_logps
from spl.lora import disable_adapters, lora_state_dict, save_adapter
from spl.losses import bradley_terry_loss, preference_loss, sft_nll
from spl.model import Transformer
from spl.reporting import Reporter


class TrainingError(RuntimeError):
    """The run cannot go on (a non-finite loss, an incompatible checkpoint); the message says why."""


# ----------------------------------------------------------------------------- distributed set-up

@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> DistEnv:
    """Read torchrun's environment once; start the process group when there is more than one rank."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistEnv(rank, world, local, device)


def print0(env: DistEnv, *args) -> None:
    if env.is_main:
        tqdm.write(" ".join(str(a) for a in args))


# ----------------------------------------------------------------------------- the scored model

class Scorer(nn.Module):
    """Wraps the transformer so one forward returns what the loss needs, (2B,) per sequence.

    Policy mode: summed response-token log-probs (``spl/logprobs.py``). Reward mode: a scalar head on
    the hidden state of each sequence's last real token (Bradley-Terry, paper eq. 2).
    """

    def __init__(self, model: nn.Module, logprob_impl: str = "auto", reward_head: bool = False):
        super().__init__()
        self.model = model
        self.logprob_impl = logprob_impl
        self.score = nn.Linear(model.cfg.dim, 1, bias=False) if reward_head else None
        if self.score is not None:
            nn.init.normal_(self.score.weight, std=model.cfg.dim ** -0.5)

    def forward(self, input_ids, targets, loss_mask, last_index) -> torch.Tensor:
        h = self.model(input_ids, return_hidden=True)  # (2B, T, D)
        if self.score is not None:
            last = h[torch.arange(h.shape[0], device=h.device), last_index]  # (2B, D)
            return self.score(last).squeeze(-1).float()  # (2B,) rewards
        return sequence_logps(h, self.model.lm_head.weight, targets, loss_mask, impl=self.logprob_impl)


# ----------------------------------------------------------------------------- schedule

def lr_lambda(cfg: Config):
    """Linear warmup to lr, then cosine or linear decay to ``min_lr_ratio * lr`` at max_steps."""
    t = cfg.train

    def f(step: int) -> float:
        if step < t.warmup_steps:
            return (step + 1) / (t.warmup_steps + 1)
        if t.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps))
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if t.schedule == "cosine" else 1 - progress
        return t.min_lr_ratio + (1 - t.min_lr_ratio) * shape
    return f


# ----------------------------------------------------------------------------- the trainer

class Trainer:
    """Owns the wrapped model, optimizer, schedule, data position and checkpoints of one run."""

    def __init__(self, cfg: Config, env: DistEnv, model: nn.Module, train_data, eval_data=None, *,
                 tokenizer_path: str | None = None, base_path: str | None = None):
        self.cfg, self.env, self.t = cfg, env, cfg.train
        self.train_data, self.eval_data = train_data, eval_data
        self.tokenizer_path, self.base_path = tokenizer_path, base_path
        self.out_dir = Path(self.t.out_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"
        t = self.t
        per_step = t.micro_batch_size * env.world_size
        if t.batch_size % per_step:
            raise TrainingError(f"train.batch_size ({t.batch_size}) must be a multiple of "
                                f"train.micro_batch_size ({t.micro_batch_size}) x ranks ({env.world_size})")
        self.accum = t.batch_size // per_step
        self.lora = cfg.lora.enabled
        model.activation_checkpointing = t.activation_checkpointing
        self.scorer = Scorer(model, t.logprob_impl, reward_head=t.mode == "reward").to(env.device)
        self.base_fingerprint = _model_fingerprint(model)  # before FSDP shards the weights
        self.wrapped = self._wrap(self.scorer)
        params = [p for p in self.scorer.parameters() if p.requires_grad]
        if not params:
            raise TrainingError("no trainable parameters: enable LoRA or unfreeze the model")
        # fused: one kernel over all parameters (CPU and CUDA), several times faster than foreach
        # for full fine-tuning; the update itself is the same AdamW.
        self.optimizer = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay, betas=(0.9, 0.999),
                                           fused=env.device.type in ("cpu", "cuda"))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg))
        self.batches = BatchIterator(train_data, t.micro_batch_size, seed=t.seed, rank=env.rank,
                                     world_size=env.world_size)
        self.step = 0
        dev = env.device.type
        bf16 = t.precision == "bf16" or (t.precision == "auto" and dev == "cuda")
        self.autocast = (lambda: torch.autocast(dev, dtype=torch.bfloat16)) if bf16 else nullcontext
        self.ref_cache: torch.Tensor | None = None  # (N, 2) reference log-probs per training pair
        # train.report_to's dashboards, on rank 0 only; metrics.jsonl (_log) stays the record.
        self.reporter = Reporter(t.report_to if env.is_main else [], self.out_dir, cfg.to_dict())

    def _wrap(self, scorer: Scorer) -> nn.Module:
        if self.env.world_size == 1:
            return scorer
        if self.lora:
            # Only adapters train: replicate the frozen base, all-reduce the few adapter gradients.
            from torch.nn.parallel import DistributedDataParallel as DDP
            ids = [self.env.device.index] if self.env.device.type == "cuda" else None
            return DDP(scorer, device_ids=ids)
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
            if self.env.device.type == "cuda" else MixedPrecisionPolicy()
        for block in scorer.model.layers:  # one all-gather per block keeps peak memory at one layer
            fully_shard(block, mp_policy=mp)
        return fully_shard(scorer, mp_policy=mp)

    # ------------------------------------------------------------------ losses

    def _batch_to(self, batch: dict) -> dict:
        return {k: v.to(self.env.device, non_blocking=True) if torch.is_tensor(v) else v
                for k, v in batch.items()}

    def reference_logps(self, batch: dict) -> torch.Tensor:
        """(2B,) log pi_ref of each sequence: cached, else the same weights with adapters off."""
        if self.ref_cache is not None:
            idx = batch["index"].to(self.ref_cache.device)  # (B,) pair indices
            return torch.cat([self.ref_cache[idx, 0], self.ref_cache[idx, 1]]).to(self.env.device)
        if not self.lora:
            raise TrainingError("full fine-tuning needs precomputed reference log-probs")
        with torch.no_grad(), disable_adapters(self.scorer.model), self.autocast():
            return self.scorer(batch["input_ids"], batch["targets"], batch["loss_mask"], batch["last_index"])

    def compute_loss(self, batch: dict, model: nn.Module | None = None) -> tuple[torch.Tensor, dict]:
        """Mean loss over the micro-batch and detached metrics (sums, so they average exactly)."""
        model = model or self.wrapped
        mode, (alpha, beta) = self.t.mode, (self.t.alpha, self.t.beta)
        with self.autocast():
            out = model(batch["input_ids"], batch["targets"], batch["loss_mask"], batch["last_index"])
        if mode == "sft":
            nll = sft_nll(out, batch["loss_mask"])  # token mean within the micro-batch
            return nll, {"nll": nll.detach()}
        B = out.shape[0] // 2
        if mode == "reward":
            losses, metrics = bradley_terry_loss(out[:B], out[B:])
            return losses.mean(), {k: v.detach().float() for k, v in metrics.items()}
        ref = self.reference_logps(batch)
        # SPL under reverse KL (DPO at alpha == beta); f-DPO under any other train.divergence.
        losses, metrics = preference_loss(out[:B], out[B:], ref[:B], ref[B:], alpha=alpha, beta=beta,
                                          divergence=self.t.divergence,
                                          divergence_alpha=self.t.divergence_alpha)
        return losses.mean(), {k: v.detach().float().mean() for k, v in metrics.items()}

    # ------------------------------------------------------------------ reference cache

    def precompute_reference(self, path: str | None) -> None:
        """Fill ``ref_cache`` (N, 2) for the training pairs, from ``path`` if it matches, else compute.

        The file records the pairs' token hash and the base model's identity, so an alpha/beta sweep
        over one data set and base model reuses it and a mismatched file is refused, not misused.
        """
        key = self.train_data.fingerprint() + ":" + self.base_fingerprint
        if path and Path(path).is_file():
            tensors = load_file(path)
            from safetensors import safe_open
            with safe_open(path, "pt") as f:
                meta = f.metadata() or {}
            if meta.get("key") != key:
                raise TrainingError(f"{path}: reference cache was computed for other data or another base "
                                    f"model (key {meta.get('key')!r}, expected {key!r}); delete it or "
                                    "point train.ref_cache elsewhere")
            self.ref_cache = tensors["ref_logps"]
            print0(self.env, f"reference log-probs: loaded {len(self.ref_cache)} pairs from {path}")
            return
        n = len(self.train_data)
        cache = torch.zeros(n, 2, dtype=torch.float64)  # float64 so the cross-rank sum is exact
        order = list(range(self.env.rank, n, self.env.world_size))
        # Every rank runs the same number of forwards (FSDP's all-gathers are collective): a short
        # rank repeats its last pair, which writes the same value twice.
        per_rank = math.ceil(n / self.env.world_size)
        order += order[-1:] * (per_rank - len(order))
        mb = self.t.micro_batch_size
        ctx = disable_adapters(self.scorer.model) if self.lora else nullcontext()
        with torch.no_grad(), ctx, self.autocast():
            for s in tqdm(range(0, len(order), mb), desc="reference log-probs", disable=not self.env.is_main):
                idx = order[s:s + mb]
                batch = self._batch_to(self.train_data.collate(idx))
                out = self.scorer(batch["input_ids"], batch["targets"], batch["loss_mask"],
                                  batch["last_index"]).double().cpu()  # (2b,)
                cache[idx, 0], cache[idx, 1] = out[:len(idx)], out[len(idx):]
        if self.env.world_size > 1:
            dist.all_reduce(cache)
        self.ref_cache = cache.float()
        if path and self.env.is_main:
            atomic_save_file({"ref_logps": self.ref_cache}, path, metadata={"key": key})
            print0(self.env, f"reference log-probs: wrote {n} pairs to {path}")

    # ------------------------------------------------------------------ the loop

    def train(self) -> dict:
        t, env = self.t, self.env
        if env.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        self.reporter.start()
        if t.mode == "spl" and (t.ref_cache or not self.lora):
            # Before any resume: the reference is the base model, not the checkpoint's weights. Full
            # fine-tuning keeps its cache in out_dir so a resumed run does not recompute it.
            self.precompute_reference(t.ref_cache or str(self.out_dir / "reference_logps.safetensors"))
        if t.resume:
            self.load_checkpoint()
        metrics_file = self.out_dir / "metrics.jsonl"
        bar = tqdm(total=t.max_steps, initial=self.step, disable=not env.is_main, desc=t.mode, unit="step")
        data = iter(self.batches)
        last: dict = {}
        tic, seen = time.perf_counter(), 0
        while self.step < t.max_steps:
            self.wrapped.train()
            sums: dict[str, torch.Tensor] = {}
            loss_sum = torch.zeros((), device=env.device)
            for micro in range(self.accum):
                batch = self._batch_to(next(data))
                sync = micro == self.accum - 1
                no_sync = getattr(self.wrapped, "no_sync", None)
                with (nullcontext() if sync or no_sync is None or not self.lora else no_sync()):
                    loss, metrics = self.compute_loss(batch)
                    (loss / self.accum).backward()
                loss_sum += loss.detach() / self.accum
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0) + v / self.accum
                seen = seen + batch["loss_mask"].sum()  # stays on device: read only when logging
            stats = torch.stack([loss_sum, *sums.values()])
            if env.world_size > 1:
                dist.all_reduce(stats)
                stats /= env.world_size
            if not torch.isfinite(stats[0]):
                latest = self.latest_checkpoint()
                raise TrainingError(f"non-finite loss ({stats[0].item()}) at step {self.step + 1}; "
                                    f"stopping without updating weights. Last good checkpoint: "
                                    f"{latest or 'none written yet'}")
            grad_norm = self._clip()
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            bar.update(1)
            last = {"step": self.step, "loss": stats[0].item(),
                    **{k: v.item() for k, v in zip(sums, stats[1:], strict=True)},
                    "lr": self.scheduler.get_last_lr()[0], "grad_norm": grad_norm}
            if self.step % t.log_every == 0 or self.step == t.max_steps:
                last["tokens_per_s"] = float(seen) * env.world_size / (time.perf_counter() - tic)
                tic, seen = time.perf_counter(), 0
                shown = ("loss", "rewards/accuracies", "rewards/margins")
                bar.set_postfix({k: f"{v:.4g}" for k, v in last.items() if k in shown})
                self._log(metrics_file, last)
            if self.eval_data is not None and (self.step % t.eval_every == 0 or self.step == t.max_steps):
                ev = self.evaluate()
                self._log(metrics_file, {"step": self.step, **{f"eval_{k}": v for k, v in ev.items()}})
                last.update({f"eval_{k}": v for k, v in ev.items()})
            if self.step % t.save_every == 0 or self.step == t.max_steps:
                self.save_checkpoint()
        bar.close()
        self.reporter.close()
        return last

    def _clip(self) -> float:
        params = [p for p in self.scorer.parameters() if p.grad is not None]
        if not params:
            return 0.0
        if self.t.grad_clip > 0:
            return float(torch.nn.utils.clip_grad_norm_(params, self.t.grad_clip))
        return float(torch.nn.utils.get_total_norm([p.grad for p in params]))

    def _log(self, path: Path, record: dict) -> None:
        if self.env.is_main:
            with open(path, "a") as f:
                f.write(json.dumps(record) + "\n")
            self.reporter.log(record)

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Mean loss and metrics over the eval set (pairs split across ranks)."""
        self.wrapped.eval()
        it = BatchIterator(self.eval_data, self.t.micro_batch_size, seed=0, rank=self.env.rank,
                           world_size=self.env.world_size, shuffle=False, drop_last=False)
        sums: dict[str, float] = {}
        count = 0
        for batch in it.epoch(0):
            loss, metrics = self.compute_loss(self._batch_to(batch), model=self.scorer)
            n = batch["input_ids"].shape[0] // (1 if self.t.mode == "sft" else 2)
            for k, v in {"loss": loss, **metrics}.items():
                sums[k] = sums.get(k, 0.0) + float(v) * n
            count += n
        keys = sorted(sums)
        totals = torch.tensor([sums[k] for k in keys] + [count], dtype=torch.float64)
        if self.env.world_size > 1:
            dist.all_reduce(totals)
        return {k: (totals[i] / totals[-1]).item() for i, k in enumerate(keys)}

    # ------------------------------------------------------------------ checkpoints

    def latest_checkpoint(self) -> Path | None:
        pointer = self.ckpt_dir / "latest"
        if not pointer.is_file():
            return None
        path = self.ckpt_dir / pointer.read_text().strip()
        return path if path.is_dir() else None

    def _optimizer_state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Optimizer state as flat tensors keyed by parameter name, plus JSON-able hyperparameters."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
        sd = get_optimizer_state_dict(self.wrapped, self.optimizer,
                                      options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        # With cpu_offload only rank 0 receives the gathered state; the others get {} and write nothing.
        tensors = {f"{name}::{k}": v.detach().cpu().contiguous()
                   for name, state in sd.get("state", {}).items() for k, v in state.items()}
        return tensors, {"param_groups": sd.get("param_groups", [])}

    def _model_state(self) -> dict[str, torch.Tensor]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        if self.lora:
            sd = lora_state_dict(self.scorer.model)
            if self.scorer.score is not None:
                sd["score.weight"] = self.scorer.score.weight
            return {k: v.detach().cpu().contiguous() for k, v in sd.items()}
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        sd = get_model_state_dict(self.wrapped, options=opts)
        return {k: v.detach().cpu().contiguous() for k, v in sd.items()}

    def save_checkpoint(self) -> Path:
        """Write ``step_XXXXXXX`` atomically, point ``latest`` at it, drop all but the newest few."""
        env = self.env
        model_sd = self._model_state()  # collective under FSDP: every rank takes part
        opt_tensors, opt_meta = self._optimizer_state()
        rng = {"cpu": torch.get_rng_state()}
        if env.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(env.device)
        name = f"step_{self.step:07d}"
        final = self.ckpt_dir / name
        tmp = self.ckpt_dir / f".tmp_{name}"
        if env.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        if env.world_size > 1:
            dist.barrier()
        save_file(rng, str(tmp / f"rng_rank{env.rank}.safetensors"))
        if env.is_main:
            self._save_weights(tmp, model_sd)
            save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
            state = {"step": self.step, "data": self.batches.state_dict(),
                     "scheduler": self.scheduler.state_dict(), "optimizer": opt_meta,
                     "world_size": env.world_size, "mode": self.t.mode, "lora": self.lora}
            (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1, default=str))
            (tmp / "config.yaml").write_text(self.cfg.to_yaml())
            if self.tokenizer_path:
                shutil.copyfile(self.tokenizer_path, tmp / "tokenizer.model")
        if env.world_size > 1:
            dist.barrier()
        if env.is_main:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            atomic_write_text(self.ckpt_dir / "latest", name + "\n")
            (self.out_dir / "config.yaml").write_text(self.cfg.to_yaml())
            old = sorted(p for p in self.ckpt_dir.glob("step_*") if p.is_dir())[:-self.t.keep_checkpoints]
            for p in old:
                shutil.rmtree(p, ignore_errors=True)
        if env.world_size > 1:
            dist.barrier()
        return final

    def _save_weights(self, out: Path, model_sd: dict[str, torch.Tensor]) -> None:
        if self.lora:
            save_adapter(self.scorer.model, out / "adapter", base_model_name_or_path=self.base_path)
            if self.scorer.score is not None:
                save_file({"weight": model_sd["score.weight"]}, str(out / "reward_head.safetensors"))
            return
        weights = {k.removeprefix("model."): v for k, v in model_sd.items() if k.startswith("model.")}
        with torch.device("meta"):  # a shell to carry the gathered full weights into save_model
            shell = Transformer(self.scorer.model.cfg)
        shell.load_state_dict(weights, assign=True)
        save_model(shell, shell.cfg, out / "model")
        if self.scorer.score is not None:
            save_file({"weight": model_sd["score.weight"]}, str(out / "reward_head.safetensors"))

    def load_checkpoint(self, path: Path | None = None) -> None:
        """Restore weights, optimizer, schedule, RNG and data position from ``path`` or ``latest``."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )
        path = path or self.latest_checkpoint()
        if path is None:
            print0(self.env, f"resume: no checkpoint in {self.ckpt_dir}; starting from step 0")
            return
        state = json.loads((path / "trainer_state.json").read_text())
        if state["mode"] != self.t.mode or state["lora"] != self.lora:
            raise TrainingError(f"{path}: checkpoint is for mode={state['mode']} lora={state['lora']}, "
                                f"this run is mode={self.t.mode} lora={self.lora}")
        if state["world_size"] != self.env.world_size:
            print0(self.env, f"resume: checkpoint used {state['world_size']} ranks, now "
                   f"{self.env.world_size}; the data order stays the same but RNG streams differ")
        opts = StateDictOptions(full_state_dict=True, strict=False)
        if self.lora:
            from spl.lora import load_adapter
            load_adapter(self.scorer.model, path / "adapter")
            if self.scorer.score is not None:
                self.scorer.score.weight.data.copy_(load_file(path / "reward_head.safetensors")["weight"])
        else:
            saved, _ = load_model(path / "model")
            sd = {"model." + k: v for k, v in saved.state_dict().items()}
            if self.scorer.score is not None:
                sd["score.weight"] = load_file(path / "reward_head.safetensors")["weight"]
            set_model_state_dict(self.wrapped, sd, options=opts)
        flat = load_file(path / "optimizer.safetensors")
        osd: dict = {"state": {}, "param_groups": state["optimizer"]["param_groups"]}
        for key, v in flat.items():
            name, k = key.split("::")
            osd["state"].setdefault(name, {})[k] = v
        set_optimizer_state_dict(self.wrapped, self.optimizer, osd, options=opts)
        self.scheduler.load_state_dict(state["scheduler"])
        self.batches.load_state_dict(state["data"])
        rng_file = path / f"rng_rank{self.env.rank}.safetensors"
        if rng_file.is_file():
            rng = load_file(rng_file)
            torch.set_rng_state(rng["cpu"])
            if "cuda" in rng and self.env.device.type == "cuda":
                torch.cuda.set_rng_state(rng["cuda"], self.env.device)
        self.step = state["step"]
        print0(self.env, f"resume: continuing from {path} at step {self.step}")


def _model_fingerprint(model: nn.Module) -> str:
    """A cheap identity of the base weights: shape plus a checksum of the output projection."""
    w = model.lm_head.weight.detach()
    return f"{tuple(w.shape)}:{float(w.double().sum()):.10e}:{float(w.double().abs().sum()):.10e}"


def run(cfg: Config, env: DistEnv) -> dict:
    """Build tokenizer, model, adapters and data from ``cfg`` and train: train.py on real data."""
    from spl.chat_templates import set_chat_template
    from spl.checkpoint import check_tokenizer_vocab
    from spl.data import load_preference_data, load_sft_data
    from spl.lora import apply_lora, parameter_summary
    from spl.tokenizer import Tokenizer

    m, t = cfg.model, cfg.train
    if m.checkpoint is None:
        raise TrainingError("model.checkpoint is required when data.train_path is set "
                            "(an HF- or original-layout model directory)")
    tok_path = Path(m.tokenizer or Path(m.checkpoint) / "tokenizer.model")
    if not tok_path.is_file():
        raise TrainingError(f"tokenizer not found: {tok_path} (set model.tokenizer)")
    tok = Tokenizer(tok_path)
    # Before the model loads: a template the checkpoint contradicts fails in a second, not a minute.
    print0(env, set_chat_template(tok, cfg.data.chat_template, checkpoint=m.checkpoint))
    cfg.data.chat_template = tok.chat_template.name  # the resolved name is saved with every checkpoint
    # Frozen LoRA bases may live in bf16 on CUDA; trained full weights stay fp32 (autocast computes in bf16).
    cuda = env.device.type == "cuda"
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}.get(
        m.dtype, torch.bfloat16 if cuda and cfg.lora.enabled else torch.float32)
    model, model_cfg = load_model(m.checkpoint, dtype=dtype, device=env.device)
    check_tokenizer_vocab(tok_path, model_cfg.vocab_size, tok.vocab_size)
    if cfg.lora.enabled:
        torch.manual_seed(t.seed)  # identical adapter init on every rank
        apply_lora(model, rank=cfg.lora.rank, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout,
                   targets=tuple(cfg.lora.targets))
    else:
        model.requires_grad_(True)
    print0(env, parameter_summary(model))
    kw = dict(max_len=cfg.data.max_len, max_prompt_len=cfg.data.max_prompt_len, format=cfg.data.format)
    load = load_sft_data if t.mode == "sft" else load_preference_data
    train_data = load(cfg.data.train_path, tok, **kw)
    eval_data = load(cfg.data.eval_path, tok, **kw) if cfg.data.eval_path else None
    for name, d in (("train", train_data), ("eval", eval_data)):
        if d is not None:
            print0(env, f"{name} data: {d.stats}")
    if len(train_data) == 0:
        raise TrainingError(f"{cfg.data.train_path}: no usable records (stats: {train_data.stats})")
    trainer = Trainer(cfg, env, model, train_data, eval_data, tokenizer_path=str(tok_path),
                      base_path=str(Path(m.checkpoint).resolve()))
    return trainer.train()


# ----------------------------------------------------------------------------- reading runs back

@dataclass
class Loaded:
    """A model ready for sampling or evaluation, and where each part came from."""

    model: nn.Module
    tokenizer: object  # spl.tokenizer.Tokenizer
    source: Path  # the directory the weights were read from
    base: Path | None = None  # the base model under an adapter
    reward_head: torch.Tensor | None = None  # (1, D) scalar head of a reward model
    has_adapter: bool = False


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A run directory (``out_dir``) means its latest checkpoint; anything else is taken as given."""
    path = Path(path)
    if not path.exists():
        raise TrainingError(f"checkpoint not found: {path} (train first: torchrun train.py)")
    pointer = path / "checkpoints" / "latest"
    if pointer.is_file():
        step = path / "checkpoints" / pointer.read_text().strip()
        if not step.is_dir():
            raise TrainingError(f"{pointer} names {step.name}, which does not exist")
        return step
    return path


def load_for_inference(path: str | os.PathLike, *, adapter: str | os.PathLike | None = None,
                       tokenizer: str | os.PathLike | None = None, device: torch.device | str = "cpu",
                       dtype: torch.dtype = torch.float32) -> Loaded:
    """Load one of: a run directory or one of its ``step_*`` checkpoints (adapter over its base, or
    merged weights), an HF-layout or original-layout model directory; then an optional extra
    PEFT-format ``adapter``. The tokenizer is the checkpoint's own ``tokenizer.model`` unless given,
    and its vocabulary must match the model's."""
    from spl.checkpoint import check_tokenizer_vocab
    from spl.lora import load_adapter
    from spl.tokenizer import Tokenizer

    src = resolve_checkpoint(path)
    base, has_adapter, head = None, False, None
    if (src / "trainer_state.json").is_file() and (src / "adapter").is_dir():
        config = json.loads((src / "adapter" / "adapter_config.json").read_text())
        base = Path(config.get("base_model_name_or_path") or "")
        if not (base / "config.json").is_file() and not (base / "params.json").is_file():
            # A run moved to another machine: look for the base beside the run (the demo's reference).
            beside = src.parent.parent / "reference"
            if not (beside / "config.json").is_file():
                raise TrainingError(f"{src / 'adapter' / 'adapter_config.json'}: base model {str(base)!r} "
                                    "not found; copy it back or pass the base as --checkpoint and the "
                                    "adapter as --adapter")
            base = beside
        model, _ = load_model(base, dtype=dtype, device=device)
        load_adapter(model, src / "adapter")
        has_adapter = True
    elif (src / "trainer_state.json").is_file() and (src / "model").is_dir():
        model, _ = load_model(src / "model", dtype=dtype, device=device)
    else:
        model, _ = load_model(src, dtype=dtype, device=device)
    if (src / "reward_head.safetensors").is_file():
        head = load_file(src / "reward_head.safetensors")["weight"].to(device)
    if adapter is not None:
        load_adapter(model, adapter)
        has_adapter = True
    tok_path = Path(tokenizer) if tokenizer else src / "tokenizer.model"
    if not tok_path.is_file() and base is not None:
        tok_path = base / "tokenizer.model"
    if not tok_path.is_file():
        raise TrainingError(f"tokenizer not found: {tok_path} (pass --tokenizer)")
    tok = Tokenizer(tok_path)
    check_tokenizer_vocab(tok_path, model.cfg.vocab_size, tok.vocab_size)
    return Loaded(model.eval(), tok, src, base, head, has_adapter)
