"""Mirror the training metrics to TensorBoard and Weights & Biases, under TRL's metric names.

``out_dir/metrics.jsonl`` stays the record of a run; ``train.report_to: [tensorboard, wandb]`` adds
live dashboards on top, so SPL runs can sit beside TRL DPOTrainer runs. Names follow what the
Hugging Face Trainer writes for TRL (its ``rewrite_logs``): a training record's keys get ``train/``
and evaluation keys ``eval_x`` become ``eval/x``, with our ``lr`` renamed ``learning_rate``:

    loss -> train/loss           rewards/margins -> train/rewards/margins   lr -> train/learning_rate
    grad_norm -> train/grad_norm eval_rewards/accuracies -> eval/rewards/accuracies

TensorBoard scalars are written at the optimizer step; W&B plots them against
``train/global_step``, as TRL's runs do. Neither package is a dependency: ``spl/config.py`` refuses
a ``report_to`` entry whose package is missing before any weights load, and this module imports
each one only when a run starts. W&B reads its own environment (``WANDB_API_KEY``,
``WANDB_PROJECT`` (default "spl"), ``WANDB_ENTITY``, ``WANDB_MODE=offline``, ``WANDB_RUN_ID`` with
``WANDB_RESUME=allow`` to continue a run's curve after ``train.resume``); nothing here logs a secret.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import ModuleType

from spl.extras import ExtraBroken, ExtraMissing, import_extra

RENAMES = {"lr": "learning_rate"}  # ours -> TRL's; every other metric already has TRL's name


class ReportingError(RuntimeError):
    """A requested logging backend cannot start; the message says which and what to do."""


def _backend(name: str) -> ModuleType:
    """Import a ``train.report_to`` backend: asked for, so missing and broken are both errors."""
    try:
        return import_extra(name, needed_for=f"train.report_to's {name}", hint=f"pip install {name}")
    except ExtraMissing:
        raise ReportingError(f"train.report_to has {name} but it is not installed: pip install {name}, "
                             "or remove it from train.report_to") from None
    except ExtraBroken as err:
        raise ReportingError(f"train.report_to has {name}, but {err}") from None


def trl_names(record: dict) -> tuple[int, dict[str, float]]:
    """A metrics.jsonl record -> (optimizer step, {tag: value}) with the Trainer's tags.

    Non-numeric entries are left out: dashboards plot numbers, and metrics.jsonl keeps the rest.
    """
    step = int(record["step"])
    tags = {}
    for key, value in record.items():
        if key == "step" or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if key.startswith("eval_"):
            tag = "eval/" + RENAMES.get(key[5:], key[5:])
        else:
            tag = "train/" + RENAMES.get(key, key)
        tags[tag] = float(value)
    return step, tags


class Reporter:
    """The backends of ``train.report_to`` for rank 0 (other ranks pass ``[]`` and do nothing)."""

    def __init__(self, report_to: list[str], out_dir: str | Path, config: dict) -> None:
        self.report_to, self.out_dir, self.config = list(report_to), Path(out_dir), config
        self.tensorboard = None  # torch.utils.tensorboard.SummaryWriter once started
        self.wandb = None  # a wandb Run once started
        self.started = False

    def start(self) -> None:
        """Open every backend; called once the run directory exists, before the first step."""
        if "tensorboard" in self.report_to:
            _backend("tensorboard")  # torch's writer needs the tensorboard package
            from torch.utils.tensorboard import SummaryWriter
            self.tensorboard = SummaryWriter(log_dir=str(self.out_dir / "tensorboard"))
        if "wandb" in self.report_to:
            wandb = _backend("wandb")
            try:
                self.wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "spl"),
                                        name=self.out_dir.name, dir=str(self.out_dir), config=self.config)
            except Exception as err:  # login, network or permission problems: wandb's own message
                raise ReportingError(f"train.report_to has wandb but W&B did not start: {err}; set "
                                     "WANDB_API_KEY, or WANDB_MODE=offline to keep the run local") from None
            self.wandb.define_metric("train/global_step")
            self.wandb.define_metric("*", step_metric="train/global_step", step_sync=True)
        self.started = True

    def log(self, record: dict) -> None:
        """Send one metrics.jsonl record (training or evaluation) to every backend."""
        if not self.report_to:
            return
        if not self.started:
            raise RuntimeError("Reporter.log before Reporter.start")
        step, tags = trl_names(record)
        if self.tensorboard is not None:
            for tag, value in tags.items():
                self.tensorboard.add_scalar(tag, value, step)
            self.tensorboard.flush()  # a killed run keeps every logged step
        if self.wandb is not None:
            self.wandb.log({**tags, "train/global_step": step})

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()
        self.tensorboard = self.wandb = None
