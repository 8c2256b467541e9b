"""Tests for spl/model.py: logits against transformers' MistralForCausalLM, and decoding invariants.

transformers is the independent oracle: it writes the checkpoints (``save_pretrained``, single file
and sharded), we load them with ``spl.checkpoint.load_model`` and compare logits. Then, on our model
alone: KV-cache decoding (token by token, chunked, ``prefill``), left padding, the sliding-window
mask, activation checkpointing, and bf16.

Tolerances (max absolute logit difference):
    fp32 vs HF fp32   1e-5   logits are O(1) (asserted); the two differ only in summation order,
                             a few float32 ulps (~1e-7) per op through 2-3 layers.
    cache vs full     1e-5   same weights, different attention shapes, so again only reduction order.
    bf16 vs fp32      2x HF  our bf16 error against the fp32 oracle may be at most twice that of
                             transformers run in bf16 on the same weights (STYLE.md's rule).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from spl.checkpoint import load_model
from spl.model import Transformer, attend, attention_mask
from spl.saving import save_original

transformers = pytest.importorskip("transformers", reason="transformers is the test oracle")

FP32_ATOL = 1e-5
T = 19  # longer than every sliding window below, so windows actually cut attention


@dataclass(frozen=True)
class Shape:
    """A tiny Mistral in HF's vocabulary; odd sizes and head_dim != hidden_size / heads on purpose."""

    name: str
    vocab: int
    dim: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    hidden: int
    rope_theta: float
    window: int | None
    eps: float


SHAPES = [
    Shape("mha", vocab=97, dim=40, layers=2, heads=4, kv_heads=4, head_dim=12, hidden=72,
          rope_theta=1e4, window=None, eps=1e-5),  # GQA group size 1
    Shape("gqa2-window5", vocab=131, dim=72, layers=2, heads=6, kv_heads=3, head_dim=8, hidden=100,
          rope_theta=1e6, window=5, eps=1e-6),  # group size 2
    Shape("gqa4-window7", vocab=131, dim=40, layers=3, heads=8, kv_heads=2, head_dim=6, hidden=56,
          rope_theta=1e4, window=7, eps=1e-5),  # group size 4
]


@pytest.fixture(autouse=True)
def seed() -> None:
    torch.manual_seed(0)


def hf_model(s: Shape):
    """A random MistralForCausalLM whose weights are large enough to make the comparison bite.

    HF initializes with std 0.02, which leaves attention nearly uniform and logits near zero; std
    0.1 on projections (fan-in 40-100), unit-variance embeddings and non-unit norm gains give O(1)
    attention scores and logits.
    """
    cfg = transformers.MistralConfig(
        vocab_size=s.vocab, hidden_size=s.dim, intermediate_size=s.hidden, num_hidden_layers=s.layers,
        num_attention_heads=s.heads, num_key_value_heads=s.kv_heads, head_dim=s.head_dim,
        rope_theta=s.rope_theta, sliding_window=s.window, rms_norm_eps=s.eps,  # HF defaults: 4096, 1e-6
        max_position_embeddings=256, attn_implementation="eager")
    model = transformers.MistralForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif "embed_tokens" in name:
                p.normal_(0, 1)
            else:
                p.normal_(0, 0.1)
    return model


@dataclass
class Case:
    shape: Shape
    tokens: torch.Tensor  # (B, T)
    hf_logits: torch.Tensor  # (B, T, V)
    single: Path  # save_pretrained, one model.safetensors
    sharded: Path  # save_pretrained with a tiny max_shard_size: shards + index.json


@pytest.fixture(scope="module", params=SHAPES, ids=lambda s: s.name)
def case(request, tmp_path_factory) -> Case:
    s: Shape = request.param
    torch.manual_seed(0)
    hf = hf_model(s)
    root = tmp_path_factory.mktemp(s.name)
    hf.save_pretrained(root / "single")
    hf.save_pretrained(root / "sharded", max_shard_size="20KB")
    assert (root / "sharded" / "model.safetensors.index.json").is_file()
    tokens = torch.randint(0, s.vocab, (2, T))
    with torch.no_grad():
        hf_logits = hf(tokens).logits.float()
    assert hf_logits.std() > 0.3, "logits too small for a meaningful comparison"
    return Case(s, tokens, hf_logits, root / "single", root / "sharded")


@pytest.fixture(scope="module")
def model(case: Case) -> Transformer:
    return load_model(case.single)[0]


# ----------------------------------------------------------------------------------------------
# Against transformers.


@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_logits_match_transformers(case: Case, layout: str) -> None:
    ours, cfg = load_model(getattr(case, layout))
    assert (cfg.n_heads, cfg.n_kv_heads, cfg.sliding_window) == (case.shape.heads, case.shape.kv_heads,
                                                                  case.shape.window)
    with torch.no_grad():
        logits = ours(case.tokens)  # (B, T, V)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, case.hf_logits, atol=FP32_ATOL, rtol=0)


def test_original_layout_gives_same_logits(case: Case, model: Transformer, tmp_path: Path) -> None:
    save_original(model, model.cfg, tmp_path / "orig")
    ours, cfg = load_model(tmp_path / "orig")
    assert cfg == model.cfg
    with torch.no_grad():
        logits = ours(case.tokens)
        # Permuting rows there and back is exact, so the model is the same bit for bit.
        assert torch.equal(logits, model(case.tokens))
    torch.testing.assert_close(logits, case.hf_logits, atol=FP32_ATOL, rtol=0)


def test_bf16_close_to_fp32(case: Case) -> None:
    ours, _ = load_model(case.single, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in ours.parameters())
    with torch.no_grad():
        ours_err = (ours(case.tokens) - case.hf_logits).abs().max()
        hf_bf16 = transformers.MistralForCausalLM.from_pretrained(case.single, dtype=torch.bfloat16,
                                                                  attn_implementation="eager")
        hf_err = (hf_bf16(case.tokens).logits.float() - case.hf_logits).abs().max()
    assert ours_err <= 2 * hf_err, f"bf16 error {ours_err:.3g} vs transformers' bf16 error {hf_err:.3g}"


# ----------------------------------------------------------------------------------------------
# Decoding with the KV cache equals the full forward.


@torch.no_grad()
def test_token_by_token_decoding(case: Case, model: Transformer) -> None:
    full = model(case.tokens)  # (B, T, V)
    cache = model.new_cache(2, max_len=T)  # with a window W < T the cache rotates
    assert cache.rotating == (case.shape.window is not None)
    steps = [model(case.tokens[:, t:t + 1], cache=cache) for t in range(T)]  # T x (B, 1, V)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=FP32_ATOL, rtol=0)


@pytest.mark.parametrize("chunk", [3, 5, 8])  # 8 exceeds both windows: a chunk longer than the cache
@torch.no_grad()
def test_chunked_decoding(case: Case, model: Transformer, chunk: int) -> None:
    full = model(case.tokens)
    cache = model.new_cache(2, max_len=T)
    parts = [model(case.tokens[:, s:s + chunk], cache=cache) for s in range(0, T, chunk)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=FP32_ATOL, rtol=0)


@pytest.mark.parametrize("chunk", [3, 5])
@torch.no_grad()
def test_prefill_then_decode(case: Case, model: Transformer, chunk: int) -> None:
    full = model(case.tokens)
    P = 13  # prompt length: past both windows, so decoding continues in a rotated cache
    cache = model.new_cache(2, max_len=T)
    h = model.prefill(case.tokens[:, :P], cache, chunk_size=chunk)  # (B, D)
    torch.testing.assert_close(model.lm_head(h).float(), full[:, P - 1], atol=FP32_ATOL, rtol=0)
    for t in range(P, T):
        torch.testing.assert_close(model(case.tokens[:, t:t + 1], cache=cache)[:, 0], full[:, t],
                                   atol=FP32_ATOL, rtol=0)


@torch.no_grad()
def test_left_padded_batch_equals_unpadded_rows(case: Case, model: Transformer) -> None:
    lengths = [T, 11, 6]  # 6 < both windows, 11 > them
    rows = [torch.randint(0, case.shape.vocab, (n,)) for n in lengths]
    pad = torch.tensor([T - n for n in lengths])  # (B,)
    padded = torch.stack([F.pad(r, (T - len(r), 0), value=0) for r in rows])  # (B, T)
    refs = [model(r[None])[0] for r in rows]  # unpadded, one row at a time: (n, V) each

    logits = model(padded, pad=pad)  # full forward over the padded batch
    for b, ref in enumerate(refs):
        torch.testing.assert_close(logits[b, pad[b]:], ref, atol=FP32_ATOL, rtol=0)

    # Prefill the padded prompt, then decode the rest token by token from a rotating cache.
    P = 14
    cache = model.new_cache(3, max_len=T, pad=pad)
    model.prefill(padded[:, :P], cache, chunk_size=4)
    for t in range(P, T):
        step = model(padded[:, t:t + 1], cache=cache)[:, 0]  # (B, V)
        for b, ref in enumerate(refs):
            torch.testing.assert_close(step[b], ref[t - pad[b]], atol=FP32_ATOL, rtol=0)


# ----------------------------------------------------------------------------------------------
# Masks, training switches.


@pytest.mark.parametrize("window", [None, 1, 3, 5])
def test_attention_mask_rule(window: int | None) -> None:
    q = torch.arange(4, 10)  # (T,) query times
    k = torch.tensor([6, 7, -1, 3, 4, 5, 8, 9, 0, 1, 2])  # (S,) rotating-cache order, one empty slot
    pad = torch.tensor([0, 2])  # (B,)
    mask = attention_mask(q, k, pad, window)  # (B, 1, T, S)
    for b in range(2):
        for i_, i in enumerate(q.tolist()):
            for j_, j in enumerate(k.tolist()):
                in_window = window is None or i - window < j
                want = (j >= pad[b] and 0 <= j <= i and in_window) or i == j
                assert mask[b, 0, i_, j_].item() == want, (b, i, j)
    assert not attention_mask(q, k, None, window)[..., 2].any()  # the empty slot (-1) is never seen


def test_activation_checkpointing_same_loss_and_grads(case: Case) -> None:
    grads = []
    for checkpointing in (False, True):
        model, _ = load_model(case.single)
        model.train()
        model.activation_checkpointing = checkpointing
        logits = model(case.tokens[:, :-1])  # (B, T-1, V)
        loss = F.cross_entropy(logits.flatten(0, 1), case.tokens[:, 1:].flatten())
        loss.backward()
        grads.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (loss0, g0), (loss1, g1) = grads
    # Recomputation runs the same kernels on the same inputs, so results are identical, not close.
    assert torch.equal(loss0, loss1)
    for name in g0:
        assert torch.equal(g0[name], g1[name]), name


@pytest.mark.parametrize("masked", [True, False], ids=["mask", "causal"])
def test_attend_equals_sdpa_with_shared_kv_heads(masked: bool) -> None:
    """Folding query heads into the query axis under a mask (no K/V copy, SDPA's masked kernels)
    changes nothing: the output equals SDPA's own head sharing (``enable_gqa``) on the same inputs."""
    torch.manual_seed(0)
    B, H, Hkv, T, S, Dh = 2, 8, 2, 5, 9, 16
    q = torch.randn(B, H, T, Dh)  # (B, H, T, Dh)
    k, v = torch.randn(B, Hkv, S, Dh), torch.randn(B, Hkv, S, Dh)  # (B, Hkv, S, Dh)
    pad = torch.tensor([0, 3])
    mask = attention_mask(torch.arange(S - T, S), torch.arange(S), pad, window=6) if masked else None
    if not masked:
        k, v = k[:, :, :T], v[:, :, :T]  # causal self-attention: S == T
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=not masked, enable_gqa=True)
    torch.testing.assert_close(attend(q, k, v, mask), expected, rtol=0, atol=1e-6)
