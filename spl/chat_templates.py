"""Chat templates as data: how a conversation becomes the token ids a model was trained on.

Each format is one entry of ``TEMPLATES``, read by one encoder (``encode_conversation``); adding a
format is a table entry plus its oracle test (tests/test_chat_templates.py), not a new code path.

    mistral-v1  Mistral-7B-Instruct v0.1/v0.2 (tokenizer v1; oracle: mistral-common)
                <s>▁[INST] {system}\\n\\n{user_1} [/INST]▁{assistant_1}</s>▁[INST] {user_2} [/INST]...
    mistral-v3  Mistral-7B-Instruct v0.3 (tokenizers v2 and v3; oracle: mistral-common)
                <s>[INST]▁{user_1}[/INST]▁{assistant_1}</s>[INST]▁{system}\\n\\n{user_2}[/INST]...
    zephyr      HuggingFaceH4/mistral-7b-sft-beta and zephyr-7b-beta (oracle: transformers'
                apply_chat_template with the alignment-handbook template)
                <s>▁<|system|>\\n{system}</s>▁\\n<|user|>\\n{user}</s>▁\\n<|assistant|>\\n{assistant}</s>
    chatml      SmolLM2, Qwen2/2.5 and many more (oracle: transformers' apply_chat_template with the
                checkpoint's own template); <|im_start|> and <|im_end|> are control tokens
                <|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n
                <|im_start|>assistant\n{assistant}<|im_end|>
    none        plain text, no markup: <s>▁{prompt} then ▁{response}</s>

(▁ marks SentencePiece's dummy-prefix space: it starts every separately encoded span of text. <s>
and </s> stand for the tokenizer's bos and eos: a byte-level BPE model without a bos starts with
nothing, and SmolLM2's eos is <|im_end|>.)

How a template is encoded:
- A turn is a tuple of parts: text, ``CONTENT`` (the message's text), or a ``Control`` piece, which
  is written as its one control-token id, never as text. Message text is always text: "[INST]" or
  "</s>" typed by a user never becomes a control token.
- ``encoder="mistral-common"`` encodes each turn's text in its own SentencePiece call;
  ``encoder="transformers"`` encodes the rendered string in one call between control tokens, so
  Zephyr's "\\n" after each </s> opens the next span (and gets its "▁"). (The hub's tokenizer.json
  for this vocabulary ranks BPE merges by SentencePiece score, so it encodes a span exactly as
  SentencePiece does, runs of spaces included.)
- Mistral merges consecutive messages of one role with "\\n\\n" and folds all system messages into
  one user turn (the FIRST for v1, the LAST for v3: mistral-common 1.13 does exactly this); v3 also
  drops trailing spaces from replies. Zephyr
  writes every message as its own turn, and puts an empty system turn first when none leads, as
  the alignment-handbook recipe that trained mistral-7b-sft-beta did.
- ChatML writes every message as its own turn and, when the conversation does not start with a
  system message, the default system prompt the checkpoint's own template defines (SmolLM2: "You
  are a helpful AI assistant named SmolLM, trained by Hugging Face"; ``default_system_prompt``).
- The response of a conversation is its final assistant turn from the first token of its text to
  its </s>; everything before it is the prompt, so prompt + response == the whole conversation,
  token for token. ``encode_prompt`` of the conversation minus that turn gives the same prompt.

Choosing a template (``resolve_chat_template``): a name, or ``auto``, which reads what the
checkpoint carries: the ``config.yaml`` saved with our own runs, then a ``chat_template`` in
``tokenizer_config.json`` (or ``chat_template.jinja``) matched against the known formats (an
unknown one is an error naming the file), then the tokenizer's own control pieces (``[INST]`` is a
control token only in v2/v3 files). A template whose control pieces contradict the tokenizer's
(mistral-v1 on a v3 file, or the reverse) is refused, naming both.

This module needs only an encode function and the ids of a few control tokens from a tokenizer
(``TokenizerLike``); ``spl/tokenizer.py`` builds on it, never the other way round.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path
from typing import Protocol

import yaml

Message = dict[str, str]
ROLES = ("user", "assistant", "system")


class ChatTemplateError(ValueError):
    """A template that is unknown, undecidable or contradicts the tokenizer; the message says which."""


class ChatTemplateUndecided(ChatTemplateError):
    """``auto`` found nothing that says how the checkpoint was trained."""


class Control(str):
    """A template piece written as the tokenizer's control token of that name (one id), never as text."""


CONTENT = object()  # stands for the message's text inside a turn
# BOS and EOS are the tokenizer's own bos_id and eos_id (whatever their pieces are called); BOS is
# written only when the tokenizer starts sequences with one.
BOS, EOS, INST, END_INST = Control("<s>"), Control("</s>"), Control("[INST]"), Control("[/INST]")
IM_START, IM_END = Control("<|im_start|>"), Control("<|im_end|>")


class TokenizerLike(Protocol):
    """What the encoder needs from a tokenizer (spl.tokenizer.Tokenizer)."""

    path: Path
    bos_id: int | None
    eos_id: int

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]: ...
    def control_id(self, piece: str) -> int | None: ...


@dataclass(frozen=True)
class ChatTemplate:
    """One format, as data: what each turn writes and how the encoder treats it."""

    name: str
    models: str  # what was trained with it (shown in messages and the README)
    user: tuple  # parts of a user turn
    assistant: tuple  # parts of an assistant turn; the parts before CONTENT end every prompt
    system: tuple | None  # parts of a system turn; None: system prompts join a user turn instead
    system_joins: str = ""  # "first" | "last": the user turn a joined system prompt is prepended to
    # Whose encoding trained the model: "mistral-common" encodes each turn's text on its own;
    # "transformers" renders the whole string and encodes each span between control tokens.
    encoder: str = "mistral-common"
    merge_runs: bool = False  # consecutive messages of one role form one turn, joined by "\n\n"
    reply_rstrip: str = ""  # characters stripped from the end of each assistant turn
    separator: str = ""  # text between two turns
    empty_system: bool = False  # an empty system turn goes first when the conversation has none there
    single_exchange: bool = False  # exactly one user message and at most one assistant reply
    # A system turn with the checkpoint's default system prompt goes first when the conversation has
    # none (ChatML); the prompt itself is the checkpoint's, read from its template.
    default_system: bool = False
    eos_piece: str = ""  # the tokenizer's eos must be this control token (ChatML: <|im_end|>)
    text_pieces: tuple[str, ...] = ()  # written as text: refused if the tokenizer makes them control tokens
    jinja_markers: tuple[str, ...] = ()  # all occur in a tokenizer_config.json chat_template of this format
    jinja_excludes: tuple[str, ...] = ()  # none occurs in it (similar formats: Llama-2, Phi-3, ChatML)


TEMPLATES: dict[str, ChatTemplate] = {t.name: t for t in (
    ChatTemplate(
        "mistral-v1", "Mistral-7B(-Instruct) v0.1/v0.2, Mixtral-8x7B: SentencePiece tokenizer v1",
        user=("[INST] ", CONTENT, " [/INST]"), assistant=(CONTENT, EOS), system=None, system_joins="first",
        merge_runs=True, text_pieces=("[INST]", "[/INST]"),
        jinja_markers=("[INST]", "[/INST]"), jinja_excludes=("<<SYS>>",)),  # <<SYS>>: Llama-2's format
    ChatTemplate(
        "mistral-v3", "Mistral-7B(-Instruct) v0.3: tokenizers v2/v3, [INST] and [/INST] are control tokens",
        user=(INST, CONTENT, END_INST), assistant=(CONTENT, EOS), system=None, system_joins="last",
        # v7 files (Mistral-Large-2411 and later) have a control token for system prompts.
        merge_runs=True, reply_rstrip=" ", text_pieces=("[SYSTEM_PROMPT]",),
        jinja_markers=("[INST]", "[/INST]"), jinja_excludes=("<<SYS>>",)),
    ChatTemplate(
        "zephyr", "HuggingFaceH4/mistral-7b-sft-beta, zephyr-7b-beta (Mistral-7B-v0.1 tokenizer)",
        user=("<|user|>\n", CONTENT, EOS), assistant=("<|assistant|>\n", CONTENT, EOS),
        system=("<|system|>\n", CONTENT, EOS), encoder="transformers", separator="\n", empty_system=True,
        jinja_markers=("<|user|>", "<|assistant|>"), jinja_excludes=("<|end|>", "<|im_start|>")),
    ChatTemplate(
        "chatml", "SmolLM2, Qwen2/2.5 and other ChatML models (<|im_start|>/<|im_end|> control tokens)",
        user=(IM_START, "user\n", CONTENT, IM_END), assistant=(IM_START, "assistant\n", CONTENT, IM_END),
        system=(IM_START, "system\n", CONTENT, IM_END), encoder="transformers", separator="\n",
        default_system=True, eos_piece="<|im_end|>", jinja_markers=("<|im_start|>", "<|im_end|>")),
    ChatTemplate(
        "none", "plain text (base models, the embedded demo)",
        user=(CONTENT,), assistant=(CONTENT, EOS), system=None, single_exchange=True),
)}
CHOICES = ("auto", *TEMPLATES)


def get_template(name: str) -> ChatTemplate:
    if name not in TEMPLATES:
        raise ChatTemplateError(f"unknown chat template {name!r}; choose one of {', '.join(CHOICES)}")
    return TEMPLATES[name]


# ------------------------------------------------------------------------------------- encoding

@dataclass(frozen=True)
class Encoded:
    ids: list[int]
    # One (start, end, message index) per assistant turn: ids[start:end] is its text and closing
    # </s>; the index is the turn's last message in the caller's list (the SFT loss mask uses it).
    responses: list[tuple[int, int, int]]
    last_role: str  # role of the final turn


def encode_conversation(template: ChatTemplate, tok: TokenizerLike, messages: list[Message], *,
                        generation_prompt: bool = False, default_system: str | None = None) -> Encoded:
    """Token ids of a conversation; with ``generation_prompt`` also the cue after which the model
    answers (Zephyr's "<|assistant|>\\n"; nothing for Mistral, whose prompts end at [/INST]).
    ``default_system``: the checkpoint's default system prompt, for templates that write one."""
    turns = _turns(template, messages, default_system)
    per_turn = template.encoder == "mistral-common"
    parts: list = [BOS]
    for i, (role, content, index) in enumerate(turns):
        parts += [template.separator] if i else []
        parts += [_BREAK] if per_turn else []
        for part in getattr(template, role):
            if part is CONTENT and role == "assistant":
                parts.append(_Mark(index))  # the response starts at its own text
            parts.append(content if part is CONTENT else part)
        if role == "assistant":
            parts.append(_END)
    if generation_prompt:
        header = template.assistant[:template.assistant.index(CONTENT)]
        parts += [template.separator, *([_BREAK] if per_turn else []), *header]
    ids, responses = _encode_parts(tok, parts)
    return Encoded(ids, responses, turns[-1][0])


class _Mark(int):
    """Where a response starts (the int is its message index)."""


_BREAK, _END = object(), object()  # end of a SentencePiece call; end of a response


def _encode_parts(tok: TokenizerLike, parts: list) -> tuple[list[int], list[tuple[int, int, int]]]:
    ids: list[int] = []
    responses: list[tuple[int, int, int]] = []
    run: list[str] = []  # text of the current SentencePiece call
    marks: list[tuple[int, int]] = []  # (character offset in the run, message index)

    def flush() -> None:
        text = "".join(run)
        full = tok.encode(text)
        for offset, index in marks:
            # A response that starts inside a run (Zephyr: after "<|assistant|>\n") must start on a
            # token boundary, or no exact prompt/response split exists. No Mistral piece contains
            # "\n" (it is a byte-fallback token), so this holds for every shipped template.
            head = tok.encode(text[:offset]) if offset else []
            if full[:len(head)] != head:
                raise ValueError(f"a token straddles the start of the response in {text!r}")
            responses.append((len(ids) + len(head), -1, index))
        ids.extend(full)
        run.clear()
        marks.clear()

    for part in parts:
        if isinstance(part, Control):
            flush()
            i = _control_id(tok, part)
            ids += [] if i is None else [i]
        elif part is _BREAK:
            flush()
        elif isinstance(part, _Mark):
            marks.append((sum(map(len, run)), int(part)))
        elif part is _END:
            flush()
            start, _, index = responses[-1]
            responses[-1] = (start, len(ids), index)
        else:
            run.append(part)
    flush()
    return ids, responses


def _control_id(tok: TokenizerLike, piece: Control) -> int | None:
    if piece is BOS:
        return tok.bos_id  # None: this tokenizer starts sequences with no bos
    if piece is EOS:
        return tok.eos_id
    i = tok.control_id(piece)
    if i is None:  # check_fits refuses such a pair first; this guards direct calls
        raise ChatTemplateError(f"tokenizer {tok.path} has no control token {piece}")
    return i


def _turns(t: ChatTemplate, messages: list[Message], default_system: str | None = None
           ) -> list[tuple[str, str, int]]:
    """(role, content, index of the turn's last message) per turn, after the template's system and
    merging rules; validates the conversation."""
    if not messages:
        raise ValueError("conversation is empty")
    for i, msg in enumerate(messages):
        if msg.get("role") not in ROLES or not isinstance(msg.get("content"), str):
            raise ValueError(f"message {i} must be {{'role': one of {ROLES}, 'content': str}}, got {msg!r}")
    indexed = list(enumerate(messages))
    if t.empty_system and messages[0]["role"] != "system":
        indexed.insert(0, (-1, {"role": "system", "content": ""}))
    if t.default_system and default_system is not None and messages[0]["role"] != "system":
        indexed.insert(0, (-1, {"role": "system", "content": default_system}))
    # Group runs of one role BEFORE dropping joined system messages (mistral-common does this, so
    # user, system, user stays two user turns).
    runs = (groupby(indexed, key=lambda im: im[1]["role"]) if t.merge_runs
            else ((m["role"], [(i, m)]) for i, m in indexed))
    turns = []
    for role, group in runs:
        group = list(group)
        if role == "system" and t.system is None:
            continue
        contents = [m["content"] for _, m in group]
        content = "\n\n".join(c for c in contents if c) if t.merge_runs else contents[0]
        turns.append((role, content, group[-1][0]))
    body = [turn for turn in turns if turn[0] != "system"]
    # mistral-common would insert an empty user turn here; for training data that is always a bug.
    if not body or body[0][0] != "user":
        raise ValueError("conversation must start with a user message (system messages aside)")
    # mistral-common refuses empty assistant turns too: there would be nothing to learn but eos.
    if any(role == "assistant" and not content for role, content, _ in turns):
        raise ValueError("assistant messages must have non-empty content")
    if t.single_exchange and [m["role"] for m in messages] not in (["user"], ["user", "assistant"]):
        raise ValueError(f"chat template {t.name!r} (plain text) takes one user message and at most one "
                         f"assistant reply, got roles {[m['role'] for m in messages]}")
    if t.reply_rstrip:  # mistral-common's v2/v3 encoders strip trailing spaces from replies
        turns = [(r, c.rstrip(t.reply_rstrip) if r == "assistant" else c, i) for r, c, i in turns]
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system" and m["content"])
    if t.system is None and system:
        users = [k for k, (role, _, _) in enumerate(turns) if role == "user"]
        k = users[0] if t.system_joins == "first" else users[-1]
        role, content, index = turns[k]
        turns[k] = (role, system + "\n\n" + content, index)
    return turns


# ------------------------------------------------------------------------------------ choosing

def check_fits(template: ChatTemplate, tok: TokenizerLike) -> None:
    """Refuse a template whose control pieces contradict the tokenizer's, naming both."""
    def fitting() -> str:
        names = [t.name for t in TEMPLATES.values() if not _misfit(t, tok)]
        return f"templates that fit this tokenizer: {', '.join(names)}"

    problem = _misfit(template, tok)
    if problem:
        raise ChatTemplateError(f"chat template {template.name!r} ({template.models}) does not fit tokenizer "
                                f"{tok.path}: {problem}; {fitting()}")


def _misfit(t: ChatTemplate, tok: TokenizerLike) -> str:
    needed = [p for role in ("user", "assistant", "system") for p in (getattr(t, role) or ())
              if isinstance(p, Control) and p not in (BOS, EOS)]
    for piece in dict.fromkeys(needed):  # in order of appearance: [INST] before [/INST]
        if tok.control_id(piece) is None:
            return f"the template writes {piece} as a control token, which this tokenizer does not have"
    if t.eos_piece and tok.control_id(t.eos_piece) != tok.eos_id:
        return (f"the template ends replies with {t.eos_piece}, but the tokenizer's eos is id {tok.eos_id}, "
                f"not {t.eos_piece} (id {tok.control_id(t.eos_piece)}): generation would not stop there")
    for piece in t.text_pieces:
        i = tok.control_id(piece)
        if i is not None:
            return (f"the tokenizer has {piece} as a control token (id {i}), which this template never "
                    "writes (it would encode the text as other pieces)")
    return ""


def resolve_chat_template(choice: str, tok: TokenizerLike,
                          dirs: list[str | Path | None] = ()) -> tuple[str, str]:
    """(template name, where it came from) for ``choice`` ("auto" or a name), checked against ``tok``.

    ``dirs``: where the checkpoint lives (the run's step directory, the model directory, a base
    model under an adapter, the tokenizer's directory); ``auto`` reads them in the order given.
    """
    if choice != "auto":
        template = get_template(choice)
        check_fits(template, tok)
        return template.name, "given"
    dirs = list(dict.fromkeys(Path(d) for d in dirs if d is not None))
    name, why = _auto(tok, dirs)
    try:
        check_fits(get_template(name), tok)
    except ChatTemplateError as err:
        raise ChatTemplateError(f"{err} (chosen because {why})") from None
    return name, why


class ChatTokenizer(TokenizerLike, Protocol):
    """A tokenizer that carries a template (spl.tokenizer.Tokenizer)."""

    chat_template: ChatTemplate | None
    default_system: str | None


def set_chat_template(tok: ChatTokenizer, choice: str, *, checkpoint: str | Path | None = None,
                      base: str | Path | None = None, adapter: str | Path | None = None) -> str:
    """Resolve ``choice`` for a checkpoint, set it (and its default system prompt, for templates that
    write one) on ``tok``, and return the line to print. ``checkpoint``: the run's step directory or
    the model directory; ``base``: the base model under a run's adapter; ``adapter``: an extra PEFT
    adapter (a run's sits in its step directory, whose config.yaml says how it trained)."""
    adapter = Path(adapter) if adapter else None
    dirs = [adapter, adapter and adapter.parent, checkpoint, base, tok.path.parent]
    name, why = resolve_chat_template(choice, tok, dirs)
    tok.chat_template = name
    line = f"chat template: {name} ({why})"
    if get_template(name).default_system:
        tok.default_system, source = default_system_prompt([Path(d) for d in dirs if d is not None])
        line += (f"; default system prompt {tok.default_system!r} (from {source})" if source else
                 "; no default system prompt (the checkpoint's template defines none)")
    return line


# A literal system turn in a ChatML Jinja template: the prompt it writes when a conversation has none.
_DEFAULT_SYSTEM_RE = re.compile(r"<\|im_start\|>system(?:\n|\\n)(.*?)<\|im_end\|>", re.DOTALL)


def default_system_prompt(dirs: list[Path]) -> tuple[str | None, Path | None]:
    """(the default system prompt, the file it came from) of the first checkpoint directory whose
    chat template writes a literal system turn (SmolLM2: "You are a helpful AI assistant named
    SmolLM, trained by Hugging Face"); (None, None) when none does."""
    for d in dict.fromkeys(dirs):
        found = _jinja_template(d)
        if found is None:
            continue
        for m in _DEFAULT_SYSTEM_RE.finditer(found[0]):
            text = m[1]
            if any(x in text for x in ("{{", "{%", "'", '"')):  # Jinja code, not a literal prompt
                continue
            return text.replace("\\n", "\n"), found[1]
        return None, None  # the checkpoint's own template writes none: never look further
    return None, None


def _auto(tok: TokenizerLike, dirs: list[Path]) -> tuple[str, str]:
    for d in dirs:  # 1. our own runs record what they trained with
        name = _saved_template(d / "config.yaml")
        if name is not None:
            return name, f"{d / 'config.yaml'} trained with it"
    for d in dirs:  # 2. the chat template a Hugging Face checkpoint ships
        found = _jinja_template(d)
        if found is not None:
            return _match_jinja(*found, tok), f"{found[1]} holds its chat_template"
    if tok.control_id("[INST]") is not None:  # 3. only v2/v3 SentencePiece files have [INST] as control
        return "mistral-v3", f"tokenizer {tok.path} has [INST] as a control token"
    for d in dirs:  # 4. an HF tokenizer without a chat template: a base model, trained on plain text
        if (d / "tokenizer_config.json").is_file():
            return "none", f"{d / 'tokenizer_config.json'} has no chat_template (a base model)"
    where = ", ".join(str(d) for d in dirs) or "(no directory)"
    raise ChatTemplateUndecided(
        f"cannot tell which chat template tokenizer {tok.path} was trained with: {where} hold no "
        "config.yaml of a train.py run and no tokenizer_config.json, and the tokenizer has no [INST] "
        f"control token; choose one with data.chat_template / --chat-template: {_choices()}")


def _saved_template(path: Path) -> str | None:
    """The template a train.py run saved in its config.yaml; None when the file is not such a config."""
    if not path.is_file():
        return None
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ChatTemplateError(f"{path}: invalid YAML ({err})") from None
    data = config.get("data") if isinstance(config, dict) else None
    if not isinstance(data, dict) or "chat_template" not in data:
        return None
    value = data["chat_template"]
    if value == "auto":  # a config saved before its template was resolved says nothing
        return None
    if isinstance(value, bool):
        # Runs saved before templates had names: true was the only template there was (Mistral v1),
        # except in the embedded demo (no train_path), which always trained on plain text.
        return "mistral-v1" if value and data.get("train_path") is not None else "none"
    if value not in TEMPLATES:
        raise ChatTemplateError(f"{path}: data.chat_template {value!r} is not one of {_choices()}")
    return value


def _jinja_template(d: Path) -> tuple[str, Path] | None:
    """(the chat template's Jinja source, the file it came from) of an HF directory, if it has one."""
    jinja = d / "chat_template.jinja"  # transformers >= 4.43 saves the template on its own
    if jinja.is_file():
        return jinja.read_text(), jinja
    path = d / "tokenizer_config.json"
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text()).get("chat_template")
    except (json.JSONDecodeError, AttributeError) as err:
        raise ChatTemplateError(f"{path}: not a JSON object ({err})") from None
    if isinstance(value, list):  # named templates: [{"name": "default", "template": ...}, ...]
        value = next((v.get("template") for v in value if isinstance(v, dict) and v.get("name") == "default"),
                     None)
    return (value, path) if isinstance(value, str) else None


def _match_jinja(source: str, path: Path, tok: TokenizerLike) -> str:
    """The known format a Jinja chat template writes; v1 and v3 share markers, the tokenizer decides."""
    known = [t for t in TEMPLATES.values() if t.jinja_markers and all(m in source for m in t.jinja_markers)
             and not any(x in source for x in t.jinja_excludes)]
    fits = [t for t in known if not _misfit(t, tok)]
    if len(fits) == 1:
        return fits[0].name
    if not known:
        raise ChatTemplateError(f"{path}: its chat_template is none of the known formats ({_choices()}); "
                                "choose one with data.chat_template / --chat-template if one of them is "
                                "what the model was trained with")
    raise ChatTemplateError(f"{path}: its chat_template looks like {', '.join(t.name for t in known)}, but "
                            f"tokenizer {tok.path} fits {', '.join(t.name for t in fits) or 'none of them'}; "
                            f"choose one with data.chat_template / --chat-template: {_choices()}")


def _choices() -> str:
    return ", ".join(f"{t.name} ({t.models})" for t in TEMPLATES.values())
