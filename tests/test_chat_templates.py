"""Tests for spl/chat_templates.py: every template against an independent oracle, the exact
prompt/response split, refusals, and how ``auto`` picks a template.

Oracles (test-only dependencies):
- mistral-common ships Mistral's real SentencePiece files (v1: Mistral-7B v0.1/v0.2; v2 and v3:
  [INST]/[/INST] as control tokens, v3 being Mistral-7B v0.3's) and encodes conversations the way
  Mistral's own stack does: mistral-v1 must equal it on the v1 file, mistral-v3 on v2 and v3.
- transformers' apply_chat_template with Zephyr's template string (below, with its source) on a
  LlamaTokenizer built from the v1 file: the tokenizer HuggingFaceH4/mistral-7b-sft-beta uses.
"""

import functools
import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from spl.chat_templates import CHOICES, TEMPLATES, ChatTemplateError, resolve_chat_template
from spl.tokenizer import Tokenizer, load_tokenizer

try:
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.protocol.instruct.validator import ValidationMode
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
except ImportError as err:  # pragma: no cover - depends on the test environment
    pytest.skip(f"mistral-common is not installed ({err}); pip install -r requirements-test.txt",
                allow_module_level=True)

FILES = {"v1": "tokenizer.model.v1", "v2": "mistral_instruct_tokenizer_240216.model.v2",
         "v3": "mistral_instruct_tokenizer_240323.model.v3",
         "v7": "mistral_instruct_tokenizer_241114.model.v7"}


def model_file(version: str) -> Path:
    """A tokenizer file inside the installed mistral-common package."""
    spec = importlib.util.find_spec("mistral_common")
    path = Path(spec.origin).parent / "data" / FILES[version]
    if not path.is_file():
        pytest.skip(f"mistral-common has no {version} tokenizer at {path}")
    return path


@functools.cache
def tokenizer(version: str, template: str | None) -> Tokenizer:
    return load_tokenizer(model_file(version), template)


@functools.cache
def mistral_oracle(version: str, final_assistant: bool) -> MistralTokenizer:
    # "finetuning" mode accepts a final assistant turn (and then appends eos); "test" mode accepts a
    # final user turn. Same encoder either way, only the validator differs.
    mode = ValidationMode.finetuning if final_assistant else ValidationMode.test
    return MistralTokenizer.from_file(str(model_file(version)), mode=mode)


def mistral_encode(version: str, messages: list[dict[str, str]]) -> list[int]:
    oracle = mistral_oracle(version, messages[-1]["role"] == "assistant")
    return oracle.encode_chat_completion(ChatCompletionRequest(messages=messages)).tokens


U = lambda text: {"role": "user", "content": text}
A = lambda text: {"role": "assistant", "content": text}
S = lambda text: {"role": "system", "content": text}

# Each conversation ends with an assistant turn; dropping the final assistant messages gives a
# prompt, so each case tests both the training and the generation encodings.
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
    "system_multi_turn_unicode": [S("Réponds en français.\n\tBref."), U("Bonjour"), A("Salut !"),
                                  U("Et 2×3 ?"), A("6 — évidemment."), U("Merci ✓"), A("De rien.")],
    "code_and_quotes": [U('def f(x):\n    return "x"  # ok?'), A("```python\nprint('hi')\n```")],
}
# Zephyr's oracle goes through transformers, which reads "</s>" and "<s>" typed in a message as the
# control tokens themselves (our encoder keeps message text as text: see test_message_text_stays_text).
ZEPHYR_CASES = [name for name in CONVERSATIONS if name != "inst_like_text"]


def prompt_of(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """The conversation without its final assistant message(s): what a model is asked."""
    prompt = messages[:-1]
    while prompt[-1]["role"] == "assistant":  # "consecutive_users" ends with two assistant messages
        prompt = prompt[:-1]
    return prompt


# ------------------------------------------------------------------------- Mistral vs mistral-common

@pytest.mark.parametrize("name", CONVERSATIONS)
@pytest.mark.parametrize("version, template",
                         [("v1", "mistral-v1"), ("v2", "mistral-v3"), ("v3", "mistral-v3")])
def test_mistral_matches_mistral_common(version: str, template: str, name: str) -> None:
    tok, messages = tokenizer(version, template), CONVERSATIONS[name]
    assert tok.encode_chat(messages) == mistral_encode(version, messages)
    prompt = prompt_of(messages)
    assert tok.encode_prompt(prompt) == mistral_encode(version, prompt)


def test_mistral_formats_pinned() -> None:
    """Pin each format itself, so a change in a future mistral-common cannot pass silently: v1 puts
    the system prompt on the FIRST user turn with [INST] as text, v3 on the LAST with control tokens."""
    messages = [S("Be nice."), U("Hi"), A("Hello!"), U("Bye")]
    v1 = tokenizer("v1", "mistral-v1")
    assert v1.encode_chat(messages) == (v1.encode("[INST] Be nice.\n\nHi [/INST]", bos=True)
                                        + v1.encode("Hello!", eos=True) + v1.encode("[INST] Bye [/INST]"))
    v3 = tokenizer("v3", "mistral-v3")
    assert (v3.control_id("[INST]"), v3.control_id("[/INST]")) == (3, 4)
    assert v3.encode_chat(messages) == ([v3.bos_id, 3, *v3.encode("Hi"), 4, *v3.encode("Hello!", eos=True),
                                         3, *v3.encode("Be nice.\n\nBye"), 4])


# ------------------------------------------------------------------------ Zephyr vs transformers

# Source: the alignment-handbook recipe that trained HuggingFaceH4/mistral-7b-sft-beta and
# zephyr-7b-beta: DEFAULT_CHAT_TEMPLATE in src/alignment/data.py (github.com/huggingface/
# alignment-handbook, first commit 2023-11-08) and chat_template in recipes/zephyr-7b-beta/sft/
# config_full.yaml; zephyr-7b-beta's tokenizer_config.json carries the same string.
ZEPHYR_JINJA = (
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n"
    "{{ '<|user|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'system' %}\n"
    "{{ '<|system|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'assistant' %}\n"
    "{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n{% endif %}\n"
    "{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}")


@pytest.fixture(scope="module")
def hf_zephyr():
    """transformers over the tokenizer.json that Mistral-7B-v0.1 (and so mistral-7b-sft-beta) ships,
    rebuilt from the v1 SentencePiece file the way transformers' converter wrote it in 2023:
    normalizer Prepend("▁") + Replace(" ", "▁") on each span between special tokens (the "legacy"
    behaviour: a "▁" after every </s>), no pre-tokenizer, BPE with byte fallback and merges ranked by
    piece score, bos added by the post-processor.

    The merge order matters for runs of spaces: ranked by score, the whitespace-only pieces (score
    -1e9) merge last and BPE agrees with SentencePiece; GGUF exports of Mistral-7B models list the
    hub file's merges as "▁ t", "i n", "e r", "▁ a", "h e", ..., which is this order. (transformers 5's
    LlamaTokenizer.from_pretrained(tokenizer.model) ranks them by id instead, "▁ ▁" first, and splits
    "    return" as ▁▁▁▁ return where the hub file and SentencePiece give ▁▁▁ ▁return.)
    """
    transformers = pytest.importorskip("transformers", reason="transformers is the Zephyr oracle")
    tokenizers = pytest.importorskip("tokenizers", reason="transformers' tokenizers backend")
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model_file("v1")))
    vocab = {sp.id_to_piece(i): i for i in range(sp.vocab_size())}
    scores = {sp.id_to_piece(i): sp.get_score(i) for i in range(sp.vocab_size())}
    try:  # the converter's own merge ranking (transformers >= 5)
        from transformers.tokenization_utils_base import generate_merges
        merges = generate_merges(vocab, scores)
    except ImportError:  # transformers 4.x
        from transformers.convert_slow_tokenizer import SentencePieceExtractor
        merges = SentencePieceExtractor(str(model_file("v1"))).extract(list(scores.items()))[1]
    assert merges[:5] == [("▁", "t"), ("i", "n"), ("e", "r"), ("▁", "a"), ("h", "e")]
    tk = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=merges, unk_token="<unk>",
                                                    fuse_unk=True, byte_fallback=True))
    tk.normalizer = tokenizers.normalizers.Sequence([tokenizers.normalizers.Prepend("▁"),
                                                     tokenizers.normalizers.Replace(" ", "▁")])
    tk.add_special_tokens(["<unk>", "<s>", "</s>"])
    tk.post_processor = tokenizers.processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>",
                                              unk_token="<unk>")
    hf.chat_template = ZEPHYR_JINJA
    return hf


def zephyr_oracle(hf, messages: list[dict[str, str]], add_generation_prompt: bool) -> list[int]:
    # The handbook's apply_chat_template inserts an empty system message when none leads, then
    # renders text that the SFT/DPO trainers tokenize with bos added.
    if messages[0]["role"] != "system":
        messages = [S(""), *messages]
    text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    return hf(text)["input_ids"]


@pytest.mark.parametrize("name", ZEPHYR_CASES)
def test_zephyr_matches_transformers(hf_zephyr, name: str) -> None:
    tok, messages = tokenizer("v1", "zephyr"), CONVERSATIONS[name]
    # The rendered string ends every message with "\n", the last one included; our conversation
    # ends at the final </s>, where the model stops.
    assert tok.encode_chat(messages) + tok.encode("\n") == zephyr_oracle(hf_zephyr, messages, False)
    prompt = prompt_of(messages)
    assert tok.encode_prompt(prompt) == zephyr_oracle(hf_zephyr, prompt, True)


def test_zephyr_format_pinned() -> None:
    tok = tokenizer("v1", "zephyr")
    ids = tok.encode_prompt([U("Hi")])
    # An empty system turn first; each span of text after </s> is one SentencePiece call, so it
    # starts with the dummy prefix "▁" (28705) and then "\n" (13).
    assert ids == [tok.bos_id, *tok.encode("<|system|>\n"), tok.eos_id, *tok.encode("\n<|user|>\nHi"),
                   tok.eos_id, *tok.encode("\n<|assistant|>\n")]
    assert tok.encode("\n<|assistant|>\n")[:2] == [28705, 13]
    assert tok.encode("\n<|assistant|>\n") != tok.encode("\n") + tok.encode("<|assistant|>\n")


# --------------------------------------------------------------------------- every template

CASES = [(v, t, name) for v, t in [("v1", "mistral-v1"), ("v3", "mistral-v3"), ("v1", "zephyr"),
                                   ("v3", "zephyr")] for name in CONVERSATIONS]
PLAIN = {"single_turn": [U("What is 2+2?"), A("4.")], "whitespace": [U("  q \n"), A("\n a ")],
         "unicode": [U("日本語 🤗"), A("naïve — café")], "inst_like": [U("[INST] </s>"), A("<s> ok")]}
CASES += [(v, "none", name) for v in ("v1", "v3") for name in PLAIN]


@pytest.mark.parametrize("version, template, name", CASES)
def test_prompt_response_split_is_exact(version: str, template: str, name: str) -> None:
    tok = tokenizer(version, template)
    messages = (PLAIN if template == "none" else CONVERSATIONS)[name]
    prompt_ids, response_ids = tok.encode_prompt_response(messages)
    assert prompt_ids + response_ids == tok.encode_chat(messages)
    assert response_ids[-1] == tok.eos_id and tok.eos_id not in response_ids[:-1]
    assert prompt_ids[0] == tok.bos_id and prompt_ids.count(tok.bos_id) == 1
    # The response is the final assistant turn: Mistral merges consecutive assistant messages with
    # "\n\n", Zephyr keeps each as its own turn. Decoded in context it ends with that text, and
    # the prompt before it is what generation starts from.
    merged = TEMPLATES[template].merge_runs
    context = prompt_of(messages) if merged else messages[:-1]
    if context[-1]["role"] == "user":
        assert prompt_ids == tok.encode_prompt(context)
    finals = [m["content"] for m in messages[len(prompt_of(messages)):]]
    text = "\n\n".join(finals) if merged else finals[-1]
    assert tok.decode(prompt_ids + response_ids).endswith(text.rstrip(TEMPLATES[template].reply_rstrip))


def test_plain_text_is_bos_prompt_then_response() -> None:
    tok = tokenizer("v1", "none")
    pair = tok.encode_prompt_response([U("Q?"), A("A.")])
    assert pair == (tok.encode("Q?", bos=True), tok.encode("A.", eos=True))
    hh = "\n\nHuman: hi\n\nAssistant:"
    assert tok.encode_prompt([U(hh)]) == tok.encode(hh, bos=True)
    for messages in ([S("s"), U("q")], [U("q"), A("a"), U("q2")], [U("a"), U("b")]):
        with pytest.raises(ValueError, match="'none' .*one user message"):
            tok.encode_chat(messages)


@pytest.mark.parametrize("template", ["mistral-v1", "zephyr", "none"])
def test_message_text_stays_text(template: str) -> None:
    """"[INST]", "</s>" or "<s>" typed in a message never become control tokens."""
    tok = tokenizer("v1", template)
    _, response = tok.encode_prompt_response([U("[INST] </s> <s>"), A("[/INST] </s> <s> done")])
    assert response.count(tok.eos_id) == 1 and tok.bos_id not in response


def test_sft_spans_cover_every_assistant_turn() -> None:
    messages = CONVERSATIONS["system_multi_turn_unicode"]
    for version, template in [("v1", "mistral-v1"), ("v3", "mistral-v3"), ("v1", "zephyr")]:
        tok = tokenizer(version, template)
        ids, spans = tok.encode_chat_responses(messages)
        assert [index for _, _, index in spans] == [2, 4, 6]
        assert [ids[end - 1] for _, end, _ in spans] == [tok.eos_id] * 3
        texts = [tok.decode(ids[s:e]).strip() for s, e, _ in spans]
        assert texts == ["Salut !", "6 — évidemment.", "De rien."]
        # v3 moves the system prompt to the last user turn, so earlier spans are not prompt+response
        # of a shorter conversation; the spans come from the full encoding, as mistral-common trains.
        assert tok.encode_prompt_response(messages) == (ids[:spans[-1][0]], ids[spans[-1][0]:])


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
@pytest.mark.parametrize("template", ["mistral-v1", "zephyr"])
def test_malformed_conversations_error(template: str, messages: list, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        tokenizer("v1", template).encode_chat(messages)


def test_wrong_final_role_errors() -> None:
    tok = tokenizer("v1", "zephyr")
    with pytest.raises(ValueError, match="final 'assistant'"):
        tok.encode_prompt([U("q"), A("a")])
    with pytest.raises(ValueError, match="final 'user'"):
        tok.encode_prompt_response([U("q")])
    with pytest.raises(ValueError, match="no chat template"):
        tokenizer("v1", None).encode_prompt([U("q")])


# ------------------------------------------------------------------------------ refusals

@pytest.mark.parametrize("version, template, match", [
    ("v3", "mistral-v1", r"'mistral-v1'.*model\.v3.*\[INST\] as a control token \(id 3\)"),
    ("v2", "mistral-v1", r"'mistral-v1'.*model\.v2.*\[INST\] as a control token"),
    ("v1", "mistral-v3", r"'mistral-v3'.*tokenizer\.model\.v1.*writes \[INST\] as a control token.*does not"),
    ("v7", "mistral-v3", r"'mistral-v3'.*model\.v7.*\[SYSTEM_PROMPT\] as a control token"),
])
def test_contradicting_tokenizer_is_refused(version: str, template: str, match: str) -> None:
    with pytest.raises(ChatTemplateError, match=match):
        load_tokenizer(model_file(version), template)
    tok = load_tokenizer(model_file(version))
    with pytest.raises(ChatTemplateError, match=match):
        tok.chat_template = template
    with pytest.raises(ChatTemplateError, match=match):
        resolve_chat_template(template, tok)


def test_templates_without_inst_fit_any_tokenizer() -> None:
    for version in ("v1", "v3"):
        for template in ("zephyr", "none"):
            assert tokenizer(version, template).chat_template.name == template
    with pytest.raises(ChatTemplateError, match="unknown chat template 'llama-2'.*mistral-v1.*chatml"):
        load_tokenizer(model_file("v1"), "llama-2")
    # ChatML's <|im_start|> is a control token; Mistral's SentencePiece files have none.
    with pytest.raises(ChatTemplateError, match=r"'chatml'.*writes <\|im_start\|> as a control token"):
        load_tokenizer(model_file("v1"), "chatml")


# ----------------------------------------------------------------------------------- auto

# Real Jinja templates, for auto's matching. Mistral-7B-Instruct-v0.1's tokenizer_config.json and the
# v2/v3 form, both quoted by mistral's cookbook (concept-deep-dive/tokenization/chat_templates.md).
MISTRAL_V1_JINJA = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ ' [INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}")
MISTRAL_V3_JINJA = MISTRAL_V1_JINJA.replace("' [INST] '", "'[INST] '").replace("' [/INST]'", "'[/INST]'")
CHATML_JINJA = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
                "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}")
LLAMA2_JINJA = "{% if messages[0]['role'] == 'system' %}{{ '[INST] <<SYS>>\\n' }}{% endif %} [INST] [/INST]"


def hf_dir(tmp_path: Path, version: str, chat_template=None, **files) -> Path:
    """An HF-style model directory: tokenizer.model plus the given tokenizer_config / other files."""
    d = tmp_path / version
    d.mkdir(exist_ok=True)
    shutil.copy(model_file(version), d / "tokenizer.model")
    config = {"tokenizer_class": "LlamaTokenizer"}
    if chat_template is not None:
        config["chat_template"] = chat_template
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    for name, text in files.items():
        (d / name.replace("__", ".")).write_text(text)
    return d


def auto(d: Path, version: str) -> tuple[str, str]:
    return resolve_chat_template("auto", load_tokenizer(d / "tokenizer.model"), [d])


@pytest.mark.parametrize("version, jinja, expected", [
    ("v1", ZEPHYR_JINJA, "zephyr"), ("v1", MISTRAL_V1_JINJA, "mistral-v1"),
    ("v3", MISTRAL_V3_JINJA, "mistral-v3"),
    # The markers say "Mistral"; the tokenizer's control pieces say which one.
    ("v3", MISTRAL_V1_JINJA, "mistral-v3"), ("v1", MISTRAL_V3_JINJA, "mistral-v1"),
    ("v1", [{"name": "tool_use", "template": CHATML_JINJA}, {"name": "default", "template": ZEPHYR_JINJA}],
     "zephyr"),
])
def test_auto_reads_tokenizer_config(tmp_path: Path, version: str, jinja, expected: str) -> None:
    name, why = auto(hf_dir(tmp_path, version, jinja), version)
    assert name == expected and "tokenizer_config.json" in why


def test_auto_reads_chat_template_jinja_file(tmp_path: Path) -> None:
    d = hf_dir(tmp_path, "v1", None, chat_template__jinja=ZEPHYR_JINJA)
    assert auto(d, "v1") == ("zephyr", f"{d / 'chat_template.jinja'} holds its chat_template")


PHI3_JINJA = ("{% for message in messages %}{{'<|' + message['role'] + '|>' + '\n' + message['content'] + "
              "'<|end|>\n'}}{% endfor %}")


@pytest.mark.parametrize("jinja", [PHI3_JINJA, LLAMA2_JINJA])
def test_auto_refuses_unknown_jinja(tmp_path: Path, jinja: str) -> None:
    d = hf_dir(tmp_path, "v1", jinja)
    with pytest.raises(ChatTemplateError, match=r"v1/tokenizer_config\.json: its chat_template is none of "
                       r"the known formats \(mistral-v1 .*mistral-v3 .*zephyr .*chatml .*none "):
        auto(d, "v1")


def test_auto_names_chatml_but_refuses_it_on_a_mistral_tokenizer(tmp_path: Path) -> None:
    """A ChatML template beside a SentencePiece file without <|im_start|>: recognized, then refused."""
    d = hf_dir(tmp_path, "v1", CHATML_JINJA)
    with pytest.raises(ChatTemplateError, match=r"looks like chatml, but tokenizer .*fits none of them"):
        auto(d, "v1")


def test_auto_from_control_pieces_and_base_models(tmp_path: Path) -> None:
    # A v3 file alone: [INST] is a control token only in v2/v3 files.
    name, why = resolve_chat_template("auto", tokenizer("v3", None), [])
    assert name == "mistral-v3" and "[INST] as a control token" in why
    # An HF tokenizer with no chat template is a base model's: plain text.
    assert auto(hf_dir(tmp_path, "v1"), "v1")[0] == "none"
    # A v1 file with nothing beside it could be Mistral-Instruct, Zephyr or a base model: refuse.
    with pytest.raises(ChatTemplateError, match=r"cannot tell.*model\.v1.*mistral-v1 .*zephyr .*none"):
        resolve_chat_template("auto", tokenizer("v1", None), [tmp_path])


def test_auto_prefers_the_runs_saved_config(tmp_path: Path) -> None:
    saved = "data:\n  train_path: x.jsonl\n  chat_template: zephyr\n"
    d = hf_dir(tmp_path, "v1", MISTRAL_V1_JINJA, config__yaml=saved)
    assert auto(d, "v1") == ("zephyr", f"{d / 'config.yaml'} trained with it")
    # Runs saved before templates had names: true meant Mistral v1, except in the demo (no data file).
    (d / "config.yaml").write_text("data:\n  train_path: x.jsonl\n  chat_template: true\n")
    assert auto(d, "v1")[0] == "mistral-v1"
    (d / "config.yaml").write_text("data:\n  train_path: null\n  chat_template: true\n")
    assert auto(d, "v1")[0] == "none"
    # A saved template that contradicts the tokenizer is refused, saying where it came from.
    (d / "config.yaml").write_text("data:\n  chat_template: mistral-v3\n")
    with pytest.raises(ChatTemplateError, match=r"'mistral-v3'.*chosen because .*config\.yaml trained"):
        auto(d, "v1")
    (d / "config.yaml").write_text("data:\n  chat_template: llama\n")
    with pytest.raises(ChatTemplateError, match=r"config\.yaml: data\.chat_template 'llama' is not one of"):
        auto(d, "v1")


def test_choices() -> None:
    assert CHOICES == ("auto", "mistral-v1", "mistral-v3", "zephyr", "chatml", "none")


# ------------------------------------------------------------------------- scripts end to end

def test_paper_configs_name_their_templates(tmp_path: Path) -> None:
    from spl.config import load_config

    root = Path(__file__).resolve().parent.parent
    data = tmp_path / "d.jsonl"
    data.write_text("{}\n")
    expected = {"hh_rlhf_spl.yaml": "mistral-v1", "hh_rlhf_reward.yaml": "mistral-v1",
                "ultrafeedback_spl.yaml": "zephyr"}  # §4.2's base, mistral-7b-sft-beta, is a Zephyr SFT
    for name, template in expected.items():
        overrides = [f"model.checkpoint={tmp_path}", f"data.train_path={data}"]
        cfg = load_config(root / "configs" / name, overrides)
        assert cfg.data.chat_template == template


@pytest.fixture(scope="module")
def zephyr_model(tmp_path_factory) -> Path:
    """A tiny random Mistral in the HF layout with the v1 tokenizer and Zephyr's tokenizer_config.json,
    as HuggingFaceH4/mistral-7b-sft-beta ships them."""
    import torch

    from spl.config import ModelConfig
    from spl.model import Transformer
    from spl.saving import save_model

    cfg = ModelConfig(dim=32, n_layers=1, head_dim=8, hidden_dim=64, n_heads=4, n_kv_heads=2,
                      vocab_size=32000, rope_theta=1e4, max_seq_len=512)
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("zephyr") / "model"
    save_model(Transformer(cfg), cfg, out)
    shutil.copy(model_file("v1"), out / "tokenizer.model")
    config = {"tokenizer_class": "LlamaTokenizer", "chat_template": ZEPHYR_JINJA}
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return out


def test_scripts_resolve_print_save_and_refuse(zephyr_model: Path, tmp_path: Path) -> None:
    from tests.conftest import ROOT, run_script

    hh = ROOT / "tests" / "fixtures" / "hh_rlhf_sample.jsonl"
    out = tmp_path / "run"
    args = ["train.py", f"model.checkpoint={zephyr_model}", f"data.train_path={hh}", "data.max_len=96",
            "data.max_prompt_len=64", "train.batch_size=2", "train.micro_batch_size=2", "train.max_steps=1",
            "train.warmup_steps=0"]
    res = run_script([*args, f"train.out_dir={out}"])
    source = zephyr_model / "tokenizer_config.json"
    assert f"chat template: zephyr ({source} holds its chat_template)" in res.stdout
    step = out / "checkpoints" / "step_0000001"
    for config in (out / "config.yaml", step / "config.yaml"):
        assert "chat_template: zephyr" in config.read_text()
    # sample.py reads the run's saved config; a contradicting choice is refused naming both, before
    # any weights load (exit 2, one line, as every bad sample.py option).
    res = run_script(["sample.py", "--checkpoint", str(out), "--prompt", "Hi", "--max-new-tokens", "2"])
    assert f"chat template: zephyr ({step / 'config.yaml'} trained with it)" in res.stderr
    bad = run_script(["sample.py", "--checkpoint", str(out), "--prompt", "Hi", "--chat-template",
                      "mistral-v3"], check=False)
    assert bad.returncode == 2 and "'mistral-v3'" in bad.stderr and "tokenizer.model" in bad.stderr
    assert "Traceback" not in bad.stderr
    # train.py refuses before loading the model; evaluate.py checks the name before anything.
    bad = run_script([*args, f"train.out_dir={tmp_path / 'bad'}", "data.chat_template=mistral-v3"],
                     check=False)
    assert bad.returncode == 1 and "does not fit tokenizer" in bad.stderr and "Traceback" not in bad.stderr
    bad = run_script(["evaluate.py", "--checkpoint", str(out), "--chat-template", "llama-2"], check=False)
    assert bad.returncode == 1 and "--chat-template must be one of auto, mistral-v1" in bad.stderr


def test_demo_checkpoints_and_exports_say_plain_text(demo_run: Path, tmp_path: Path) -> None:
    """Every directory our code writes carries its template: the demo's run, its reference model
    (which sample.py and evaluate.py are pointed at too) and a merged export."""
    from spl.export import export

    exported = export(demo_run, out=tmp_path / "merged")
    tok = load_tokenizer(demo_run / "reference" / "tokenizer.model")  # a 160-piece BPE: nothing to go on
    for d in (demo_run, demo_run / "reference", exported):
        assert resolve_chat_template("auto", tok, [d])[0] == "none", d
