import json
import logging

import pytest

from distill.data.formats import DataFormatError
from distill.data.pairs import (
    PairRecord,
    UnpairedRecord,
    detect_pair_format,
    read_pair_records,
    to_pair_record,
)
from tests.helpers import write_jsonl


def u(text):
    return {"role": "user", "content": text}


def a(text):
    return {"role": "assistant", "content": text}


def s(text):
    return {"role": "system", "content": text}


def read_one(tmp_path, row, fmt="auto"):
    path = write_jsonl(tmp_path / "pairs.jsonl", [row])
    records, stats = read_pair_records(path, fmt)
    assert stats.records == len(records) == 1 and stats.identical_dropped == 0
    assert records[0].source == f"{path}:1"
    return records[0]


def assert_pair(record, prompt, chosen, rejected):
    assert isinstance(record, PairRecord)
    assert (record.prompt, record.chosen, record.rejected) == (tuple(prompt), tuple(chosen), tuple(rejected))


SHAREGPT_PROMPT = [
    {"from": "human", "value": "Q1"},
    {"from": "gpt", "value": "A1"},
    {"from": "human", "value": "Q2"},
]


@pytest.mark.parametrize(
    ("row", "prompt"),
    [
        ({"conversations": SHAREGPT_PROMPT[:1], "chosen": "good", "rejected": "bad"}, [u("Q1")]),
        (  # multi-turn prompt with a system field
            {"conversations": SHAREGPT_PROMPT, "chosen": "good", "rejected": "bad", "system": "S"},
            [s("S"), u("Q1"), a("A1"), u("Q2")],
        ),
        (  # the conversation's own system message wins over the field
            {
                "conversations": [{"from": "system", "value": "own"}, *SHAREGPT_PROMPT[:1]],
                "chosen": "good",
                "rejected": "bad",
                "system": "field",
            },
            [s("own"), u("Q1")],
        ),
        ({"question": "Q1", "response_chosen": "good", "response_rejected": "bad"}, [u("Q1")]),
        ({"prompt": "Q1", "chosen": "good", "rejected": "bad", "system": "S"}, [s("S"), u("Q1")]),
        ({"prompt": "Q1", "chosen": "good", "rejected": "bad", "system": "  "}, [u("Q1")]),
        ({"prompt": [s("S"), u("Q1")], "chosen": [a("good")], "rejected": [a("bad")]}, [s("S"), u("Q1")]),
        (  # a messages prompt under the SFT key
            {"messages": [u("Q1"), a("A1"), u("Q2")], "chosen": "good", "rejected": "bad"},
            [u("Q1"), a("A1"), u("Q2")],
        ),
        (  # UltraFeedback: chosen and rejected repeat the prompt
            {"prompt": "Q1", "chosen": [u("Q1"), a("good")], "rejected": [u("Q1"), a("bad")]},
            [u("Q1")],
        ),
        (  # ... with the system message, or without it
            {
                "prompt": "Q1",
                "system": "S",
                "chosen": [s("S"), u("Q1"), a("good")],
                "rejected": [u("Q1"), a("bad")],
            },
            [s("S"), u("Q1")],
        ),
    ],
)
def test_pair_formats(tmp_path, row, prompt):
    assert_pair(read_one(tmp_path, row), prompt, [a("good")], [a("bad")])


def test_hh_splits_at_the_last_assistant_turn(tmp_path):
    common = [u("Q1"), a("A1"), u("Q2")]
    row = {"chosen": [*common, a("good")], "rejected": [*common, a("bad")], "system": "S"}
    assert_pair(read_one(tmp_path, row), [s("S"), *common], [a("good")], [a("bad")])
    # an assistant turn the two share right before they differ belongs to both responses
    row = {"chosen": [u("Q"), a("same"), a("good")], "rejected": [u("Q"), a("same"), a("bad")]}
    assert_pair(read_one(tmp_path, row), [u("Q")], [a("same"), a("good")], [a("same"), a("bad")])


def test_multi_turn_tool_response_and_margin(tmp_path):
    tool = {"role": "tool", "content": "42"}
    row = {"prompt": "Q", "chosen": [a("call"), tool, a("42")], "rejected": "guess", "margin": 2}
    record = read_one(tmp_path, row)
    assert_pair(record, [u("Q")], [a("call"), tool, a("42")], [a("guess")])
    assert record.margin == 2.0 and read_one(tmp_path, {**row, "margin": None}).margin is None


@pytest.mark.parametrize(
    "row",
    [
        {"prompt": "Q", "completion": "A", "label": False},
        {"prompt": [u("Q")], "completion": [a("A")], "label": False},
        {"prompt": "Q", "completion": [u("Q"), a("A")], "label": False},
        {"messages": [u("Q"), a("A")], "label": False},
    ],
)
def test_kto_shapes(tmp_path, row):
    record = read_one(tmp_path, row)
    assert record == UnpairedRecord(record.source, (u("Q"),), (a("A"),), False)


def test_kto_messages_multi_turn_with_system(tmp_path):
    row = {"messages": [u("Q1"), a("A1"), u("Q2"), a("A2")], "label": True, "system": "S"}
    record = read_one(tmp_path, row)
    assert (record.prompt, record.completion, record.label) == (
        (s("S"), u("Q1"), a("A1"), u("Q2")),
        (a("A2"),),
        True,
    )


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        (["conversations", "chosen", "rejected"], "medicalgpt"),
        (["question", "response_chosen", "response_rejected"], "medicalgpt_reward"),
        (["prompt", "chosen", "rejected"], "trl"),
        (["messages", "chosen", "rejected"], "trl"),
        (["chosen", "rejected"], "hh"),
        (["prompt", "completion", "label"], "kto"),
        (["messages", "label"], "kto"),
        (["messages"], None),
        (["conversations"], None),
    ],
)
def test_detect_pair_format(keys, expected):
    assert detect_pair_format(dict.fromkeys(keys)) == expected


def test_forced_format_and_json_array(tmp_path):
    row = {"prompt": "Q", "chosen": "good", "rejected": "bad"}
    with pytest.raises(DataFormatError, match="missing field 'conversations'"):
        to_pair_record(row, "f:1", fmt="medicalgpt")
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps([row, row]))
    records, _ = read_pair_records(path, fmt="trl")
    assert [r.source for r in records] == [f"{path}[0]", f"{path}[1]"]


def test_sha_covers_every_field_and_not_the_source():
    pair = {"prompt": "Q", "chosen": "good", "rejected": "bad", "margin": 1.0}
    base = to_pair_record(pair, "f:1")
    assert base.sha == to_pair_record(pair, "other.jsonl:9").sha
    for key, value in [("prompt", "Q?"), ("chosen", "good!"), ("rejected", "bad!"), ("margin", 1.5)]:
        assert to_pair_record({**pair, key: value}, "f:1").sha != base.sha, key
    kto = {"prompt": "Q", "completion": "A", "label": True}
    base = to_pair_record(kto, "f:1")
    assert base.sha == to_pair_record(kto, "g:2").sha
    for key, value in [("prompt", "Q?"), ("completion", "A!"), ("label", False)]:
        assert to_pair_record({**kto, key: value}, "f:1").sha != base.sha, key


def test_identical_pair_dropped_counted_and_warned(tmp_path, caplog):
    rows = [
        {"prompt": "Q", "chosen": "same", "rejected": "same"},
        {"prompt": "Q", "chosen": "good", "rejected": "bad"},
        {"chosen": [u("Q"), a("same")], "rejected": [u("Q"), a("same")]},
    ]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="distill.data.pairs"):
        records, stats = read_pair_records(path)
    assert (stats.records, stats.identical_dropped) == (1, 2)
    assert [r.source for r in records] == [f"{path}:2"]
    assert len(caplog.records) == 1 and f"{path}:1, {path}:3" in caplog.text


def test_file_mixing_pairs_and_kto_names_the_line(tmp_path):
    rows = [
        {"prompt": "Q", "chosen": "good", "rejected": "bad"},
        {"prompt": "Q", "completion": "A", "label": True},
    ]
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    with pytest.raises(DataFormatError, match=r"mixed\.jsonl:2: a KTO record in a file of preference pair"):
        read_pair_records(path)


HH_TURNS = [u("Q1"), a("A1"), u("Q2")]


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ([1, 2], "expected a JSON object"),
        ({"foo": 1}, "unknown preference record format with keys ['foo']"),
        ({"prompt": "Q", "rejected": "bad"}, "missing field 'chosen'"),
        ({"conversations": [{"from": "human", "value": "Q"}], "chosen": "good"}, "missing field 'rejected'"),
        ({"response_chosen": "good", "response_rejected": "bad"}, "missing field 'question'"),
        ({"prompt": "Q", "label": True}, "missing field 'completion'"),
        ({"prompt": "Q", "completion": "A"}, "missing field 'label'"),
        ({"prompt": "Q", "chosen": " \n", "rejected": "bad"}, "'chosen' turn 0 is an empty response"),
        ({"prompt": "Q", "chosen": "good", "rejected": [a("")]}, "'rejected' turn 0 is an empty response"),
        (
            {"prompt": "Q", "chosen": [u("X"), a("good")], "rejected": "bad"},
            "must start with an assistant turn",
        ),
        ({"prompt": "Q", "chosen": [a("good"), u("more")], "rejected": "bad"}, "turn 1 is a user turn"),
        ({"prompt": [u("Q"), a("A")], "chosen": "good", "rejected": "bad"}, "nothing to respond to"),
        ({"prompt": "  ", "chosen": "good", "rejected": "bad"}, "empty prompt"),
        ({"prompt": [s("S")], "chosen": "good", "rejected": "bad"}, "empty prompt"),
        ({"prompt": [], "chosen": "good", "rejected": "bad"}, "non-empty list"),
        (
            {"prompt": [u("Q"), s("S"), u("Q")], "chosen": "good", "rejected": "bad"},
            "system message must come first",
        ),
        ({"prompt": "Q", "chosen": "good", "rejected": "bad", "system": 3}, "'system' must be a string"),
        (
            {"prompt": "Q", "chosen": [{"role": "bot", "content": "x"}], "rejected": "bad"},
            "('chosen'): turn 0",
        ),
        ({"prompt": "Q", "completion": "A", "label": "true"}, "JSON boolean"),
        ({"prompt": "Q", "completion": "A", "label": 1}, "JSON boolean"),
        ({"prompt": "Q", "completion": "A", "label": None}, "JSON boolean"),
        ({"messages": [u("Q")], "label": True}, "must end with the assistant completion"),
        ({"messages": [a("A")], "label": True}, "empty prompt"),
        ({"prompt": "Q", "chosen": "good", "rejected": "bad", "margin": "1.5"}, "'margin' must be"),
        ({"prompt": "Q", "chosen": "good", "rejected": "bad", "margin": True}, "'margin' must be"),
        ({"chosen": [u("Q1"), a("good")], "rejected": [u("Q2"), a("bad")]}, "share no prompt"),
        ({"chosen": "good", "rejected": "bad"}, "share no prompt"),
        (
            {
                "chosen": [u("Q1"), a("A1"), u("Q2"), a("good")],
                "rejected": [u("Q1"), a("X"), u("Q2"), a("bad")],
            },
            "differ before the last user turn",
        ),
        ({"chosen": [*HH_TURNS, a("good")], "rejected": HH_TURNS}, "'rejected' has no response"),
    ],
)
def test_bad_input_names_file_and_line(tmp_path, row, message):
    good = {"prompt": "Q", "chosen": "good", "rejected": "bad"}
    path = write_jsonl(tmp_path / "bad.jsonl", [good, row])
    with pytest.raises(DataFormatError) as err:
        read_pair_records(path)
    assert "bad.jsonl:2" in str(err.value) and message in str(err.value)


def test_medicalgpt_history_becomes_earlier_turns_of_the_prompt(tmp_path):
    path = tmp_path / "rm.jsonl"
    row = {"history": [["hi", "hello"]], "question": "q?", "response_chosen": "a", "response_rejected": "b"}
    path.write_text(json.dumps(row) + "\n" + json.dumps({**row, "history": [["only one"]]}) + "\n")
    with pytest.raises(DataFormatError, match=r"rm.jsonl:2: 'history'"):
        read_pair_records(path)
    path.write_text(json.dumps(row) + "\n")
    (record,), _ = read_pair_records(path)
    assert record.prompt == (
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "q?"},
    )
