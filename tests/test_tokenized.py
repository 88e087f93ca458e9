"""The tokenized-data cache: equal to fresh encoding, reused on a rerun, rebuilt on every key, never
read half-built; parallel encoding equals serial."""

from __future__ import annotations

import json
import multiprocessing
import os
import pickle
from concurrent.futures.process import BrokenProcessPool

import numpy as np
import pytest
from transformers import AutoTokenizer

from distill.commands import main
from distill.data import tokenized_splits
from distill.data.batching import pack
from distill.data.chunks import EncodedChunk, encode_chunks
from distill.data.datamodule import DataModule
from distill.data.encoding import EncodingStats, NoTrainableTokensError, encode_all
from distill.data.formats import read_records
from distill.data.templates import resolve_template
from distill.data.tokenized import TokenizedEntry, TokenizedSamples
from tests.helpers import conversation, write_config, write_jsonl


@pytest.fixture(autouse=True)
def _chat_tokenizer(chat_tokenizer_dir):
    global CHAT_TOKENIZER
    CHAT_TOKENIZER = str(chat_tokenizer_dir)


CHAT_TOKENIZER = ""


def make_data(tmp_path, records=None, **options) -> DataModule:
    path = tmp_path / "train.jsonl"
    if not path.exists() or records is not None:
        rows = records or [conversation(i, turns=1 + i % 3) for i in range(40)] + [
            {"text": f"Plain text number {i}, for pretraining."} for i in range(8)
        ]
        write_jsonl(path, rows)
    settings = {
        "train_files": str(path),
        "tokenizer": CHAT_TOKENIZER,
        "template": "chatml",
        "add_eot_to_stop_tokens": True,
        "max_seq_length": 64,
        "val_fraction": 0.25,
        "tokenized_cache": str(tmp_path / "cache"),
        **options,
    }
    return DataModule(**settings)


def entries(tmp_path) -> list[str]:
    return sorted(p.parent.name for p in (tmp_path / "cache").glob("*/data"))


def same(a, b) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert (list(x.input_ids), list(x.labels), x.sha, x.source) == (
            list(y.input_ids),
            list(y.labels),
            y.sha,
            y.source,
        )


def test_cache_equals_fresh_encoding_for_both_splits(tmp_path, chat_tokenizer):
    tokenizer = chat_tokenizer
    data = make_data(tmp_path)
    data.setup("fit")
    assert isinstance(data.train, TokenizedSamples) and isinstance(data.val, TokenizedSamples)
    train_records, val_records = data.load_records()
    template = resolve_template(tokenizer, "chatml")
    fresh_train, train_stats = encode_all(train_records, tokenizer, template, 64)
    fresh_val, _ = encode_all(val_records, tokenizer, template, 64)
    same(data.train, fresh_train)
    same(data.val, fresh_val)
    assert len(data.train) + len(data.val) == 48
    assert data.stats["data/train_kept"] == train_stats.kept
    assert data.stats["data/train_truncated"] == train_stats.truncated > 0  # 64 tokens cut the long ones
    assert data.chat_template is not None and data.chat_template.name == "chatml"
    assert list(data.train.lengths) == [len(s.input_ids) for s in fresh_train]


def test_a_rerun_maps_the_cache_without_encoding(tmp_path, monkeypatch):
    first = make_data(tmp_path)
    first.setup("fit")

    def refuse(*args, **kwargs):
        raise AssertionError("encoded again although the cache holds the samples")

    monkeypatch.setattr(tokenized_splits, "encode_chunks", refuse)
    monkeypatch.setattr(DataModule, "load_records", refuse)
    second = make_data(tmp_path)
    second.setup("fit")
    same(second.train, first.train)
    same(second.val, first.val)
    assert second.stats == first.stats
    assert second.chat_template == first.chat_template  # resolved although no record was read
    assert len(entries(tmp_path)) == 2  # train and val


@pytest.mark.parametrize(
    "change",
    [
        {"max_seq_length": 48},
        {"truncation": "left"},
        {"train_on_responses_only": False},
        {"template": "llama3"},
        {"val_fraction": 0.5},
        {"seed": 7},
        {"max_train_samples": 10},
        {"format": "messages"},
        {"tokenizer": "other"},
        {"file": "edited"},
    ],
    ids=lambda change: next(iter(change)),
)
def test_every_key_change_rebuilds(tmp_path, chat_tokenizer, change):
    rows = [conversation(i, turns=1 + i % 3) for i in range(40)]
    make_data(tmp_path, records=rows).setup("fit")
    before = entries(tmp_path)
    options = dict(change)
    if options.pop("file", None):
        write_jsonl(tmp_path / "train.jsonl", [*rows[:-1], conversation(99)])
    if options.get("tokenizer") == "other":  # one more special token: another tokenizer
        chat_tokenizer.save_pretrained(tmp_path / "other")
        other = AutoTokenizer.from_pretrained(tmp_path / "other")
        other.add_tokens(["<extra>"], special_tokens=True)
        other.save_pretrained(tmp_path / "other")
        options["tokenizer"] = str(tmp_path / "other")
    data = make_data(tmp_path, **options)
    data.setup("fit")
    after = entries(tmp_path)
    assert set(before) < set(after), f"{change} reused the cache"
    fresh, _ = encode_all(
        data.load_records()[0],
        data.tokenizer,
        resolve_template(data.tokenizer, data.template_name),
        data.max_seq_length,
        data.truncation,
        data.train_on_responses_only,
    )
    same(data.train, fresh)


def _killed_build(entry: TokenizedEntry, samples) -> None:
    def chunks():
        yield EncodedChunk.of(samples[:5], EncodingStats(samples=5, kept=5))
        os._exit(9)  # dies mid-build like a kill -9: no cleanup runs

    with entry.lock():
        entry.build(chunks(), {})


def test_a_killed_build_is_never_read_and_the_next_run_rebuilds(tmp_path):
    data = make_data(tmp_path)
    inputs = data.split_inputs()["train"]
    entry = TokenizedEntry(data.tokenized_cache, inputs)
    records = data.load_records()[0]
    template = resolve_template(data.tokenizer, "chatml")
    samples, _ = encode_all(records, data.tokenizer, template, 64)
    child = multiprocessing.get_context("fork").Process(target=_killed_build, args=(entry, samples))
    child.start()
    child.join()
    assert child.exitcode == 9
    assert list(entry.path.glob("building-*")), "the killed build left its files"
    assert entry.open() is None  # a half-built entry is not read as whole
    data.setup("fit")
    same(data.train, samples)
    assert not list(entry.path.glob("building-*"))


def test_a_damaged_entry_is_rebuilt(tmp_path, capsys):
    first = make_data(tmp_path)
    first.setup("fit")
    ids = first.train.directory / "input_ids.bin"
    reference = list(first.train)
    ids.write_bytes(ids.read_bytes()[:-8])
    second = make_data(tmp_path)
    second.setup("fit")
    assert "input_ids.bin" in capsys.readouterr().out
    same(second.train, reference)


def _swap_two_token_ids(data_dir) -> str:
    ids = np.memmap(data_dir / "input_ids.bin", dtype=np.int32, mode="r+")
    i = int(np.flatnonzero(ids[:-1] != ids[1:])[0])
    ids[i], ids[i + 1] = ids[i + 1], ids[i]  # both valid ids, every size unchanged
    ids.flush()
    return f"{data_dir / 'input_ids.bin'}: its bytes do not match the checksum"


def _move_one_offset(data_dir) -> str:
    offsets = np.memmap(data_dir / "offsets.bin", dtype=np.int64, mode="r+")
    offsets[1] += 1  # still ascending: one token moves from the second sample to the first
    offsets.flush()
    return f"{data_dir / 'offsets.bin'}: its bytes do not match the checksum"


def _out_of_vocabulary_id(data_dir) -> str:
    ids = np.memmap(data_dir / "input_ids.bin", dtype=np.int32, mode="r+")
    ids[3] = 10**6
    ids.flush()
    return f"{data_dir / 'input_ids.bin'}: its bytes do not match the checksum"


def _garbage_meta(data_dir) -> str:
    (data_dir / "meta.json").write_text('{"samples": 3, "tok')
    return f"{data_dir / 'meta.json'}: unreadable"


def _meta_without_counts(data_dir) -> str:
    (data_dir / "meta.json").write_text("[1, 2]")
    return f"{data_dir / 'meta.json'}: not the meta.json of a tokenized cache entry"


@pytest.mark.parametrize(
    "damage",
    [_swap_two_token_ids, _move_one_offset, _out_of_vocabulary_id, _garbage_meta, _meta_without_counts],
    ids=lambda damage: damage.__name__.strip("_"),
)
def test_an_entry_edited_in_place_is_named_and_rebuilt_once(tmp_path, capsys, damage):
    first = make_data(tmp_path)
    first.setup("fit")
    reference = list(first.train)
    message = damage(first.train.directory)
    second = make_data(tmp_path)
    second.setup("fit")
    assert capsys.readouterr().out.count(message) == 1  # named once, though opened again under the lock
    same(second.train, reference)
    third = make_data(tmp_path)  # the rebuilt entry is whole: no rerun keeps failing
    third.setup("fit")
    assert "damaged" not in capsys.readouterr().out
    same(third.train, reference)


def test_an_entry_without_checksums_is_rebuilt(tmp_path, capsys):
    first = make_data(tmp_path)
    first.setup("fit")
    meta_path = first.train.directory / "meta.json"
    meta = json.loads(meta_path.read_text())
    del meta["checksums"]  # as distill wrote its entries before they had checksums
    meta_path.write_text(json.dumps(meta))
    make_data(tmp_path).setup("fit")
    assert f"{meta_path}: no checksums of the arrays" in capsys.readouterr().out
    assert "checksums" in json.loads(meta_path.read_text())


def test_a_fully_masked_dataset_fails_at_every_start_and_leaves_no_entry(tmp_path):
    rows = [conversation(i) for i in range(6)]
    for attempt in range(2):
        data = make_data(tmp_path, records=rows, max_seq_length=8, val_fraction=0.0)
        with pytest.raises(NoTrainableTokensError, match="every label masked"):
            data.setup("fit")
        assert entries(tmp_path) == [], attempt


def test_parallel_encoding_equals_serial(tmp_path, chat_tokenizer):
    rows = [conversation(i, turns=1 + i % 3) for i in range(1200)] + [{"text": "short"}] * 3
    records = read_records(write_jsonl(tmp_path / "many.jsonl", rows))
    template = resolve_template(chat_tokenizer, "chatml")
    serial, serial_stats = encode_all(records, chat_tokenizer, template, 64)
    chunks = list(encode_chunks(records, chat_tokenizer, template, 64, num_proc=2))
    assert len(chunks) == 5  # 1203 records in chunks of 256: the workers had several each
    same([sample for chunk in chunks for sample in chunk.samples()], serial)
    stats = EncodingStats()
    for chunk in chunks:
        stats.add(chunk.stats)
    assert stats.as_dict() == serial_stats.as_dict()
    assert serial_stats.truncated > 0 and serial_stats.kept == 1203


class _DiesWhenUnpickled:
    """A record that kills the worker process that receives it."""

    def __reduce__(self):
        return os._exit, (3,)


def test_a_worker_that_dies_fails_the_encoding_instead_of_hanging(tmp_path, chat_tokenizer):
    rows = [conversation(i, turns=1) for i in range(12)]
    records = read_records(write_jsonl(tmp_path / "few.jsonl", rows))
    records[6] = _DiesWhenUnpickled()  # the second of three chunks
    template = resolve_template(chat_tokenizer, "chatml")
    # the pool's clean-up after a dead worker could wait forever on a live one, once in tens of runs
    for _ in range(20):
        with pytest.raises(BrokenProcessPool):
            list(encode_chunks(records, chat_tokenizer, template, 64, num_proc=2, chunk_size=4))


def test_a_cache_built_by_two_processes_equals_one_built_by_one(tmp_path):
    rows = [conversation(i, turns=2) for i in range(1100)]
    one = make_data(tmp_path, records=rows)
    one.setup("fit")
    two = make_data(tmp_path, num_proc=2, tokenized_cache=str(tmp_path / "cache2"))
    two.setup("fit")
    same(two.train, one.train)
    same(two.val, one.val)
    assert two.stats == one.stats


def test_packing_reads_lengths_only_and_samples_pickle_as_a_path(tmp_path, monkeypatch):
    data = make_data(tmp_path, packing=True)
    data.setup("fit")
    rows_expected = [[len(s.input_ids) for s in row] for row in data._rows(data.train, 3)]

    def no_reads(self, index):
        raise AssertionError("packing read a sample")

    monkeypatch.setattr(TokenizedSamples, "__getitem__", no_reads)
    rows = pack(data.train, 64, seed=3)
    monkeypatch.undo()
    assert [[len(s.input_ids) for s in row] for row in rows] == rows_expected
    assert sum(len(r) for r in rows.rows) == len(data.train)
    blob = pickle.dumps(data.train)
    assert len(blob) < 1000  # the workers map the files: no sample travels
    same(pickle.loads(blob), data.train)
    meta = json.loads((data.train.directory / "meta.json").read_text())
    assert meta["samples"] == len(data.train) and meta["conversations"] is True


def test_the_tokenize_command_builds_the_entries_a_fit_then_maps(tmp_path, chat_file, monkeypatch):
    cache = tmp_path / "tokenized"
    config = write_config(tmp_path, chat_file, tokenized_cache=str(cache))
    main(["tokenize", "--config", str(config)])
    built = sorted(json.loads(p.read_text())["samples"] for p in cache.glob("*/data/meta.json"))
    assert built == [5, 19]  # val_fraction 0.2 of 24 records

    def refuse(*args, **kwargs):
        raise AssertionError("the fit encoded again")

    monkeypatch.setattr(tokenized_splits, "encode_chunks", refuse)
    main(["fit", "--config", str(config), "--trainer.max_steps", "2"])
    assert (tmp_path / "hf" / "config.json").exists()
