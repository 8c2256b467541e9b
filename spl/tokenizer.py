"""SentencePiece tokenizer and the Mistral instruct chat template (v1: Mistral-7B-Instruct v0.1/v0.2).

The template, token for token as mistral-common 1.13 encodes it for the v1 tokenizer:

    <s>[INST] {system}\\n\\n{user_1} [/INST]{assistant_1}</s>[INST] {user_2} [/INST]{assistant_2}</s>...

- One bos, at the start. Each user turn is the single string f"[INST] {content} [/INST]" encoded in
  one call, so SentencePiece's dummy-prefix space puts a "▁" before "[INST]". "[INST]" is plain
  text in v1 (not a control token): the same words typed by a user encode to the same ids.
- Each assistant turn is encoded on its own (so it too starts with a dummy-prefix "▁") and is
  followed by eos.
- All system messages, wherever they appear, are joined with "\\n\\n" and prepended to the FIRST
  user turn. (Older mistral-common releases used the last user turn; we match the installed oracle.)
- Consecutive messages of one role are merged with "\\n\\n" (empty ones skipped), as mistral-common
  does; a system message between two user messages therefore leaves two separate user turns.

Public API (messages are [{"role": "user" | "assistant" | "system", "content": str}, ...]):
    Tokenizer(path)                          SentencePiece model file → tokenizer
      .encode(text, bos=False, eos=False)    text → ids
      .decode(ids)                           ids → text
      .vocab_size .bos_id .eos_id .pad_id    ids for batching
      .encode_chat(messages)                 any conversation → ids
      .encode_prompt(messages)               conversation ending in a user turn → ids to generate from
      .encode_prompt_response(messages)      conversation ending in an assistant turn →
                                             (prompt_ids, response_ids), response ending with eos;
                                             prompt_ids + response_ids == encode_chat(messages)
(Whether a tokenizer fits a model is checked by spl.checkpoint.check_tokenizer_vocab.)

There is no `add_generation_prompt`: in this format a conversation ending in a user turn already ends
with "[/INST]", which is exactly where the model starts its answer.
"""

from itertools import groupby
from pathlib import Path

import sentencepiece as spm

Message = dict[str, str]
ROLES = ("user", "assistant", "system")


class Tokenizer:
    """Thin wrapper over a SentencePiece model, plus the Mistral v1 chat template."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        # SentencePiece's own errors are terse ("could not parse ModelProto"); name the file instead.
        if not self.path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {self.path}")
        try:
            self._sp = spm.SentencePieceProcessor(model_file=str(self.path))
        except (RuntimeError, OSError) as err:
            raise ValueError(f"{self.path} is not a SentencePiece model ({err})") from err

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

    def decode(self, ids: list[int]) -> str:
        # Control ids (bos/eos) decode to ""; strip padding with the mask first, since pad (unk)
        # decodes to " ⁇ ".
        # int() accepts tensors and numpy arrays too.
        return self._sp.decode([int(i) for i in ids])

    def encode_chat(self, messages: list[Message]) -> list[int]:
        return [tok for turn in self._encode_turns(messages)[0] for tok in turn]

    def encode_prompt(self, messages: list[Message]) -> list[int]:
        turns, last_role = self._encode_turns(messages)
        if last_role != "user":
            raise ValueError(f"a prompt must end with a user turn, got a final {last_role!r} turn")
        return [tok for turn in turns for tok in turn]

    def encode_prompt_response(self, messages: list[Message]) -> tuple[list[int], list[int]]:
        turns, last_role = self._encode_turns(messages)
        if last_role != "assistant":
            raise ValueError(f"a response must be the final assistant turn, got a final {last_role!r} turn")
        # Turns are encoded separately, so splitting at a turn boundary is exact: no token straddles
        # the prompt/response boundary and the concatenation equals encode_chat(messages).
        return [tok for turn in turns[:-1] for tok in turn], turns[-1]

    def _encode_turns(self, messages: list[Message]) -> tuple[list[list[int]], str]:
        """Encode [bos], then each merged turn separately; also return the role of the last turn."""
        system, turns = _merge_turns(messages)
        encoded = [[self.bos_id]]
        for i, (role, content) in enumerate(turns):
            if role == "user":
                # The system prompt joins the first user turn only when it is non-empty.
                if i == 0 and system:
                    content = system + "\n\n" + content
                encoded.append(self.encode(f"[INST] {content} [/INST]"))
            else:
                encoded.append(self.encode(content, eos=True))
        return encoded, turns[-1][0]


def _merge_turns(messages: list[Message]) -> tuple[str, list[tuple[str, str]]]:
    """Split a conversation into (system prompt, [(role, content), ...]) the way mistral-common does."""
    if not messages:
        raise ValueError("conversation is empty")
    for i, msg in enumerate(messages):
        if msg.get("role") not in ROLES or not isinstance(msg.get("content"), str):
            raise ValueError(f"message {i} must be {{'role': one of {ROLES}, 'content': str}}, got {msg!r}")
    # Non-empty system contents, in order, wherever they appear.
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system" and m["content"])
    # Group consecutive messages of one role BEFORE dropping system ones: mistral-common does this, so
    # user, system, user stays two user turns.
    turns: list[tuple[str, str]] = []
    for role, group in groupby(messages, key=lambda m: m["role"]):
        if role != "system":
            turns.append((role, "\n\n".join(m["content"] for m in group if m["content"])))
    # mistral-common would insert an empty user turn here; for training data that is always a bug.
    if not turns or turns[0][0] != "user":
        raise ValueError("conversation must start with a user message (system messages aside)")
    # mistral-common refuses empty assistant turns too: there would be nothing to learn but eos.
    for role, content in turns:
        if role == "assistant" and not content:
            raise ValueError("assistant messages must have non-empty content")
    return system, turns
