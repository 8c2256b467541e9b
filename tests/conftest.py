"""Shared test fixtures: a fixed seed for every test, and one run of the embedded demo."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def run_script(args: list[str], *, nproc: int | None = None, timeout: float = 900,
               check: bool = True) -> subprocess.CompletedProcess:
    """Run a repo script (``train.py ...``) as users do: plain python, or torchrun with ``nproc``."""
    cmd = [sys.executable, *args]
    if nproc is not None:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
               str(nproc), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    if check and out.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({out.returncode}):\n"
                             f"{out.stdout[-3000:]}\n{out.stderr[-5000:]}")
    return out


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory) -> Path:
    """``train.py`` with no arguments but an output directory: the embedded opinion demo, run once."""
    out = tmp_path_factory.mktemp("demo") / "run"
    run_script(["train.py", f"train.out_dir={out}"])
    return out


@pytest.fixture(scope="session")
def tiny_hf_model(tmp_path_factory) -> Path:
    """A tiny random Mistral in the HF layout with the real 32000-token tokenizer beside it (the real
    Mistral v1 tokenizer file ships inside mistral-common, a test-only dependency) and, as in
    Mistral-7B-Instruct-v0.1's tokenizer_config.json, its [INST] chat template (auto: mistral-v1)."""
    import importlib.util
    import shutil

    spec = importlib.util.find_spec("mistral_common")
    if spec is None or spec.origin is None:
        pytest.skip("mistral-common is not installed: no real tokenizer file for the real-data path")
    from spl.checkpoint import save_model
    from spl.config import ModelConfig
    from spl.model import Transformer

    cfg = ModelConfig(dim=32, n_layers=2, head_dim=8, hidden_dim=64, n_heads=4, n_kv_heads=2,
                      vocab_size=32000, rope_theta=1e4, max_seq_len=512)
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny") / "model"
    save_model(Transformer(cfg), cfg, out)
    shutil.copyfile(Path(spec.origin).parent / "data" / "tokenizer.model.v1", out / "tokenizer.model")
    jinja = ("{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
             "{{ ' [INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
             "{{ ' ' + message['content'] + eos_token}}{% endif %}{% endfor %}")
    (out / "tokenizer_config.json").write_text(json.dumps({"chat_template": jinja}))
    return out
