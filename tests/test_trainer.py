"""train.py end to end: DDP equals one process, kill-and-resume equals
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
from spl.distributed import TrainingError
from tests.conftest import ROOT, run_script


def adapter(run: Path) -> dict[str, torch.Tensor]:
    latest = (run / "checkpoints" / "latest").read_text().strip()
    return load_file(run / "checkpoints" / latest / "adapter" / "adapter_model.safetensors")


def with_reference(demo_run: Path, out: Path) -> Path:
    """A fresh output directory that reuses the demo's fitted reference (skips stage 1)."""
    out.mkdir(parents=True)
    shutil.copytree(demo_run / "reference", out / "reference")
    return out


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
    # Summation order differs between one and two ranks; Adam's 1/sqrt(v) turns that into ~1e-6 on
    # weights whose gradients are tiny. A wrong average (a rank's share, or a sum) moves them by ~lr.
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-5)


def adapter_init(key: str, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.zeros_like(tensors[key])  # lora_B starts at zero


def test_kill_and_resume_equals_uninterrupted(demo_run, tmp_path):
    """SIGKILL a run after its step-10 checkpoint; ``train.resume=true`` ends where a clean run ends."""
    common = ["train.max_steps=40", "train.save_every=5", "train.warmup_steps=2", "lora.dropout=0.1",
              "train.batch_size=16", "train.micro_batch_size=8", "train.log_every=1"]  # dropout +
    # accumulation: RNG and data position must both be restored for the results to match; every
    # step is logged, so the killed run logged steps past its checkpoint that must not appear twice
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
    steps = lambda run: [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert steps(killed) == steps(clean) == list(range(1, 41))


# ----------------------------------------------------------------------------- real-data path

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
    # The logged lr is the one the step used: no warmup, so step 1 runs at the full 1e-3 (the
    # cosine schedule then halves the way to the floor: 1e-3 * (0.1 + 0.9 * 0.5) at step 2).
    assert [r["lr"] for r in records if "loss" in r] == pytest.approx([1e-3, 5.5e-4])
    # Throughput over all tokens and over the response tokens the loss reads, both logged.
    assert all(r["tokens_per_s"] > r["response_tokens_per_s"] > 0 for r in records if "loss" in r)
    ckpt = out / "checkpoints" / "step_0000002"
    weights = ["dcp/.metadata", "model_config.json"] if extra else ["adapter/adapter_config.json"]
    assert all((ckpt / w).is_file() for w in weights)
    assert not (ckpt / "model").exists()  # full weights are exported on demand, not at every save
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
    from spl.checkpoint import load_sharded_model

    model, _ = load_sharded_model(run / "checkpoints" / f"step_{step:07d}")
    return model.state_dict()


@pytest.mark.parametrize("family", ["mistral", "llama-tied"])
def test_fsdp_two_processes_equal_one(family, request, tmp_path):
    """Full fine-tuning: FSDP2 over 2 gloo ranks equals one process (reference log-probs precomputed).
    The tied Llama trains its one embedding/output tensor through both uses and keeps it one tensor
    through the DCP checkpoint."""
    model_dir = request.getfixturevalue("tiny_hf_model" if family == "mistral" else "tiny_llama_model")
    template = [] if family == "mistral" else ["data.chat_template=chatml"]
    args = ["train.py", f"model.checkpoint={model_dir}", f"data.train_path={HH}", *REAL, *template,
            "lora.enabled=false"]
    run_script([*args, f"train.out_dir={tmp_path / 'one'}", "train.micro_batch_size=4"])
    run_script([*args, f"train.out_dir={tmp_path / 'two'}", "train.micro_batch_size=2"], nproc=2)
    a, b = full_weights(tmp_path / "one", 2), full_weights(tmp_path / "two", 2)
    base = load_file(model_dir / "model.safetensors")
    hf = lambda k: k if k == "lm_head.weight" else "model." + k  # noqa: E731
    assert max((a[k] - base[hf(k)]).abs().max().item() for k in a if hf(k) in base) > 1e-4  # it trained
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    if family == "llama-tied":
        assert "lm_head.weight" not in base
        for w in (a, b):
            assert torch.equal(w["lm_head.weight"], w["embed_tokens.weight"])
        assert (a["embed_tokens.weight"] - base["model.embed_tokens.weight"]).abs().max() > 1e-4


# ----------------------------------------------------------------------------- one step, in process

def build_run(model_dir: Path, out: Path, *overrides: str, train_path: Path = HH):
    """The Trainer train.py would run (``spl.trainer.build``), in this process on one rank."""
    from spl.trainer import DistEnv, build

    cfg = load_config(None, [f"model.checkpoint={model_dir}", f"data.train_path={train_path}", *REAL,
                             f"train.out_dir={out}", *overrides])
    return build(cfg, DistEnv())


def head(path: Path, lines: int, out: Path) -> Path:
    out.write_text("".join(path.read_text().splitlines(keepends=True)[:lines]))
    return out


@pytest.mark.parametrize("extra", [["lora.enabled=false"], ["train.ref_cache={tmp}/ref.safetensors"]],
                         ids=["full", "lora-ref-cache"])
def test_eval_reference_is_the_eval_sets_own(tiny_hf_model, tmp_path, extra):
    """After one step at a negligible learning rate the policy is still the reference, so on a
    distinct eval file (larger than the training file) eval policy log-probs equal eval reference
    log-probs: the eval pairs met their own cached reference, not training pairs at the same index."""
    small = head(HH, 10, tmp_path / "train.jsonl")
    extra = [e.format(tmp=tmp_path) for e in extra]
    trainer = build_run(tiny_hf_model, tmp_path / "run", f"data.eval_path={HH}", "data.format=hh",
                        "train.lr=1e-12", "train.max_steps=1", "train.eval_every=1", *extra, train_path=small)
    assert len(trainer.eval_data) > len(trainer.train_data)
    last = trainer.train()
    for side in ("chosen", "rejected"):
        assert last[f"eval_logps/{side}"] == pytest.approx(last[f"eval_logps/ref_{side}"], rel=1e-5)
    # The eval set's reference has its own file, keyed to the eval data.
    assert len(list((tmp_path).rglob("*.eval.safetensors"))) == 1


def test_inf_gradient_stops_before_the_update(tiny_hf_model, tmp_path):
    """An inf gradient with a finite loss: no update, no checkpoint, and the error names the step and
    the last checkpoint, whose weights are finite (the old loop applied it and saved NaNs)."""
    trainer = build_run(tiny_hf_model, tmp_path / "run", "train.max_steps=5", "train.save_every=1")
    target = trainer.scorer.model.layers[0].self_attn.q_proj.lora_b
    target.register_hook(lambda g: torch.full_like(g, float("inf")) if trainer.step == 2 else g)
    with pytest.raises(TrainingError) as err:
        trainer.train()
    step2 = tmp_path / "run" / "checkpoints" / "step_0000002"
    assert str(err.value).startswith("non-finite gradient norm (inf, loss ")
    assert f"at step 3; stopping without updating the weights. Last good checkpoint: {step2}" \
        in str(err.value)
    assert not (tmp_path / "run" / "checkpoints" / "step_0000003").exists()
    saved = load_file(step2 / "adapter" / "adapter_model.safetensors")
    assert all(torch.isfinite(t).all() for t in saved.values())
    live = trainer.scorer.model.layers[0].self_attn.q_proj.lora_b
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    assert torch.equal(live.detach(), saved[key])  # nothing was applied after step 2


def test_sft_loss_is_the_global_batch_token_mean(tiny_hf_model, tmp_path):
    """SFT divides by the tokens of the whole global batch: accumulating over micro-batches of
    unequal token counts gives the gradient and loss of one forward over the batch, which equal an
    independent computation of -sum log pi / tokens (the old per-micro-batch mean did not)."""
    from spl.logprobs import sequence_logps

    data = tmp_path / "sft.jsonl"
    words = ["alpha", "beta gamma delta", "epsilon " * 9, "zeta eta", "theta " * 20, "iota kappa lambda mu"]
    data.write_text("".join(json.dumps({"prompt": f"say {i}", "response": w}) + "\n"
                            for i, w in enumerate(words)))
    grads, losses = {}, {}
    for micro in ("auto", "1"):
        trainer = build_run(tiny_hf_model, tmp_path / f"run{micro}", "train.mode=sft", "lora.enabled=false",
                            f"train.micro_batch_size={micro}", "train.grad_clip=0", train_path=data)
        params = list(trainer.scorer.parameters())
        indices = next(trainer.batches.indices())
        if micro == "auto":
            # The oracle: one plain forward over the batch's sequences, -sum log pi / their tokens.
            batch = trainer.train_data.collate(indices)
            h = trainer.scorer.model(batch["input_ids"], return_hidden=True)
            logps = sequence_logps(h, trainer.scorer.model.lm_head.weight, batch["targets"],
                                   batch["loss_mask"], impl="plain")
            oracle = -logps.sum() / batch["loss_mask"].sum()
            oracle.backward()
            oracle_grads = [p.grad.clone() for p in params]
            trainer.optimizer.zero_grad(set_to_none=True)
            counts = batch["loss_mask"].sum(1)
            assert counts.min() < counts.max()  # unequal token counts: per-micro-batch means would differ
        captured = []
        trainer.optimizer.register_step_pre_hook(  # the gradient the update is about to use
            lambda *_, captured=captured, params=params: captured.append([p.grad.clone() for p in params]))
        losses[micro] = trainer.train_step(indices)["loss"]
        grads[micro] = captured[0]
    for micro in ("auto", "1"):
        assert losses[micro] == pytest.approx(oracle.item(), rel=1e-5)
        for got, want in zip(grads[micro], oracle_grads, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)


def test_held_out_split_is_seeded_and_checked(tiny_hf_model, tmp_path, capsys):
    from spl.trainer import TrainingError as Error

    a = build_run(tiny_hf_model, tmp_path / "a", "data.eval_size=8")
    b = build_run(tiny_hf_model, tmp_path / "b", "data.eval_size=8")
    c = build_run(tiny_hf_model, tmp_path / "c", "data.eval_size=8", "train.seed=1")
    assert "eval data: held out 8 of 37 records" in capsys.readouterr().out
    assert len(a.eval_data) == 8 and len(a.train_data) == 29
    assert not set(map(repr, a.eval_data)) & set(map(repr, a.train_data))  # disjoint
    assert list(map(repr, a.eval_data)) == list(map(repr, b.eval_data))  # the same seed, the same split
    assert list(map(repr, a.eval_data)) != list(map(repr, c.eval_data))
    with pytest.raises(Error, match=r"data.eval_size=34 leaves 3 of the 37 usable records .* fewer than one"):
        build_run(tiny_hf_model, tmp_path / "d", "data.eval_size=34")
    with pytest.raises(ConfigError, match="data.eval_size and data.eval_path both"):
        load_config(None, ["data.eval_size=4", f"data.eval_path={HH}"])


def test_base_fingerprint_covers_every_tensor(tiny_hf_model):
    """The reference cache's key changes with any base weight (the old key read lm_head only) and
    ignores LoRA factors, which the reference pass disables."""
    from spl.checkpoint import load_model
    from spl.lora import apply_lora
    from spl.reference import base_fingerprint

    model, _ = load_model(tiny_hf_model)
    before = base_fingerprint(model)
    apply_lora(model, rank=2, alpha=2)
    assert base_fingerprint(model) == before
    with torch.no_grad():
        w = model.layers[0].mlp.down_proj.weight
        w[3, 5] = torch.nextafter(w[3, 5], torch.tensor(1.0))  # one ulp in one element of layer 0
    assert base_fingerprint(model) != before
    with torch.no_grad():
        w[3, 5], w[5, 3] = w[5, 3].clone(), w[3, 5].clone()  # swapping values changes it too
    assert base_fingerprint(model) != before


@pytest.mark.parametrize("setup,overrides,message", [
    ("used", [], "already holds a run (metrics.jsonl, checkpoints): set train.resume=true to continue it, "
                 "train.overwrite=true to start afresh"),
    ("dangling", ["train.resume=true"], "checkpoints/latest names step_0000009, which does not exist"),
    ("empty_eval", ["data.eval_path={tmp}/empty.jsonl"], "empty.jsonl: no usable records"),
    ("none", ["data.eval_size=36"], "data.eval_size=36 leaves 1 of the 37 usable records"),
])
def test_bad_run_inputs_stop_with_one_line(tiny_hf_model, tmp_path, setup, overrides, message):
    """Each stops before any weights load (the model directory's weights are unreadable here), with
    one line on stderr, exit code 1 and no traceback."""
    model = tmp_path / "model"
    shutil.copytree(tiny_hf_model, model)
    (model / "model.safetensors").write_bytes(b"not loaded: the checks come first")
    run = tmp_path / "run"
    (tmp_path / "empty.jsonl").write_text("\n")
    if setup in ("used", "dangling"):
        (run / "checkpoints").mkdir(parents=True)
        (run / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
        (run / "checkpoints" / "latest").write_text("step_0000009\n")
    out = run_script(["train.py", f"model.checkpoint={model}", f"data.train_path={HH}", *REAL,
                      f"train.out_dir={run}", *(o.format(tmp=tmp_path) for o in overrides)], check=False)
    assert out.returncode == 1, out.stderr
    assert message in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr, out.stderr
