import json
import re
from pathlib import Path

import pytest

from distill.data.formats import DataFormatError, _iter_raw, read_records, to_record
from distill.data.pairs import read_pair_records
from distill.data.prompts import read_prompt_records
from distill.data.streaming import _lines
from tests.helpers import write_jsonl


def test_each_format_normalises_to_messages(tmp_path):
    rows = [
        {
            "conversations": [
                {"from": "system", "value": "S"},
                {"from": "human", "value": "Q"},
                {"from": "gpt", "value": "A"},
            ]
        },
        {
            "messages": [
                {"role": "system", "content": "S"},
                {"role": "user", "content": "Q"},
                {"role": "assistant", "content": "A"},
            ]
        },
        {"instruction": "Q", "input": "", "output": "A", "system": "S"},
    ]
    records = read_records(write_jsonl(tmp_path / "mixed.jsonl", rows))
    expected = (
        {"role": "system", "content": "S"},
        {"role": "user", "content": "Q"},
        {"role": "assistant", "content": "A"},
    )
    assert [r.messages for r in records] == [expected] * 3
    # same content in another format: same SHA, whatever file or line it came from
    assert len({r.sha for r in records}) == 1
    assert records[0].source.endswith("mixed.jsonl:1") and records[2].source.endswith("mixed.jsonl:3")


def test_alpaca_input_joins_instruction_and_text_format(tmp_path):
    path = tmp_path / "a.json"
    path.write_text(json.dumps([{"instruction": "Sum", "input": "2 3", "output": "5"}, {"text": "plain"}]))
    alpaca, text = read_records(path)
    assert alpaca.messages == (
        {"role": "user", "content": "Sum\n\n2 3"},
        {"role": "assistant", "content": "5"},
    )
    assert text.text == "plain" and text.messages is None and text.source.endswith("a.json[1]")


def test_directory_reads_all_files_in_order(tmp_path):
    write_jsonl(tmp_path / "b.jsonl", [{"text": "second"}])
    write_jsonl(tmp_path / "a.jsonl", [{"text": "first"}])
    (tmp_path / "notes.txt").write_text("ignored")
    assert [r.text for r in read_records(tmp_path)] == ["first", "second"]


def test_sha_changes_with_content_only():
    a = to_record({"text": "x"}, "f:1")
    assert a.sha == to_record({"text": "x"}, "g:9").sha
    assert a.sha != to_record({"text": "y"}, "f:1").sha
    assert len(a.sha) == 64


def test_malformed_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n\n{"text": "broken\n')
    with pytest.raises(DataFormatError, match=r"bad\.jsonl:3: malformed JSON"):
        read_records(path)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"instruction": "Q"}, "missing field 'output'"),
        ({"messages": [{"role": "user", "content": "Q"}]}, "no assistant turn"),
        (
            {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "  "}]},
            "empty assistant",
        ),
        (
            {"messages": [{"role": "user"}, {"role": "assistant", "content": "A"}]},
            "missing a string 'content'",
        ),
        ({"conversations": [{"from": "bot", "value": "A"}]}, "unknown from 'bot'"),
        ({"messages": []}, "non-empty list"),
        ({"prompt": "Q"}, "unknown record format"),
        ({"text": ""}, "empty 'text'"),
        (["not", "an", "object"], "expected a JSON object"),
    ],
)
def test_bad_records_name_their_place(raw, message):
    with pytest.raises(DataFormatError, match=message) as info:
        to_record(raw, "data.jsonl:7")
    assert str(info.value).startswith("data.jsonl:7:")


def test_missing_file_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such data file"):
        read_records(tmp_path / "nope.jsonl")


def test_a_line_separator_inside_a_jsonl_string_is_not_a_line_break(tmp_path):
    path = tmp_path / "ls.jsonl"
    text = "one\u2028two\u0085three"
    first = json.dumps({"text": text}, ensure_ascii=False)
    path.write_text(first + "\r\n" + json.dumps({"text": "b"}) + "\n")
    records = read_records(path)
    assert [r.text for r in records] == [text, "b"]
    assert [r.source for r in records] == [f"{path}:1", f"{path}:2"]


# ---- a byte that is not UTF-8 (issue 25 #2) -------------------------------------------------------


def read_streamed(path):
    """The documents of a ``.txt`` or ``.jsonl`` file as a stream reads them."""
    return [read() for _, _, read in _lines(path, 0, 0) if read is not None]


@pytest.mark.parametrize(
    ("read", "name", "content", "line"),
    [
        (read_records, "sft.jsonl", b'\xef\xbb\xbf{"text": "ok"}\n\n{"text": "caf\xe9"}\n', 3),
        (read_records, "sft.json", b'\n[{"text": "ok"},\n {"text": "caf\xe9"}]\n', 3),
        (read_records, "sft.csv", b"text\nok\ncaf\xe9\nlast\n", 3),
        (read_pair_records, "pairs.jsonl", b'{"prompt": "Q", "chosen": "A", "rejected": "\xff"}\n', 1),
        (read_prompt_records, "prompts.jsonl", b'{"question": "ok"}\n{"question": "caf\xe9"}\n', 2),
        (read_streamed, "corpus.txt", b"ok\nsecond\ncaf\xe9\n", 3),
    ],
    ids=["sft-jsonl", "sft-json-array", "sft-csv", "preference", "prompts", "stream"],
)
def test_a_byte_that_is_not_utf8_names_the_file_the_line_and_the_byte_offset(
    tmp_path, read, name, content, line
):
    path = tmp_path / name
    path.write_bytes(content)
    offset = next(i for i, byte in enumerate(content) if byte in b"\xe9\xff")
    where = re.escape(
        f"{path}:{line}: not UTF-8: byte 0x{content[offset]:02x} at byte offset {offset} of the file"
    )
    with pytest.raises(DataFormatError, match=f"^{where} .*re-encode it"):
        read(path)


def test_a_jsonl_file_is_read_a_line_at_a_time_not_whole(tmp_path, monkeypatch):
    path = tmp_path / "big.jsonl"
    path.write_bytes(b'{"text": "first"}\n{"text": "caf\xe9"}\n')
    for whole in ("read_text", "read_bytes"):
        monkeypatch.setattr(
            Path, whole, lambda *_, whole=whole, **__: pytest.fail(f"the data file was read whole ({whole})")
        )
    raw = _iter_raw(path)
    assert next(raw) == ({"text": "first"}, f"{path}:1")  # the first record before the bad line is read
    with pytest.raises(DataFormatError, match=r"big\.jsonl:2: not UTF-8"):
        next(raw)
