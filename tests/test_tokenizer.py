"""Tests for spl/tokenizer.py: the Mistral v1 chat template against mistral-common as an oracle.

mistral-common is test-only: it ships the real Mistral-7B v0.1/v0.2 SentencePiece file and encodes
conversations the way Mistral's own inference stack does, so equal ids means our template is right.
"""

from pathlib import Path

import pytest

from spl.checkpoint import check_tokenizer_vocab
from spl.tokenizer import Tokenizer

try:
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.protocol.instruct.validator import ValidationMode
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
except ImportError as err:  # pragma: no cover - depends on the test environment
    pytest.skip(f"mistral-common is not installed ({err}); pip install -r requirements-test.txt",
                allow_module_level=True)


def find_v1_model() -> Path:
    """The v1 tokenizer file inside the installed mistral-common package."""
    import mistral_common

    path = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    if not path.is_file():
        pytest.skip(f"mistral-common has no v1 tokenizer at {path}")
    return path


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer(find_v1_model())


def oracle_encode(messages: list[dict[str, str]]) -> list[int]:
    # "finetuning" mode accepts a final assistant turn (and then appends eos); "test" mode accepts a
    # final user turn. Same encoder either way, only the validator differs.
    final_assistant = messages[-1]["role"] == "assistant"
    mode = ValidationMode.finetuning if final_assistant else ValidationMode.test
    oracle = MistralTokenizer.from_file(str(find_v1_model()), mode=mode)
    return oracle.encode_chat_completion(ChatCompletionRequest(messages=messages)).tokens


U = lambda text: {"role": "user", "content": text}
A = lambda text: {"role": "assistant", "content": text}
S = lambda text: {"role": "system", "content": text}

# Each conversation ends with an assistant turn; dropping that turn gives a prompt, so each case tests
# both the training and the generation encodings.
CONVERSATIONS = {
    "single_turn": [U("What is 2+2?"), A("4.")],
    "two_exchanges": [U("Hi"), A("Hello! How can I help?"), U("Tell me a joke."), A("Why did the...")],
    "three_exchanges": [U("a"), A("b"), U("c"), A("d"), U("e"), A("f")],
    "system_prompt": [S("You are terse."), U("Name a colour."), A("Red."), U("Another."), A("Blue.")],
    # mistral-common forbids system after assistant; after a user it splits the user turn in two.
    "two_system_prompts": [S("Be kind."), U("x"), S("Be brief."), U("z"), A("w")],
    "unicode_emoji": [U("Ça va? 日本語で答えて 🤗"), A("はい、元気です 👍 — naïve café")],
    "whitespace": [U("  leading and trailing  \n"), A("\n\n  indented\tanswer  "), U(" "), A(" x")],
    "inst_like_text": [U("Say [INST] and [/INST] and </s> <s>"), A("[INST] ok [/INST] </s>")],
    "consecutive_users": [U("part one"), U("part two"), A("merged"), A("also merged")],
    "newline_heavy": [S("sys\n"), U("\n\nq\n\n"), A("\n")],
}


@pytest.mark.parametrize("name", CONVERSATIONS)
def test_encode_chat_matches_mistral_common(tok: Tokenizer, name: str) -> None:
    messages = CONVERSATIONS[name]
    assert tok.encode_chat(messages) == oracle_encode(messages)


@pytest.mark.parametrize("name", CONVERSATIONS)
def test_encode_prompt_matches_mistral_common(tok: Tokenizer, name: str) -> None:
    prompt = CONVERSATIONS[name][:-1]
    while prompt[-1]["role"] == "assistant":  # "consecutive_users" ends with two assistant messages
        prompt = prompt[:-1]
    ids = tok.encode_prompt(prompt)
    assert ids == oracle_encode(prompt)
    # The prompt must end exactly where the model starts answering: on "[/INST]", not on eos.
    assert tok.decode(ids[-4:]).endswith("[/INST]")


@pytest.mark.parametrize("name", CONVERSATIONS)
def test_prompt_response_split_is_exact(tok: Tokenizer, name: str) -> None:
    messages = CONVERSATIONS[name]
    prompt_ids, response_ids = tok.encode_prompt_response(messages)
    assert prompt_ids + response_ids == tok.encode_chat(messages)
    assert response_ids[-1] == tok.eos_id
    assert prompt_ids[0] == tok.bos_id and prompt_ids.count(tok.bos_id) == 1
    # The response is the final assistant turn alone (consecutive assistant messages merged with
    # "\n\n", as mistral-common does), so it decodes back to that text.
    n_final = len(messages) - max(i for i, m in enumerate(messages) if m["role"] != "assistant") - 1
    assert tok.decode(response_ids) == "\n\n".join(m["content"] for m in messages[-n_final:])


def test_exact_ids_of_a_system_prompt_conversation(tok: Tokenizer) -> None:
    """Pin the format itself, so a change in a future mistral-common cannot pass silently."""
    ids = tok.encode_chat([S("Be nice."), U("Hi"), A("Hello!"), U("Bye")])
    assert ids == tok.encode("[INST] Be nice.\n\nHi [/INST]", bos=True) + tok.encode("Hello!", eos=True) + (
        tok.encode("[INST] Bye [/INST]")
    )


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


def test_wrong_final_role_errors(tok: Tokenizer) -> None:
    with pytest.raises(ValueError, match="final 'assistant'"):
        tok.encode_prompt([U("q"), A("a")])
    with pytest.raises(ValueError, match="final 'user'"):
        tok.encode_prompt_response([U("q")])


@pytest.mark.parametrize(
    "messages, match",
    [
        ([], "empty"),
        ([A("first")], "start with a user"),
        ([S("only system")], "start with a user"),
        ([U("q"), A("")], "non-empty"),
        ([{"role": "tool", "content": "x"}], "message 0"),
        ([U("q"), {"role": "assistant", "content": None}], "message 1"),
    ],
)
def test_malformed_conversations_error(tok: Tokenizer, messages: list, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        tok.encode_chat(messages)


def test_missing_file_names_path(tmp_path: Path) -> None:
    path = tmp_path / "nope.model"
    with pytest.raises(FileNotFoundError, match="nope.model"):
        Tokenizer(path)


def test_non_model_file_names_path(tmp_path: Path) -> None:
    path = tmp_path / "not_a_model.model"
    path.write_text("this is not a protobuf")
    with pytest.raises(ValueError, match="not_a_model.model.*not a SentencePiece model"):
        Tokenizer(path)


def test_check_vocab(tok: Tokenizer) -> None:
    check_tokenizer_vocab(tok.path, 32000)
    with pytest.raises(ValueError, match=r"tokenizer\.model\.v1.*32000.*32768"):
        check_tokenizer_vocab(tok.path, 32768)
