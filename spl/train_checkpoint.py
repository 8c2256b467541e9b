"""Training checkpoints: what a run writes so a killed job continues exactly, and where.

    out_dir/
      metrics.jsonl                  one JSON line per logged step (rank 0)
      config.yaml                    the resolved config of the newest checkpoint
      checkpoints/latest             the name of the newest complete checkpoint
      checkpoints/step_XXXXXXX/
        trainer_state.json           step, data position, schedule, optimizer hyperparameters
        config.yaml, tokenizer.model (or tokenizer.json + tokenizer_config.json)
        rng_rank{r}.safetensors      each rank's RNG state (LoRA dropout)
        LoRA:  adapter/ (PEFT format), optimizer.safetensors, reward_head.safetensors (reward mode)
        full:  dcp/ (torch.distributed.checkpoint: every rank's FSDP2 shards of the weights and the
               AdamW moments), model_config.json (the shape, for spl.export and inference)

Full fine-tuning never gathers the model: each rank writes and reads only its own shards, so host
memory stays near one rank's shard (7B in fp32 with AdamW is ~84 GB whole), and DCP reshards when
the number of ranks changes. The merged HF-layout model is exported on demand
(``python -m spl.export RUN_DIR``). LoRA adapters and their optimizer state are small and the same
on every rank (DDP), so rank 0 writes them.

Atomicity: everything goes to ``checkpoints/.tmp_step_XXXXXXX``; every file and the directory are
fsynced, the directory is renamed to ``step_XXXXXXX``, its parent fsynced, and only then does
``latest`` move. A kill at any moment leaves ``latest`` naming a complete checkpoint, and stale
temporaries are removed at the next start (``prepare_run_dir``). Every rank takes part in a save
and learns its outcome: a failed write on any rank (a full disk) stops all of them with one clear
error rather than leaving the others in a barrier.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from spl.atomic import atomic_write_text, fsync_path
from spl.checkpoint import SHARDED_CONFIG, dcp_load
from spl.config import Config
from spl.distributed import DistEnv, TrainingError, barrier, decide_on_rank0, print0, raise_together
from spl.layouts import model_config_to_hf
from spl.lora import save_adapter
from spl.tokenizer import copy_tokenizer

LATEST = "latest"


def _failure(err: BaseException) -> str:
    """One line for an exception, looking inside DCP's CheckpointException, which carries each failed
    rank's exception as ``{rank: (exception, traceback)}``."""
    failures = getattr(err, "failures", None)
    if failures:
        inner = failures[min(failures)]
        err = inner[0] if isinstance(inner, tuple) else getattr(inner, "exc", inner)
    text = str(err) if isinstance(err, OSError) else f"{type(err).__name__}: {err}"
    return (text.strip().splitlines() or [type(err).__name__])[0]


def _checkpoint_exception() -> type[BaseException]:
    from torch.distributed.checkpoint.api import CheckpointException
    return CheckpointException


def fsync_tree(root: Path) -> None:
    """fsync every file under ``root``, then every directory, deepest first: without it a power
    loss after the rename can leave renamed but empty files."""
    paths = sorted(root.rglob("*"), key=lambda p: len(p.parts), reverse=True)
    for path in [*(p for p in paths if p.is_file()), *(p for p in paths if p.is_dir()), root]:
        fsync_path(path)


# ----------------------------------------------------------------------------- the run directory

def checkpoint_dir(cfg: Config) -> Path:
    return Path(cfg.train.out_dir) / "checkpoints"


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    """The directory ``latest`` names; None when there is no ``latest``. A ``latest`` naming a missing
    directory is an error: resuming from step 0 instead would silently redo (and relog) the run."""
    pointer = ckpt_dir / LATEST
    if not pointer.is_file():
        return None
    path = ckpt_dir / pointer.read_text().strip()
    if not path.is_dir():
        raise TrainingError(f"{pointer} names {path.name}, which does not exist; restore it, or point "
                            f"{pointer} at another step_* directory in {ckpt_dir}")
    return path


def prepare_run_dir(cfg: Config, env: DistEnv) -> None:
    """Check ``out_dir`` before anything is loaded: refuse to reuse it unless resuming or asked to
    overwrite, refuse a ``latest`` that names nothing, and remove stale temporaries. Collective."""
    t = cfg.train
    out, ckpts = Path(t.out_dir), checkpoint_dir(cfg)

    def decide() -> None:
        used = [name for name in ("metrics.jsonl", "checkpoints") if (out / name).exists()]
        if used and not t.resume and not t.overwrite:
            raise TrainingError(f"train.out_dir {out} already holds a run ({', '.join(used)}): set "
                                "train.resume=true to continue it, train.overwrite=true to start afresh "
                                "there (deletes its checkpoints and metrics), or another train.out_dir")
        if t.resume:
            latest_checkpoint(ckpts)
        try:
            if t.overwrite:
                shutil.rmtree(ckpts, ignore_errors=True)
                (out / "metrics.jsonl").unlink(missing_ok=True)
            stale = sorted(ckpts.glob(".tmp_step_*")) if ckpts.is_dir() else []
            for path in stale:  # a save that was killed (or hit a full disk) before its rename
                shutil.rmtree(path)
            if stale:
                print(f"removed {len(stale)} unfinished checkpoint(s): {', '.join(p.name for p in stale)}")
            out.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise TrainingError(f"train.out_dir {out}: {err}") from None

    decide_on_rank0(env, decide)


def truncate_metrics(path: Path, step: int) -> None:
    """Keep only the records of steps <= ``step``: the lines a killed run logged after its last
    checkpoint are logged again by the resumed run, and must not appear twice."""
    if not path.is_file():
        return
    def before(line: str) -> bool:
        try:
            return json.loads(line).get("step", 0) <= step
        except ValueError:  # a line torn by the kill
            return False

    lines = path.read_text().splitlines()
    kept = [line for line in lines if before(line)]
    if len(kept) != len(lines):
        atomic_write_text(path, "".join(line + "\n" for line in kept))


# ----------------------------------------------------------------------------- saving

def _sharded_state(trainer) -> tuple[dict, list]:
    """What DCP writes for full fine-tuning: FSDP2's sharded (DTensor) weights and AdamW moments,
    and apart from them the optimizer's hyperparameters (JSON in trainer_state.json: DCP then holds
    only tensors, no pickled bytes)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    optim = get_optimizer_state_dict(trainer.wrapped, trainer.optimizer)
    tensors = {"model": get_model_state_dict(trainer.wrapped), "optim": {"state": optim["state"]}}
    return tensors, optim["param_groups"]


def _flat_optimizer_state(trainer) -> tuple[dict[str, torch.Tensor], list]:
    """LoRA: the whole (small) optimizer state as flat tensors keyed ``param::moment``, on rank 0."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    sd = get_optimizer_state_dict(trainer.wrapped, trainer.optimizer,
                                  options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    # With cpu_offload only rank 0 receives the gathered state; the others get {} and write nothing.
    tensors = {f"{name}::{k}": v.detach().cpu().contiguous()
               for name, state in sd.get("state", {}).items() for k, v in state.items()}
    return tensors, sd.get("param_groups", [])


def _all_finite(trainer) -> bool:
    """Whether every trainable weight is finite on every rank (FSDP: each checks its own shard)."""
    flags = [(p.to_local() if hasattr(p, "to_local") else p).isfinite().all()
             for group in trainer.optimizer.param_groups for p in group["params"]]
    ok = torch.stack(flags).all().to(torch.int32)
    if trainer.env.distributed:
        torch.distributed.all_reduce(ok, op=torch.distributed.ReduceOp.MIN)
    return bool(ok)


def save_checkpoint(trainer) -> Path:
    """Write ``step_XXXXXXX`` (collective), point ``latest`` at it, keep the newest few."""
    env, t, cfg = trainer.env, trainer.t, trainer.cfg
    ckpts = checkpoint_dir(cfg)
    name = f"step_{trainer.step:07d}"
    final, tmp = ckpts / name, ckpts / f".tmp_{name}"
    last_good = latest_checkpoint(ckpts)
    if not _all_finite(trainer):
        # A finite gradient with an absurd learning rate can still overflow the weights.
        raise TrainingError(f"weights are non-finite after step {trainer.step}; not saving them. Last good "
                            f"checkpoint: {last_good or 'none written yet'}")
    failure_types = (OSError, _checkpoint_exception())
    error = None
    try:
        if env.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
    except failure_types as err:
        error = _failure(err)
    _settle(env, error, final, last_good)
    try:
        state = {"step": trainer.step, "data": trainer.batches.state_dict(),
                 "scheduler": trainer.scheduler.state_dict(), "world_size": env.world_size,
                 "mode": t.mode, "lora": trainer.lora}
        if trainer.lora:
            opt_tensors, groups = _flat_optimizer_state(trainer)
            if env.is_main:
                _save_adapter_files(trainer, tmp, opt_tensors)
        else:
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint import FileSystemWriter

            sharded, groups = _sharded_state(trainer)
            with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
                warnings.filterwarnings("ignore", message=".*single process")
                dcp.save(sharded, storage_writer=FileSystemWriter(str(tmp / "dcp"), sync_files=True))
            if env.is_main:
                hf = model_config_to_hf(trainer.scorer.model.cfg)
                (tmp / SHARDED_CONFIG).write_text(json.dumps(hf, indent=2) + "\n")
        state["optimizer"] = {"param_groups": groups}  # hyperparameters; the tensors are saved above
        rng = {"cpu": torch.get_rng_state()}
        if env.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(env.device)
        save_file(rng, str(tmp / f"rng_rank{env.rank}.safetensors"))
        if env.is_main:
            (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1, default=str))
            (tmp / "config.yaml").write_text(cfg.to_yaml())
            if trainer.tokenizer_path:
                copy_tokenizer(trainer.tokenizer_path, tmp)
    except failure_types as err:
        error = _failure(err)
    _settle(env, error, final, last_good)
    if env.is_main:
        try:
            fsync_tree(tmp)
            shutil.rmtree(final, ignore_errors=True)  # a step redone after a resume
            os.replace(tmp, final)
            fsync_path(ckpts)
            atomic_write_text(ckpts / LATEST, name + "\n")  # fsyncs the file
            fsync_path(ckpts)
            atomic_write_text(Path(t.out_dir) / "config.yaml", cfg.to_yaml())
            old = sorted(p for p in ckpts.glob("step_*") if p.is_dir())[:-t.keep_checkpoints]
            for p in old:
                shutil.rmtree(p, ignore_errors=True)
        except OSError as err:
            error = _failure(err)
    _settle(env, error, final, last_good)
    return final


def _settle(env: DistEnv, error: str | None, final: Path, last_good: Path | None) -> None:
    """Collective: if any rank failed to write, remove the temporary directory and raise on all."""
    try:
        raise_together(env, error)
    except TrainingError as err:
        shutil.rmtree(final.parent / f".tmp_{final.name}", ignore_errors=True)  # every rank: idempotent
        try:  # a full disk often surfaces as a short write deep inside torch.save: say how full it is
            free = f" ({shutil.disk_usage(final.parent).free / 2**30:.1f} GiB free there)"
        except OSError:
            free = ""
        raise TrainingError(f"cannot write checkpoint {final}: {err}{free}. Last good checkpoint: "
                            f"{last_good or 'none written yet'}; free space or fix the directory, then "
                            "continue with train.resume=true") from None


def _save_adapter_files(trainer, out: Path, opt_tensors: dict[str, torch.Tensor]) -> None:
    save_adapter(trainer.scorer.model, out / "adapter", base_model_name_or_path=trainer.base_path)
    if trainer.scorer.score is not None:
        save_file({"weight": trainer.scorer.score.weight.detach().cpu().contiguous()},
                  str(out / "reward_head.safetensors"))
    save_file(opt_tensors, str(out / "optimizer.safetensors"))


# ----------------------------------------------------------------------------- loading

def load_checkpoint(trainer, path: Path) -> None:
    """Restore weights, optimizer, schedule, RNG and data position from ``path`` (collective).

    The number of ranks may differ from the run that wrote it: DCP reshards full weights, LoRA
    state is replicated, and the data position counts global batches. Only the dropout RNG streams
    of the new ranks differ.
    """
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    env = trainer.env
    state = _read_state(path)
    if state["mode"] != trainer.t.mode or state["lora"] != trainer.lora:
        raise TrainingError(f"{path}: checkpoint is for mode={state['mode']} lora={state['lora']}, "
                            f"this run is mode={trainer.t.mode} lora={trainer.lora}")
    if trainer.lora:
        from spl.lora import load_adapter

        try:
            load_adapter(trainer.scorer.model, path / "adapter")
            if trainer.scorer.score is not None:
                trainer.scorer.score.weight.data.copy_(load_file(path / "reward_head.safetensors")["weight"])
            flat = load_file(path / "optimizer.safetensors")
        except (OSError, ValueError) as err:  # safetensors' errors are ValueErrors or OSErrors
            raise TrainingError(f"{path}: cannot resume from it ({err})") from None
        osd: dict = {"state": {}, "param_groups": state["optimizer"]["param_groups"]}
        for key, v in flat.items():
            name, k = key.split("::")
            osd["state"].setdefault(name, {})[k] = v
        set_optimizer_state_dict(trainer.wrapped, trainer.optimizer, osd,
                                 options=StateDictOptions(full_state_dict=True, strict=False))
    else:
        if not (path / "dcp").is_dir():
            raise TrainingError(f"{path}: no dcp/ directory (sharded weights); it was not written by this "
                                "version of spl's full fine-tuning and cannot be resumed")
        sharded, _ = _sharded_state(trainer)  # targets of the right (sharded) shapes, filled in place
        try:
            dcp_load(sharded, path / "dcp")
        except _checkpoint_exception() as err:
            raise TrainingError(f"{path / 'dcp'}: cannot resume from it ({_failure(err)})") from None
        set_model_state_dict(trainer.wrapped, sharded["model"])
        set_optimizer_state_dict(trainer.wrapped, trainer.optimizer,
                                 {"state": sharded["optim"]["state"],
                                  "param_groups": state["optimizer"]["param_groups"]})
    trainer.scheduler.load_state_dict(state["scheduler"])
    try:
        trainer.batches.load_state_dict(state["data"])
    except ValueError as err:
        raise TrainingError(f"{path}: {err} (the data, train.batch_size or train.seed changed)") from None
    rng_file = path / f"rng_rank{env.rank}.safetensors"
    if rng_file.is_file():
        rng = load_file(rng_file)
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and env.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], env.device)
    if state["world_size"] != env.world_size:
        print0(env, f"resume: checkpoint used {state['world_size']} ranks, now {env.world_size}; weights, "
               "optimizer and data position carry over, dropout RNG streams differ")
    trainer.step = state["step"]
    print0(env, f"resume: continuing from {path} at step {trainer.step}")
    barrier(env)


def _read_state(path: Path) -> dict:
    try:
        state = json.loads((path / "trainer_state.json").read_text())
    except (OSError, ValueError) as err:
        raise TrainingError(f"{path / 'trainer_state.json'}: cannot read it ({err})") from None
    needed = ("step", "data", "scheduler", "world_size", "mode", "lora", "optimizer")
    missing = [k for k in needed if k not in state]
    if missing:
        raise TrainingError(f"{path / 'trainer_state.json'}: missing {missing}; written by an older spl? "
                            "It cannot be resumed")
    return state
