"""The training loop for SFT, SPL (DPO when alpha == beta) and Bradley-Terry reward models.

One step of SPL (paper eq. 5) on a global batch of ``train.batch_size`` preference pairs, split
evenly over the ranks and, on each rank, into micro-batches:
    1. chosen and rejected sequences go through the policy in one (2B, T) forward;
    2. ``spl/logprobs.py`` turns hidden states into per-sequence log-probs without ever holding
       (2B, T, V) logits; 3. the reference log-probs come from the same weights with the LoRA
       adapters disabled (no second model copy), or ride along with the data (``spl/reference.py``);
    4. ``spl/losses.py``, summed over the micro-batch and divided by the size of the whole global
       batch (pairs, or for SFT response tokens), so accumulation and the number of ranks leave
       the objective unchanged;
    5. one optimizer step, unless the loss or the gradient norm is not finite: then the run stops
       with nothing applied, naming the last good checkpoint.
Parallelism: DDP when LoRA trains (gloo on CPU, NCCL on CUDA), FSDP2 (``fully_shard``) for full
fine-tuning. The loss is computed inside the wrapped module's forward (``Scorer``), so FSDP2 has
the output projection unsharded exactly when the fused log-prob kernel reads it.

``build`` turns a config into a ready ``Trainer`` (cheap checks first, weights last); ``Trainer.train``
runs the steps. Checkpoints and the run directory are ``spl/train_checkpoint.py``'s.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from spl.config import Config, TrainConfig
from spl.data import BatchIterator
from spl.distributed import DistEnv, TrainingError, print0
from spl.logprobs import sequence_logps
from spl.lora import disable_adapters
from spl.losses import bradley_terry_loss, preference_loss
from spl.reference import attach_reference, base_fingerprint, cache_fields, compute_reference
from spl.reporting import Reporter
from spl.train_checkpoint import (
    checkpoint_dir,
    latest_checkpoint,
    load_checkpoint,
    prepare_run_dir,
    save_checkpoint,
    truncate_metrics,
)

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


# ----------------------------------------------------------------------------- batch layout and schedule

def batch_layout(t: TrainConfig, world_size: int) -> tuple[int, int, int]:
    """(per-rank share, micro-batch, accumulation steps) of one optimizer step.

    Needs no weights, so a layout that cannot work stops before any are loaded, naming the setting.
    """
    if t.batch_size % world_size:
        raise TrainingError(f"train.batch_size={t.batch_size} cannot be split evenly over {world_size} "
                            f"ranks: set train.batch_size to a multiple of {world_size}, or use a number of "
                            f"ranks that divides {t.batch_size}")
    share = t.batch_size // world_size
    micro = share if t.micro_batch_size == "auto" else t.micro_batch_size
    if share % micro:
        raise TrainingError(f"train.micro_batch_size={micro} does not divide the per-rank share of {share} "
                            f"pairs (train.batch_size={t.batch_size} over {world_size} ranks): set "
                            f"train.micro_batch_size=auto or to a divisor of {share}")
    return share, micro, share // micro


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
        t = self.t
        self.share, self.micro, self.accum = batch_layout(t, env.world_size)
        self.lora = cfg.lora.enabled
        model.activation_checkpointing = t.activation_checkpointing
        torch.manual_seed(t.seed)  # the reward head starts the same on every rank (FSDP does not broadcast)
        self.scorer = Scorer(model, t.logprob_impl, reward_head=t.mode == "reward").to(env.device)
        # Keys precomputed reference log-probs (spl/reference.py); taken before FSDP shards the weights.
        cached = t.mode == "spl" and (t.ref_cache is not None or not self.lora)
        self.base_fingerprint = base_fingerprint(model) if cached else ""
        self.wrapped = self._wrap(self.scorer)
        # Each rank its own stream, so LoRA dropout masks differ across ranks (shared seeds would
        # correlate them); the weights above were initialized identically before this.
        torch.manual_seed(t.seed * 65536 + env.rank)
        params = [p for p in self.scorer.parameters() if p.requires_grad]
        if not params:
            raise TrainingError("no trainable parameters: enable LoRA or unfreeze the model")
        # fused: one kernel over all parameters (CPU and CUDA), several times faster than foreach
        # for full fine-tuning; the update itself is the same AdamW.
        self.optimizer = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay,
                                           betas=tuple(t.adam_betas),
                                           fused=env.device.type in ("cpu", "cuda"))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg))
        try:
            # The data order is defined by global batches, so it does not depend on the rank count.
            self.batches = BatchIterator(train_data, self.share, seed=t.seed, rank=env.rank,
                                         world_size=env.world_size)
        except ValueError as err:
            raise TrainingError(f"training data: {err}") from None
        self.step = 0
        dev = env.device.type
        self.bf16 = t.precision == "bf16" or (t.precision == "auto" and dev == "cuda")
        self.autocast = (lambda: torch.autocast(dev, dtype=torch.bfloat16)) if self.bf16 else nullcontext
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

    def forward(self, batch: dict, model: nn.Module | None = None) -> torch.Tensor:
        """(N,) per-sequence log-probs (policy) or rewards (reward mode) of the batch's rows."""
        with self.autocast():
            return (model or self.wrapped)(batch["input_ids"], batch["targets"], batch["loss_mask"],
                                           batch["last_index"])

    def reference_logps(self, batch: dict) -> torch.Tensor:
        """(2B,) log pi_ref of each row: carried by the batch, else the same weights with adapters off."""
        if "ref_logps" in batch:
            return batch["ref_logps"].to(self.env.device)
        if not self.lora:
            raise TrainingError("spl bug: full fine-tuning needs precomputed reference log-probs")
        with torch.no_grad(), disable_adapters(self.scorer.model):
            return self.forward(batch, self.scorer)

    def _reference_if_needed(self, batch: dict) -> torch.Tensor | None:
        return self.reference_logps(batch) if self.t.mode == "spl" else None

    def loss_terms(self, out: torch.Tensor, ref: torch.Tensor | None) -> tuple[torch.Tensor, dict]:
        """Per-example losses and detached metrics (batch means) from the forward's (N,) outputs.

        SFT: per-sequence negative log-likelihoods (summed over tokens; the caller divides by a
        token count). Preferences: per-pair losses (B,), rows [0:B] chosen and [B:2B] rejected.
        """
        if self.t.mode == "sft":
            return -out.float(), {}
        B = out.shape[0] // 2
        if self.t.mode == "reward":
            losses, metrics = bradley_terry_loss(out[:B], out[B:])
            return losses, {k: v.detach().float() for k, v in metrics.items()}
        alpha, beta = self.t.alpha, self.t.beta
        # SPL under reverse KL (DPO at alpha == beta); f-DPO under any other train.divergence.
        losses, metrics = preference_loss(out[:B], out[B:], ref[:B], ref[B:], alpha=alpha, beta=beta,
                                          divergence=self.t.divergence,
                                          divergence_alpha=self.t.divergence_alpha)
        return losses, {k: v.detach().float().mean() for k, v in metrics.items()}

    def compute_loss(self, batch: dict, model: nn.Module | None = None) -> tuple[torch.Tensor, dict]:
        """Mean loss over one batch (per pair, or per response token for SFT) and its metrics."""
        out = self.forward(batch, model)
        losses, metrics = self.loss_terms(out, self._reference_if_needed(batch))
        if self.t.mode == "sft":
            return losses.sum() / batch["loss_mask"].sum().clamp(min=1), metrics
        return losses.mean(), metrics

    # ------------------------------------------------------------------ reference log-probs

    def attach_references(self) -> None:
        """Precompute (or load) reference log-probs for the training set, and the eval set, when
        they cannot come from the live model: full fine-tuning, or a shared ``train.ref_cache``."""
        t = self.t
        if t.ref_cache:
            train_path = Path(t.ref_cache)
        elif not self.lora:
            # Kept in out_dir, so a resumed run does not recompute it.
            train_path = self.out_dir / "reference_logps.safetensors"
        else:
            return  # LoRA: adapters off, beside each forward
        eval_path = train_path.with_name(train_path.stem + ".eval" + train_path.suffix)
        d = self.cfg.data
        for name, data, path in (("train", self.train_data, train_path), ("eval", self.eval_data, eval_path)):
            if data is None:
                continue
            fields = cache_fields(data, base=self.base_fingerprint, tokenizer_path=self.tokenizer_path,
                                  max_len=d.max_len, max_prompt_len=d.max_prompt_len,
                                  chat_template=d.chat_template, precision="bf16" if self.bf16 else "fp32")
            compute = lambda data=data: compute_reference(self.scorer, data, self.env, self.micro,
                                                          self.autocast, adapters_off=self.lora)
            attach_reference(data, path, fields, self.env, compute, name)

    # ------------------------------------------------------------------ the loop

    def train(self) -> dict:
        t, env = self.t, self.env
        prepare_run_dir(self.cfg, env)
        self.reporter.start()
        if t.mode == "spl":
            # Before any resume: the reference is the base model, not the checkpoint's weights.
            self.attach_references()
        metrics_file = self.out_dir / "metrics.jsonl"
        if t.resume:
            path = self.latest_checkpoint()
            if path is None:
                print0(env, f"resume: no checkpoint in {checkpoint_dir(self.cfg)}; starting from step 0")
            else:
                load_checkpoint(self, path)
            if env.is_main:
                truncate_metrics(metrics_file, self.step)
        # The context closes the bar on errors too, so a final message starts on its own line.
        with tqdm(total=t.max_steps, initial=self.step, disable=not env.is_main, desc=t.mode,
                  unit="step") as bar:
            try:
                return self._loop(bar, metrics_file)
            finally:
                self.reporter.close()

    def _loop(self, bar: tqdm, metrics_file: Path) -> dict:
        t = self.t
        steps = self.batches.indices()
        last: dict = {}
        seconds, tokens, response_tokens = 0.0, 0.0, 0.0  # since the last logged step
        while self.step < t.max_steps:
            tic = time.perf_counter()
            last = self.train_step(next(steps))
            seconds += time.perf_counter() - tic
            tokens += last.pop("tokens")
            response_tokens += last.pop("response_tokens")
            bar.update(1)
            if self.step % t.log_every == 0 or self.step == t.max_steps:
                # Throughput over all tokens (prompt and response, both sides) and over the response
                # tokens the loss reads, all ranks together.
                last["tokens_per_s"] = tokens / seconds
                last["response_tokens_per_s"] = response_tokens / seconds
                seconds, tokens, response_tokens = 0.0, 0.0, 0.0
                shown = ("loss", "rewards/accuracies", "rewards/margins")
                bar.set_postfix({k: f"{v:.4g}" for k, v in last.items() if k in shown})
                self._log(metrics_file, last)
            if self.eval_data is not None and (self.step % t.eval_every == 0 or self.step == t.max_steps):
                ev = {f"eval_{k}": v for k, v in self.evaluate().items()}
                self._log(metrics_file, {"step": self.step, **ev})
                last.update(ev)
            if self.step % t.save_every == 0 or self.step == t.max_steps:
                save_checkpoint(self)
        return last

    def train_step(self, indices: list[int]) -> dict:
        """One optimizer step on this rank's share (``indices``) of a global batch; the step's loss,
        metrics, learning rate, gradient norm and token counts, reduced over all ranks."""
        t, env = self.t, self.env
        self.wrapped.train()
        m = self.micro
        micros = [self.train_data.collate(indices[i:i + m]) for i in range(0, len(indices), m)]
        # Counted on the host from CPU tensors: no device sync.
        tokens = float(sum(int((b["last_index"] + 1).sum()) for b in micros))
        response_tokens = float(sum(int(b["loss_mask"].sum()) for b in micros))
        # The loss is a sum over the global batch divided by its size: pairs, or for SFT its response
        # tokens over all ranks (one scalar all-reduce). DDP and FSDP average gradients over ranks,
        # so each rank's part is scaled by the rank count to give the gradient of that sum.
        denom = torch.tensor(float(t.batch_size) if t.mode != "sft" else response_tokens, device=env.device)
        if t.mode == "sft" and env.world_size > 1:
            dist.all_reduce(denom)
        loss_sum = torch.zeros((), device=env.device)
        metric_sums: dict[str, torch.Tensor] = {}
        for i, batch in enumerate(micros):
            batch = self._batch_to(batch)
            no_sync = getattr(self.wrapped, "no_sync", None)
            skip_sync = i < len(micros) - 1 and no_sync is not None and self.lora
            with no_sync() if skip_sync else nullcontext():
                out = self.forward(batch)
                losses, metrics = self.loss_terms(out, self._reference_if_needed(batch))
                part = losses.sum() / denom
                (part * env.world_size).backward()
            loss_sum += part.detach()
            for k, v in metrics.items():
                metric_sums[k] = metric_sums.get(k, 0) + v / (self.accum * env.world_size)
        # One all-reduce (sum) for everything: loss parts and token counts add up over ranks, and
        # the metrics (equal-sized micro-batch means) were pre-divided so their sum is the mean.
        counts = torch.tensor([tokens, response_tokens], device=env.device)
        stats = torch.cat([loss_sum[None], counts, torch.stack(list(metric_sums.values()))
                           if metric_sums else counts[:0]])
        if env.world_size > 1:
            dist.all_reduce(stats)
        grad_norm = self._clip()
        values = torch.cat([stats, grad_norm.reshape(1).to(stats)]).tolist()  # the step's one host sync
        loss, norm = values[0], values[-1]
        if not math.isfinite(loss) or not math.isfinite(norm):
            latest = self.latest_checkpoint()
            what = f"loss ({loss})" if not math.isfinite(loss) else f"gradient norm ({norm}, loss {loss:.6g})"
            raise TrainingError(f"non-finite {what} at step {self.step + 1}; stopping without updating the "
                                f"weights. Last good checkpoint: {latest or 'none written yet'}")
        lr = self.optimizer.param_groups[0]["lr"]  # the rate this update uses (the scheduler moves it next)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return {"step": self.step, "loss": loss, **dict(zip(metric_sums, values[3:-1], strict=True)),
                "lr": lr, "grad_norm": norm, "tokens": values[1], "response_tokens": values[2]}

    def latest_checkpoint(self) -> Path | None:
        return latest_checkpoint(checkpoint_dir(self.cfg))

    def _clip(self) -> torch.Tensor:
        """The global gradient norm (0-dim tensor, no host sync), clipping to ``train.grad_clip``."""
        params = [p for p in self.scorer.parameters() if p.grad is not None]
        if not params:
            return torch.zeros((), device=self.env.device)
        if self.t.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, self.t.grad_clip)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP: a replicated DTensor

    def _log(self, path: Path, record: dict) -> None:
        if self.env.is_main:
            try:
                with open(path, "a") as f:
                    f.write(json.dumps(record) + "\n")
            except OSError as err:
                raise TrainingError(f"{path}: cannot append metrics ({err})") from None
            self.reporter.log(record)

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Loss and metrics over the whole eval set, exactly: pairs split across ranks, each counted once.

        Every rank runs the same number of forwards (FSDP's collectives), so a rank short of items
        repeats one; its outputs are dropped before the loss. SFT's loss is per response token.
        """
        t, env = self.t, self.env
        self.wrapped.eval()
        n = len(self.eval_data)
        mine = list(range(env.rank, n, env.world_size))
        real = len(mine)
        mine += (mine[-1:] or [0]) * (math.ceil(n / env.world_size) - real)
        sums: dict[str, float] = {}
        count = 0.0  # pairs, or response tokens for SFT
        for s in range(0, len(mine), self.micro):
            batch = self._batch_to(self.eval_data.collate(mine[s:s + self.micro]))
            keep = max(0, min(self.micro, real - s))  # the batch's first `keep` items are real
            out = self.forward(batch, self.scorer)
            ref = self._reference_if_needed(batch)
            # A batch of repeats only is still scored (one row, weight 0): every rank then holds the
            # same metric names, so the all-reduce below has the same length everywhere.
            rows = torch.arange(max(keep, 1))  # real rows: the first `keep`, for pairs their rejected too
            if t.mode != "sft":
                rows = torch.cat([rows, batch["index"].shape[0] + rows])
            losses, metrics = self.loss_terms(out[rows], None if ref is None else ref[rows])
            weight = 1.0 if keep else 0.0
            sums["loss"] = sums.get("loss", 0.0) + float(losses.sum()) * weight
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v) * keep
            count += float(batch["loss_mask"][rows].sum()) * weight if t.mode == "sft" else keep
        keys = sorted(sums)
        totals = [sums.get(k, 0.0) for k in keys] + [count]
        totals = torch.tensor(totals, dtype=torch.float64, device=env.device)
        if env.world_size > 1:
            dist.all_reduce(totals)
        totals = totals.tolist()
        pairs = len(self.eval_data)  # metrics are means over pairs; the loss over `count`
        return {k: totals[i] / (totals[-1] if k == "loss" else pairs) for i, k in enumerate(keys)}


# ----------------------------------------------------------------------------- building a run

def load_data(cfg: Config, tok, env: DistEnv):
    """Training and eval sets, checked before any weights are loaded: a held-out split
    (``data.eval_size``, seeded by ``train.seed``) or a separate ``data.eval_path``."""
    from spl.data import load_preference_data, load_sft_data

    d, t = cfg.data, cfg.train
    kw = dict(max_len=d.max_len, max_prompt_len=d.max_prompt_len, format=d.format)
    load = load_sft_data if t.mode == "sft" else load_preference_data
    train_data = load(d.train_path, tok, **kw)
    eval_data = load(d.eval_path, tok, **kw) if d.eval_path else None
    for name, data in (("train", train_data), ("eval", eval_data)):
        if data is not None:
            print0(env, f"{name} data: {data.stats}")
    if eval_data is not None and len(eval_data) == 0:
        raise TrainingError(f"data.eval_path {d.eval_path}: no usable records (stats: {eval_data.stats})")
    if d.eval_size:
        n = len(train_data)
        if d.eval_size + t.batch_size > n:
            raise TrainingError(f"data.eval_size={d.eval_size} leaves {max(0, n - d.eval_size)} of the {n} "
                                f"usable records of {d.train_path} for training, fewer than one batch "
                                f"(train.batch_size={t.batch_size}); lower data.eval_size")
        order = torch.randperm(n, generator=torch.Generator().manual_seed(t.seed)).tolist()
        held = set(order[:d.eval_size])
        make, pad = type(train_data), train_data.pad_id
        eval_data = make([x for i, x in enumerate(train_data) if i in held], {"held_out_of": n}, pad)
        train_data = make([x for i, x in enumerate(train_data) if i not in held], train_data.stats, pad)
        print0(env, f"eval data: held out {len(eval_data)} of {n} records of {d.train_path} "
                    f"(data.eval_size, seed {t.seed}); {len(train_data)} remain for training")
    if len(train_data) < t.batch_size:
        raise TrainingError(f"data.train_path {d.train_path}: {len(train_data)} usable records, fewer than "
                            f"one batch (train.batch_size={t.batch_size}; stats: {train_data.stats})")
    return train_data, eval_data


def build(cfg: Config, env: DistEnv) -> Trainer:
    """Everything before the first step, cheapest checks first: batch layout, run directory,
    tokenizer and data (eval data included), and only then the weights."""
    from spl.chat_templates import set_chat_template
    from spl.checkpoint import check_tokenizer_vocab, load_model
    from spl.lora import apply_lora, parameter_summary
    from spl.tokenizer import find_tokenizer, load_tokenizer

    m, t = cfg.model, cfg.train
    batch_layout(t, env.world_size)
    if m.checkpoint is None:
        raise TrainingError("model.checkpoint is required when data.train_path is set "
                            "(an HF- or original-layout model directory)")
    prepare_run_dir(cfg, env)
    tok_path = Path(m.tokenizer) if m.tokenizer else find_tokenizer(m.checkpoint)
    if tok_path is None or not tok_path.is_file():
        raise TrainingError(f"tokenizer not found: {tok_path or Path(m.checkpoint) / 'tokenizer.model'} "
                            "(set model.tokenizer)")
    tok = load_tokenizer(tok_path)
    print0(env, set_chat_template(tok, cfg.data.chat_template, checkpoint=m.checkpoint))
    cfg.data.chat_template = tok.chat_template.name  # the resolved name is saved with every checkpoint
    train_data, eval_data = load_data(cfg, tok, env)
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
    return Trainer(cfg, env, model, train_data, eval_data, tokenizer_path=str(tok_path),
                   base_path=str(Path(m.checkpoint).resolve()))


def run(cfg: Config, env: DistEnv) -> dict:
    """train.py on real data: build the run, then train it."""
    return build(cfg, env).train()
