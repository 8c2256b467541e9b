"""The three scripts on a Llama-family checkpoint shaped as SmolLM2 (tied embeddings, rope_theta 1e5,
GQA 3:1, its real byte-level BPE tokenizer and ChatML template), on their default paths:
``torchrun train.py configs/smollm2_hh_spl.yaml`` (SPL and DPO on the shipped HH-RLHF pairs, and a
reward model), ``sample.py --global-temp 2`` and token-level, ``evaluate.py`` diversity and best-of-N;
the saved LoRA adapter loads in PEFT on transformers' Llama and gives our greedy text."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, run_script

CONFIG = ROOT / "configs" / "smollm2_hh_spl.yaml"
# The shipped config at test size: the real data file and template, a few steps of short sequences.
# A large learning rate so that two steps move the adapter visibly (the PEFT check needs that).
SMALL = ["data.max_len=80", "data.max_prompt_len=48", "data.eval_size=8", "train.max_steps=2",
         "train.warmup_steps=0", "train.eval_every=2", "train.save_every=2", "train.log_every=1",
         "train.batch_size=4", "train.lr=0.05"]
PROMPT = "How do I bake bread?"


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tiny_llama_model, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("llama_runs")
    base = ["train.py", str(CONFIG), f"model.checkpoint={tiny_llama_model}", *SMALL]
    runs = {"spl": out / "spl", "dpo": out / "dpo", "rm": out / "rm"}
    logs = {"spl": run_script([*base, f"train.out_dir={runs['spl']}"], nproc=2)}
    logs["dpo"] = run_script([*base, "train.alpha=0.1", f"train.out_dir={runs['dpo']}"])
    logs["rm"] = run_script([*base, "train.mode=reward", "lora.enabled=false", f"train.out_dir={runs['rm']}"])
    for name, log in logs.items():
        text = log.stdout + log.stderr
        assert "chatml" in text and "You are a helpful AI assistant named SmolLM" in text, (name, text[-999:])
    return runs


def latest(run: Path) -> Path:
    return run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()


def test_training_runs_the_shipped_config(runs):
    for name in ("spl", "dpo", "rm"):
        state = json.loads((latest(runs[name]) / "trainer_state.json").read_text())
        assert state["step"] == 2
    config = json.loads((latest(runs["spl"]) / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 16


def test_sample_global_and_token_level(runs, tmp_path):
    g, t = tmp_path / "g.jsonl", tmp_path / "t.jsonl"
    proc = run_script(["sample.py", "--checkpoint", str(runs["spl"]), "--prompt", PROMPT,
                       "--global-temp", "2", "--num-samples", "2", "--max-new-tokens", "8",
                       "--output", str(g)])
    assert "chatml" in proc.stdout + proc.stderr and "named SmolLM" in proc.stdout + proc.stderr
    rows = read(g)
    assert len(rows) == 2 and all(r["method"] in ("smc", "resample") and r["temperature"] == 2 for r in rows)
    run_script(["sample.py", "--checkpoint", str(runs["spl"]), "--prompt", PROMPT, "--temperature", "1.4",
                "--top-p", "0.9", "--num-samples", "3", "--max-new-tokens", "8", "--output", str(t)])
    rows = read(t)
    assert len(rows) == 3 and all(r["method"] == "token" and 1 <= r["num_tokens"] <= 8 for r in rows)
    # Under ChatML the printout shows the turn and where the answer starts, not the prompt glued to it.
    assert "[prompt 0, sample 0] logp=" in proc.stdout
    assert f"user: {PROMPT}\nassistant: " in proc.stdout, proc.stdout[-1000:]


def test_evaluate_diversity_and_best_of_n(runs, tmp_path):
    out = tmp_path / "eval"
    run_script(["evaluate.py", "--checkpoint", str(runs["dpo"]), "--checkpoint", str(runs["spl"]),
                "--suite", "diversity,bestofn", "--datasets", "gsm8k", "--reward-model", str(runs["rm"]),
                "--num-prompts", "2", "--num-samples", "2", "--max-new-tokens", "8", "--limit", "2",
                "--bestofn-samples", "4", "--temperature", "1,1.4", "--out", str(out)])
    results = json.loads((out / "results.json").read_text())
    assert len(results["diversity"]) == 4  # two models x two temperatures
    for row in results["diversity"].values():
        assert row["prompts"] == 2 and row["reference_cross_entropy"] > 0 and isinstance(row["reward"], float)
        assert 0 <= row["non_word_token_rate"] <= 1
    rows = results["best_of_n"]["gsm8k"]["all"]
    assert len(rows) == 4 and all(r["problems"] == 2 and 0 <= r["pass@1"] <= r["pass@4"] <= 1
                                  for r in rows.values())


def test_adapter_loads_in_peft_with_the_same_greedy_text(runs, tiny_llama_model, tmp_path):
    """Our adapter on transformers' Llama through PEFT gives our greedy continuation token for token,
    and the adapter matters (the base model's logits differ)."""
    peft = pytest.importorskip("peft", reason="PEFT is the adapter oracle")
    transformers = pytest.importorskip("transformers", reason="transformers is the oracle")
    ours = tmp_path / "ours.jsonl"
    run_script(["sample.py", "--checkpoint", str(runs["spl"]), "--prompt", PROMPT, "--temperature", "0",
                "--max-new-tokens", "12", "--output", str(ours)])
    row = read(ours)[0]

    hf_tok = transformers.AutoTokenizer.from_pretrained(tiny_llama_model)  # its own template, default system
    prompt = hf_tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True)
    prompt = list(prompt["input_ids"] if isinstance(prompt, dict) or hasattr(prompt, "keys") else prompt)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_model, torch_dtype=torch.float32).eval()
    model = peft.PeftModel.from_pretrained(hf, latest(runs["spl"]) / "adapter").eval()
    x = torch.tensor([prompt])
    with torch.no_grad():
        gen = model.generate(x, max_new_tokens=row["num_tokens"], do_sample=False, eos_token_id=None,
                             pad_token_id=0)
        with model.disable_adapter():
            base = model(x).logits
        assert (model(x).logits - base).abs().max() > 1e-3
    assert hf_tok.decode(gen[0, len(prompt):].tolist()) == row["completion"]
