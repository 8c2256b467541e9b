"""sample.py end to end on the demo checkpoint: every way of naming a model, both samplers, output."""

import json

from tests.conftest import run_script


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_global_temperature_on_demo_checkpoint(demo_run, tmp_path):
    out = tmp_path / "s.jsonl"
    run_script(["sample.py", "--checkpoint", str(demo_run), "--global-temp", "2", "--num-samples", "3",
                "--max-new-tokens", "6", "--output", str(out)])
    rows = read(out)
    assert len(rows) == 6 * 3  # the demo's six questions by default
    for r in rows:
        assert set(r) == {"prompt", "completion", "num_tokens", "logp", "method", "temperature", "ess"}
        assert r["method"] == "resample" and r["temperature"] == 2 and 1 <= r["ess"] <= 16
        assert 1 <= r["num_tokens"] <= 6 and r["logp"] < 0


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
    assert all(r["method"] == "token" and r["ess"] is None for r in ra)


def test_smc_and_errors(demo_run, tmp_path):
    out = tmp_path / "smc.jsonl"
    run_script(["sample.py", "--checkpoint", str(demo_run), "--global-temp", "0.5", "--method", "smc",
                "--num-samples", "2", "--max-new-tokens", "5", "--output", str(out)])
    assert all(r["method"] == "smc" for r in read(out))
    bad = run_script(["sample.py", "--checkpoint", str(demo_run), "--global-temp", "2", "--top-p", "0.9"],
                     check=False)
    assert bad.returncode == 2 and "--global-temp replaces token-level" in bad.stderr
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hi"}\n{"oops": 1}\n')
    bad = run_script(["sample.py", "--checkpoint", str(demo_run), "--prompts-file", str(prompts)],
                     check=False)
    assert bad.returncode != 0 and "p.jsonl, line 2" in bad.stderr
    missing = run_script(["sample.py", "--checkpoint", str(tmp_path / "nope")], check=False)
    assert missing.returncode == 1 and "checkpoint not found" in missing.stderr
