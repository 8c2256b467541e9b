"""Tokenizers: SentencePiece (Mistral) and byte-level BPE (``tokenizer.json``: SmolLM2, Llama 3, Qwen),
each carrying the chat template its checkpoint was trained with.

The templates themselves are data in spl/chat_templates.py, each proven against its oracle; a
Tokenizer carries the one chosen for its checkpoint (checked against its control tokens when set)
and, for templates that have one, the default system prompt the checkpoint defines.

Public API (messages are [{"role": "user" | "assistant" | "system", "content": str}, ...]):
    load_tokenizer(path, chat_template=None) a tokenizer file or a directory holding one → Tokenizer
                                             (the kind from the file name: TOKENIZER_FILES)
    find_tokenizer(*dirs)                    the first tokenizer file in ``dirs``, or None
    copy_tokenizer(path, dest)               a tokenizer's files into a checkpoint directory
      .kind                                  "sentencepiece" | "bpe"
      .chat_template                         the ChatTemplate in use (settable by name), or None
      .default_system                        system prompt used when a conversation has none (or None)
      .encode(text, bos=False, eos=False)    text → ids; text is always text (never control tokens)
      .decode(ids)                           ids → text, control tokens dropped
      .vocab_size .bos_id .eos_id .pad_id    bos_id is None when the model starts sequences with none
      .control_id(piece)                     id of a control token ("[INST]", "<|im_start|>"), or None
      .files                                 the files that make this tokenizer (copied into runs)
      .encode_chat(messages)                 any conversation → ids
      .encode_prompt(messages)               conversation ending in a user turn → ids to generate from
                                             (with the template's answer cue, e.g. "<|assistant|>\n")
      .encode_prompt_response(messages)      conversation ending in an assistant turn →
                                             (prompt_ids, response_ids), response ending with eos;
                                             prompt_ids + response_ids == encode_chat(messages)
      .encode_chat_responses(messages)       (ids, [(start, end, message index) per assistant turn])
    TextStream(tokenizer)                    streamed text of a growing completion, in whole characters
(Whether a tokenizer fits a model is checked by spl.checkpoint.check_tokenizer_vocab.)

Adding a tokenizer kind is one class here and one entry of ``TOKENIZER_FILES``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from spl.chat_templates import ROLES, ChatTemplate, Message, check_fits, encode_conversation, get_template

__all__ = ["ROLES", "BPETokenizer", "Message", "SentencePieceTokenizer", "TextStream", "Tokenizer",
           "TokenizerError", "copy_tokenizer", "find_tokenizer", "load_tokenizer"]


class TokenizerError(ValueError):
    """A tokenizer file that cannot be used; the message names the file."""


class Tokenizer:
    """What every tokenizer offers: ids, special ids, and the chat template of its checkpoint.

    Subclasses implement ``encode``, ``decode``, ``control_id`` and the id properties.
    """

    kind = ""
    path: Path
    files: list[Path]

    def __init__(self) -> None:
        self._template: ChatTemplate | None = None
        self.default_system: str | None = None

    # -- the vocabulary ------------------------------------------------------------------------
    vocab_size: int
    bos_id: int | None
    eos_id: int
    pad_id: int

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self._encode_text(text)
        if bos and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        if eos:
            ids = [*ids, self.eos_id]
        return ids

    def _encode_text(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids) -> str:
        raise NotImplementedError

    def control_id(self, piece: str) -> int | None:
        raise NotImplementedError

    # -- the chat template ---------------------------------------------------------------------
    @property
    def chat_template(self) -> ChatTemplate | None:
        return self._template

    @chat_template.setter
    def chat_template(self, name: str) -> None:
        template = get_template(name)
        check_fits(template, self)  # e.g. mistral-v1 on a v3 file, whose [INST] is a control token
        self._template = template

    @property
    def poses_chat(self) -> bool:
        """Whether prompts are posed as chat messages (a template other than "none")."""
        return self._template is not None and self._template.name != "none"

    def encode_chat(self, messages: list[Message]) -> list[int]:
        return self._encode(messages).ids

    def encode_prompt(self, messages: list[Message]) -> list[int]:
        encoded = self._encode(messages, generation_prompt=True)
        if encoded.last_role != "user":
            raise ValueError(f"a prompt must end with a user turn, got a final {encoded.last_role!r} turn")
        return encoded.ids

    def encode_prompt_response(self, messages: list[Message]) -> tuple[list[int], list[int]]:
        encoded = self._encode(messages)
        if encoded.last_role != "assistant":
            raise ValueError("a response must be the final assistant turn, got a final "
                             f"{encoded.last_role!r} turn")
        # The response is the final assistant turn from its first token through eos; the encoder
        # checked that it starts on a token boundary, so the split is exact.
        start, end, _ = encoded.responses[-1]
        return encoded.ids[:start], encoded.ids[start:end]

    def encode_chat_responses(self, messages: list[Message]) -> tuple[list[int], list[tuple[int, int, int]]]:
        """The conversation's ids and, per assistant turn, (start, end, index of its last message):
        ids[start:end] is that turn's text and eos (the spans an SFT loss trains on)."""
        encoded = self._encode(messages)
        return encoded.ids, encoded.responses

    def _encode(self, messages: list[Message], generation_prompt: bool = False):
        if self._template is None:
            raise ValueError(f"tokenizer {self.path} has no chat template: set one "
                             "(spl.chat_templates.resolve_chat_template picks it for a checkpoint)")
        return encode_conversation(self._template, self, messages, generation_prompt=generation_prompt,
                                   default_system=self.default_system)


# ---------------------------------------------------------------------------------------------
# SentencePiece (Mistral's tokenizer.model)


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model file; every sequence starts with bos."""

    kind = "sentencepiece"

    def __init__(self, path: str | Path, chat_template: str | None = None) -> None:
        import sentencepiece as spm

        super().__init__()
        self.path = Path(path)
        self.files = [self.path]
        # SentencePiece's own errors are terse ("could not parse ModelProto"); name the file instead.
        if not self.path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {self.path}")
        try:
            self._sp = spm.SentencePieceProcessor(model_file=str(self.path))
        except (RuntimeError, OSError) as err:
            raise TokenizerError(f"{self.path} is not a SentencePiece model ({err})") from err
        if chat_template is not None:
            self.chat_template = chat_template

    @property
    def vocab_size(self) -> int:
        return self._sp.vocab_size()

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def pad_id(self) -> int:
        # Mistral's model has no pad piece (SentencePiece reports -1, not a valid embedding row). Any
        # real row would do, because every batch carries a mask and padded positions are never
        # attended to or scored; we pick unk (0), which never collides with bos/eos, so a pad can
        # never be mistaken for the end of a response. Byte fallback means unk never occurs in text.
        pad = self._sp.pad_id()
        return pad if pad >= 0 else self._sp.unk_id()

    def _encode_text(self, text: str) -> list[int]:
        # SentencePiece never parses "<s>"/"</s>" in text as control ids: those only come from flags.
        return self._sp.encode(text)

    def control_id(self, piece: str) -> int | None:
        """The id of control piece ``piece`` (bos, eos, v3's "[INST]"), or None when it is not one."""
        i = self._sp.piece_to_id(piece)  # unknown pieces map to unk, which is not a control piece
        return i if self._sp.is_control(i) and self._sp.id_to_piece(i) == piece else None

    def decode(self, ids) -> str:
        # Control ids (bos/eos) decode to ""; strip padding with the mask first, since pad (unk)
        # decodes to " ⁇ ". int() accepts tensors and numpy arrays too.
        return self._sp.decode([int(i) for i in ids])


# ---------------------------------------------------------------------------------------------
# Byte-level BPE (tokenizer.json, through Hugging Face's tokenizers library)


class BPETokenizer(Tokenizer):
    """A ``tokenizer.json`` read by Hugging Face's ``tokenizers`` (an optional run-time dependency,
    requirements-models.txt), with the special tokens its ``tokenizer_config.json`` names.

    Text is always text: ``encode_special_tokens`` makes "<|im_end|>" typed in a message encode as
    ordinary pieces, never as the control token. ``bos_id`` is None unless the checkpoint starts
    sequences with one (``add_bos_token`` in tokenizer_config.json, else what the file's own
    post-processor adds): SmolLM2's "bos" ``<|im_start|>`` opens every ChatML turn instead.
    Byte-level ids decode to valid text only in whole-character groups; ``TextStream`` streams them.
    """

    kind = "bpe"

    def __init__(self, path: str | Path, chat_template: str | None = None) -> None:
        from spl.extras import ExtraBroken, ExtraMissing, import_extra

        super().__init__()
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {self.path}")
        try:
            tokenizers = import_extra("tokenizers", needed_for=f"the byte-level BPE tokenizer {self.path}",
                                      hint="pip install -r requirements-models.txt")
        except (ExtraMissing, ExtraBroken) as err:
            raise TokenizerError(str(err).replace(" skipped:", " needs a package:")) from None
        try:
            self._tk = tokenizers.Tokenizer.from_file(str(self.path))
        except Exception as err:  # tokenizers raises its own Exception subclass with a terse message
            raise TokenizerError(f"{self.path} is not a tokenizers JSON file ({err})") from err
        self._tk.encode_special_tokens = True
        config_path = self.path.with_name("tokenizer_config.json")
        self.files = [self.path] + ([config_path] if config_path.is_file() else [])
        config = _read_config(config_path)
        self._special = {t.content: i for i, t in self._tk.get_added_tokens_decoder().items() if t.special}
        eos = self._named_id(config, "eos_token", config_path)
        if eos is None:
            raise TokenizerError(f"{config_path}: no eos_token; generation would never stop")
        self._eos = eos
        bos = self._named_id(config, "bos_token", config_path)
        if "add_bos_token" in config:
            self._bos = bos if config["add_bos_token"] else None
        else:  # what the file's post-processor puts in front (Llama 3: <|begin_of_text|>), if anything
            plain, full = self._tk.encode("a", add_special_tokens=False).ids, self._tk.encode("a").ids
            self._bos = full[0] if len(full) > len(plain) and full[0] != plain[0] else None
        # A pad id only needs to be a real row (batches carry masks); keep it off eos and bos so
        # that padding can never read as the end of a response.
        candidates = [self._named_id(config, k, config_path) for k in ("pad_token", "unk_token")]
        self._pad = next((i for i in candidates if i is not None and i not in (self._eos, self._bos)),
                         next(i for i in range(self.vocab_size) if i not in (self._eos, self._bos)))
        if chat_template is not None:
            self.chat_template = chat_template

    def _named_id(self, config: dict, key: str, where: Path) -> int | None:
        value = config.get(key)
        if isinstance(value, dict):  # transformers 4 saved AddedToken dicts
            value = value.get("content")
        if value is None:
            return None
        i = self._tk.token_to_id(value)
        if i is None:
            raise TokenizerError(f"{where}: {key} {value!r} is not in {self.path}'s vocabulary")
        return i

    @property
    def vocab_size(self) -> int:
        return self._tk.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int | None:
        return self._bos

    @property
    def eos_id(self) -> int:
        return self._eos

    @property
    def pad_id(self) -> int:
        return self._pad

    def _encode_text(self, text: str) -> list[int]:
        return self._tk.encode(text, add_special_tokens=False).ids

    def control_id(self, piece: str) -> int | None:
        return self._special.get(piece)

    def decode(self, ids) -> str:
        return self._tk.decode([int(i) for i in ids], skip_special_tokens=True)


def _read_config(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise TokenizerError(f"{path}: cannot read JSON ({err})") from err
    if not isinstance(config, dict):
        raise TokenizerError(f"{path}: expected a JSON object")
    return config


# ---------------------------------------------------------------------------------------------
# Finding and loading

# File name in a checkpoint directory -> the class that reads it, in order of preference.
TOKENIZER_FILES: dict[str, type[Tokenizer]] = {"tokenizer.model": SentencePieceTokenizer,
                                               "tokenizer.json": BPETokenizer}


def find_tokenizer(*dirs: str | Path | None) -> Path | None:
    """The first tokenizer file (``TOKENIZER_FILES``) in the first of ``dirs`` that holds one."""
    for d in dirs:
        if d is None:
            continue
        for name in TOKENIZER_FILES:
            if (Path(d) / name).is_file():
                return Path(d) / name
    return None


def copy_tokenizer(path: str | Path, dest: str | Path) -> None:
    """Copy a tokenizer file (under its kind's name) and the tokenizer_config.json beside it, if any,
    into directory ``dest``: what a checkpoint needs to be read again on its own."""
    path, dest = Path(path), Path(dest)
    name = "tokenizer.json" if path.suffix == ".json" else "tokenizer.model"
    shutil.copyfile(path, dest / name)
    if name == "tokenizer.json" and path.with_name("tokenizer_config.json").is_file():
        shutil.copyfile(path.with_name("tokenizer_config.json"), dest / "tokenizer_config.json")


def load_tokenizer(path: str | Path, chat_template: str | None = None) -> Tokenizer:
    """A tokenizer from its file (``*.model``: SentencePiece, ``*.json``: byte-level BPE) or from a
    directory holding one."""
    path = Path(path)
    if path.is_dir():
        found = find_tokenizer(path)
        if found is None:
            raise FileNotFoundError(f"no tokenizer in {path} (looked for {', '.join(TOKENIZER_FILES)})")
        path = found
    cls = BPETokenizer if path.suffix == ".json" else SentencePieceTokenizer
    return cls(path, chat_template)


class TextStream:
    """Text of a growing completion, released in whole characters (``push`` one id at a time).

    Each push decodes the whole completion (SentencePiece joins pieces with context, so decoding
    token by token would mangle spaces) and releases what is new, except a trailing U+FFFD: a
    byte-level BPE id may end inside a multi-byte character (an emoji is up to 4 ids), whose
    bytes decode as replacement characters until the rest arrives. ``flush`` releases what is left.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer, self.ids, self.shown = tokenizer, [], ""

    def push(self, token: int) -> str:
        self.ids.append(int(token))
        text = self.tokenizer.decode(self.ids)
        stable = text.rstrip("\ufffd")
        if not stable.startswith(self.shown):  # a decoder that rewrites earlier text: wait for flush
            return ""
        new, self.shown = stable[len(self.shown):], stable
        return new

    def flush(self) -> str:
        text = self.tokenizer.decode(self.ids)
        new = text[len(self.shown):] if text.startswith(self.shown) else ""
        self.shown = text
        return new
