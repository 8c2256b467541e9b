"""SentencePiece tokenizer, with the chat template its checkpoint was trained with.

The templates themselves (Mistral v1 and v3, Zephyr, plain text) are data in spl/chat_templates.py,
each proven against its oracle; a Tokenizer carries the one chosen for its checkpoint, checked
against its control pieces when it is set.

Public API (messages are [{"role": "user" | "assistant" | "system", "content": str}, ...]):
    Tokenizer(path, chat_template=None)      SentencePiece model file → tokenizer; the template is a
                                             name from spl.chat_templates.TEMPLATES (resolve "auto"
                                             with spl.chat_templates.resolve_chat_template)
      .chat_template                         the ChatTemplate in use (settable by name), or None
      .encode(text, bos=False, eos=False)    text → ids
      .decode(ids)                           ids → text
      .vocab_size .bos_id .eos_id .pad_id    ids for batching
      .control_id(piece)                     id of a control piece ("[INST]" in v3 files), or None
      .encode_chat(messages)                 any conversation → ids
      .encode_prompt(messages)               conversation ending in a user turn → ids to generate from
                                             (with the template's answer cue, e.g. "<|assistant|>\n")
      .encode_prompt_response(messages)      conversation ending in an assistant turn →
                                             (prompt_ids, response_ids), response ending with eos;
                                             prompt_ids + response_ids == encode_chat(messages)
      .encode_chat_responses(messages)       (ids, [(start, end, message index) per assistant turn])
(Whether a tokenizer fits a model is checked by spl.checkpoint.check_tokenizer_vocab.)
"""

from pathlib import Path

import sentencepiece as spm

from spl.chat_templates import ROLES, ChatTemplate, Message, check_fits, encode_conversation, get_template

__all__ = ["ROLES", "Message", "Tokenizer"]


class Tokenizer:
    """Thin wrapper over a SentencePiece model, plus the chat template of its checkpoint."""

    def __init__(self, path: str | Path, chat_template: str | None = None) -> None:
        self.path = Path(path)
        # SentencePiece's own errors are terse ("could not parse ModelProto"); name the file instead.
        if not self.path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {self.path}")
        try:
            self._sp = spm.SentencePieceProcessor(model_file=str(self.path))
        except (RuntimeError, OSError) as err:
            raise ValueError(f"{self.path} is not a SentencePiece model ({err})") from err
        self._template: ChatTemplate | None = None
        if chat_template is not None:
            self.chat_template = chat_template

    @property
    def chat_template(self) -> ChatTemplate | None:
        return self._template

    @chat_template.setter
    def chat_template(self, name: str) -> None:
        template = get_template(name)
        check_fits(template, self)  # e.g. mistral-v1 on a v3 file, whose [INST] is a control token
        self._template = template

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

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        # SentencePiece never parses "<s>"/"</s>" in text as control ids: those only come from flags.
        ids = self._sp.encode(text)
        if bos:
            ids = [self.bos_id, *ids]
        if eos:
            ids = [*ids, self.eos_id]
        return ids

    def control_id(self, piece: str) -> int | None:
        """The id of control piece ``piece`` (bos, eos, v3's "[INST]"), or None when it is not one."""
        i = self._sp.piece_to_id(piece)  # unknown pieces map to unk, which is not a control piece
        return i if self._sp.is_control(i) and self._sp.id_to_piece(i) == piece else None

    def decode(self, ids: list[int]) -> str:
        # Control ids (bos/eos) decode to ""; strip padding with the mask first, since pad (unk)
        # decodes to " ⁇ ".
        # int() accepts tensors and numpy arrays too.
        return self._sp.decode([int(i) for i in ids])

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
        return encode_conversation(self._template, self, messages, generation_prompt=generation_prompt)
