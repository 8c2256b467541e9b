"""Data: JSONL records → token ids with response masks → padded, shuffled, resumable batches.

Flow (one way): JSONL file or in-memory dicts → read_preference / read_sft (parse, validate, tag
each record with its file and line) → tokenize and truncate (skip and count harmless records) →
PreferenceDataset / SFTDataset → BatchIterator (seeded shuffle, rank slicing, resume) → collate_*.

Record formats, one JSON object per line:
  preference  {"prompt": str | messages, "chosen": R, "rejected": R}, where R is a response string,
              a list of assistant messages (merged with "\\n\\n", as the Mistral templates merge them),
              or a full conversation [*prompt, assistant] (UltraFeedback). "prompt" may be left out
              when the sides are full conversations: the prompt is then everything before the final
              assistant message, and both sides must agree on it.
  hh          raw HH-RLHF dialogues {"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": ...},
              split at the last "\\n\\nAssistant:" inside the COMMON PREFIX of chosen and rejected:
              a response may itself contain that marker (HH test idx 567), so the last marker of
              chosen is not always the boundary.
  sft         {"text": str}: plain language modelling, loss on every token after bos;
              {"prompt": ..., "response": R}: loss on the response only;
              {"messages": [...]}: loss on EVERY assistant turn (each is a demonstration, as in
              UltraChat SFT), the user and system turns being context.

Tokens: the tokenizer's chat template (spl/chat_templates.py: mistral-v1, mistral-v3, zephyr) encodes
the prompt and the response; with the "none" template (plain-string prompts: base models, the tiny
CPU demo) prompt = bos + encode(prompt) and response = encode(response) + eos. When prompt + longest
response exceeds max_len, the prompt keeps its LAST max_prompt_len tokens (bos kept in front), then
responses are cut from the right.

Batch contract (collate_preference / collate_sft; the trainer relies on exactly this):
  input_ids   (N, T) long  prompt + response, right-padded with pad_id; for preference batches N = 2B
                           with chosen rows [0:B] and rejected rows [B:2B] (one forward for both)
  targets     (N, T) long  targets[:, t] = input_ids[:, t + 1]; the last column is pad
  loss_mask   (N, T) bool  aligned with targets: True exactly where targets[:, t] is a response token
  last_index  (N,)   long  position of each row's last real token (the reward model's scalar head)
  index       (B,)   long  dataset positions of the batch's items (added by dataset.collate)
  ref_logps   (N,)   float reference log-probs of each row, when the dataset carries them
                           (``dataset.ref_logps``, one (chosen, rejected) row per item)
T is the longest full sequence, rounded up to pad_to_multiple_of: the last target column is therefore
always padding, a column wasted so that one tensor serves the policy, the reference and the reward
model (whose head reads the final token as an input).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from spl.tokenizer import ROLES, Message, Tokenizer

FORMATS = ("auto", "preference", "hh", "sft")
HH_MARKER = "\n\nAssistant:"
HH_TURN = re.compile(r"\n\n(Human|Assistant):")  # only "\n\n"-led markers: idx 355 has a bare "Human:"
HH_ROLES = {"Human": "user", "Assistant": "assistant"}
Source = str | Path | Iterable[dict]  # a JSONL path, or records already in memory
# One JSONL record may hold at most this many bytes (4 MiB): ~7x a preference record filling a
# 32k-token context with every character \u-escaped (~9 bytes a token, two sides), yet a runaway
# line is refused before it costs seconds and hundreds of MB to parse and tokenize.
MAX_LINE_BYTES = 4 * 2**20


class Where(NamedTuple):
    """Where a record came from; in-memory records get path "<records>" and their 1-based position."""

    path: str
    line: int


class DataError(ValueError):
    """A malformed record: the message names the file, the line and the field."""

    def __init__(self, where: Where, field: str, message: str) -> None:
        super().__init__(f"{where.path}, line {where.line}, field {field!r}: {message}")
        self.where, self.field = where, field


@dataclass(frozen=True)
class PreferenceText:
    """A parsed preference record, before tokenization."""

    prompt: list[Message]  # conversation ending in a user turn
    prompt_text: str | None  # the prompt as one raw string, when the source has one (template "none")
    chosen: str
    rejected: str


@dataclass(frozen=True)
class SFTText:
    """A parsed SFT record, before tokenization: exactly one of `text` and `messages` is set."""

    text: str | None = None
    messages: list[Message] | None = None  # ends in an assistant turn
    prompt_text: str | None = None  # raw prompt string of a {"prompt": str, "response"} record
    first_trained: int = 0  # assistant turns before messages[first_trained] are context, not targets


@dataclass(frozen=True)
class PreferencePair:
    prompt_ids: list[int]  # starts with bos
    chosen_ids: list[int]  # ends with eos unless truncated
    rejected_ids: list[int]


@dataclass(frozen=True)
class SFTExample:
    input_ids: list[int]
    response_mask: list[bool]  # aligned with input_ids: True on tokens the loss trains on


# ---------------------------------------------------------------------------------------- reading

def read_jsonl(path: str | Path, max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[tuple[dict, Where]]:
    """Yield (record, where) for each non-blank line; a line that is not UTF-8, not a JSON object,
    nested past the parser's depth or longer than ``max_line_bytes`` is a DataError naming it.

    Lines are read as bytes and at most ``max_line_bytes`` at a time, so one runaway line (a file
    missing its newlines, a dumped blob) costs that cap, not its size, before it is refused; a line
    is decoded on its own, so a stray non-UTF-8 byte names its line instead of ending the read.
    """
    with open(path, "rb") as f:
        line_no = 0
        # + 2: a line at the cap is read whole with its "\r\n", and a longer one shows as longer.
        while raw := f.readline(max_line_bytes + 2):
            line_no += 1
            where = Where(str(path), line_no)
            if len(raw.rstrip(b"\r\n")) > max_line_bytes:
                raise DataError(where, "<line>", f"longer than the {max_line_bytes:,}-byte cap on one record "
                                "(spl.data.MAX_LINE_BYTES); not read further: shorten or drop it")
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(where, "<utf-8>", f"byte 0x{raw[err.start]:02x} at byte {err.start + 1} of "
                                "the line is not valid UTF-8; save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(where, "<json>", f"invalid JSON ({err})") from None
            except RecursionError:  # json's C scanner recurses once per level of [ or {
                raise DataError(where, "<json>", "JSON nested too deeply to parse (about "
                                f"{sys.getrecursionlimit()} levels or more)") from None
            yield _check_object(record, where), where


def _tagged(source: Source) -> Iterator[tuple[dict, Where]]:
    if isinstance(source, str | Path):
        yield from read_jsonl(source)
    else:
        for i, record in enumerate(source, start=1):
            where = Where("<records>", i)
            yield _check_object(record, where), where


def _check_object(record: object, where: Where) -> dict:
    if not isinstance(record, dict):
        raise DataError(where, "<record>", f"expected a JSON object, got {type(record).__name__}")
    return record


def detect_format(record: dict, where: Where) -> str:
    """"preference", "hh" or "sft", from the keys of one record (the first of a file decides)."""
    if "chosen" in record or "rejected" in record:
        # A plain-string dialogue with no prompt beside it can only be raw HH-RLHF.
        return "hh" if "prompt" not in record and isinstance(record.get("chosen"), str) else "preference"
    if {"text", "messages", "response"} & record.keys():
        return "sft"
    raise DataError(where, "<record>", f"cannot tell the format from keys {sorted(record)}: expected "
                    "preference (prompt, chosen, rejected), hh (chosen, rejected dialogues) or sft "
                    "(text | messages | prompt and response); or pass format= explicitly")


def read_preference(source: Source, format: str = "auto") -> Iterator[tuple[PreferenceText, Where]]:
    """Parse preference records ("preference" or "hh" format), each tagged with where it came from."""
    if format not in ("auto", "preference", "hh"):
        raise ValueError(f"preference data format must be 'auto', 'preference' or 'hh', got {format!r}")
    fmt = format
    for record, where in _tagged(source):
        fmt = detect_format(record, where) if fmt == "auto" else fmt
        if fmt == "sft":
            raise DataError(where, "<record>", f"this is SFT data (keys {sorted(record)}), not preferences")
        yield (parse_hh if fmt == "hh" else parse_preference)(record, where), where


def read_sft(source: Source, format: str = "auto") -> Iterator[tuple[SFTText, Where]]:
    """Parse SFT records, each tagged with where it came from."""
    if format not in ("auto", "sft"):
        raise ValueError(f"SFT data format must be 'auto' or 'sft', got {format!r}")
    fmt = format
    for record, where in _tagged(source):
        # Any record without chosen/rejected is read as SFT, so a broken one gets a precise error.
        if fmt == "auto" and ("chosen" in record or "rejected" in record):
            raise DataError(where, "<record>", f"this is preference data (keys {sorted(record)}), not SFT")
        fmt = "sft"
        yield parse_sft(record, where), where


# ---------------------------------------------------------------------------------------- parsing

def _field(record: dict, key: str, where: Where) -> object:
    if key not in record:
        raise DataError(where, key, f"missing (the record has {sorted(record)})")
    return record[key]


def _messages(value: object, where: Where, name: str) -> list[Message]:
    """Validate a list of {"role", "content"} messages; extra keys are dropped."""
    if not isinstance(value, list):
        raise DataError(where, name, f"expected a list of messages, got {type(value).__name__}")
    out = []
    for i, msg in enumerate(value):
        if not isinstance(msg, dict):
            raise DataError(where, f"{name}[{i}]", f"expected a message object, got {type(msg).__name__}")
        role, content = msg.get("role"), msg.get("content")
        if role not in ROLES:
            raise DataError(where, f"{name}[{i}].role", f"unknown role {role!r}; expected one of {ROLES}")
        if not isinstance(content, str):
            raise DataError(where, f"{name}[{i}].content", f"expected a string, got {type(content).__name__}")
        out.append({"role": role, "content": content})
    return out


def _prompt(value: object, where: Where, name: str = "prompt") -> tuple[list[Message], str | None]:
    """A prompt field → (messages, raw string or None); an empty prompt is malformed, not skippable."""
    if isinstance(value, str):
        messages, text = [{"role": "user", "content": value}], value
    else:
        messages, text = _messages(value, where, name), None
    if not any(m["content"].strip() for m in messages if m["role"] == "user"):
        raise DataError(where, name, "empty prompt (no user message with content)")
    last = [m["role"] for m in messages if m["role"] != "system"][-1]
    if last != "user":
        raise DataError(where, name, f"a prompt must end with a user message, not {last!r}")
    return messages, text


def _response(value: object, where: Where, name: str) -> tuple[list[Message] | None, str]:
    """A response field → (the conversation before it if given as a full conversation, response text)."""
    if isinstance(value, str):
        return None, value
    if not isinstance(value, list):
        raise DataError(where, name, f"expected a string or a list of messages, got {type(value).__name__}")
    messages = _messages(value, where, name)
    if not messages:
        raise DataError(where, name, "empty list of messages")
    if all(m["role"] == "assistant" for m in messages):
        # The response alone; merged exactly as the template merges consecutive assistant messages.
        return None, "\n\n".join(m["content"] for m in messages if m["content"])
    if messages[-1]["role"] != "assistant":
        raise DataError(where, f"{name}[{len(messages) - 1}].role", "a conversation must end with the "
                        f"assistant response, not {messages[-1]['role']!r}")
    return messages[:-1], messages[-1]["content"]


def _assistant(content: str) -> Message:
    return {"role": "assistant", "content": content}


def parse_preference(record: dict, where: Where) -> PreferenceText:
    chosen_prefix, chosen = _response(_field(record, "chosen", where), where, "chosen")
    rejected_prefix, rejected = _response(_field(record, "rejected", where), where, "rejected")
    if "prompt" in record:
        prompt, prompt_text = _prompt(record["prompt"], where)
    elif chosen_prefix is not None:
        # Prompt-less UltraFeedback: the prompt is the conversation both sides share.
        prompt, prompt_text = _prompt(chosen_prefix, where, "chosen")
    else:
        raise DataError(where, "prompt", "missing; it may be left out only when chosen and rejected are "
                        "full conversations")
    for name, prefix in (("chosen", chosen_prefix), ("rejected", rejected_prefix)):
        if prefix is not None and prefix != prompt:
            raise DataError(where, name, "the conversation before the final assistant message differs "
                            "from the prompt")
    return PreferenceText(prompt, prompt_text, chosen, rejected)


def split_hh(chosen: str, rejected: str) -> tuple[str, str, str] | None:
    """(prompt text, chosen response, rejected response) of two raw HH-RLHF dialogues, cut after the
    last "\n\nAssistant:" inside their common prefix (not chosen's last marker: a response may
    itself contain one); None when the prefix holds no marker."""
    # rfind's end bound keeps only markers lying wholly inside the shared prefix.
    common = len(os.path.commonprefix([chosen, rejected]))
    cut = chosen.rfind(HH_MARKER, 0, common)
    if cut < 0:
        return None
    cut += len(HH_MARKER)
    return chosen[:cut], chosen[cut:], rejected[cut:]


def hh_messages(prompt_text: str) -> list[Message] | None:
    """An HH-RLHF prompt ("\n\nHuman: ...\n\nAssistant:") as chat messages; None when it does not
    start with "\n\nHuman:".

    Empty turns are dropped: the final "Assistant:" is the generation slot, and a few dialogues
    (idx 120) hold an empty assistant turn, which the chat template refuses. The user turns around
    one then merge with "\n\n", as the template merges consecutive messages of one role.
    """
    parts = HH_TURN.split(prompt_text)  # [text before the first marker, role, content, role, content, ...]
    if parts[0].strip():
        return None
    return [{"role": HH_ROLES[role], "content": content.strip()}
            for role, content in zip(parts[1::2], parts[2::2], strict=True) if content.strip()]


def parse_hh(record: dict, where: Where) -> PreferenceText:
    chosen, rejected = _field(record, "chosen", where), _field(record, "rejected", where)
    for name, value in (("chosen", chosen), ("rejected", rejected)):
        if not isinstance(value, str):
            raise DataError(where, name, f"expected an HH-RLHF dialogue string, got {type(value).__name__}")
    split = split_hh(chosen, rejected)
    if split is None:
        raise DataError(where, "chosen", f"no {HH_MARKER!r} inside the common prefix of chosen and rejected")
    prompt_text, chosen_response, rejected_response = split
    messages = hh_messages(prompt_text)
    if messages is None:
        raise DataError(where, "chosen", "an HH-RLHF dialogue must start with '\\n\\nHuman:'")
    prompt, _ = _prompt(messages, where, "chosen")
    # Responses start with the space after "Assistant:"; SentencePiece's dummy prefix stands for it.
    return PreferenceText(prompt, prompt_text, chosen_response.strip(), rejected_response.strip())


def parse_sft(record: dict, where: Where) -> SFTText:
    if "text" in record:
        if not isinstance(record["text"], str):
            raise DataError(where, "text", f"expected a string, got {type(record['text']).__name__}")
        return SFTText(text=record["text"])
    if "messages" in record:
        messages = _messages(record["messages"], where, "messages")
        if not messages or messages[-1]["role"] != "assistant":
            raise DataError(where, "messages", "a conversation must end with an assistant message")
        return SFTText(messages=messages)
    prompt, prompt_text = _prompt(_field(record, "prompt", where), where)
    prefix, response = _response(_field(record, "response", where), where, "response")
    if prefix is not None and prefix != prompt:
        raise DataError(where, "response", "the conversation before the final assistant message differs "
                        "from the prompt")
    messages = [*prompt, _assistant(response)]
    return SFTText(messages=messages, prompt_text=prompt_text, first_trained=len(prompt))


# ----------------------------------------------------------------------------- tokens, truncation

def _new_stats() -> dict[str, int]:
    # Counts of records; truncated_* count kept records with the prompt / any response cut.
    keys = ("read", "kept", "skipped_identical", "skipped_empty", "truncated_prompt", "truncated_response")
    return dict.fromkeys(keys, 0)


def _check_lengths(max_len: int, max_prompt_len: int) -> None:
    if not 1 <= max_prompt_len < max_len:
        raise ValueError(f"need 1 <= max_prompt_len < max_len so a response keeps at least one token, "
                         f"got max_prompt_len={max_prompt_len}, max_len={max_len}")


def truncate(prompt: list[int], responses: list[list[int]], *, max_len: int, max_prompt_len: int,
             bos_id: int) -> tuple[list[int], list[list[int]], bool, bool]:
    """Fit prompt + each response into max_len → (prompt, responses, prompt_cut, response_cut).

    Only when the longest pair overflows: the prompt keeps its last max_prompt_len tokens (the latest
    turns are what the response answers; bos stays in front, the model never saw text without it),
    then responses are cut from the right (losing eos: the model did not finish, which is true).
    """
    longest = max(len(r) for r in responses)
    prompt_cut = len(prompt) + longest > max_len and len(prompt) > max_prompt_len
    if prompt_cut:
        keep_bos = int(prompt[0] == bos_id)
        tail = max_prompt_len - keep_bos
        prompt = prompt[:keep_bos] + (prompt[-tail:] if tail else [])  # [-0:] would keep everything
    budget = max_len - len(prompt)
    response_cut = longest > budget
    if response_cut:
        responses = [r[:budget] for r in responses]
    return prompt, responses, prompt_cut, response_cut


def _plain(tok: Tokenizer) -> bool:
    """Whether the tokenizer's template is plain text ("none"), which reads the raw prompt string."""
    if tok.chat_template is None:
        raise ValueError(f"tokenizer {tok.path} has no chat template (set data.chat_template)")
    return tok.chat_template.single_exchange


def _encode_pair(text: PreferenceText, tok: Tokenizer,
                 where: Where) -> tuple[list[int], list[int], list[int]]:
    prompt = text.prompt
    if _plain(tok):
        if text.prompt_text is None:
            raise DataError(where, "prompt", "chat template 'none' needs a plain-string prompt, got messages")
        prompt = [{"role": "user", "content": text.prompt_text}]
    try:
        # Both sides give the same prompt ids: a response always starts on a token boundary.
        prompt_ids, chosen = tok.encode_prompt_response([*prompt, _assistant(text.chosen)])
        _, rejected = tok.encode_prompt_response([*prompt, _assistant(text.rejected)])
    except ValueError as err:
        raise DataError(where, "prompt", str(err)) from err
    return prompt_ids, chosen, rejected


def _encode_sft(text: SFTText, tok: Tokenizer, where: Where) -> tuple[list[int], list[bool]]:
    """→ (input_ids, response_mask aligned with input_ids)."""
    if text.text is not None:
        ids = tok.encode(text.text, bos=True, eos=True)
        return ids, [False] + [True] * (len(ids) - 1)  # bos is never a target
    messages = text.messages
    if _plain(tok):
        if text.prompt_text is None:
            raise DataError(where, "messages", "chat template 'none' needs {'prompt': str, 'response': str}")
        messages = [{"role": "user", "content": text.prompt_text}, messages[-1]]
    try:
        ids, responses = tok.encode_chat_responses(messages)
    except ValueError as err:
        raise DataError(where, "messages", str(err)) from err
    # Train on every assistant turn whose last message is at or after first_trained (a prompt's
    # own assistant turns are context). The spans come from one encoding of the whole conversation,
    # so a template that moves the system prompt (mistral-v3: to the last user turn) is honoured.
    mask = [False] * len(ids)
    for start, end, index in responses:
        if index >= text.first_trained:
            mask[start:end] = [True] * (end - start)
    return ids, mask


# --------------------------------------------------------------------------------------- datasets

class _TokenizedDataset(list):
    """A list of examples, plus the loader's `stats` (read, kept, skipped, truncated) and `pad_id`.

    `ref_logps` (N, 2), when set, is a column of per-item reference log-probs (chosen, rejected):
    collate hands each batch its own rows of it, so they cannot be paired with other items.
    """

    def __init__(self, items: Iterable, stats: dict[str, int], pad_id: int) -> None:
        super().__init__(items)
        self.stats, self.pad_id = stats, pad_id
        self.ref_logps: torch.Tensor | None = None

    def collate(self, indices: list[int], pad_to_multiple_of: int = 1) -> dict:
        """The batch dict for items at `indices`, with "index" (B,) naming them."""
        collate = collate_preference if isinstance(self, PreferenceDataset) else collate_sft
        batch = collate([self[i] for i in indices], self.pad_id, pad_to_multiple_of)
        batch["index"] = torch.tensor(indices, dtype=torch.long)  # (B,)
        if self.ref_logps is not None:
            rows = self.ref_logps[batch["index"]]  # (B, 2)
            batch["ref_logps"] = torch.cat([rows[:, 0], rows[:, 1]])  # (2B,) chosen rows, then rejected
        return batch

    def fingerprint(self) -> str:
        """A hash of every token id and mask, to key caches (reference log-probs) to this exact data."""
        digest = hashlib.sha256()
        for item in self:
            # repr of the dataclass lists every field by name: a stable, unambiguous serialization.
            digest.update(repr(item).encode())
        return digest.hexdigest()[:16]


class PreferenceDataset(_TokenizedDataset):
    """A list of PreferencePair."""

    @classmethod
    def from_records(cls, records: Source, tokenizer: Tokenizer, *, max_len: int, max_prompt_len: int,
                     format: str = "auto") -> PreferenceDataset:
        """Tokenize records (dicts in memory, or a JSONL path): the one code path for every source."""
        _check_lengths(max_len, max_prompt_len)
        pairs, stats = [], _new_stats()
        for text, where in read_preference(records, format):
            stats["read"] += 1
            # Harmless records are skipped, not errors: an empty response teaches nothing but eos.
            if not text.chosen.strip() or not text.rejected.strip():
                stats["skipped_empty"] += 1
                continue
            prompt, chosen, rejected = _encode_pair(text, tokenizer, where)
            prompt, (chosen, rejected), prompt_cut, response_cut = truncate(
                prompt, [chosen, rejected], max_len=max_len, max_prompt_len=max_prompt_len,
                bos_id=tokenizer.bos_id)
            # Identical sides (HH idx 721, or equal after truncation) give a constant loss, zero gradient.
            if chosen == rejected:
                stats["skipped_identical"] += 1
                continue
            stats["truncated_prompt"] += prompt_cut
            stats["truncated_response"] += response_cut
            pairs.append(PreferencePair(prompt, chosen, rejected))
        stats["kept"] = len(pairs)
        return cls(pairs, stats, tokenizer.pad_id)


class SFTDataset(_TokenizedDataset):
    """A list of SFTExample (stats["skipped_identical"] stays 0)."""

    @classmethod
    def from_records(cls, records: Source, tokenizer: Tokenizer, *, max_len: int, max_prompt_len: int,
                     format: str = "auto") -> SFTDataset:
        _check_lengths(max_len, max_prompt_len)
        examples, stats = [], _new_stats()
        for text, where in read_sft(records, format):
            stats["read"] += 1
            last = text.text if text.text is not None else text.messages[-1]["content"]
            if not last.strip():
                stats["skipped_empty"] += 1
                continue
            ids, mask = _encode_sft(text, tokenizer, where)
            # The "prompt" for truncation is everything before the first trained token.
            first = mask.index(True)
            prompt, (response,), prompt_cut, response_cut = truncate(
                ids[:first], [ids[first:]], max_len=max_len, max_prompt_len=max_prompt_len,
                bos_id=tokenizer.bos_id)
            stats["truncated_prompt"] += prompt_cut
            stats["truncated_response"] += response_cut
            response_mask = [False] * len(prompt) + mask[first:first + len(response)]
            examples.append(SFTExample(prompt + response, response_mask))
        stats["kept"] = len(examples)
        return cls(examples, stats, tokenizer.pad_id)


def load_preference_data(path: str | Path, tokenizer: Tokenizer, *, max_len: int, max_prompt_len: int,
                         format: str = "auto") -> PreferenceDataset:
    return PreferenceDataset.from_records(Path(path), tokenizer, max_len=max_len,
                                          max_prompt_len=max_prompt_len, format=format)


def load_sft_data(path: str | Path, tokenizer: Tokenizer, *, max_len: int, max_prompt_len: int,
                  format: str = "auto") -> SFTDataset:
    return SFTDataset.from_records(Path(path), tokenizer, max_len=max_len, max_prompt_len=max_prompt_len,
                                   format=format)


# -------------------------------------------------------------------------------------- collation

def _collate(rows: list[tuple[list[int], list[bool]]], pad_id: int, pad_to_multiple_of: int) -> dict:
    """Rows of (ids, response mask aligned with ids) → the batch dict of the module docstring."""
    if not rows:
        raise ValueError("cannot collate an empty batch")
    lengths = [len(ids) for ids, _ in rows]
    T = -(-max(lengths) // pad_to_multiple_of) * pad_to_multiple_of  # ceil to a multiple
    input_ids = torch.full((len(rows), T), pad_id, dtype=torch.long)  # (N, T)
    response = torch.zeros((len(rows), T), dtype=torch.bool)  # (N, T), aligned with input_ids
    for i, (ids, mask) in enumerate(rows):
        input_ids[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        response[i, :len(ids)] = torch.tensor(mask, dtype=torch.bool)
    # Position t predicts token t + 1: targets and the mask shift left; the vacated column is padding.
    targets = torch.full_like(input_ids, pad_id)  # (N, T)
    targets[:, :-1] = input_ids[:, 1:]
    loss_mask = torch.zeros_like(response)  # (N, T)
    loss_mask[:, :-1] = response[:, 1:]
    last_index = torch.tensor(lengths, dtype=torch.long) - 1  # (N,)
    return {"input_ids": input_ids, "targets": targets, "loss_mask": loss_mask, "last_index": last_index}


def collate_preference(pairs: list[PreferencePair], pad_id: int, pad_to_multiple_of: int = 1) -> dict:
    """B pairs → a (2B, T) batch: chosen rows [0:B], then rejected rows [B:2B]."""
    row = lambda prompt, response: (prompt + response, [False] * len(prompt) + [True] * len(response))
    rows = [row(p.prompt_ids, p.chosen_ids) for p in pairs]
    rows += [row(p.prompt_ids, p.rejected_ids) for p in pairs]
    return _collate(rows, pad_id, pad_to_multiple_of)


def collate_sft(examples: list[SFTExample], pad_id: int, pad_to_multiple_of: int = 1) -> dict:
    """B examples → a (B, T) batch."""
    return _collate([(e.input_ids, e.response_mask) for e in examples], pad_id, pad_to_multiple_of)


# --------------------------------------------------------------------------------------- batching

class BatchIterator:
    """Endless, seeded, rank-sliced, resumable batches over a PreferenceDataset or SFTDataset.

    Each epoch is one permutation (torch.Generator seeded with seed + epoch), the same on every rank.
    It is cut into GLOBAL batches of batch_size * world_size items, and rank r takes items
    [r * batch_size, (r + 1) * batch_size) of each: two ranks with batch b see exactly what one
    process with batch 2b sees. With drop_last=False the short final global batch is split evenly,
    repeating a few items from the start of the epoch when it does not divide by world_size (as
    torch's DistributedSampler does). state_dict() is the position of the NEXT batch.
    """

    def __init__(self, dataset: PreferenceDataset | SFTDataset, batch_size: int, *, seed: int, rank: int = 0,
                 world_size: int = 1, shuffle: bool = True, drop_last: bool = True,
                 pad_to_multiple_of: int = 1) -> None:
        if batch_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need batch_size >= 1 and 0 <= rank < world_size, got batch_size={batch_size}, "
                             f"rank={rank}, world_size={world_size}")
        self.global_batch = batch_size * world_size
        need = self.global_batch if drop_last else world_size
        if len(dataset) < need:
            # Otherwise an epoch would have no batches and iteration would spin forever.
            raise ValueError(f"dataset has {len(dataset)} items, fewer than one batch of {need} "
                             f"(batch_size {batch_size} x world_size {world_size})")
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.rank, self.world_size, self.shuffle, self.drop_last = rank, world_size, shuffle, drop_last
        self.pad_to_multiple_of = pad_to_multiple_of
        self._epoch, self._index = 0, 0  # position of the next batch
        self._order: tuple[int, list[int]] = (-1, [])  # (epoch, its permutation), computed once per epoch

    def __len__(self) -> int:
        n = len(self.dataset)
        return n // self.global_batch if self.drop_last else -(-n // self.global_batch)

    def epoch_order(self, epoch: int) -> list[int]:
        if self._order[0] != epoch:
            n = len(self.dataset)
            if self.shuffle:
                gen = torch.Generator().manual_seed(self.seed + epoch)
                self._order = (epoch, torch.randperm(n, generator=gen).tolist())
            else:
                self._order = (epoch, list(range(n)))
        return self._order[1]

    def batch_indices(self, epoch: int, index: int) -> list[int]:
        """Dataset positions of this rank's share of global batch `index` of `epoch`."""
        order = self.epoch_order(epoch)
        chunk = order[index * self.global_batch:(index + 1) * self.global_batch]
        per_rank = self.batch_size
        if len(chunk) < self.global_batch:  # the short final batch, drop_last=False only
            per_rank = -(-len(chunk) // self.world_size)
            chunk = chunk + order[:per_rank * self.world_size - len(chunk)]
        return chunk[self.rank * per_rank:(self.rank + 1) * per_rank]

    def _batch(self, epoch: int, index: int) -> dict:
        return self.dataset.collate(self.batch_indices(epoch, index), self.pad_to_multiple_of)

    def indices(self) -> Iterator[list[int]]:
        """This rank's dataset positions of each batch, forever, from the saved position on."""
        while True:
            if self._index >= len(self):
                self._epoch, self._index = self._epoch + 1, 0
            # Advance before yielding, so state_dict() taken after a batch names the next one.
            self._index += 1
            yield self.batch_indices(self._epoch, self._index - 1)

    def __iter__(self) -> Iterator[dict]:
        """Batches forever, from the saved position on, across epochs."""
        for indices in self.indices():
            yield self.dataset.collate(indices, self.pad_to_multiple_of)

    def epoch(self, epoch: int) -> Iterator[dict]:
        """The batches of one epoch, once (evaluation); the training position is left alone."""
        for index in range(len(self)):
            yield self._batch(epoch, index)

    def state_dict(self) -> dict:
        return {"epoch": self._epoch, "index": self._index, "seed": self.seed, "shuffle": self.shuffle,
                "global_batch": self.global_batch, "num_items": len(self.dataset)}

    def load_state_dict(self, state: dict) -> None:
        # A different order or batch size would silently replay or skip data: refuse instead.
        mine = self.state_dict()
        for key in ("seed", "shuffle", "global_batch", "num_items"):
            if state[key] != mine[key]:
                raise ValueError(f"cannot resume: saved {key}={state[key]!r}, this run has {mine[key]!r}")
        self._epoch, self._index = state["epoch"], state["index"]
