"""The Llama family on tiny random models (the real SmolLM2 is tests/test_real_model.py): rope_theta
read from the checkpoint, one tied embedding/output tensor through loading, saving, the trainable
log-prob path, LoRA and full fine-tuning, all against transformers' LlamaForCausalLM as the oracle."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from spl.checkpoint import load_model
from spl.logprobs import sequence_logps
from spl.lora import apply_lora, trainable_parameters
from spl.model import Transformer

transformers = pytest.importorskip("transformers", reason="transformers is the test oracle")


def tokens(vocab: int, shape=(2, 23), seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def with_theta(model_dir: Path, theta: float, out: Path) -> Path:
    shutil.copytree(model_dir, out)
    config = json.loads((out / "config.json").read_text())
    config["rope_theta"] = theta
    (out / "config.json").write_text(json.dumps(config))
    return out


@torch.no_grad()
def hf_logits(model_dir: Path, x: torch.Tensor) -> torch.Tensor:
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    return hf(x).logits.float()


@torch.no_grad()
def test_logits_match_transformers_llama_at_each_rope_theta(tiny_llama_model, tmp_path):
    """rope_theta comes from config.json: at 1e5 (SmolLM2's) and 1e4 our logits equal
    transformers' Llama, and the two thetas give different logits (so the value is really used)."""
    x = tokens(49152, (2, 200))  # long enough that the rotary base matters at every head dim
    got = {}
    for theta in (1e5, 1e4):
        d = with_theta(tiny_llama_model, theta, tmp_path / f"theta{theta:g}")
        model, cfg = load_model(d)
        assert cfg.rope_theta == theta and cfg.family == "llama" and cfg.sliding_window is None
        got[theta] = model.eval()(x)
        torch.testing.assert_close(got[theta], hf_logits(d, x), rtol=0, atol=1e-5)
    assert (got[1e5] - got[1e4]).abs().max() > 1e-3


def test_tied_checkpoint_is_one_tensor_saved_once(tiny_llama_model, tmp_path):
    """A tied checkpoint loads as one Parameter for embedding and output, saves it once (no
    lm_head.weight, as transformers writes), and transformers reads our save with the tie on."""
    from spl.saving import save_model

    model, cfg = load_model(tiny_llama_model)
    assert cfg.tie_word_embeddings
    assert model.lm_head.weight is model.embed_tokens.weight
    assert sum(1 for _ in model.parameters()) == len({id(p) for p in model.parameters()})
    with torch.no_grad():
        model.embed_tokens.weight.mul_(1.5)  # a visible change, made through the embedding
    save_model(model, cfg, tmp_path / "saved")
    saved = load_file(tmp_path / "saved" / "model.safetensors")
    assert "lm_head.weight" not in saved
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["tie_word_embeddings"] is True
    x = tokens(cfg.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), hf_logits(tmp_path / "saved", x), rtol=0, atol=1e-5)


def _untied_twin(model: Transformer) -> Transformer:
    from dataclasses import replace

    twin = Transformer(replace(model.cfg, tie_word_embeddings=False))
    state = model.state_dict()
    twin.load_state_dict({**state, "lm_head.weight": state["embed_tokens.weight"].clone()})
    return twin


@pytest.mark.parametrize("impl", ["plain", "chunked"])
def test_tied_weight_gradient_is_embedding_plus_output(tiny_llama_model, impl):
    """The trainable log-prob path on a tied weight: its gradient is the sum of the embedding's and
    the output projection's, each taken from an untied twin. A path that overwrote the weight's
    gradient instead of adding to it (or treated the output weight as frozen) fails here."""
    model, _ = load_model(tiny_llama_model)
    twin = _untied_twin(model)
    x = tokens(model.cfg.vocab_size, (3, 17))
    mask = torch.ones_like(x, dtype=torch.bool)
    mask[:, :5] = False
    for m in (model, twin):
        hidden = m(x[:, :-1], return_hidden=True)
        sequence_logps(hidden, m.lm_head.weight, x[:, 1:], mask[:, 1:], impl=impl).sum().backward()
    expected = twin.embed_tokens.weight.grad + twin.lm_head.weight.grad
    assert twin.embed_tokens.weight.grad.abs().max() > 0 and twin.lm_head.weight.grad.abs().max() > 0
    torch.testing.assert_close(model.embed_tokens.weight.grad, expected, rtol=1e-5, atol=1e-7)


def test_lora_on_a_tied_model_leaves_the_shared_tensor_alone(tiny_llama_model):
    """LoRA freezes the tied tensor as one: after an optimizer step embedding and output are still
    the same, unchanged tensor, and only adapter weights moved."""
    model, _ = load_model(tiny_llama_model)
    before = model.embed_tokens.weight.detach().clone()
    apply_lora(model, rank=4, alpha=8, dropout=0.0)
    params = trainable_parameters(model)
    assert params and all(".lora_" in n for n in params)
    for p in params.values():  # B starts at zero; give the step something to move
        torch.nn.init.normal_(p, std=0.02)
    opt = torch.optim.AdamW(params.values(), lr=1e-2)
    x = tokens(model.cfg.vocab_size, (2, 11))
    hidden = model(x[:, :-1], return_hidden=True)
    sequence_logps(hidden, model.lm_head.weight, x[:, 1:], torch.ones_like(x[:, 1:], dtype=torch.bool),
                   impl="chunked").sum().backward()
    opt.step()
    assert model.lm_head.weight is model.embed_tokens.weight
    assert torch.equal(model.embed_tokens.weight, before)
