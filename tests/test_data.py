"""Tests for spl/data.py: every record format, the HH-RLHF split, truncation, errors, collation, batching.

The HH fixtures are 40 records of the shipped HH-RLHF sample and their reference split, with the
records that break the naive rule (see tests/fixtures/README_hh_rlhf.md). Tests that tokenize use the
real Mistral v1 tokenizer shipped in mistral-common (test-only); collation and batching tests build
token ids by hand and need no tokenizer.
"""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from spl.data import (
    MAX_LINE_BYTES,
    BatchIterator,
    DataError,
    PreferenceDataset,
    PreferencePair,
    PreferenceText,
    SFTDataset,
    SFTExample,
    Where,
    collate_preference,
    collate_sft,
    detect_format,
    load_preference_data,
    load_sft_data,
    read_jsonl,
    read_preference,
    read_sft,
    truncate,
)
from spl.tokenizer import Tokenizer, load_tokenizer

FIXTURES = Path(__file__).parent / "fixtures"
HH_RAW, HH_SPLIT = FIXTURES / "hh_rlhf_sample.jsonl", FIXTURES / "hh_rlhf_sample_split.jsonl"
U = lambda text: {"role": "user", "content": text}
A = lambda text: {"role": "assistant", "content": text}
S = lambda text: {"role": "system", "content": text}
HERE = Where("<records>", 1)


def v1_model() -> Path:
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
    return load_tokenizer(v1_model(), "mistral-v1")


@pytest.fixture(scope="module")
def raw_tok() -> Tokenizer:
    """The same vocabulary with plain-text prompts (chat template "none")."""
    return load_tokenizer(v1_model(), "none")


def parse_one(record: dict) -> PreferenceText:
    return next(read_preference([record]))[0]


def write_lines(tmp_path: Path, lines: list[str], name: str = "data.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------- parsing

@pytest.mark.parametrize("record, expected", [
    ({"prompt": "Q?", "chosen": "yes", "rejected": "no"}, PreferenceText([U("Q?")], "Q?", "yes", "no")),
    # (b) the response as assistant messages; several merge with "\n\n" like the chat template.
    ({"prompt": [S("sys"), U("Q?")], "chosen": [A("yes")], "rejected": [A("no"), A("never")]},
     PreferenceText([S("sys"), U("Q?")], None, "yes", "no\n\nnever")),
    # (c) UltraFeedback: full conversations whose prefix is the prompt.
    ({"prompt": "Q?", "chosen": [U("Q?"), A("yes")], "rejected": [U("Q?"), A("no")]},
     PreferenceText([U("Q?")], "Q?", "yes", "no")),
    # Prompt-less UltraFeedback, multi-turn: the prompt is the shared conversation.
    ({"chosen": [U("a"), A("b"), U("c"), A("yes")], "rejected": [U("a"), A("b"), U("c"), A("no")]},
     PreferenceText([U("a"), A("b"), U("c")], None, "yes", "no")),
], ids=["strings", "assistant_messages", "ultrafeedback", "ultrafeedback_promptless"])
def test_parse_preference_forms(record: dict, expected: PreferenceText) -> None:
    assert parse_one(record) == expected


def test_parse_sft_forms() -> None:
    records = [{"text": "plain"}, {"prompt": "Q?", "response": "A."},
               {"messages": [U("a"), A("b"), U("c"), A("d")]}]
    texts = [text for text, _ in read_sft(records)]
    assert texts[0].text == "plain"
    assert texts[1].messages == [U("Q?"), A("A.")] and texts[1].prompt_text == "Q?"
    assert texts[1].first_trained == 1  # only the response is trained
    assert texts[2].messages == records[2]["messages"] and texts[2].first_trained == 0


def test_detect_format() -> None:
    assert detect_format({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "x"}, HERE) == "hh"
    assert detect_format({"prompt": "q", "chosen": "a", "rejected": "b"}, HERE) == "preference"
    assert detect_format({"chosen": [U("q"), A("a")], "rejected": [U("q"), A("b")]}, HERE) == "preference"
    assert detect_format({"messages": []}, HERE) == detect_format({"text": ""}, HERE) == "sft"
    with pytest.raises(DataError, match="cannot tell the format"):
        detect_format({"question": "q"}, HERE)
    with pytest.raises(DataError, match="SFT data"):
        parse_one({"text": "x"})


def test_hh_split_matches_reference() -> None:
    reference = [json.loads(line) for line in HH_SPLIT.read_text(encoding="utf-8").splitlines()]
    raw = [json.loads(line) for line in HH_RAW.read_text(encoding="utf-8").splitlines()]
    # The sample must contain the traps, or this test proves nothing about them.
    by_idx = {ref["idx"]: ref for ref in reference}
    assert {567, 168, 354, 743, 721, 120, 355} <= by_idx.keys()
    assert not by_idx[567]["naive_chosen_split_agrees"]
    parsed = list(read_preference(HH_RAW))  # format auto-detected as "hh"
    assert len(parsed) == len(reference) == 40
    for (text, where), ref, orig in zip(parsed, reference, raw, strict=True):
        assert text.prompt_text == ref["prompt"], where
        # Responses are stripped of the space after "Assistant:" (SentencePiece's dummy prefix adds it).
        assert (text.chosen, text.rejected) == (ref["chosen"].strip(), ref["rejected"].strip()), where
        assert orig["chosen"] == text.prompt_text + ref["chosen"]
        assert text.prompt[-1]["role"] == "user"


def test_hh_prompt_messages() -> None:
    parsed = {json.loads(line)["idx"]: text for line, (text, _) in
              zip(HH_SPLIT.read_text(encoding="utf-8").splitlines(), read_preference(HH_RAW), strict=True)}
    # idx 355: "Human:" without "\n\n" is text inside an assistant turn, not a turn boundary.
    assert [m["role"] for m in parsed[355].prompt] == ["user", "assistant", "assistant", "user"]
    assert "Human:  Thanks." in parsed[355].prompt[1]["content"]
    # idx 120: an empty assistant turn is dropped (the template refuses it); the user turns around it stay.
    assert [m["role"] for m in parsed[120].prompt] == ["user", "assistant", "user", "user"]
    assert all(m["content"] == m["content"].strip() != "" for m in parsed[120].prompt)


def test_hh_dataset_skips_and_tokens(tok: Tokenizer, raw_tok: Tokenizer) -> None:
    ds = load_preference_data(HH_RAW, tok, max_len=4096, max_prompt_len=2048)
    # 721 is identical; 120 and 740 have an empty rejected response.
    assert ds.stats == {"read": 40, "kept": 37, "skipped_identical": 1, "skipped_empty": 2,
                        "truncated_prompt": 0, "truncated_response": 0}
    text = next(t for t, _ in read_preference(HH_RAW))
    pair = ds[0]
    assert pair.prompt_ids + pair.chosen_ids == tok.encode_chat([*text.prompt, A(text.chosen)])
    assert pair.chosen_ids[-1] == pair.rejected_ids[-1] == tok.eos_id
    raw = load_preference_data(HH_RAW, raw_tok, max_len=4096, max_prompt_len=2048)
    assert raw[0].prompt_ids == tok.encode(text.prompt_text, bos=True)
    assert raw[0].chosen_ids == tok.encode(text.chosen, eos=True)


# ------------------------------------------------------------------------------------ tokenization

def test_chat_template_and_raw_tokens(tok: Tokenizer, raw_tok: Tokenizer) -> None:
    records = [{"prompt": "What is 2+2?", "chosen": "4.", "rejected": "5."}]
    pair = PreferenceDataset.from_records(records, tok, max_len=64, max_prompt_len=32)[0]
    assert pair.prompt_ids == tok.encode_prompt([U("What is 2+2?")])
    assert pair.chosen_ids == tok.encode("4.", eos=True)
    assert tok.decode(pair.prompt_ids) == "[INST] What is 2+2? [/INST]"
    raw = PreferenceDataset.from_records(records, raw_tok, max_len=64, max_prompt_len=32)[0]
    assert raw.prompt_ids == [tok.bos_id, *tok.encode("What is 2+2?")]
    assert raw.rejected_ids == [*tok.encode("5."), tok.eos_id]
    with pytest.raises(DataError, match="chat template 'none' needs a plain-string prompt"):
        PreferenceDataset.from_records([{"prompt": [U("q")], "chosen": "a", "rejected": "b"}], raw_tok,
                                       max_len=64, max_prompt_len=32)


def test_truncate_keeps_bos_and_prompt_end() -> None:
    prompt, chosen, rejected = [1, 10, 11, 12, 13, 14, 15], [20, 21, 22, 23, 2], [30, 2]
    # Fits: nothing changes, even though the prompt is longer than max_prompt_len.
    assert truncate(prompt, [chosen, rejected], max_len=12, max_prompt_len=3, bos_id=1) == \
        (prompt, [chosen, rejected], False, False)
    # Too long: the prompt keeps bos and its last 2 tokens; then responses are cut to 8 - 3 = 5 tokens.
    assert truncate(prompt, [chosen + [24, 25], rejected], max_len=8, max_prompt_len=3, bos_id=1) == \
        ([1, 14, 15], [[20, 21, 22, 23, 2], rejected], True, True)
    # A short prompt is kept whole and only the response is cut; a prompt without bos keeps only its tail.
    cut = lambda prompt, responses, max_len, max_prompt_len: truncate(
        prompt, responses, max_len=max_len, max_prompt_len=max_prompt_len, bos_id=1)
    assert cut([1, 10], [chosen], 4, 3) == ([1, 10], [[20, 21]], False, True)
    assert cut([10, 11, 12], [[20]], 3, 1) == ([12], [[20]], True, False)
    assert cut([1, 10, 11], [[20]], 3, 1) == ([1], [[20]], True, False)


def test_truncation_counts(raw_tok: Tokenizer) -> None:
    tok = raw_tok
    long_prompt = " ".join(f"word{i}" for i in range(40))
    records = [{"prompt": long_prompt, "chosen": "short", "rejected": "a much longer answer " * 10},
               {"prompt": "hi", "chosen": "a", "rejected": "b"}]
    ds = PreferenceDataset.from_records(records, tok, max_len=24, max_prompt_len=10)
    full_prompt = tok.encode(long_prompt, bos=True)
    pair = ds[0]
    assert pair.prompt_ids == [tok.bos_id, *full_prompt[-9:]]
    assert tok.decode(pair.prompt_ids).endswith("word39")  # the LEFT end was dropped
    assert pair.chosen_ids == tok.encode("short", eos=True)
    assert pair.rejected_ids == tok.encode("a much longer answer " * 10, eos=True)[:14]  # 24 - 10
    assert ds.stats["truncated_prompt"] == ds.stats["truncated_response"] == 1 and ds.stats["kept"] == 2


# ---------------------------------------------------------------------------------- errors, skips

GOOD = json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"})
GOOD_HH = json.dumps({"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "\n\nHuman: q\n\nAssistant: b"})


@pytest.mark.parametrize("bad, field, message", [
    ('{"prompt": "q", "chosen": ', "<json>", "invalid JSON"),
    ('["not", "an", "object"]', "<record>", "expected a JSON object"),
    (json.dumps({"prompt": "q", "chosen": "a"}), "rejected", "missing"),
    (json.dumps({"prompt": "q", "chosen": 3, "rejected": "b"}), "chosen", "got int"),
    (json.dumps({"prompt": [{"role": "bot", "content": "q"}], "chosen": "a", "rejected": "b"}),
     "prompt[0].role", "unknown role 'bot'"),
    (json.dumps({"prompt": [U("q"), {"role": "user", "content": None}], "chosen": "a", "rejected": "b"}),
     "prompt[1].content", "expected a string"),
    (json.dumps({"prompt": "  ", "chosen": "a", "rejected": "b"}), "prompt", "empty prompt"),
    (json.dumps({"prompt": [U("q"), A("x")], "chosen": "a", "rejected": "b"}), "prompt", "end with a user"),
    (json.dumps({"prompt": "q", "chosen": [U("other"), A("a")], "rejected": "b"}), "chosen", "differs"),
    (json.dumps({"chosen": "no markers here", "rejected": "no markers there"}), "chosen", "Assistant"),
])
def test_malformed_record_names_file_line_field(tmp_path: Path, bad: str, field: str, message: str) -> None:
    # A blank line in between checks that line numbers count every physical line.
    # The first record fixes the format (auto-detected), so an HH file starts with a good HH record.
    path = write_lines(tmp_path, [GOOD_HH if "markers" in bad else GOOD, "", bad], name="prefs.jsonl")
    with pytest.raises(DataError) as info:
        list(read_preference(path))
    text = str(info.value)
    assert "prefs.jsonl" in text and "line 3" in text and f"field {field!r}" in text and message in text, text
    assert info.value.where.line == 3 and info.value.field == field


def test_sft_errors(tmp_path: Path) -> None:
    path = write_lines(tmp_path, [json.dumps({"messages": [U("q"), A("a"), U("more?")]})], name="sft.jsonl")
    with pytest.raises(DataError, match=r"sft\.jsonl, line 1, field 'messages': .*end with an assistant"):
        list(read_sft(path))
    path = write_lines(tmp_path, [json.dumps({"prompt": "q"})], name="sft2.jsonl")
    with pytest.raises(DataError, match="line 1, field 'response': missing"):
        list(read_sft(path))
    with pytest.raises(ValueError, match="format"):
        list(read_sft([], format="hh"))


# Bad bytes, depth and size: each must be one DataError naming file and line, never a traceback.
NOT_UTF8 = '{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}'.encode("latin-1")  # é as 1 byte
NESTED = '{"prompt": ' + "[" * 100_000 + "]" * 100_000 + ', "chosen": "a", "rejected": "b"}'


@pytest.mark.parametrize("read, good, bad", [
    (read_preference, GOOD.encode(), NOT_UTF8),
    (read_sft, b'{"text": "ok"}', '{"text": "caf\xe9"}'.encode("latin-1")),
], ids=["preference", "sft"])
def test_non_utf8_byte_names_file_and_line(tmp_path: Path, read, good: bytes, bad: bytes) -> None:
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(good + b"\n\n" + bad + b"\n" + good + b"\n")
    column = bad.index(b"\xe9") + 1
    with pytest.raises(DataError, match=rf"latin1\.jsonl, line 3, field '<utf-8>': byte 0xe9 at byte "
                       rf"{column} of the line is not valid UTF-8") as info:
        list(read(path))
    assert info.value.where == Where(str(path), 3)


def test_deeply_nested_json_names_file_and_line(tmp_path: Path) -> None:
    path = write_lines(tmp_path, [GOOD, NESTED], name="deep.jsonl")
    with pytest.raises(DataError, match=r"deep\.jsonl, line 2, field '<json>': JSON nested too deeply"):
        list(read_preference(path))
    # Nesting the parser can hold is still checked field by field.
    path = write_lines(tmp_path, [GOOD, '{"prompt": [[[["q"]]]], "chosen": "a", "rejected": "b"}'])
    with pytest.raises(DataError, match=r"line 2, field 'prompt\[0\]': expected a message object"):
        list(read_preference(path))


def test_line_cap_is_exact(tmp_path: Path) -> None:
    cap = len(GOOD) + 3
    fits = GOOD[:-1] + "   }"  # exactly cap bytes of valid JSON
    path = tmp_path / "cap.jsonl"
    # LF, CRLF and a final line without a newline all fit at exactly cap bytes.
    path.write_bytes(f"{fits}\n{fits}\r\n{fits}".encode())
    assert [w.line for _, w in read_jsonl(path, max_line_bytes=cap)] == [1, 2, 3]
    path.write_bytes(f"{fits}\n{fits} \n{fits}\n".encode())
    with pytest.raises(DataError, match=rf"cap\.jsonl, line 2, field '<line>': longer than the {cap}-byte"):
        list(read_jsonl(path, max_line_bytes=cap))


def test_ten_megabyte_line_is_refused_at_the_cap(tmp_path: Path) -> None:
    huge = json.dumps({"prompt": "q", "chosen": "word " * 2_000_000, "rejected": "b"})  # 10 MB
    path = write_lines(tmp_path, [GOOD, GOOD, huge, GOOD], name="huge.jsonl")
    with pytest.raises(DataError, match=rf"huge\.jsonl, line 3, field '<line>': longer than the "
                       rf"{MAX_LINE_BYTES:,}-byte cap on one record \(spl\.data\.MAX_LINE_BYTES\)"):
        list(read_preference(path))


@pytest.mark.parametrize("content, message", [
    (GOOD.encode() + b"\n" + NOT_UTF8 + b"\n", "line 2, field '<utf-8>': byte 0xe9"),
    ((GOOD + "\n" + NESTED + "\n").encode(), "line 2, field '<json>': JSON nested too deeply"),
    ((GOOD + "\n" + json.dumps({"prompt": "q", "chosen": "w " * 5_000_000, "rejected": "b"})).encode(),
     f"line 2, field '<line>': longer than the {MAX_LINE_BYTES:,}-byte cap"),
], ids=["not_utf8", "nested", "ten_mb_line"])
def test_train_py_bad_data_is_one_line_exit_1(tiny_hf_model: Path, tmp_path: Path, capsys, content: bytes,
                                               message: str) -> None:
    """train.py's entry point, in process: exit code 1 and one stderr line naming file and line."""
    import train

    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    code = train.main([f"model.checkpoint={tiny_hf_model}", f"data.train_path={path}",
                       "data.format=preference", f"train.out_dir={tmp_path / 'run'}", "data.max_len=64",
                       "data.max_prompt_len=32",
                       "train.batch_size=2", "train.micro_batch_size=2", "train.max_steps=1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1, err
    assert err[0].startswith(f"train.py: {path}, {message}"), err[0]


def test_harmless_records_skipped_and_counted(tok: Tokenizer) -> None:
    records = [{"prompt": "q", "chosen": "same", "rejected": "same"},  # identical
               {"prompt": "q", "chosen": "a", "rejected": "   "},  # empty response
               {"prompt": "q", "chosen": [A("")], "rejected": "b"},  # empty assistant message
               {"prompt": "q", "chosen": "a", "rejected": "b"}]
    ds = PreferenceDataset.from_records(records, tok, max_len=32, max_prompt_len=16)
    assert ds.stats == {"read": 4, "kept": 1, "skipped_identical": 1, "skipped_empty": 2,
                        "truncated_prompt": 0, "truncated_response": 0}
    # Responses equal after truncation give zero gradient too: skipped as identical.
    records = [{"prompt": "q", "chosen": "same start, then A", "rejected": "same start, then B"}]
    ds = PreferenceDataset.from_records(records, tok, max_len=8, max_prompt_len=4)
    assert ds.stats["skipped_identical"] == 1 and len(ds) == 0
    sft = SFTDataset.from_records([{"text": " "}, {"messages": [U("q"), A("")]}, {"text": "x"}], tok,
                                  max_len=16, max_prompt_len=8)
    assert sft.stats["skipped_empty"] == 2 and sft.stats["kept"] == 1


# -------------------------------------------------------------------------------------- collation

def test_collate_preference_contract() -> None:
    pairs = [PreferencePair([1, 5, 6], [7, 8, 2], [9, 2]), PreferencePair([1, 5], [7, 2], [3, 4, 10, 2])]
    batch = collate_preference(pairs, pad_id=0)
    expected = torch.tensor([[1, 5, 6, 7, 8, 2],  # chosen 0
                             [1, 5, 7, 2, 0, 0],  # chosen 1
                             [1, 5, 6, 9, 2, 0],  # rejected 0
                             [1, 5, 3, 4, 10, 2]])  # rejected 1
    assert torch.equal(batch["input_ids"], expected)
    assert torch.equal(batch["targets"][:, :-1], expected[:, 1:]) and (batch["targets"][:, -1] == 0).all()
    # loss_mask[t] says whether targets[t] is a response token: row 0 targets 7, 8, 2 at t = 2, 3, 4.
    assert batch["loss_mask"].tolist() == [[False, False, True, True, True, False],
                                           [False, True, True, False, False, False],
                                           [False, False, True, True, False, False],
                                           [False, True, True, True, True, False]]
    assert batch["last_index"].tolist() == [5, 3, 4, 5]
    assert batch["input_ids"].dtype == batch["targets"].dtype == batch["last_index"].dtype == torch.long
    assert batch["loss_mask"].dtype == torch.bool
    assert collate_preference(pairs, pad_id=0, pad_to_multiple_of=8)["input_ids"].shape == (4, 8)


def test_loss_mask_decodes_to_responses(tok: Tokenizer) -> None:
    records = [{"prompt": "Name a colour.", "chosen": "Red, like a tomato.", "rejected": "Blue."},
               {"prompt": [S("Be brief."), U("a"), A("b"), U("Count to three.")], "chosen": "1 2 3",
                "rejected": "one, two, three"}]
    ds = PreferenceDataset.from_records(records, tok, max_len=64, max_prompt_len=48)
    batch = collate_preference(list(ds), tok.pad_id)
    responses = ["Red, like a tomato.", "1 2 3", "Blue.", "one, two, three"]
    for row, response in enumerate(responses):
        mask = batch["loss_mask"][row]
        targets = batch["targets"][row][mask].tolist()
        assert targets[-1] == tok.eos_id and tok.decode(targets) == response
        assert batch["input_ids"][row, batch["last_index"][row]] == tok.eos_id


def test_sft_masks(tok: Tokenizer) -> None:
    records = [{"messages": [S("sys"), U("Hi"), A("Hello there."), U("Bye"), A("Goodbye!")]},
               {"prompt": [U("Hi"), A("Hello there."), U("Bye")], "response": "Goodbye!"},
               {"text": "Just text."}]
    ds = SFTDataset.from_records(records, tok, max_len=64, max_prompt_len=32)
    batch = collate_sft(list(ds), tok.pad_id)
    assert batch["input_ids"].shape[0] == 3
    assert batch["last_index"].tolist() == [len(e.input_ids) - 1 for e in ds]

    def trained(row: int) -> list[str]:
        # Runs of consecutive masked targets, decoded: one string per trained span.
        mask, targets = batch["loss_mask"][row].tolist(), batch["targets"][row].tolist()
        spans, current = [], []
        for keep, target in zip(mask, targets, strict=True):
            if keep:
                current.append(target)
            elif current:
                spans, current = [*spans, tok.decode(current)], []
        return spans

    assert trained(0) == ["Hello there.", "Goodbye!"]  # every assistant turn of a "messages" record
    assert trained(1) == ["Goodbye!"]  # only the response of a prompt/response record
    assert trained(2) == ["Just text."] and ds[2].input_ids[-1] == tok.eos_id
    assert ds[0].input_ids == tok.encode_chat(records[0]["messages"])


def test_the_tokenizers_template_decides_the_tokens() -> None:
    """mistral-v3 puts the system prompt on the LAST user turn, so the first reply's context differs
    from a shorter conversation's; SFT masks come from one encoding of the whole conversation."""
    v3 = load_tokenizer(v1_model().with_name("mistral_instruct_tokenizer_240323.model.v3"), "mistral-v3")
    messages = [S("Be brief."), U("Hi"), A("Hello."), U("Bye"), A("Bye!")]
    example = SFTDataset.from_records([{"messages": messages}], v3, max_len=64, max_prompt_len=32)[0]
    assert example.input_ids == v3.encode_chat(messages)
    ids, mask = example.input_ids, example.response_mask
    spans = [i for i in range(len(ids)) if mask[i] and (i == 0 or not mask[i - 1])]
    assert [v3.decode(ids[i:ids.index(v3.eos_id, i) + 1]) for i in spans] == ["Hello.", "Bye!"]
    zephyr = load_tokenizer(v1_model(), "zephyr")
    pair = PreferenceDataset.from_records([{"prompt": "Hi", "chosen": "Yes.", "rejected": "No."}], zephyr,
                                          max_len=64, max_prompt_len=32)[0]
    assert pair.prompt_ids == zephyr.encode_prompt([U("Hi")])
    assert zephyr.decode(pair.prompt_ids).endswith("<|user|>\nHi \n<|assistant|>\n")
    assert pair.chosen_ids == zephyr.encode_prompt_response([U("Hi"), A("Yes.")])[1]


def test_load_sft_raw_and_truncation(tmp_path: Path, raw_tok: Tokenizer) -> None:
    tok = raw_tok
    path = write_lines(tmp_path, [json.dumps({"prompt": "p " * 30, "response": "r " * 30})])
    ds = load_sft_data(path, tok, max_len=20, max_prompt_len=8)
    example = ds[0]
    assert len(example.input_ids) == 20 and example.input_ids[0] == tok.bos_id
    assert example.response_mask == [False] * 8 + [True] * 12
    assert ds.stats["truncated_prompt"] == ds.stats["truncated_response"] == 1


# --------------------------------------------------------------------------------------- batching

def toy_dataset(n: int) -> PreferenceDataset:
    # Item i has a distinct length, so rows can be identified after padding.
    pairs = [PreferencePair([1, 100 + i], [200 + i] * (1 + i % 3) + [2], [300 + i, 2]) for i in range(n)]
    return PreferenceDataset(pairs, stats={}, pad_id=0)


def take(iterator: BatchIterator, k: int) -> list[dict]:
    it = iter(iterator)
    return [next(it) for _ in range(k)]


def test_batch_iterator_deterministic_epochs() -> None:
    ds = toy_dataset(10)
    it = BatchIterator(ds, 3, seed=7)
    assert len(it) == 3  # 10 // 3, drop_last
    batches = take(it, 9)  # three epochs
    again = take(BatchIterator(ds, 3, seed=7), 9)
    assert all(torch.equal(a["index"], b["index"]) and torch.equal(a["input_ids"], b["input_ids"])
               for a, b in zip(batches, again, strict=True))
    epochs = [torch.cat([b["index"] for b in batches[e * 3:(e + 1) * 3]]).tolist() for e in range(3)]
    assert all(len(set(e)) == 9 for e in epochs) and epochs[0] != epochs[1]  # reshuffled each epoch
    other = take(BatchIterator(ds, 3, seed=8), 3)
    assert [b["index"].tolist() for b in other] != [b["index"].tolist() for b in batches[:3]]
    in_order = take(BatchIterator(ds, 3, seed=7, shuffle=False), 4)
    assert [b["index"].tolist() for b in in_order] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [0, 1, 2]]


def test_rank_slices_equal_global_batch() -> None:
    ds = toy_dataset(13)
    single = take(BatchIterator(ds, 4, seed=3), 6)
    ranks = [take(BatchIterator(ds, 2, seed=3, rank=r, world_size=2), 6) for r in range(2)]
    for step, whole in enumerate(single):
        r0, r1 = ranks[0][step], ranks[1][step]
        assert torch.cat([r0["index"], r1["index"]]).tolist() == whole["index"].tolist()
        # The content matches too: chosen rows then rejected rows, each rank holding its half.
        for half, rows in ((r0, [0, 1, 4, 5]), (r1, [2, 3, 6, 7])):
            for mine, theirs in zip(range(4), rows, strict=True):
                n = int(half["last_index"][mine]) + 1
                assert torch.equal(half["input_ids"][mine, :n], whole["input_ids"][theirs, :n])
                assert int(whole["last_index"][theirs]) + 1 == n


def test_resume_gives_exactly_the_next_batches() -> None:
    ds = toy_dataset(10)
    reference = take(BatchIterator(ds, 3, seed=1), 8)
    for stop in (2, 3, 5):  # mid-epoch, exactly at an epoch boundary, in the second epoch
        first = BatchIterator(ds, 3, seed=1)
        take(first, stop)
        state = json.loads(json.dumps(first.state_dict()))  # must survive a round trip through a file
        resumed = BatchIterator(ds, 3, seed=1)
        resumed.load_state_dict(state)
        for got, want in zip(take(resumed, 8 - stop), reference[stop:], strict=True):
            assert torch.equal(got["index"], want["index"])
            assert torch.equal(got["input_ids"], want["input_ids"])
    with pytest.raises(ValueError, match="cannot resume: saved global_batch=3"):
        BatchIterator(ds, 2, seed=1).load_state_dict(state)


def test_drop_last_false() -> None:
    ds = toy_dataset(11)
    single = BatchIterator(ds, 4, seed=0, drop_last=False)
    assert len(single) == 3 and [len(b["index"]) for b in take(single, 3)] == [4, 4, 3]
    # Two ranks: the last global batch (3 items) is split 2 + 2, repeating the epoch's first item.
    ranks = [BatchIterator(ds, 4, seed=0, rank=r, world_size=2, drop_last=False) for r in range(2)]
    assert len(ranks[0]) == 2
    seen = [take(it, 2) for it in ranks]
    last = seen[0][1]["index"].tolist() + seen[1][1]["index"].tolist()
    order = ranks[0].epoch_order(0)
    assert last == order[8:] + order[:1]
    everything = sorted(i for per_rank in seen for b in per_rank for i in b["index"].tolist())
    assert sorted(set(everything)) == list(range(11)) and len(everything) == 12
    with pytest.raises(ValueError, match="fewer than one batch"):
        BatchIterator(ds, 6, seed=0, world_size=2)  # 11 items < one global batch of 12


def test_sft_batches() -> None:
    examples = [SFTExample([1, 5, 6, 2], [False, False, True, True]),
                SFTExample([1, 7, 2], [False, True, True])]
    batch = next(iter(BatchIterator(SFTDataset(examples, {}, pad_id=0), 2, seed=0, shuffle=False)))
    assert batch["input_ids"].tolist() == [[1, 5, 6, 2], [1, 7, 2, 0]]
    assert batch["loss_mask"].tolist() == [[False, True, True, False], [True, True, False, False]]
    assert batch["last_index"].tolist() == [3, 2]


def test_epoch_collate_and_fingerprint() -> None:
    ds = toy_dataset(10)
    it = BatchIterator(ds, 3, seed=5)
    first = take(it, 1)[0]
    state = it.state_dict()
    # epoch(e) replays one epoch (evaluation) without moving the training position.
    replay = list(it.epoch(0))
    assert len(replay) == 3 and torch.equal(replay[0]["input_ids"], first["input_ids"])
    assert it.state_dict() == state
    # dataset.collate(indices) is the batch the iterator yields for those indices (reference caches).
    again = ds.collate(first["index"].tolist())
    assert all(torch.equal(again[k], first[k]) for k in first)
    assert ds.fingerprint() == toy_dataset(10).fingerprint() != toy_dataset(11).fingerprint()
