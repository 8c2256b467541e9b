"""Every shipped config starts on 1, 2, 4 and 8 ranks (where its global batch splits), under torchrun
with gloo on CPU, a tiny model and tiny data injected by overrides: 2 optimizer steps, an evaluation
on held-out pairs, a checkpoint. A batch that cannot split fails before any weights load, naming
the setting. (All configs share one torchrun job per rank count: tests/shipped_configs_worker.py.)"""

import json
import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from tests.conftest import ROOT, run_script

CONFIGS = sorted(p.stem for p in (ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("ranks", [1, 2, 4, 8])
def test_every_config_runs_on_n_ranks(tiny_hf_model, tmp_path, ranks):
    out = run_script(["tests/shipped_configs_worker.py", str(tmp_path), str(tiny_hf_model)], nproc=ranks)
    line = next(x for x in out.stdout.splitlines() if x.startswith("RESULT "))
    results = json.loads(line.removeprefix("RESULT "))
    assert sorted(results) == CONFIGS
    for name, result in results.items():
        run = tmp_path / f"{name}_{ranks}"
        if ranks == 8 and name == "ultrafeedback_spl":  # batch 4 cannot split over 8 ranks
            assert result["rc"] == 1, result
            assert "train.batch_size=4 cannot be split evenly over 8 ranks" in result["stderr"]
            assert not run.exists()  # stopped before the run directory, the data and the weights
            continue
        assert result["rc"] == 0, (name, result["stderr"])
        records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records if "loss" in r] == [1, 2]
        assert any("eval_rewards/accuracies" in r for r in records)  # held-out evaluation ran
        step = run / "checkpoints" / "step_0000002"
        assert (step / "adapter" / "adapter_model.safetensors").is_file()
        rng = [load_file(step / f"rng_rank{r}.safetensors")["cpu"] for r in range(ranks)]
        # Each rank draws its own dropout masks (the configs use LoRA dropout 0.05).
        assert all(not rng[0].equal(other) for other in rng[1:])


@pytest.mark.parametrize("overrides,message", [
    (["train.batch_size=4"], "train.batch_size=4 cannot be split evenly over 8 ranks: set train.batch_size "
                             "to a multiple of 8, or use a number of ranks that divides 4"),
    (["train.batch_size=8", "train.micro_batch_size=2"],
     "train.micro_batch_size=2 does not divide the per-rank share of 1 pairs (train.batch_size=8 over 8 "
     "ranks): set train.micro_batch_size=auto or to a divisor of 1"),
])
def test_indivisible_batch_fails_before_anything_loads(tmp_path, overrides, message):
    """torchrun's WORLD_SIZE alone decides: the layout is refused before the process group starts
    (no rendezvous needed here), before the run directory, the data and any weights."""
    env = {**os.environ, "WORLD_SIZE": "8", "RANK": "0", "LOCAL_RANK": "0", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "train.py", f"train.out_dir={tmp_path / 'r'}", *overrides]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 1
    assert out.stderr == f"train.py: {message}\n"  # one line, no traceback
    assert not (tmp_path / "r").exists()
