"""train.py end to end: the demo against SPL theory, DDP equals one process, kill-and-resume equals
an uninterrupted run, and bad configs, data and losses stop with clear errors."""

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from spl.config import ConfigError, load_config
from tests.conftest import ROOT, run_script

MISTRAL_TOKENIZER = None
try:  # the real Mistral v1 tokenizer file ships inside mistral-common (a test-only dependency)
    import mistral_common

    MISTRAL_TOKENIZER = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
except ImportError:
    pass


def adapter(run: Path) -> dict[str, torch.Tensor]:
    latest = (run / "checkpoints" / "latest").read_text().strip()
    return load_file(run / "checkpoints" / latest / "adapter" / "adapter_model.safetensors")


def with_reference(demo_run: Path, out: Path) -> Path:
    """A fresh output directory that reuses the demo's fitted reference (skips stage 1)."""
    out.mkdir(parents=True)
    shutil.copytree(demo_run / "reference", out / "reference")
    return out


def test_demo_matches_spl_theory(demo_run):
    """Per question, the trained answer distribution is within TV 0.05 of pi ∝ ref^(b/a) p^(1/a)."""
    rows = json.loads((demo_run / "demo_results.json").read_text())
    assert len(rows) == 4
    for row in rows:
        trained, theory = torch.tensor(row["trained"]), torch.tensor(row["spl_theory"])
        assert abs(trained.sum().item() - 1) < 1e-6
        tv = 0.5 * (trained - theory).abs().sum().item()
        assert tv <= 0.05, (row["question"], row["trained"], row["spl_theory"])
        # The DPO optimum for the same data is far away: the demo separates the two methods.
        assert 0.5 * (torch.tensor(row["dpo_theory"]) - theory).abs().sum().item() > 0.3
    # A checkpoint sample.py / evaluate.py can find, with everything needed to resume.
    ckpt = demo_run / "checkpoints" / (demo_run / "checkpoints" / "latest").read_text().strip()
    for name in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "optimizer.safetensors",
                 "trainer_state.json", "config.yaml", "tokenizer.model", "rng_rank0.safetensors"):
        assert (ckpt / name).is_file(), name


def test_two_processes_equal_one(demo_run, tmp_path):
    """torchrun with 2 gloo ranks x 32 pairs equals 1 process x 64 pairs (same global batch)."""
    common = ["train.max_steps=3", "train.warmup_steps=1", "lora.dropout=0.0", "train.batch_size=64"]
    one = with_reference(demo_run, tmp_path / "one")
    two = with_reference(demo_run, tmp_path / "two")
    run_script(["train.py", f"train.out_dir={one}", "train.micro_batch_size=64", *common], nproc=1)
    run_script(["train.py", f"train.out_dir={two}", "train.micro_batch_size=32", *common], nproc=2)
    a, b = adapter(one), adapter(two)
    assert a.keys() == b.keys() and len(a) > 0
    moved = max((a[k] - adapter_init(k, a)).abs().max().item() for k in a if "lora_B" in k)
    assert moved > 1e-4  # training changed the adapters, so equality below is not vacuous
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def adapter_init(key: str, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.zeros_like(tensors[key])  # lora_B starts at zero


def test_kill_and_resume_equals_uninterrupted(demo_run, tmp_path):
    """SIGKILL a run after its step-10 checkpoint; ``train.resume=true`` ends where a clean run ends."""
    common = ["train.max_steps=40", "train.save_every=5", "train.warmup_steps=2", "lora.dropout=0.1",
              "train.batch_size=16", "train.micro_batch_size=8"]  # dropout + accumulation: RNG and
    # data position must both be restored for the results to match
    clean = with_reference(demo_run, tmp_path / "clean")
    run_script(["train.py", f"train.out_dir={clean}", *common])
    killed = with_reference(demo_run, tmp_path / "killed")
    proc = subprocess.Popen([sys.executable, "train.py", f"train.out_dir={killed}", *common], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = killed / "checkpoints" / "latest"
    deadline = time.time() + 600
    while time.time() < deadline:
        if latest.is_file() and int(latest.read_text().strip().split("_")[1]) >= 10:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    stopped_at = int(latest.read_text().strip().split("_")[1])
    assert 10 <= stopped_at < 40
    out = run_script(["train.py", f"train.out_dir={killed}", "train.resume=true", *common])
    assert f"at step {stopped_at}" in out.stdout + out.stderr
    a, b = adapter(clean), adapter(killed)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_alpha_equal_beta_is_dpo_and_collapses(demo_run, tmp_path):
    """The same demo at alpha == beta moves toward DPO's majority-collapsed optimum."""
    out = with_reference(demo_run, tmp_path / "dpo")
    run_script(["train.py", f"train.out_dir={out}", "train.alpha=0.1", "train.max_steps=150"])
    rows = json.loads((out / "demo_results.json").read_text())
    spl = json.loads((demo_run / "demo_results.json").read_text())
    for row, spl_row in zip(rows, spl, strict=True):
        majority = max(range(4), key=lambda i: row["population"][i])
        # More mass on the majority answer than both the population share and the SPL model.
        assert row["trained"][majority] > row["population"][majority] + 0.1
        assert row["trained"][majority] > spl_row["trained"][majority] + 0.1


# ----------------------------------------------------------------------------- real-data path

@pytest.fixture(scope="module")
def tiny_hf_model(tmp_path_factory) -> Path:
    """A tiny random Mistral in the HF layout with the real 32000-token tokenizer beside it."""
    if MISTRAL_TOKENIZER is None:
        pytest.skip("mistral-common is not installed: no real tokenizer file for the real-data path")
    from spl.checkpoint import save_model
    from spl.config import ModelConfig
    from spl.model import Transformer

    cfg = ModelConfig(dim=32, n_layers=2, head_dim=8, hidden_dim=64, n_heads=4, n_kv_heads=2,
                      vocab_size=32000, rope_theta=1e4, max_seq_len=512)
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny") / "model"
    save_model(Transformer(cfg), cfg, out)
    shutil.copyfile(MISTRAL_TOKENIZER, out / "tokenizer.model")
    return out


HH = ROOT / "tests" / "fixtures" / "hh_rlhf_sample.jsonl"
REAL = ["data.max_len=96", "data.max_prompt_len=64", "train.batch_size=4", "train.micro_batch_size=2",
        "train.max_steps=2", "train.warmup_steps=0", "train.log_every=1", "data.chat_template=mistral-v1"]


@pytest.mark.parametrize("mode,extra", [
    ("spl", []),
    ("spl", ["lora.enabled=false"]),  # full fine-tuning: reference log-probs precomputed first
    ("reward", []),
])
def test_real_data_modes(tiny_hf_model, tmp_path, mode, extra):
    out = tmp_path / "run"
    run_script(["train.py", f"model.checkpoint={tiny_hf_model}", f"data.train_path={HH}", "data.format=hh",
                f"data.eval_path={HH}", "train.eval_every=2", f"train.mode={mode}",
                f"train.out_dir={out}", *REAL, *extra])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records if "loss" in r)
    assert any("eval_loss" in r for r in records)
    ckpt = out / "checkpoints" / "step_0000002"
    weights = "model/config.json" if extra else "adapter/adapter_config.json"
    assert (ckpt / weights).is_file()
    if mode == "reward":
        assert (ckpt / "reward_head.safetensors").is_file()


def test_reference_cache_is_shared_and_checked(tiny_hf_model, tmp_path):
    """An alpha sweep reuses one reference cache; a cache for other data is refused."""
    cache = tmp_path / "ref.safetensors"
    args = ["train.py", f"model.checkpoint={tiny_hf_model}", f"data.train_path={HH}", *REAL,
            f"train.ref_cache={cache}"]
    first = run_script([*args, f"train.out_dir={tmp_path / 'a'}", "train.alpha=0.2"])
    assert "wrote" in first.stdout + first.stderr and cache.is_file()
    second = run_script([*args, f"train.out_dir={tmp_path / 'b'}", "train.alpha=0.5"])
    assert "loaded" in second.stdout + second.stderr
    other = tmp_path / "other.jsonl"
    other.write_text("\n".join(HH.read_text().splitlines()[:10]) + "\n")
    bad = run_script([*args[:2], f"data.train_path={other}", *args[3:], f"train.out_dir={tmp_path / 'c'}"],
                     check=False)
    assert bad.returncode == 1 and "reference cache was computed for other data" in bad.stderr


def test_malformed_data_names_file_and_line(tiny_hf_model, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "hi", "chosen": "a", "rejected": "b"}\n{"prompt": "hi", "chosen": "a"}\n')
    out = run_script(["train.py", f"model.checkpoint={tiny_hf_model}", f"data.train_path={bad}",
                      "data.format=preference", f"train.out_dir={tmp_path / 'r'}", *REAL], check=False)
    assert out.returncode == 1
    assert "bad.jsonl" in out.stderr and "line 2" in out.stderr and "rejected" in out.stderr


def test_vocab_mismatch_is_refused(tiny_hf_model, tmp_path, demo_run):
    out = run_script(["train.py", f"model.checkpoint={tiny_hf_model}", f"data.train_path={HH}",
                      f"model.tokenizer={demo_run / 'reference' / 'tokenizer.model'}",
                      f"train.out_dir={tmp_path / 'r'}", *REAL], check=False)
    assert out.returncode == 1 and "tokenizer.model" in out.stderr and "vocab_size is 32000" in out.stderr


def test_nan_loss_stops_and_keeps_last_checkpoint(demo_run, tmp_path):
    """An absurd learning rate blows the weights up; the run stops naming the step and checkpoint."""
    out = with_reference(demo_run, tmp_path / "nan")
    res = run_script(["train.py", f"train.out_dir={out}", "train.lr=1e30", "train.grad_clip=0",
                      "train.warmup_steps=0", "train.save_every=1", "train.max_steps=20"], check=False)
    assert res.returncode == 1
    assert "non-finite loss" in res.stderr and "Last good checkpoint" in res.stderr
    latest = out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()
    assert (latest / "adapter" / "adapter_model.safetensors").is_file()
    assert not list((out / "checkpoints").glob(".tmp_*"))


# ----------------------------------------------------------------------------- configuration

@pytest.mark.parametrize("override,message", [
    ("train.alpha=0", "train.alpha must be positive"),
    ("train.beta=-1", "train.beta must be >= 0"),
    ("train.lr=-1e-5", "train.lr must be positive"),
    ("train.mode=ppo", "train.mode must be one of"),
    ("train.optimizer=sgd", "unknown config key(s) ['train.optimizer']"),
    ("lora.rank=1.5", "lora.rank must be of type int"),
    ("data.train_path=/no/such.jsonl", "data.train_path: no such file"),
    ("model.checkpoint=/no/such/dir", "model.checkpoint: no such file or directory"),
    ("data.max_prompt_len=600", "must be below data.max_len"),
    ("train", "not of the form section.key=value"),
])
def test_bad_config_values(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert message in str(e.value)


def test_cli_config_error_exit_code():
    out = run_script(["train.py", "train.alpha=-2"], check=False)
    assert out.returncode == 2 and "train.alpha must be positive" in out.stderr


def test_yaml_configs_and_overrides(tmp_path):
    """Shipped configs parse (paths pointed at real files) and list only known keys."""
    data = tmp_path / "d.jsonl"
    data.write_text("{}\n")
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        cfg = load_config(path, [f"model.checkpoint={tmp_path}", f"data.train_path={data}"])
        assert cfg.train.beta == 0.1 and cfg.lora.enabled
    cfg = load_config(ROOT / "configs" / "hh_rlhf_spl.yaml",
                      [f"model.checkpoint={tmp_path}", f"data.train_path={data}", "train.alpha=0.4"])
    assert (cfg.train.alpha, cfg.lora.rank, cfg.train.max_steps) == (0.4, 16, 5000)
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  alpah: 1.0\n")
    with pytest.raises(ConfigError, match="bad.yaml.*train.alpah"):
        load_config(bad)
    bad.write_text("!!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(bad)


def full_weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(run / "checkpoints" / f"step_{step:07d}" / "model" / "model.safetensors")


def test_fsdp_two_processes_equal_one(tiny_hf_model, tmp_path):
    """Full fine-tuning: FSDP2 over 2 gloo ranks equals one process (reference log-probs precomputed)."""
    args = ["train.py", f"model.checkpoint={tiny_hf_model}", f"data.train_path={HH}", *REAL,
            "lora.enabled=false"]
    run_script([*args, f"train.out_dir={tmp_path / 'one'}", "train.micro_batch_size=4"])
    run_script([*args, f"train.out_dir={tmp_path / 'two'}", "train.micro_batch_size=2"], nproc=2)
    a, b = full_weights(tmp_path / "one", 2), full_weights(tmp_path / "two", 2)
    base = load_file(tiny_hf_model / "model.safetensors")
    assert max((a[k] - base[k]).abs().max().item() for k in a) > 1e-4  # the weights did train
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def test_full_finetune_resume_equals_uninterrupted(tiny_hf_model, tmp_path):
    """Weights, optimizer moments and schedule of a full fine-tune come back exactly on resume."""
    args = ["train.py", f"model.checkpoint={tiny_hf_model}", f"data.train_path={HH}", *REAL,
            "lora.enabled=false", "train.save_every=2", "train.max_steps=4", f"train.out_dir={tmp_path}"]
    run_script(args)
    final = full_weights(tmp_path, 4)
    # Roll the run back to its step-2 checkpoint, as if it had been killed right after writing it.
    shutil.rmtree(tmp_path / "checkpoints" / "step_0000004")
    (tmp_path / "checkpoints" / "latest").write_text("step_0000002\n")
    out = run_script([*args, "train.resume=true"])
    assert "at step 2" in out.stdout + out.stderr
    a, b = final, full_weights(tmp_path, 4)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
