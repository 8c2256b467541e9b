"""sample.py: every input checked before a model is loaded; end to end on the demo checkpoint."""

import json

import pytest

import sample
from spl.config import ModelConfig
from spl.demo import train_demo_tokenizer
from spl.layouts import model_config_to_hf
from tests.conftest import run_script


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


# ----------------------------------------------------------------------------------------------
# Validation, in process: no model is ever loaded


@pytest.fixture(scope="module")
def unloadable(tmp_path_factory):
    """An HF-layout directory whose config and tokenizer are fine but whose weights cannot load: any
    error that only a load could produce would show up as a load failure, not as exit code 2."""
    root = tmp_path_factory.mktemp("ckpt")
    train_demo_tokenizer(root / "tokenizer.model")
    cfg = ModelConfig(dim=16, n_layers=1, head_dim=8, hidden_dim=32, n_heads=2, n_kv_heads=1, vocab_size=160,
                      rope_theta=1e4, max_seq_len=64)
    (root / "config.json").write_text(json.dumps(model_config_to_hf(cfg)))
    (root / "model.safetensors").write_bytes(b"not weights")
    (root / "tokenizer_config.json").write_text("{}")  # no chat template: a base model, plain-text prompts
    return root


@pytest.fixture
def no_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the inputs were checked")
    monkeypatch.setattr("spl.inference.load_for_inference", refuse)


def rejected(capsys, argv: list[str]) -> str:
    """Run sample.py's main on argv; it must exit with code 2 and print exactly one line."""
    with pytest.raises(SystemExit) as exit_info:
        sample.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2, err
    assert len(err) == 1 and err[0].startswith("sample.py: error: "), err
    return err[0]


@pytest.mark.parametrize("args, message", [
    (["--top-p", "2"], "--top-p must lie in (0, 1]"),
    (["--top-p", "0"], "--top-p must lie in (0, 1]"),
    (["--temperature", "-1"], "--temperature must be a finite number >= 0"),
    (["--temperature", "nan"], "--temperature must be a finite number >= 0"),
    (["--top-k", "0"], "--top-k must be a positive integer"),
    (["--min-p", "1.5"], "--min-p must lie in [0, 1]"),
    (["--global-temp", "2", "--num-candidates", "0"], "--num-candidates (0) must be at least --num-samples"),
    (["--global-temp", "2", "--num-samples", "8", "--num-candidates", "4"], "at least --num-samples (8)"),
    (["--global-temp", "0"], "--global-temp must be a positive number"),
    (["--global-temp", "2", "--top-p", "0.9"], "--global-temp replaces token-level --top-p"),
    (["--num-candidates", "8"], "--num-candidates only apply with --global-temp"),
    (["--global-temp", "2", "--method", "resample", "--moves", "2"], "--moves must be >= 0, and applies to"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--stop", ""], "--stop needs a non-empty text"),
    (["--max-new-tokens", "100"], "exceeds the model's context of 64 tokens"),
    (["--device", "cuda:99"], "no such CUDA device here"),
    (["--device", "gpu"], "is not a device"),
    (["--tokenizer", "/nonexistent/tokenizer.model"], "--tokenizer file not found"),
    (["--output", "/nonexistent/dir/out.jsonl"], "--output: directory /nonexistent/dir does not exist"),
])
def test_bad_option_is_one_line_and_exit_2(unloadable, no_loading, capsys, args, message):
    line = rejected(capsys, ["--checkpoint", str(unloadable), "--prompt", "Question: hi", *args])
    assert message in line


@pytest.mark.parametrize("record, message", [
    ('["a list"]', "line 2: expected an object with 'prompt' or 'messages', got a list"),
    ('{"oops": 1}', "line 2: needs either a 'prompt' string or a 'messages' list"),
    ('{"messages": [{"role": "user"}]}', "line 2: 'messages' must be a non-empty list"),
    ('{"messages": [{"role": "assistant", "content": "hi"}]}', "prompt 1: conversation must start with"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}',
     "prompt 1: a prompt must end with a user turn"),
    ('{"prompt": "x"', "line 2: invalid JSON"),
])
def test_bad_prompts_file_names_the_line(unloadable, no_loading, capsys, tmp_path, record, message):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hi"}\n' + record + "\n")
    line = rejected(capsys, ["--checkpoint", str(unloadable), "--prompts-file", str(prompts)])
    assert message in line and ("p.jsonl" in line or line.startswith("sample.py: error: prompt"))


def test_missing_checkpoint(no_loading, capsys, tmp_path):
    assert "--checkpoint directory not found" in rejected(capsys, ["--checkpoint", str(tmp_path / "nope")])


# ----------------------------------------------------------------------------------------------
# End to end on the demo checkpoint


def test_global_temperature_on_demo_checkpoint(demo_run, tmp_path):
    out = tmp_path / "s.jsonl"
    run = run_script(["sample.py", "--checkpoint", str(demo_run), "--global-temp", "2", "--num-samples", "3",
                      "--max-new-tokens", "6", "--batch-size", "20", "--output", str(out)])
    rows = read(out)
    assert len(rows) == 6 * 3  # the demo's six questions by default
    for r in rows:
        assert set(r) == {"prompt", "completion", "num_tokens", "logp", "finish_reason", "method",
                          "temperature", "sampler"}
        assert r["method"] == "smc" and r["temperature"] == 2 and 1 <= r["num_tokens"] <= 6 and r["logp"] < 0
        d = r["sampler"]
        assert d["num_candidates"] == 16 and 1 <= d["ess"] <= 16 and 1 <= d["distinct_samples"] <= 3
        assert 1 <= d["distinct_lineages"] <= 3 and d["min_step_ess"] <= d["ess"] + 1e-6
        assert r["finish_reason"] in ("eos", "length")
    # The terminal shows each prompt's diagnostics.
    assert run.stdout.count("distinct of 3 from") == 6 and "lowest per step" in run.stdout


def test_token_level_same_seed_same_text_and_layouts(demo_run, tmp_path):
    step = demo_run / "checkpoints" / (demo_run / "checkpoints" / "latest").read_text().strip()
    args = ["--prompt", "Question: Which pet would you rather have?", "--num-samples", "4",
            "--temperature", "0.9", "--top-k", "20", "--min-p", "0.05", "--seed", "3"]
    a, b, c = tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "c.jsonl"
    run_script(["sample.py", "--checkpoint", str(demo_run), *args, "--output", str(a)])
    run_script(["sample.py", "--checkpoint", str(step), *args, "--output", str(b)])
    # The same model named as base directory + PEFT adapter directory.
    run_script(["sample.py", "--checkpoint", str(demo_run / "reference"), "--adapter", str(step / "adapter"),
                *args, "--output", str(c)])
    ra, rb, rc = read(a), read(b), read(c)
    assert [r["completion"] for r in ra] == [r["completion"] for r in rb] == [r["completion"] for r in rc]
    assert all(r["method"] == "token" and r["sampler"] is None for r in ra)


def test_smc_with_moves_and_stop_strings(demo_run, tmp_path):
    out = tmp_path / "smc.jsonl"
    run_script(["sample.py", "--checkpoint", str(demo_run), "--global-temp", "0.5", "--method", "smc",
                "--moves", "1", "--num-samples", "2", "--max-new-tokens", "5", "--stop", "A",
                "--output", str(out)])
    rows = read(out)
    assert all(r["method"] == "smc" and r["sampler"]["resamples"] >= 0 for r in rows)
    # Answers are one letter (" A"); A is the majority answer of four of the six questions: the stop
    # string "A" ends those answers, and is cut from the text.
    stopped = [r for r in rows if r["finish_reason"] == "stop"]
    assert stopped and all("A" not in r["completion"] for r in stopped)
