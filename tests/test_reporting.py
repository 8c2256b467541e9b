"""spl/reporting.py and train.report_to: TensorBoard and W&B (offline) files read back, TRL's metric
names, the one-line message for a missing package, and a train.py f-DPO run end to end.

No network: W&B runs with WANDB_MODE=offline and its directories under tmp_path. Its run file is
read back with a 20-line reader of the LevelDB log format W&B writes (records are its protobufs).
"""

from __future__ import annotations

import importlib.util
import json
import math
import struct
import time
from pathlib import Path

import pytest

import train
from spl.config import ConfigError, load_config
from spl.reporting import Reporter, ReportingError, trl_names
from tests.conftest import ROOT, run_script

HAS_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None
HAS_WANDB = importlib.util.find_spec("wandb") is not None
needs_tensorboard = pytest.mark.skipif(not HAS_TENSORBOARD, reason="tensorboard is not installed: "
                                       "pip install -r requirements-test.txt")
needs_wandb = pytest.mark.skipif(not HAS_WANDB, reason="wandb is not installed: "
                                 "pip install -r requirements-test.txt")
TRAIN = {"step": 3, "loss": 0.69, "rewards/chosen": 0.1, "rewards/rejected": -0.2, "rewards/accuracies": 0.5,
         "rewards/margins": 0.3, "logps/chosen": -40.0, "logps/rejected": -52.5, "lr": 1e-5, "grad_norm": 2.5,
         "tokens_per_s": 1000.0}
EVAL = {"step": 3, "eval_loss": 0.7, "eval_rewards/accuracies": 0.25}


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    """W&B without network or home-directory writes: offline mode, every directory under tmp_path."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb_home"))
    monkeypatch.setenv("WANDB_PROJECT", "spl-tests")


def read_tensorboard(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def read_wandb_history(out_dir: Path, timeout_s: float = 60) -> list[dict[str, float]]:
    """The history rows of the one offline run under out_dir/wandb, from its .wandb file.

    The file is W&B's 7-byte header, then LevelDB log blocks of 32 KiB: each chunk has a 7-byte
    header (crc32c, little-endian length, type: 1 full, 2 first, 3 middle, 4 last). W&B's service
    process finishes writing after ``finish()`` returns, so read until its exit record is there.
    """
    from wandb.proto import wandb_internal_pb2

    deadline = time.monotonic() + timeout_s
    while True:
        (path,) = out_dir.glob("wandb/offline-run-*/run-*.wandb")
        data, pos, block, chunks, records = path.read_bytes(), 7, 32768, b"", []
        while pos + 7 <= len(data):
            if block - pos % block < 7:  # a block tail too short for a header is padding
                pos += block - pos % block
                continue
            _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
            chunks, pos = chunks + data[pos + 7:pos + 7 + length], pos + 7 + length
            if kind in (1, 4):
                record = wandb_internal_pb2.Record()
                record.ParseFromString(chunks)
                records.append(record)
                chunks = b""
        kinds = [r.WhichOneof("record_type") for r in records]
        if "exit" in kinds:
            break
        assert time.monotonic() < deadline, f"{path}: no exit record after {timeout_s} s ({kinds})"
        time.sleep(0.2)
    return [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
            for r, kind in zip(records, kinds, strict=True) if kind == "history"]


def test_trl_names():
    step, tags = trl_names({**TRAIN, "note": "text", "flag": True})
    assert step == 3
    assert tags == {"train/loss": 0.69, "train/rewards/chosen": 0.1, "train/rewards/rejected": -0.2,
                    "train/rewards/accuracies": 0.5, "train/rewards/margins": 0.3,
                    "train/logps/chosen": -40.0, "train/logps/rejected": -52.5, "train/learning_rate": 1e-5,
                    "train/grad_norm": 2.5, "train/tokens_per_s": 1000.0}
    assert trl_names(EVAL) == (3, {"eval/loss": 0.7, "eval/rewards/accuracies": 0.25})


@needs_tensorboard
def test_tensorboard_event_file_reads_back(tmp_path):
    reporter = Reporter(["tensorboard"], tmp_path, config={"train": {"lr": 1e-5}})
    reporter.start()
    reporter.log(TRAIN)
    reporter.log({**TRAIN, "step": 4, "loss": 0.5})
    reporter.log(EVAL)
    reporter.close()
    scalars = read_tensorboard(tmp_path / "tensorboard")
    assert scalars["train/loss"] == [(3, pytest.approx(0.69)), (4, 0.5)]
    assert scalars["train/learning_rate"] == [(3, pytest.approx(1e-5)), (4, pytest.approx(1e-5))]
    assert scalars["eval/rewards/accuracies"] == [(3, 0.25)]
    assert "train/lr" not in scalars and "train/step" not in scalars


@needs_wandb
def test_wandb_offline_run_reads_back(tmp_path, offline_wandb):
    reporter = Reporter(["wandb"], tmp_path / "run", config={"train": {"lr": 1e-5}})
    reporter.start()
    reporter.log(TRAIN)
    reporter.log(EVAL)
    reporter.close()
    rows = read_wandb_history(tmp_path / "run")
    assert len(rows) == 2
    assert rows[0]["train/global_step"] == 3 and rows[0]["train/rewards/margins"] == 0.3
    assert rows[0]["train/learning_rate"] == 1e-5
    assert rows[1]["eval/loss"] == 0.7 and rows[1]["train/global_step"] == 3


def test_missing_package_is_one_clear_config_error(monkeypatch, capsys):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else
                        real_find_spec(name, *a))
    with pytest.raises(ConfigError, match=r"wandb not installed; pip install wandb, or remove it"):
        load_config(None, ["train.report_to=[wandb]"])
    # Through train.py: a config error (exit 2) before anything is built, one line, no traceback.
    assert train.main(["train.report_to=[wandb]", "train.out_dir=/nonexistent/never-created"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install wandb" in err[0] and not Path("/nonexistent/never-created").exists()


def test_import_failure_at_start_is_a_reporting_error(tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "wandb", None)  # makes `import wandb` raise ImportError
    with pytest.raises(ReportingError, match="pip install wandb, or remove it from train.report_to"):
        Reporter(["wandb"], tmp_path, config={}).start()


def test_report_to_is_validated():
    with pytest.raises(ConfigError, match="must be one of"):
        load_config(None, ["train.report_to=[mlflow]"])
    with pytest.raises(ConfigError, match="list of strings"):
        load_config(None, ["train.report_to=tensorboard"])


def alpha_divergence_loss(record: dict, beta: float, a: float) -> tuple[float, float, float]:
    """(f-DPO loss, DPO loss, rounding bound) from one logged pair's log-probs, in Python floats."""
    x_w = record["logps/chosen"] - record["logps/ref_chosen"]
    x_l = record["logps/rejected"] - record["logps/ref_rejected"]
    f = lambda x: (1 - math.exp(-a * x)) / a  # Wang et al.'s f'(u) at u = e^x
    softplus = lambda m: math.log1p(math.exp(-abs(m))) + max(-m, 0)  # -log sigmoid(m)
    # fp32 log-probs (each rounded by eps32 |logp|) give x to eps32 (|logp| + |ref|); f' <= e^(-a x).
    eps = 2 * 2.0 ** -23 * sum(abs(record[k]) for k in ("logps/chosen", "logps/ref_chosen", "logps/rejected",
                                                          "logps/ref_rejected"))
    bound = 4 * beta * eps * max(math.exp(-a * x_w), math.exp(-a * x_l), 1) + 1e-6
    return softplus(beta * (f(x_w) - f(x_l))), softplus(beta * (x_w - x_l)), bound


def test_train_py_f_dpo_run_reports_to_dashboards(tiny_hf_model, tmp_path, offline_wandb):
    """One pair per step, so each metrics line holds that pair's log-probs: the logged loss must be the
    alpha-divergence f-DPO loss of them (and not DPO's), and every dashboard must hold the same numbers."""
    backends = [name for name, ok in (("tensorboard", HAS_TENSORBOARD), ("wandb", HAS_WANDB)) if ok]
    hh = ROOT / "tests" / "fixtures" / "hh_rlhf_sample.jsonl"
    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text("".join(hh.read_text().splitlines(keepends=True)[:4]))
    out = tmp_path / "run"
    run_script(["train.py", f"model.checkpoint={tiny_hf_model}", f"data.train_path={hh}", "data.format=hh",
                f"data.eval_path={eval_file}", "data.max_len=64", "data.max_prompt_len=32",
                "train.divergence=alpha_divergence", "train.divergence_alpha=0.5", "train.alpha=0.5",
                "train.beta=0.5", "train.lr=0.05", "train.warmup_steps=0", "train.batch_size=1",
                "train.micro_batch_size=1", "train.max_steps=4", "train.log_every=1", "train.eval_every=4",
                f"train.report_to=[{','.join(backends)}]", f"train.out_dir={out}"])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    moved = 0
    for r in steps:
        f_dpo, dpo, bound = alpha_divergence_loss(r, beta=0.5, a=0.5)
        assert abs(r["loss"] - f_dpo) <= bound, (r, f_dpo, bound)
        moved += abs(dpo - f_dpo) > 10 * bound
    assert moved >= 2  # the policy left the reference, so f-DPO and DPO differ: the setting reached the loss
    evals = [r for r in records if "eval_loss" in r]
    assert len(evals) == 1
    if "tensorboard" in backends:
        scalars = read_tensorboard(out / "tensorboard")
        for r in steps:
            for key, tag in (("loss", "train/loss"), ("lr", "train/learning_rate"),
                             ("grad_norm", "train/grad_norm"), ("rewards/margins", "train/rewards/margins"),
                             ("logps/chosen", "train/logps/chosen")):
                assert dict(scalars[tag])[r["step"]] == pytest.approx(r[key], rel=1e-6)  # TB keeps fp32
        assert dict(scalars["eval/loss"])[4] == pytest.approx(evals[0]["eval_loss"], rel=1e-6)
    if "wandb" in backends:
        rows = read_wandb_history(out)
        assert [row["train/global_step"] for row in rows] == [r["step"] for r in records]
        for row, r in zip(rows, records, strict=True):
            _, tags = trl_names(r)
            assert {k: row[k] for k in tags} == pytest.approx(tags, rel=1e-12)
