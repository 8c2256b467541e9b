"""Training checkpoints (spl/train_checkpoint.py) and exports (spl/export.py): sharded full
fine-tuning checkpoints resume on another rank count, a kill during a save loses nothing, a full
disk is one clear error, files reach the disk before ``latest`` moves, and run directories are
never silently reused."""

import json
import os
import pickle
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from spl.checkpoint import CheckpointError, load_model, load_sharded_model
from spl.config import load_config
from spl.distributed import DistEnv, TrainingError
from spl.inference import load_for_inference
from tests.conftest import ROOT, run_script
from tests.test_trainer import HH, REAL, build_run

FULL = [f"data.train_path={HH}", *REAL, "lora.enabled=false", "train.micro_batch_size=auto"]


def weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    model, _ = load_sharded_model(run / "checkpoints" / f"step_{step:07d}")
    return model.state_dict()


def logged_steps(run: Path) -> list[int]:
    return [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]


def roll_back(src: Path, dst: Path, step: int) -> Path:
    """A copy of run ``src`` as if killed right after writing its ``step`` checkpoint."""
    shutil.copytree(src, dst)
    for later in (dst / "checkpoints").glob("step_*"):
        if int(later.name.split("_")[1]) > step:
            shutil.rmtree(later)
    (dst / "checkpoints" / "latest").write_text(f"step_{step:07d}\n")
    return dst


@pytest.fixture(scope="module")
def sharded_run(tiny_hf_model, tmp_path_factory) -> Path:
    """Full fine-tuning over 2 gloo ranks, 4 steps, checkpoints at 2 and 4, never interrupted."""
    out = tmp_path_factory.mktemp("sharded") / "run"
    run_script(["train.py", f"model.checkpoint={tiny_hf_model}", *FULL, "train.max_steps=4",
                "train.save_every=2", f"train.out_dir={out}"], nproc=2)
    return out


@pytest.mark.parametrize("ranks", [1, 2])
def test_two_rank_sharded_checkpoint_resumes_on_one_or_two_ranks(sharded_run, tiny_hf_model, tmp_path,
                                                                 ranks):
    """Each rank wrote its own shard; the run continues from step 2 on 1 or 2 ranks to the same
    weights as the uninterrupted run, logging steps 3 and 4 once."""
    step2 = sharded_run / "checkpoints" / "step_0000002"
    assert sorted(p.name for p in (step2 / "dcp").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    run = roll_back(sharded_run, tmp_path / "run", 2)
    out = run_script(["train.py", f"model.checkpoint={tiny_hf_model}", *FULL, "train.max_steps=4",
                      "train.save_every=2", f"train.out_dir={run}", "train.resume=true"],
                     nproc=ranks if ranks > 1 else None)
    assert "continuing from" in out.stdout + out.stderr and "at step 2" in out.stdout + out.stderr
    assert "reference log-probs (train): loaded" in out.stdout + out.stderr  # not recomputed
    want, got = weights(sharded_run, 4), weights(run, 4)
    assert max((want[k] - weights(sharded_run, 2)[k]).abs().max().item() for k in want) > 1e-4  # trained
    for k in want:  # 1 rank vs 2: the same sums in another order
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5)
    assert logged_steps(run) == [1, 2, 3, 4]


def test_kill_during_sharded_save_then_resume(tiny_hf_model, tmp_path):
    """SIGKILL while a DCP save is under way (its temporary directory exists): the resumed run
    removes the remains, continues from the last complete checkpoint and ends where a clean run ends."""
    args = ["train.py", f"model.checkpoint={tiny_hf_model}", *FULL, "train.max_steps=5", "train.save_every=1"]
    clean = tmp_path / "clean"
    run_script([*args, f"train.out_dir={clean}"])
    killed = tmp_path / "killed"
    ckpts = killed / "checkpoints"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for _attempt in range(3):  # the save must be caught in the act; retry if it finished first
        proc = subprocess.Popen([sys.executable, *args, f"train.out_dir={killed}", "train.overwrite=true"],
                                cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while proc.poll() is None:
            if ckpts.is_dir() and [p for p in ckpts.glob(".tmp_step_*") if int(p.name[-7:]) >= 2]:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.001)
        proc.wait()
        if proc.returncode == -signal.SIGKILL and list(ckpts.glob(".tmp_step_*")):
            break
    else:
        pytest.fail("could not kill the run during a save in 3 attempts")
    latest = int((ckpts / "latest").read_text().strip()[-7:])
    out = run_script([*args, f"train.out_dir={killed}", "train.resume=true"])
    assert "removed 1 unfinished checkpoint(s)" in out.stdout
    assert f"at step {latest}" in out.stdout + out.stderr
    assert not list(ckpts.glob(".tmp_*"))
    want, got = weights(clean, 5), weights(killed, 5)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)
    assert logged_steps(killed) == logged_steps(clean) == [1, 2, 3, 4, 5]


def _limit_file_size() -> None:  # in the child: writes past 1 MiB fail with EFBIG ("disk full")
    resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, 2**20))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


def test_full_disk_is_one_clear_error(tiny_hf_model, tmp_path):
    """A shard that cannot be written stops the run with one line naming the checkpoint and the
    last good one; no temporary directory is left and ``latest`` does not move."""
    run = tmp_path / "run"
    cmd = [sys.executable, "train.py", f"model.checkpoint={tiny_hf_model}", *FULL, f"train.out_dir={run}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
                         preexec_fn=_limit_file_size)
    assert out.returncode == 1, out.stderr
    lines = [x for x in out.stderr.splitlines() if "train.py:" in x]
    assert len(lines) == 1 and lines[0].startswith(f"train.py: cannot write checkpoint {run}/checkpoints/"
                                                   "step_0000002: "), out.stderr[-2000:]
    assert lines[0].endswith("free there). Last good checkpoint: none written yet; free space or fix the "
                             "directory, then continue with train.resume=true")
    assert "Traceback" not in out.stderr
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == []


def test_files_and_directories_are_synced_before_latest_moves(tiny_hf_model, tmp_path, monkeypatch):
    trainer = build_run(tiny_hf_model, tmp_path / "run", "train.max_steps=1")
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd)))
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", str(a), str(b))),
                                                     real_replace(a, b)))
    trainer.train()
    ckpts = tmp_path / "run" / "checkpoints"
    replaced = [e[2] if e[0] == "replace" else None for e in events]
    moved_latest, renamed = replaced.index(str(ckpts / "latest")), replaced.index(str(ckpts / "step_0000001"))
    synced_before_rename = {e[1] for e in events[:renamed] if e[0] == "fsync"}
    tmp = ckpts / ".tmp_step_0000001"
    written = [tmp / p.relative_to(ckpts / "step_0000001") for p in (ckpts / "step_0000001").rglob("*")]
    assert written and all(str(p) in synced_before_rename for p in [*written, tmp])
    assert ("fsync", str(ckpts)) in events[renamed:moved_latest]  # the rename itself is durable


def test_run_directory_policy(tmp_path):
    """Overwrite clears the old run; stale temporaries go at start; resume needs a real ``latest``."""
    from spl.train_checkpoint import prepare_run_dir, truncate_metrics

    run = tmp_path / "run"
    (run / "checkpoints" / "step_0000004").mkdir(parents=True)
    (run / "checkpoints" / ".tmp_step_0000006").mkdir()
    (run / "checkpoints" / "latest").write_text("step_0000004\n")
    (run / "metrics.jsonl").write_text('{"step": 4}\n')
    cfg = lambda *o: load_config(None, [f"train.out_dir={run}", *o])  # noqa: E731
    with pytest.raises(TrainingError, match="already holds a run"):
        prepare_run_dir(cfg(), DistEnv())
    prepare_run_dir(cfg("train.resume=true"), DistEnv())
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_0000004"]
    shutil.rmtree(run / "checkpoints" / "step_0000004")
    with pytest.raises(TrainingError, match="latest names step_0000004, which does not exist"):
        prepare_run_dir(cfg("train.resume=true"), DistEnv())
    prepare_run_dir(cfg("train.overwrite=true"), DistEnv())
    assert sorted(p.name for p in run.iterdir()) == []
    metrics = run / "metrics.jsonl"
    metrics.write_text('{"step": 1}\n{"step": 2, "eval_loss": 1}\n{"step": 3}\n{"step": 4, "lo')
    truncate_metrics(metrics, 2)  # what a resume from step 2 keeps; the torn line goes too
    assert metrics.read_text() == '{"step": 1}\n{"step": 2, "eval_loss": 1}\n'


def test_export_gives_a_model_transformers_reads(sharded_run, tmp_path):
    """``python -m spl.export RUN`` merges the shards into an HF directory, bit for bit."""
    transformers = pytest.importorskip("transformers")
    from spl.export import main

    assert main([str(sharded_run), "--out", str(tmp_path / "m")]) == 0
    exported, _ = load_model(tmp_path / "m")
    sharded, _ = load_sharded_model(sharded_run / "checkpoints" / "step_0000004")
    for k, v in sharded.state_dict().items():
        assert torch.equal(exported.state_dict()[k], v), k
    assert (tmp_path / "m" / "tokenizer.model").is_file()
    inference = load_for_inference(sharded_run)  # what sample.py and evaluate.py read: the same weights
    assert inference.source.name == "step_0000004" and not inference.has_adapter
    assert all(torch.equal(inference.model.state_dict()[k], v) for k, v in sharded.state_dict().items())
    hf = transformers.MistralForCausalLM.from_pretrained(tmp_path / "m", attn_implementation="eager")
    tokens = torch.tensor([[1, 415, 2936, 9060, 285]])
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, exported(tokens), atol=1e-5, rtol=0)
    assert main([str(sharded_run), "--out", str(tmp_path / "m")]) == 1  # exists: refused


def test_export_merges_lora_adapters(demo_run, tmp_path):
    from spl.export import export

    out = export(demo_run, out=tmp_path / "merged")
    merged, _ = load_model(out)
    with_adapter = load_for_inference(demo_run).model
    tokens = torch.tensor([[1, 5, 9, 13, 7]])
    with torch.no_grad():
        torch.testing.assert_close(merged(tokens), with_adapter(tokens), atol=1e-4, rtol=1e-4)


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_dcp_index_is_never_unpickled_blindly(sharded_run, tmp_path):
    step = tmp_path / "step"
    shutil.copytree(sharded_run / "checkpoints" / "step_0000004", step)
    load_sharded_model(step)  # the real index passes the allow-list
    (step / "dcp" / ".metadata").write_bytes(pickle.dumps(_Payload()))
    with pytest.raises(CheckpointError, match=r"refusing to unpickle (posix|os)\.system"):
        load_sharded_model(step)
    # A dotted name reaches os.system through torch's own namespace; plain pickle would resolve it.
    dotted = b"\x80\x04\x8c\x05torch\x8c\x09os.system\x93."
    assert pickle.loads(dotted) is os.system
    (step / "dcp" / ".metadata").write_bytes(dotted)
    with pytest.raises(CheckpointError, match=r"refusing to unpickle torch\.os\.system"):
        load_sharded_model(step)
    assert not (tmp_path / "pwned").exists() and not Path("pwned").exists()



def test_sharded_save_adds_little_host_memory(tmp_path):
    """While saving, each rank's resident memory grows by less than its own shard (DCP writes the
    shards where they are), while the old full gather put the whole state on rank 0.
    (benchmarks/bench_checkpoint.py, small; RESULTS.md has the numbers at a larger size.)"""
    out = run_script(["benchmarks/bench_checkpoint.py", "--dim", "256", "--layers", "4"], nproc=2)
    rows = json.loads(out.stdout.strip().splitlines()[-1])
    full = sum(r["shard"] for r in rows)
    for r in rows:
        assert r["sharded"] < 0.5 * r["shard"], rows
    assert rows[0]["gathered"] > 0.7 * full, rows  # what the sharded save avoids (RSS: 0.85-1.0 measured)
