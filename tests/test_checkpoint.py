"""Tests for spl/checkpoint.py, spl/saving.py, spl/layouts.py and spl/atomic.py: round trips,
config mapping, the RoPE permutation, and bad files.

Every malformed checkpoint must raise ``CheckpointError`` naming the file and, where one exists, the
tensor: a user with a 14 GB download needs to know which shard to fetch again. Logit agreement with
transformers on checkpoints *it* wrote lives in tests/test_model.py; here transformers only checks
that it can read what we write.
"""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import spl.atomic
import spl.saving
from spl.atomic import atomic_save_file, atomic_write_text
from spl.checkpoint import CheckpointError, check_tokenizer_vocab, load_model
from spl.config import ModelConfig
from spl.layouts import (
    model_config_from_hf,
    model_config_from_params,
    model_config_to_hf,
    model_config_to_params,
    permute_hf_to_original,
    permute_original_to_hf,
)
from spl.model import Transformer, apply_rope, rope_tables
from spl.saving import save_model, save_original

CFG = ModelConfig(dim=40, n_layers=2, head_dim=12, hidden_dim=72, n_heads=4, n_kv_heads=2, vocab_size=97,
                  rope_theta=1e4, sliding_window=6, max_seq_len=256)
SINGLE = "model.safetensors"


@pytest.fixture(autouse=True)
def seed() -> None:
    torch.manual_seed(0)


def make_model(cfg: ModelConfig = CFG) -> Transformer:
    model = Transformer(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.1 * torch.randn_like(p))  # so a swapped or dropped norm would show
    return model


@pytest.fixture
def model() -> Transformer:
    return make_model()


@pytest.fixture
def hf_dir(model: Transformer, tmp_path: Path) -> Path:
    save_model(model, CFG, tmp_path / "hf")
    return tmp_path / "hf"


def assert_same_weights(a: Transformer, b: Transformer) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


def no_temp_left(parent: Path) -> bool:
    return not [p for p in parent.iterdir() if p.name.endswith((".tmp", ".old"))]


# ----------------------------------------------------------------------------------------------
# Round trips, dtype, device.


@pytest.mark.parametrize("max_shard_bytes", [2**30, 20_000])
def test_save_load_round_trip_is_bitwise(model: Transformer, tmp_path: Path, max_shard_bytes: int) -> None:
    """One file, then ~20 kB shards (several per layer) with an index: same tensors, same bits."""
    save_model(model, CFG, tmp_path / "m", max_shard_bytes=max_shard_bytes)
    files = sorted(p.name for p in (tmp_path / "m").iterdir())
    if max_shard_bytes == 20_000:
        assert "model.safetensors.index.json" in files
        assert len([f for f in files if f.startswith("model-")]) > 2
    else:
        assert files == ["config.json", SINGLE]
    loaded, cfg = load_model(tmp_path / "m")
    assert cfg == CFG
    assert_same_weights(loaded, model)
    assert no_temp_left(tmp_path)


def test_original_layout_round_trip(model: Transformer, tmp_path: Path) -> None:
    save_original(model, CFG, tmp_path / "o")
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["consolidated.safetensors", "params.json"]
    with safe_open(tmp_path / "o" / "consolidated.safetensors", "pt") as f:
        assert "layers.1.feed_forward.w3.weight" in f.keys() and "output.weight" in f.keys()
    loaded, cfg = load_model(tmp_path / "o")
    assert cfg == CFG
    assert_same_weights(loaded, model)


def test_meta_loading_leaves_no_meta_tensors_and_honors_dtype(model: Transformer, hf_dir: Path) -> None:
    for dtype in (torch.float32, torch.bfloat16):
        loaded, _ = load_model(hf_dir, dtype=dtype, device=torch.device("cpu"))
        tensors = [*loaded.parameters(), *loaded.buffers()]
        assert not any(t.is_meta for t in tensors)
        assert {(t.dtype, t.device.type) for t in tensors} == {(dtype, "cpu")}
        assert not loaded.training
    with torch.no_grad():
        logits = loaded(torch.tensor([[1, 2, 3]]))
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


def test_bf16_checkpoint_loads_as_fp32(model: Transformer, tmp_path: Path) -> None:
    """Released weights are bf16; CPU work wants fp32: the requested dtype wins over the stored one."""
    model.to(torch.bfloat16)
    save_model(model, CFG, tmp_path / "b")
    assert json.loads((tmp_path / "b" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    loaded, _ = load_model(tmp_path / "b", dtype=torch.float32)
    assert loaded.lm_head.weight.dtype == torch.float32
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight.float())  # upcast is exact


def test_tied_embeddings_stay_tied(tmp_path: Path) -> None:
    cfg = ModelConfig(**{**CFG.__dict__, "tie_word_embeddings": True})
    model = make_model(cfg)
    save_model(model, cfg, tmp_path / "t")
    assert "lm_head.weight" not in load_file(tmp_path / "t" / SINGLE)  # as transformers saves it
    loaded, _ = load_model(tmp_path / "t")
    assert loaded.lm_head.weight is loaded.embed_tokens.weight  # one Parameter, as the optimizer must see
    assert_same_weights(loaded, model)
    # Some exporters store the tied copy anyway: accepted, and the embedding still wins.
    rewrite(tmp_path / "t" / SINGLE, lambda t: t.update({"lm_head.weight": torch.zeros(97, 40)}))
    loaded, _ = load_model(tmp_path / "t")
    assert loaded.lm_head.weight is loaded.embed_tokens.weight
    assert_same_weights(loaded, model)


def test_transformers_reads_what_we_save(model: Transformer, tmp_path: Path) -> None:
    """Our merged weights are a real HF checkpoint: config.json, index and shards all understood."""
    transformers = pytest.importorskip("transformers")
    save_model(model, CFG, tmp_path / "m", max_shard_bytes=20_000)
    hf = transformers.MistralForCausalLM.from_pretrained(tmp_path / "m", attn_implementation="eager")
    tokens = torch.randint(0, CFG.vocab_size, (2, 9))  # longer than the window of 6
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), hf(tokens).logits, atol=1e-5, rtol=0)


def test_save_refuses_unmerged_or_mismatched_model(model: Transformer, tmp_path: Path) -> None:
    """Saving LoRA factors as if they were base weights would produce a checkpoint nothing can load."""
    model.layers[0].self_attn.q_proj.register_parameter("lora_a", torch.nn.Parameter(torch.zeros(2, 40)))
    with pytest.raises(CheckpointError, match="lora_a.*merge"):
        save_model(model, CFG, tmp_path / "m")
    with pytest.raises(CheckpointError, match="n_layers|missing"):
        save_model(make_model(), ModelConfig(**{**CFG.__dict__, "n_layers": 3}), tmp_path / "m")


# ----------------------------------------------------------------------------------------------
# Bad checkpoints: the error names the file and the tensor.


def rewrite(path: Path, edit) -> None:
    """Apply ``edit`` to the tensors of a valid safetensors file and write it back (still valid)."""
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_missing_tensor(hf_dir: Path) -> None:
    rewrite(hf_dir / SINGLE, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: missing tensor 'model\.layers\.1\.mlp"
                                              r"\.up_proj\.weight'"):
        load_model(hf_dir)


@pytest.mark.parametrize("name", ["model.layers.0.self_attn.q_proj.bias", "model.layers.2.mlp.up_proj.weight",
                                  "transformer.wte.weight"])
def test_unexpected_tensor(hf_dir: Path, name: str) -> None:
    rewrite(hf_dir / SINGLE, lambda t: t.update({name: torch.zeros(3)}))
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: unexpected tensor '{re.escape(name)}'"):
        load_model(hf_dir)


def test_old_rotary_buffers_are_skipped(hf_dir: Path) -> None:
    """Older transformers saved RoPE's inv_freq buffer; we recompute it, so it is not an error."""
    buffer = "model.layers.0.self_attn.rotary_emb.inv_freq"  # saved by transformers < 4.31
    rewrite(hf_dir / SINGLE, lambda t: t.update({buffer: torch.ones(6)}))
    load_model(hf_dir)


def test_wrong_shape(hf_dir: Path) -> None:
    name = "model.layers.0.self_attn.k_proj.weight"
    rewrite(hf_dir / SINGLE, lambda t: t.update({name: torch.zeros(12, 40)}))
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: tensor '{re.escape(name)}' has shape "
                                              r"\[12, 40\], but the config implies \[24, 40\]"):
        load_model(hf_dir)


def test_integer_tensor(hf_dir: Path) -> None:
    rewrite(hf_dir / SINGLE, lambda t: t.update({"model.norm.weight": torch.ones(40, dtype=torch.int32)}))
    with pytest.raises(CheckpointError, match=r"'model\.norm\.weight' has dtype I32"):
        load_model(hf_dir)


def test_truncated_data_names_the_cut_tensor(hf_dir: Path) -> None:
    path = hf_dir / SINGLE
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = {k: v for k, v in json.loads(data[8:8 + n]).items() if k != "__metadata__"}
    last = max(header, key=lambda k: header[k]["data_offsets"][1])  # the tensor stored last
    path.write_bytes(data[:-4])  # cut into that tensor only
    with pytest.raises(CheckpointError, match=rf"{SINGLE}: tensor '{re.escape(last)}' ends past the end"
                                              r".*truncated"):
        load_model(hf_dir)


def test_truncated_header(hf_dir: Path) -> None:
    path = hf_dir / SINGLE
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(CheckpointError, match=rf"{SINGLE}: .*truncated"):
        load_model(hf_dir)


def test_pickle_file_is_refused_not_unpickled(model: Transformer, hf_dir: Path, monkeypatch) -> None:
    """Unpickling an untrusted download can run arbitrary code: the loader must not even try."""
    torch.save(model.state_dict(), hf_dir / SINGLE)  # a torch.save zip/pickle under a safetensors name

    def forbidden(*args, **kwargs):
        raise AssertionError("a checkpoint must never be unpickled")

    for mod, name in [(torch, "load"), (pickle, "load"), (pickle, "loads"), (pickle, "Unpickler")]:
        monkeypatch.setattr(mod, name, forbidden)
    with pytest.raises(CheckpointError, match=rf"{SINGLE}: .*not safetensors"):
        load_model(hf_dir)


def test_pickle_only_directory(model: Transformer, tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(model_config_to_hf(CFG)))
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin.*safetensors only"):
        load_model(tmp_path)


def test_index_pointing_to_missing_shard(model: Transformer, tmp_path: Path) -> None:
    """An interrupted download: the error says which shard to fetch again and what it holds."""
    save_model(model, CFG, tmp_path / "s", max_shard_bytes=20_000)
    index = json.loads((tmp_path / "s" / "model.safetensors.index.json").read_text())
    shard = "model-00002-of-" + sorted(index["weight_map"].values())[-1][-17:]
    (tmp_path / "s" / shard).unlink()
    tensor = next(k for k, v in index["weight_map"].items() if v == shard)
    with pytest.raises(CheckpointError, match=rf"index\.json maps tensor '{re.escape(tensor)}'.*{shard}, "
                                              "which does not exist"):
        load_model(tmp_path / "s")


def test_index_listing_tensor_absent_from_shard(model: Transformer, tmp_path: Path) -> None:
    save_model(model, CFG, tmp_path / "s", max_shard_bytes=20_000)
    path = tmp_path / "s" / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    weight_map = index["weight_map"]
    weight_map["model.norm.weight"] = "model-00001-of-" + weight_map["model.norm.weight"][-17:]
    path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"model-00001-of-\d+\.safetensors: tensor 'model\.norm\.weight'"
                                              " is listed in the index but not in this file"):
        load_model(tmp_path / "s")


def test_missing_or_broken_config(hf_dir: Path, tmp_path: Path) -> None:
    (hf_dir / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"no config\.json .* or params\.json"):
        load_model(hf_dir)
    (hf_dir / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json: cannot read JSON"):
        load_model(hf_dir)
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        load_model(tmp_path / "nowhere")


# ----------------------------------------------------------------------------------------------
# Tokenizer vocabulary.


def test_tokenizer_vocab_mismatch_names_the_file(hf_dir: Path) -> None:
    mistral_common = pytest.importorskip("mistral_common")
    path = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"  # 32000 tokens
    if not path.is_file():
        pytest.skip(f"no tokenizer at {path}")
    check_tokenizer_vocab(path, 32000)
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(path))}: tokenizer has 32000 tokens.*is 97"):
        load_model(hf_dir, tokenizer_path=path)
    with pytest.raises(CheckpointError, match=r"tok\.model: tokenizer has 100 tokens"):
        check_tokenizer_vocab("tok.model", 97, tokenizer_vocab_size=100)


# ----------------------------------------------------------------------------------------------
# Config mapping.


@pytest.mark.parametrize("cfg", [CFG, ModelConfig(), ModelConfig.preset("mistral-7b-v0.1"),
                                 ModelConfig(**{**CFG.__dict__, "tie_word_embeddings": True})])
def test_hf_and_params_config_round_trip(cfg: ModelConfig) -> None:
    """ModelConfig -> config.json / params.json -> ModelConfig is the identity (bar tying)."""
    assert model_config_from_hf(model_config_to_hf(cfg)) == cfg
    assert model_config_from_params(model_config_to_params(cfg)) == ModelConfig(
        **{**cfg.__dict__, "tie_word_embeddings": False})  # params.json has no tying


def test_transformers_config_both_styles() -> None:
    """transformers 5 nests rope_theta in rope_parameters; released 4.x files keep it top level."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.MistralConfig(**model_config_to_hf(CFG))  # what transformers makes of our file
    assert (hf.rope_parameters["rope_theta"], hf.sliding_window, hf.head_dim) == (1e4, 6, 12)
    assert model_config_from_hf(hf.to_dict()) == CFG  # 5.x style: rope_parameters
    real_v01 = {  # Mistral-7B-v0.1's config.json (transformers 4.x style)
        "architectures": ["MistralForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
        "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336,
        "max_position_embeddings": 32768, "model_type": "mistral", "num_attention_heads": 32,
        "num_hidden_layers": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-05, "rope_theta": 10000.0,
        "sliding_window": 4096, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "transformers_version": "4.34.0.dev0", "use_cache": True, "vocab_size": 32000}
    assert model_config_from_hf(real_v01) == ModelConfig.preset("mistral-7b-v0.1")


@pytest.mark.parametrize("change, message", [
    ({"model_type": "gpt2"}, "model_type 'gpt2' is not supported"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "RoPE scaling"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6}}, "RoPE scaling"),
    ({"attention_bias": True}, "attention_bias"),
    ({"hidden_size": None}, "'hidden_size' is missing"),
    ({"num_key_value_heads": 3}, "multiple of model.n_kv_heads"),
])
def test_hf_config_rejects_unsupported(change: dict, message: str) -> None:
    with pytest.raises(CheckpointError, match=rf"my/config\.json: .*{re.escape(message)}"):
        model_config_from_hf({**model_config_to_hf(CFG), **change}, source="my/config.json")


def test_attention_dropout_is_forced_to_zero() -> None:
    with pytest.warns(UserWarning, match="attention_dropout=0.6 ignored"):
        assert model_config_from_hf({**model_config_to_hf(CFG), "attention_dropout": 0.6}) == CFG


def test_params_without_rope_theta_means_v01() -> None:
    params = {k: v for k, v in model_config_to_params(ModelConfig.preset("mistral-7b-v0.1")).items()
              if k not in ("rope_theta", "max_seq_len")}
    with pytest.warns(UserWarning, match="no rope_theta; assuming 1e4"):
        cfg = model_config_from_params(params)
    assert (cfg.rope_theta, cfg.sliding_window) == (1e4, 4096)
    with pytest.raises(CheckpointError, match="'moe' models are not supported"):
        model_config_from_params({**params, "moe": {"num_experts": 8}})


# ----------------------------------------------------------------------------------------------
# The RoPE permutation between layouts.


@pytest.mark.parametrize("n_heads, head_dim", [(1, 4), (4, 12), (3, 6)])
def test_permutations_invert(n_heads: int, head_dim: int) -> None:
    w = torch.randn(n_heads * head_dim, 5)
    assert torch.equal(permute_hf_to_original(permute_original_to_hf(w, n_heads), n_heads), w)
    assert torch.equal(permute_original_to_hf(permute_hf_to_original(w, n_heads), n_heads), w)
    assert not torch.equal(permute_original_to_hf(w, n_heads), w)


def interleaved_rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """mistral-inference's RoPE: rotate pairs (2i, 2i+1) as complex numbers. x (T, H, Dh)."""
    Dh = x.shape[-1]
    freqs = positions.double()[:, None] / theta ** (torch.arange(0, Dh, 2).double() / Dh)  # (T, Dh/2)
    xc = torch.view_as_complex(x.double().reshape(*x.shape[:-1], Dh // 2, 2))  # (T, H, Dh/2)
    return torch.view_as_real(xc * torch.polar(torch.ones_like(freqs), freqs)[:, None]).flatten(-2)


def test_original_rope_with_permuted_rows_gives_same_scores() -> None:
    """Independent of our loader: original weights + interleaved RoPE == HF weights + rotate-half."""
    T, D, H, Dh, theta = 7, 16, 2, 8, 1e4
    x, wq = torch.randn(T, D).double(), torch.randn(H * Dh, D).double()
    pos = torch.arange(T)
    cos, sin = rope_tables(pos[None], Dh, theta, torch.float64)  # (1, 1, T, Dh)
    q = apply_rope((x @ wq.T).view(T, H, Dh).transpose(0, 1), cos[0], sin[0])  # (H, T, Dh)
    hf_scores = q @ q.transpose(1, 2)  # (H, T, T): q against itself stands in for k

    def original_scores(w_orig: torch.Tensor) -> torch.Tensor:
        q = interleaved_rope((x @ w_orig.T).view(T, H, Dh), pos, theta).transpose(0, 1)  # (H, T, Dh)
        return q @ q.transpose(1, 2)

    # rope_tables builds its frequencies in fp32 (by design), hence fp32-level, not fp64, agreement.
    permuted = original_scores(permute_hf_to_original(wq, H))
    torch.testing.assert_close(permuted, hf_scores, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(original_scores(wq), hf_scores, rtol=1e-2)  # without the permutation: wrong


# ----------------------------------------------------------------------------------------------
# Atomic writes.


def test_overwrite_and_failed_save_keep_a_whole_checkpoint(model: Transformer, hf_dir: Path,
                                                           monkeypatch) -> None:
    """Overwriting replaces the whole directory; a crash mid-save leaves the old one whole."""
    with pytest.raises(FileExistsError):
        save_model(model, CFG, hf_dir)
    (hf_dir / "stale.txt").write_text("from an older save")
    save_model(model, CFG, hf_dir, max_shard_bytes=20_000, overwrite=True)
    assert not (hf_dir / "stale.txt").exists() and (hf_dir / "model.safetensors.index.json").is_file()

    calls = []

    def failing_save_file(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("disk full")
        return save_file(*args, **kwargs)

    monkeypatch.setattr(spl.saving, "save_file", failing_save_file)
    with pytest.raises(OSError, match="disk full"):
        save_model(make_model(), CFG, hf_dir, max_shard_bytes=20_000, overwrite=True)
    assert_same_weights(load_model(hf_dir)[0], model)  # the previous checkpoint, untouched
    assert no_temp_left(hf_dir.parent)


def test_atomic_file_helpers(tmp_path: Path, monkeypatch) -> None:
    atomic_write_text(tmp_path / "a" / "log.txt", "one")
    atomic_write_text(tmp_path / "a" / "log.txt", "two")
    assert (tmp_path / "a" / "log.txt").read_text() == "two"
    atomic_save_file({"w": torch.ones(3)}, tmp_path / "a" / "w.safetensors", {"step": "7"})
    with safe_open(tmp_path / "a" / "w.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt", "step": "7"} and torch.equal(f.get_tensor("w"), torch.ones(3))

    monkeypatch.setattr(spl.atomic, "save_file", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        atomic_save_file({"w": torch.zeros(3)}, tmp_path / "a" / "w.safetensors")
    assert torch.equal(load_file(tmp_path / "a" / "w.safetensors")["w"], torch.ones(3))
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["log.txt", "w.safetensors"]
