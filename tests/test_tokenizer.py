"""Tests for spl/tokenizer.py: the SentencePiece wrapper on the real Mistral v1 file.

mistral-common is test-only: it ships the real Mistral-7B v0.1/v0.2 SentencePiece file. The chat
templates are tested against their oracles in tests/test_chat_templates.py.
"""

import importlib.util
from pathlib import Path

import pytest

from spl.checkpoint import check_tokenizer_vocab
from spl.tokenizer import Tokenizer, load_tokenizer


def find_v1_model() -> Path:
    """The v1 tokenizer file inside the installed mistral-common package."""
    # find_spec locates the package without importing it (and its numpy pin) into the test process.
    spec = importlib.util.find_spec("mistral_common")
    if spec is None or spec.origin is None:
        pytest.skip("mistral-common is not installed; pip install -r requirements-test.txt")
    path = Path(spec.origin).parent / "data" / "tokenizer.model.v1"
    if not path.is_file():
        pytest.skip(f"mistral-common has no v1 tokenizer at {path}")
    return path


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return load_tokenizer(find_v1_model())


@pytest.mark.parametrize(
    "text", ["hello world", "  leading", "trailing  ", "\n\ttabs\n", "日本語 🤗 naïve", "[INST] </s>", ""]
)
def test_decode_encode_round_trip(tok: Tokenizer, text: str) -> None:
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok.encode(text, bos=True, eos=True)) == text


def test_special_ids(tok: Tokenizer) -> None:
    assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (32000, 1, 2)
    assert 0 <= tok.pad_id < tok.vocab_size
    assert tok.pad_id not in (tok.bos_id, tok.eos_id)
    # Text that looks like a control token is still text.
    assert tok.eos_id not in tok.encode("</s>") and tok.bos_id not in tok.encode("<s>")


def test_control_ids(tok: Tokenizer) -> None:
    assert (tok.control_id("<s>"), tok.control_id("</s>")) == (tok.bos_id, tok.eos_id)
    # In the v1 file "[INST]" is not a piece at all (it is text: "▁[", "INST", "]"), and "▁the" is a
    # normal piece: neither is a control token.
    assert tok.control_id("[INST]") is None and tok.control_id("▁the") is None


def test_chat_template_is_set_by_name(tok: Tokenizer) -> None:
    assert tok.chat_template is None
    zephyr = load_tokenizer(tok.path, "zephyr")
    assert zephyr.chat_template.name == "zephyr"
    zephyr.chat_template = "mistral-v1"
    hi = [{"role": "user", "content": "Hi"}]
    assert zephyr.encode_prompt(hi) == tok.encode("[INST] Hi [/INST]", bos=True)


def test_missing_file_names_path(tmp_path: Path) -> None:
    path = tmp_path / "nope.model"
    with pytest.raises(FileNotFoundError, match="nope.model"):
        load_tokenizer(path)


def test_non_model_file_names_path(tmp_path: Path) -> None:
    path = tmp_path / "not_a_model.model"
    path.write_text("this is not a protobuf")
    with pytest.raises(ValueError, match="not_a_model.model.*not a SentencePiece model"):
        load_tokenizer(path)


def test_check_vocab(tok: Tokenizer) -> None:
    check_tokenizer_vocab(tok.path, 32000)
    with pytest.raises(ValueError, match=r"tokenizer\.model\.v1.*32000.*32768"):
        check_tokenizer_vocab(tok.path, 32768)
