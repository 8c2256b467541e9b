"""experiments/real_model.py's own logic: resuming stages, bootstrap intervals, the computed verdicts.

The experiment itself runs on the real SmolLM2 (``--quick``: 6.5 min; its report is in
docs/real_model_quick); these tests check the parts whose mistakes would not show in a report.
"""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def rm():
    path = ROOT / "experiments" / "real_model.py"
    spec = importlib.util.spec_from_file_location("real_model_experiment", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bootstrap_interval_is_the_mean_over_prompts(rm):
    rng = np.random.default_rng(1)
    values = list(rng.normal(2.0, 1.0, size=40))
    ci = rm.bootstrap(values + [None])  # a prompt without a value (no embedder) is left out
    assert ci["mean"] == pytest.approx(float(np.mean(values)))
    assert ci["lo"] < ci["mean"] < ci["hi"]
    # The 95% interval of a mean of 40 N(., 1) values is about +-1.96 / sqrt(40) = +-0.31 wide.
    assert 0.2 < (ci["hi"] - ci["lo"]) / 2 < 0.45
    assert rm.bootstrap([3.0, 3.0, 3.0]) == {"mean": 3.0, "lo": 3.0, "hi": 3.0}
    assert rm.bootstrap([None]) == {"mean": None, "lo": None, "hi": None}


def test_interpolation_and_interval_verdicts(rm):
    curve = [(0.5, 1.0), (0.3, 2.0), (0.7, 0.0)]  # unsorted on purpose
    assert rm._interpolate(curve, 0.4) == pytest.approx(1.5)
    assert rm._interpolate(curve, 0.7) == pytest.approx(0.0)
    assert rm._interpolate(curve, 0.8) is None and rm._interpolate(curve, 0.2) is None
    a, b = {"mean": 1.0, "lo": 0.9, "hi": 1.1}, {"mean": 0.5, "lo": 0.4, "hi": 0.6}
    assert rm._versus(a, b).startswith("higher")
    assert rm._versus(b, a).startswith("lower")
    assert rm._versus(a, {"mean": 1.05, "lo": 1.0, "hi": 1.2}).startswith("not separated")
    assert rm._versus(a, {"mean": None}) == "not measured"


def ci(m: float, half: float = 0.05) -> dict:
    return {"mean": m, "lo": m - half, "hi": m + half}


def synthetic_table(spl_reward: float) -> dict:
    table = {}
    for t, (div, reward, nw) in {
        "1": (0.3, 2.0, 0.01),
        "1.2": (0.4, 1.6, 0.02),
        "1.4": (0.5, 1.0, 0.2),
        "1.6": (0.6, 0.4, 0.4),
    }.items():
        table[f"DPO t={t}"] = {
            "embedding_cosine_distance": ci(div),
            "reward": ci(reward),
            "non_word_token_rate": ci(nw, 0.005),
            "reference_cross_entropy": ci(2.0),
        }
    table["SPL T=2 t=1"] = {
        "embedding_cosine_distance": ci(0.45),
        "reward": ci(spl_reward),
        "non_word_token_rate": ci(0.01),
        "reference_cross_entropy": ci(2.1),
    }
    table["DPO T_global=2"] = {
        "embedding_cosine_distance": ci(0.5),
        "reward": ci(0.0),
        "non_word_token_rate": ci(0.3),
        "reference_cross_entropy": ci(9.0),
    }
    return table


def test_findings_compute_each_verdict(rm):
    bon = {
        "settings": {
            "DPO t=1": {
                "splits": {"all": {"problems": 4, "pass@4": 0.25}, "hard": {"problems": 2, "pass@4": 0.0}}
            },
            "SPL T=2 t=1": {
                "splits": {"all": {"problems": 4, "pass@4": 0.5}, "hard": {"problems": 2, "pass@4": 0.5}}
            },
        }
    }
    # DPO's token-temperature line gives 1.3 at diversity 0.45 (between t = 1.2 and 1.4).
    above = "\n".join(rm.findings(synthetic_table(1.6), bon, [1, 4]))
    assert (
        "SPL T=2 t=1 reward 1.600 [1.550, 1.650] at embedding cosine distance 0.450: "
        "better than DPO's line (1.300"
        in above
    )
    below = "\n".join(rm.findings(synthetic_table(1.0), bon, [1, 4]))
    assert (
        "reward 1.000 [0.950, 1.050] at embedding cosine distance 0.450: worse than DPO's line (1.300"
        in below
    )
    assert (
        "reward 1.320 [1.270, 1.370] at embedding cosine distance 0.450: "
        "on DPO's line within the interval (1.300"
        in ("\n".join(rm.findings(synthetic_table(1.32), bon, [1, 4])))
    )
    # Cross-entropy: lower is better. SPL's 2.1 against DPO's line at 2.0: worse, intervals clear.
    assert (
        "reference CE 2.100 [2.050, 2.150] at embedding cosine distance 0.450: worse than DPO's line (2.000"
        in above
    )
    assert "t=1.4 against t=1: higher (intervals disjoint)" in above
    assert "pass@4 on the hard split (2 GSM8K problems" in above
    assert "DPO t=1 0.000, SPL T=2 t=1 0.500" in above
    assert "reference cross-entropy SPL 2.100 [2.050, 2.150] vs tempered DPO 9.000" in above
    tail = {"positions": 10, "share": {"1": 0.04, "1.5": 0.3, "2": 0.6, "4": 0.9}}
    why = "\n".join(rm.findings(synthetic_table(1.6), bon, [1, 4], tail))
    assert "hold 0.040 of its probability, but 0.300 of p^(1/1.5), 0.600 of p^(1/2), 0.900 of p^(1/4)" in why


def test_tail_share_of_tempered_distribution(rm):
    """The tail stage's quantity on distributions whose answer is known: one token at 0.9 and 10^4
    sharing 0.1 (each 1e-5 < TAIL_P): p^(1/T) gives the tail 1e4 (1e-5)^(1/T) / (0.9^(1/T) + that)."""
    import torch

    head = torch.tensor([0.9], dtype=torch.float64)
    p = torch.cat([head, torch.full((10_000,), 1e-5, dtype=torch.float64)])
    flat = torch.full((1, 10), 0.1, dtype=torch.float64).log()  # nothing below TAIL_P: no tail
    shares = rm.tail_share(torch.cat([p.log()[None], p.log()[None] + 3.0]), (1.0, 2.0, 4.0))
    for t in (1.0, 2.0, 4.0):
        tail = 1e4 * 1e-5 ** (1 / t)
        assert shares[t].tolist() == pytest.approx([tail / (0.9 ** (1 / t) + tail)] * 2, rel=1e-9)
    assert float(rm.tail_share(flat, (2.0,))[2.0][0]) == 0.0


def test_stages_resume_only_with_the_same_settings(rm, tmp_path):
    path = tmp_path / "stage.json"
    assert rm.cached(path, {"a": 1}) is None
    rm.save(path, {"a": 1}, {"value": 7, "seconds": 3.0})
    assert rm.cached(path, {"a": 1})["value"] == 7
    assert rm.cached(path, {"a": 2}) is None  # other settings: the stage runs again
    assert not list(tmp_path.glob("*.tmp*"))  # written atomically, nothing left behind
    times = rm.stage_times(
        {"dpo": {"seconds": 10.0}, "rm": {"seconds": 5.0}},
        {"x": {"seconds": 2.0}},
        {"difficulty": {"seconds": 1.0}, "settings": {"y": {"seconds": 4.0}}},
    )
    assert times == {"training": 15.0, "diversity": 2.0, "best-of-N": 5.0, "total": 22.0}


def test_data_split_is_seeded_disjoint_and_cached(rm, tmp_path):
    s = dict(rm.SIZES["quick"])
    first = rm.split_data(tmp_path, s, seed=0)
    train = (tmp_path / "data" / "train.jsonl").read_text().splitlines()
    held = (tmp_path / "data" / "heldout.jsonl").read_text().splitlines()
    assert len(train) == s["train_pairs"] and len(held) == s["heldout_pairs"]
    assert not set(first["train_lines"]) & set(first["heldout_lines"])  # held-out prompts never trained on
    assert not set(train) & set(held)
    again = rm.split_data(tmp_path, s, seed=0)
    assert again["train_lines"] == first["train_lines"]
    other = rm.split_data(tmp_path / "other", s, seed=1)
    assert other["train_lines"] != first["train_lines"]
    json.loads(train[0])  # the shipped records, whole


def test_trained_models_are_not_retrained(rm, tmp_path, monkeypatch):
    """A finished training stage (saved settings + a latest checkpoint) is skipped: no subprocess."""
    s = dict(rm.SIZES["quick"])
    key = rm.split_data(tmp_path, s, seed=0)["settings_key"]

    def finished_run(cmd, **kw):
        out = Path(next(a for a in cmd if a.startswith("train.out_dir=")).split("=", 1)[1])
        (out / "checkpoints").mkdir(parents=True)
        (out / "checkpoints" / "latest").write_text("step_0000003\n")
        (out / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 0.7}) + "\n")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(rm.subprocess, "run", finished_run)
    runs = rm.train(tmp_path, s, seed=0, threads=1, data_key=key)
    assert set(runs) == {*rm.MODELS, "rm"} and runs["dpo"]["losses"] == [0.7]

    def must_not_run(cmd, **kw):
        raise AssertionError(f"retrained: {cmd}")

    monkeypatch.setattr(rm.subprocess, "run", must_not_run)
    assert rm.train(tmp_path, s, seed=0, threads=1, data_key=key)["rm"]["losses"] == [0.7]
    with pytest.raises(AssertionError, match="retrained"):  # another split: it trains again
        rm.train(tmp_path, s, seed=0, threads=1, data_key=rm.split_data(tmp_path, s, seed=1)["settings_key"])
    s["lr"] = 1e-4  # other settings: it trains again
    with pytest.raises(AssertionError, match="retrained"):
        rm.train(tmp_path, s, seed=0, threads=1, data_key=key)


def test_cli_errors_are_one_line(tmp_path):
    script = ROOT / "experiments" / "real_model.py"
    proc = subprocess.run(
        [sys.executable, str(script), "--threads", "0", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "--threads and --batch-size must be positive" in last
