"""LoRA (spl/lora.py): identities with the base model, merge, gradients, and PEFT's adapter format.

PEFT and transformers are test-only oracles here: an adapter we save must load in PEFT onto
``MistralForCausalLM`` with our logits, and one PEFT saves must load into ours.

Tolerances (fp32): the base model alone matches HF to ~2e-7; a LoRA branch adds a few more fp32
matmul roundings of O(1) values per layer, so 1e-5 is ~50x that and still far below the adapters'
effect (checked to be > 1e-2 in each test, so a dropped branch cannot pass).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from spl.config import ModelConfig
from spl.lora import (
    LoRALinear,
    apply_lora,
    disable_adapters,
    load_adapter,
    lora_state_dict,
    merge,
    parameter_summary,
    save_adapter,
    trainable_parameters,
    unmerge,
)
from spl.model import Transformer

TOL = 1e-5
CFG = dict(dim=32, n_layers=2, head_dim=8, hidden_dim=48, n_heads=4, n_kv_heads=2, vocab_size=101,
           rope_theta=1e4, norm_eps=1e-5, sliding_window=None, max_seq_len=64)


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


def tiny_model() -> Transformer:
    return Transformer(ModelConfig(**CFG)).eval()


def tokens(B: int = 2, T: int = 7) -> torch.Tensor:
    return torch.randint(0, CFG["vocab_size"], (B, T))  # (B, T)


def randomize_b(model: nn.Module, std: float = 0.5) -> None:
    # A fresh adapter has B = 0 (identity); tests need a branch that visibly changes the output.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("lora_b", "lora_B.default.weight")):
                p.normal_(0.0, std)


def hf_twin(model: Transformer):
    """A transformers MistralForCausalLM with ``model``'s weights."""
    transformers = pytest.importorskip("transformers")
    c = model.cfg
    hf_cfg = transformers.MistralConfig(
        vocab_size=c.vocab_size, hidden_size=c.dim, intermediate_size=c.hidden_dim,
        num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads,
        head_dim=c.head_dim, rms_norm_eps=c.norm_eps, sliding_window=c.sliding_window,
        max_position_embeddings=c.max_seq_len, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta}, attn_implementation="eager")
    hf = transformers.MistralForCausalLM(hf_cfg)
    assert hf.config._attn_implementation == "eager"
    base = {k: v for k, v in model.state_dict().items() if not k.endswith(("lora_a", "lora_b"))}
    missing, unexpected = hf.load_state_dict({"model." * (not k.startswith("lm_head")) + k: v
                                              for k, v in base.items()}, strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    return hf.eval()


def test_zero_b_equals_base_and_disabled_equals_base():
    model = tiny_model()
    x = tokens()
    with torch.no_grad():
        base = model(x)
        names = apply_lora(model, rank=4, alpha=8, dropout=0.0)
        assert len(names) == 7 * CFG["n_layers"]
        # B = 0: the branch adds exact zeros, so the output is bitwise the base's.
        assert torch.equal(model(x), base)
        randomize_b(model)
        assert (model(x) - base).abs().max() > 1e-2
        with disable_adapters(model):
            assert torch.equal(model(x), base)
        assert (model(x) - base).abs().max() > 1e-2  # re-enabled on exit


def test_state_dict_keys_keep_base_names():
    model = tiny_model()
    plain = model.state_dict()
    apply_lora(model, rank=2, alpha=2)
    sd = model.state_dict()
    assert set(plain) <= set(sd)
    extra = set(sd) - set(plain)
    assert extra == set(lora_state_dict(model))
    assert all(k.endswith((".lora_a", ".lora_b")) for k in extra)
    # Base weights are the very same tensors, not copies.
    q = "layers.0.self_attn.q_proj.weight"
    assert sd[q].data_ptr() == plain[q].data_ptr()
    # A plain checkpoint still loads into the wrapped model (adapters untouched with strict=False).
    missing, unexpected = model.load_state_dict(plain, strict=False)
    assert set(missing) == extra and not unexpected


def test_merge_equals_unmerged_and_unmerge_restores():
    model = tiny_model()
    apply_lora(model, rank=4, alpha=16, dropout=0.1)
    randomize_b(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = tokens()
    with torch.no_grad():
        unmerged = model(x)  # eval mode: dropout off, so merged must agree
        merge(model)
        assert all(m.merged for m in model.modules() if isinstance(m, LoRALinear))
        assert (model(x) - unmerged).abs().max() <= TOL
        with pytest.raises(RuntimeError, match="unmerge"):
            with disable_adapters(model):
                pass
        unmerge(model)
        for k, v in model.state_dict().items():
            torch.testing.assert_close(v, before[k], rtol=0, atol=1e-6)
        assert (model(x) - unmerged).abs().max() <= TOL


def test_only_lora_parameters_get_gradients():
    model = tiny_model().train()
    apply_lora(model, rank=4, alpha=4, targets=("q_proj", "v_proj"))
    randomize_b(model)
    model(tokens()).logsumexp(-1).mean().backward()
    for name, p in model.named_parameters():
        if name.endswith(("lora_a", "lora_b")):
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name
    trainable = trainable_parameters(model)
    assert len(trainable) == 2 * 2 * CFG["n_layers"]
    n_q = 4 * CFG["dim"] + CFG["n_heads"] * CFG["head_dim"] * 4  # A (r, D) + B (H*Dh, r)
    n_v = 4 * CFG["dim"] + CFG["n_kv_heads"] * CFG["head_dim"] * 4
    assert sum(p.numel() for p in trainable.values()) == CFG["n_layers"] * (n_q + n_v)
    assert parameter_summary(model).startswith(f"trainable params {CFG['n_layers'] * (n_q + n_v):,} / ")


def test_dropout_only_in_train_mode():
    model = tiny_model()
    apply_lora(model, rank=4, alpha=4, dropout=0.5)
    randomize_b(model)
    x = tokens()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))  # eval: deterministic
        model.train()
        a, b = model(x), model(x)
        assert (a - b).abs().max() > 1e-3  # train: two dropout masks differ
        model.eval()
        layer = model.layers[0].self_attn.q_proj
        h = torch.randn(3, CFG["dim"])  # (N, D)
        # Dropout hits the branch input only: the base part is untouched in train mode.
        layer.train()
        with disable_adapters(model):
            assert torch.equal(layer(h), h @ layer.weight.T)


def test_custom_targets_and_errors():
    model = tiny_model()
    names = apply_lora(model, targets=("self_attn.o_proj", "down_proj"))
    assert names == [f"layers.{i}.{m}" for i in range(CFG["n_layers"])
                     for m in ("self_attn.o_proj", "mlp.down_proj")]
    assert not isinstance(model.lm_head, LoRALinear)
    assert not isinstance(model.layers[0].self_attn.q_proj, LoRALinear)
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(model)
    with pytest.raises(ValueError, match=r"\['wq'\] match no nn.Linear"):
        apply_lora(tiny_model(), targets=("q_proj", "wq"))
    # The log-prob paths read lm_head.weight directly: an adapter there would be ignored, so refuse.
    head = tiny_model()
    with pytest.raises(ValueError, match="LoRA on lm_head is not supported"):
        apply_lora(head, targets=("q_proj", "lm_head"))
    assert not isinstance(head.lm_head, LoRALinear) and not lora_state_dict(head)


def test_save_load_roundtrip_and_format(tmp_path):
    model = tiny_model()
    apply_lora(model, rank=4, alpha=8, dropout=0.05, targets=("q_proj", "up_proj"))
    randomize_b(model)
    save_adapter(model, tmp_path, base_model_name_or_path="mistralai/Mistral-7B-v0.1")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (4, 8, 0.05)
    assert config["target_modules"] == ["q_proj", "up_proj"] and config["peft_type"] == "LORA"
    keys = load_file(tmp_path / "adapter_model.safetensors")
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert keys["base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"].shape == (CFG["hidden_dim"], 4)

    fresh = tiny_model()
    fresh.load_state_dict({k: v for k, v in model.state_dict().items() if "lora" not in k})
    assert len(load_adapter(fresh, tmp_path)) == 2 * CFG["n_layers"]  # applies LoRA itself
    x = tokens()
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def test_bad_adapter_files(tmp_path):
    model = tiny_model()
    apply_lora(model, rank=4, alpha=8, targets=("q_proj",))
    save_adapter(model, tmp_path)
    weights_path, config_path = tmp_path / "adapter_model.safetensors", tmp_path / "adapter_config.json"
    good = load_file(weights_path)
    config = json.loads(config_path.read_text())
    key_a = "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"

    def expect(tensors, cfg, match):
        save_file(tensors, weights_path)
        config_path.write_text(json.dumps(cfg))
        with pytest.raises((ValueError, RuntimeError), match=match):
            load_adapter(tiny_model(), tmp_path)

    missing_a = r"adapter_model\.safetensors.*missing tensor " + key_a.replace(".", r"\.")
    expect({k: v for k, v in good.items() if k != key_a}, config, missing_a)
    bad_shape = dict(good, **{key_a: torch.zeros(3, CFG["dim"])})
    expect(bad_shape, config, r"tensor .*layers\.1\.self_attn\.q_proj\.lora_A\.weight has shape \(3, 32\)")
    unknown = dict(good, **{"base_model.model.model.layers.0.mlp.nope.lora_A.weight": torch.zeros(4, 4),
                            "base_model.model.model.layers.0.mlp.nope.lora_B.weight": torch.zeros(4, 4)})
    expect(unknown, config, r"modules the model lacks.*layers\.0\.mlp\.nope")
    expect(dict(good, bogus=torch.zeros(1)), config, r"unexpected tensor 'bogus'")
    expect(good, dict(config, use_dora=True), r"adapter_config\.json.*unsupported LoRA option use_dora")
    expect(good, dict(config, use_rslora=True), r"unsupported LoRA option use_rslora")
    expect(good, dict(config, peft_type="IA3"), r"peft_type 'IA3'")
    # A model that already has different adapters: missing/unexpected modules are named.
    save_file(good, weights_path)
    config_path.write_text(json.dumps(config))
    other = tiny_model()
    apply_lora(other, rank=4, alpha=8, targets=("k_proj",))
    with pytest.raises(ValueError, match=r"missing from the file \['layers\.0\.self_attn\.k_proj'"):
        load_adapter(other, tmp_path)
    (tmp_path / "adapter_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_adapter(tiny_model(), tmp_path)


def test_our_adapter_loads_in_peft(tmp_path):
    peft = pytest.importorskip("peft")
    model = tiny_model()
    hf = hf_twin(model)
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits.float(), model(x), rtol=0, atol=TOL)  # same base
    apply_lora(model, rank=4, alpha=16, dropout=0.05)
    randomize_b(model)
    save_adapter(model, tmp_path)
    peft_model = peft.PeftModel.from_pretrained(hf, tmp_path).eval()
    with torch.no_grad():
        ours, theirs = model(x), peft_model(x).logits.float()
        assert (ours - hf_twin(tiny_model())(x).logits).abs().max() > 1e-2  # the adapter matters
    assert (ours - theirs).abs().max() <= TOL


def test_peft_adapter_loads_in_ours(tmp_path):
    peft = pytest.importorskip("peft")
    model = tiny_model()
    hf = hf_twin(model)
    config = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, task_type="CAUSAL_LM",
                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                             "down_proj"])
    peft_model = peft.get_peft_model(hf, config)
    randomize_b(peft_model)  # PEFT also zero-inits B
    peft_model.save_pretrained(tmp_path)
    peft_model.eval()
    load_adapter(model, tmp_path)
    x = tokens()
    with torch.no_grad():
        ours, theirs = model(x), peft_model(x).logits.float()
        with peft_model.disable_adapter():
            assert (theirs - peft_model(x).logits).abs().max() > 1e-2
    assert (ours - theirs).abs().max() <= TOL


def test_peft_adapter_on_lm_head_is_refused(tmp_path):
    """PEFT can put LoRA on lm_head; we refuse such a file, naming it, rather than ignore its head."""
    peft = pytest.importorskip("peft")
    model = tiny_model()
    peft_model = peft.get_peft_model(hf_twin(model), peft.LoraConfig(r=4, lora_alpha=8, task_type="CAUSAL_LM",
                                                                     target_modules=["q_proj", "lm_head"]))
    peft_model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"adapter_model.safetensors: has an adapter on lm_head"):
        load_adapter(model, tmp_path)
    assert not lora_state_dict(model)  # refused before anything was wrapped
