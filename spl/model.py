"""Mistral: a minimal decoder (RMSNorm, RoPE, grouped-query attention, SwiGLU) with a KV cache.

Module and parameter names follow Hugging Face's ``MistralForCausalLM`` minus its ``model.``
prefix (``layers.0.self_attn.q_proj.weight``), so HF checkpoints and PEFT adapters map by name;
``spl/layouts.py`` maps the original ``consolidated.safetensors`` names (``wq``, ``w1`` ...).

Shape letters used in comments throughout the project:
    B batch, T query tokens, S key tokens, D model dim, H query heads, Hkv key/value heads,
    Dh head dim, F hidden (SwiGLU) dim, V vocabulary.

Dtype policy (the one place it is stated): parameters and activations are kept in the model's
dtype (fp32 or bf16); RMSNorm statistics, rotary tables and logits are computed in fp32, and
attention's softmax accumulates in fp32 inside ``scaled_dot_product_attention``. Everything that
reduces over the vocabulary (log-softmax, losses) runs in fp32 downstream (``spl/logprobs.py``).

Attention masks. Token i attends to key j when j <= i and, with a sliding window W, j > i - W:
exactly W keys including itself, as in transformers (some original Mistral code uses W + 1).
Left padding (batched prompts of unequal length) is given per row as ``pad`` (B,); padded slots
are never attended to, and every query may attend to itself so no softmax row is empty.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from spl.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Statistics in fp32 (bf16 squares lose precision), cast back before the gain, as HF does.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_tables(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos and sin for rotate-half RoPE at integer ``positions`` (B, T) -> two (B, 1, T, Dh)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim)
    freqs = positions.float()[..., None] * inv_freq  # (B, T, Dh/2)
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]  # (B, 1, T, Dh)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # Rotate-half form: pairs (i, i + Dh/2) rotate together. Original checkpoints pair (2i, 2i+1);
    # checkpoint.py permutes their q/k rows once at load so this single form serves both.
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class KVCache:
    """Keys and values of past tokens, for incremental decoding.

    Rows share one time axis: the token written at step ``t`` of row b sits at position
    ``t - pad[b]`` (left padding). Without a sliding window (or when ``max_len`` fits inside it) the
    cache is linear: slot t holds time t. With a window W < max_len it rotates: slot ``t % W`` holds
    the latest time t, so memory stays at W keys however long the generation runs.
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, *, device=None,
                 dtype: torch.dtype = torch.float32, pad: torch.Tensor | None = None):
        self.window = cfg.sliding_window
        self.rotating = self.window is not None and max_len > self.window
        self.size = self.window if self.rotating else max_len
        self.max_len = max_len
        shape = (batch_size, cfg.n_kv_heads, self.size, cfg.head_dim)  # (B, Hkv, S, Dh)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        # Time held by each slot, -1 while empty; drives the mask of a rotating cache.
        self.slot_times = torch.full((self.size,), -1, device=device, dtype=torch.long)  # (S,)
        self.pad = pad if pad is not None else torch.zeros(batch_size, device=device, dtype=torch.long)
        self.pos = 0  # next time step to be written

    def key_times(self, T: int) -> torch.Tensor:
        """Times of the keys that queries at steps [pos, pos + T) attend over, in ``update`` order."""
        new = torch.arange(self.pos, self.pos + T, device=self.slot_times.device)  # (T,)
        if self.rotating:
            return torch.cat([self.slot_times, new])  # (S + T,) old slots, then the new tokens
        return torch.arange(self.pos + T, device=new.device)  # (pos + T,)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's (B, Hkv, T, Dh) keys and values; return all keys and values to attend."""
        T = k.shape[2]
        if not self.rotating:
            if self.pos + T > self.size:
                raise ValueError(f"KV cache overflow: {self.pos + T} tokens > max_len {self.size}")
            self.k[layer][:, :, self.pos:self.pos + T] = k
            self.v[layer][:, :, self.pos:self.pos + T] = v
            return self.k[layer][:, :, :self.pos + T], self.v[layer][:, :, :self.pos + T]
        # Rotating: attend over (old slots ++ new) *before* writing, so a chunk longer than the free
        # space cannot overwrite keys that its own first queries still need.
        k_all = torch.cat([self.k[layer], k], dim=2)  # (B, Hkv, S + T, Dh)
        v_all = torch.cat([self.v[layer], v], dim=2)
        keep = min(T, self.size)  # only the last W new tokens can ever be attended again
        slots = torch.arange(self.pos + T - keep, self.pos + T, device=k.device) % self.size
        self.k[layer][:, :, slots] = k[:, :, T - keep:]
        self.v[layer][:, :, slots] = v[:, :, T - keep:]
        return k_all, v_all

    def advance(self, T: int) -> None:
        if self.rotating:
            keep = min(T, self.size)
            times = torch.arange(self.pos + T - keep, self.pos + T, device=self.slot_times.device)
            self.slot_times[times % self.size] = times
        self.pos += T

    def reorder(self, index: torch.Tensor) -> None:
        """Select rows (beam/particle resampling, or ``repeat_interleave`` to share one prefill)."""
        self.k = [k.index_select(0, index) for k in self.k]
        self.v = [v.index_select(0, index) for v in self.v]
        self.pad = self.pad.index_select(0, index)


def attention_mask(q_times: torch.Tensor, k_times: torch.Tensor, pad: torch.Tensor | None,
                   window: int | None) -> torch.Tensor:
    """Boolean (B or 1, 1, T, S) mask, True where query time may attend to key time."""
    q, k = q_times[:, None], k_times[None, :]  # (T, 1), (1, S)
    allowed = (k >= 0) & (k <= q)  # (T, S) causal; negative times are empty slots
    if window is not None:
        allowed &= k > q - window
    allowed = allowed[None, None]  # (1, 1, T, S)
    if pad is not None:
        allowed = allowed & (k_times >= pad[:, None])[:, None, None, :]  # (B, 1, T, S)
        # A padded query would see no key at all; let it see itself so softmax stays finite.
        allowed = allowed | (q == k)[None, None]
    return allowed


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Softmax attention of q (B, H, T, Dh) over k, v (B, Hkv, S, Dh) -> (B, H, T, Dh); causal if no mask.

    Without a mask, ``enable_gqa`` shares each key/value head among H / Hkv query heads without
    copying it, on SDPA's flash kernel. With a mask (padding, KV-cache decode, sliding window) SDPA
    has no fused kernel that also shares heads (on a GPU it falls back to its math kernel). So the
    g = H / Hkv query heads of each key/value head are folded into its query axis instead: q becomes
    (B, Hkv, g*T, Dh) and the mask (., 1, g*T, S); keys and values are never copied (expanding them
    would copy the whole KV cache at every decoding step), and SDPA's memory-efficient kernels apply.
    """
    B, H, T, Dh = q.shape
    groups = H // k.shape[1]
    if mask is None or groups == 1:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                              enable_gqa=mask is None and groups > 1)  # (B, H, T, Dh)
    # Query head h uses key/value head h // groups (repeat_interleave order): (B, Hkv, g, T, Dh).
    qg = q.reshape(B, H // groups, groups * T, Dh)  # (B, Hkv, g*T, Dh)
    mg = mask[:, :, None].expand(-1, -1, groups, -1, -1).reshape(mask.shape[0], 1, groups * T, -1)
    out = F.scaled_dot_product_attention(qg, k, v, attn_mask=mg)  # (B, Hkv, g*T, Dh)
    return out.view(B, H, T, Dh)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x, cos, sin, mask, cache: KVCache | None, layer: int) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, Dh)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, Dh)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, Dh)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, Hkv, S, Dh)
        return self.o_proj(attend(q, k, v, mask).transpose(1, 2).reshape(B, T, -1))  # (B, T, D)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.down_proj = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU, (B, T, D)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, cache: KVCache | None, layer: int) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        # Kept separate from forward so losses can fuse it with the log-softmax (spl/logprobs.py).
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # Recompute each block in backward instead of storing its activations (trainer's switch).
        self.activation_checkpointing = False

    def forward(self, tokens: torch.Tensor, *, cache: KVCache | None = None, pad: torch.Tensor | None = None,
                return_hidden: bool = False) -> torch.Tensor:
        """Logits (B, T, V) in fp32, or final-normed hidden states (B, T, D) with ``return_hidden``.

        ``tokens`` (B, T) continue ``cache`` at its current step when one is given; otherwise they
        start at position 0. ``pad`` (B,) counts left-padding tokens (taken from the cache if any).
        """
        B, T = tokens.shape
        start = cache.pos if cache is not None else 0
        pad = cache.pad if cache is not None else pad
        window = self.cfg.sliding_window
        q_times = torch.arange(start, start + T, device=tokens.device)  # (T,)
        positions = q_times[None]  # (1, T): one rotary table serves every row when none is padded
        if pad is not None:
            positions = (positions - pad[:, None]).clamp(min=0)  # (B, T); padded slots get 0 (unused)
        x = self.embed_tokens(tokens)  # (B, T, D)
        cos, sin = rope_tables(positions, self.cfg.head_dim, self.cfg.rope_theta, x.dtype)
        if cache is None and pad is None and (window is None or T <= window):
            mask = None  # plain causal: lets SDPA pick its fused (flash / memory-efficient) kernels
        else:
            k_times = cache.key_times(T) if cache is not None else q_times
            mask = attention_mask(q_times, k_times, pad, window)
        checkpointing = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for i, layer in enumerate(self.layers):
            if checkpointing:
                x = checkpoint(layer, x, cos, sin, mask, cache, i, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, cache, i)
        if cache is not None:
            cache.advance(T)
        del cos, sin, mask  # free them, and (by rebinding x) the un-normed x, before the (B, T, V) logits
        x = self.norm(x)  # (B, T, D)
        return x if return_hidden else self.lm_head(x).float()  # (B, T, V)

    def new_cache(self, batch_size: int, max_len: int, pad: torch.Tensor | None = None) -> KVCache:
        """An empty cache on this model's device and dtype, sized for ``max_len`` time steps."""
        w = self.lm_head.weight
        return KVCache(self.cfg, batch_size, max_len, device=w.device, dtype=w.dtype, pad=pad)

    @torch.no_grad()
    def prefill(self, tokens: torch.Tensor, cache: KVCache, chunk_size: int | None = None) -> torch.Tensor:
        """Feed a prompt into ``cache`` in chunks (bounded attention memory); last hidden state (B, D)."""
        chunk_size = chunk_size or tokens.shape[1]
        for s in range(0, tokens.shape[1], chunk_size):
            h = self(tokens[:, s:s + chunk_size], cache=cache, return_hidden=True)  # (B, t, D)
        return h[:, -1]
