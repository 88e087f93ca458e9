"""Preference pairs and KTO samples from files to batches: response-only labels, truncation of the prompt,
pairs as units (grouping, collating, packing, shuffling, rank shards, resume), the tokenized cache, and
bad input named by file and line."""

from __future__ import annotations

import functools
import logging
import math
import re
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from distill.cache.lock import WriterLock
from distill.data import chunks, datamodule, preference_datamodule, tokenized
from distill.data.encoding import IGNORE_INDEX, Encoded, encode_messages
from distill.data.formats import DataFormatError
from distill.data.pair_encoding import (
    Grouped,
    UnitCollator,
    encode_unit,
    first_trainable,
    truncate_unit,
)
from distill.data.pairs import PairRecord, read_pair_records, to_pair_record
from distill.data.preference_datamodule import PreferenceDataModule
from distill.data.resume import ShuffledBatches
from distill.data.templates import resolve_template
from distill.objectives.base import loss_inputs, sequence_layout
from tests.helpers import TOKENIZER_DIR, write_jsonl

EOT = "</s>"  # mistral's end of an assistant turn, the tokenizer's EOS
LONG_PROMPT = " ".join(f"word{i}" for i in range(40))
LONG_RESPONSE = " ".join(f"step{i}" for i in range(40))


def u(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def a(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def pair(i: int, **extra) -> dict:
    return {
        "prompt": f"Question {i}: what is {i} times two?",
        "chosen": f"It is {2 * i}.",
        "rejected": f"Maybe {2 * i + 1}.",
        **extra,
    }


def kto(i: int) -> dict:
    return {"prompt": f"Question {i}?", "completion": f"Answer {i}.", "label": i % 3 != 0}


def pair_file(path: Path, indices: range) -> Path:
    """Pairs whose margin is their index, so a packed batch (which has no ``sha``) still names them."""
    return write_jsonl(path, [pair(i, margin=float(i)) for i in indices])


def data(tmp_path: Path, train: Path, val: Path | None = None, **options) -> PreferenceDataModule:
    """A set-up data module with its own tokenized cache under ``tmp_path``."""
    settings = {
        "train_files": str(train),
        "val_files": str(val) if val else None,
        "tokenizer": str(TOKENIZER_DIR),
        "template": "mistral",
        "max_seq_length": 64,
        "batch_size": 3,
        "tokenized_cache": str(tmp_path / "cache"),
        **options,
    }
    dm = PreferenceDataModule(**settings)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def entries(tmp_path: Path) -> list[str]:
    return sorted(p.parent.name for p in (tmp_path / "cache").glob("*/data"))


def trained(sample: Encoded) -> list[int]:
    return [
        token for token, label in zip(sample.input_ids, sample.labels, strict=True) if label != IGNORE_INDEX
    ]


def fake_trainer(rank: int, world_size: int) -> SimpleNamespace:
    """What the data module reads of a Trainer: its rank, and the fit loop's progress (none yet)."""
    progress = SimpleNamespace(current=SimpleNamespace(completed=0, ready=0))
    loop = SimpleNamespace(epoch_progress=progress, epoch_loop=SimpleNamespace(batch_progress=progress))
    return SimpleNamespace(global_rank=rank, world_size=world_size, fit_loop=loop)


def sequence_tokens(batch: dict, s: int) -> list[int]:
    return batch.input_ids[batch.sequence_index == s].tolist()


@pytest.fixture(autouse=True)
def _one_tokenizer(monkeypatch, tokenizer):
    """The data modules share the session's tokenizer: loading it is most of their setup time."""

    def load(name: str):
        assert name == str(TOKENIZER_DIR)
        return tokenizer

    monkeypatch.setattr(datamodule, "load_tokenizer", load)


@pytest.fixture(scope="module")
def mistral(tokenizer):
    return resolve_template(tokenizer, "mistral")


@pytest.fixture(scope="module")
def units(tokenizer, mistral) -> list[list[Encoded]]:
    """Three encoded pairs of different lengths; the first has a margin of 0.5, the others none."""
    rows = [
        pair(0, margin=0.5),
        {"prompt": "Hi", "chosen": "Hello there, how are you today?", "rejected": "Go away."},
        {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "Seven."},
    ]
    return [encode_unit(to_pair_record(row, f"t:{i + 1}"), tokenizer, mistral) for i, row in enumerate(rows)]


# ---- masking and truncation -------------------------------------------------------------------------

PROMPT = [u("What is Python?"), a("A snake."), u("And the language?")]


def test_only_the_response_is_trained_after_a_shared_prompt(tokenizer, mistral):
    record = to_pair_record(
        {"prompt": PROMPT, "chosen": "A programming language.", "rejected": "No idea."}, "t:1"
    )
    chosen, rejected = encode_unit(record, tokenizer, mistral)
    rendered = mistral.render(tokenizer, list(PROMPT), generation_prompt=True)
    prompt_ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    k = len(prompt_ids)
    for sample, response in ((chosen, "A programming language."), (rejected, "No idea.")):
        assert sample.input_ids[:k] == prompt_ids
        assert sample.labels[:k] == [IGNORE_INDEX] * k
        assert sample.labels[k:] == sample.input_ids[k:]  # the whole response, nothing after it
        assert tokenizer.decode(trained(sample)) == response + EOT
        assert sample.input_ids[-1] == tokenizer.eos_token_id
        assert (sample.sha, sample.source, sample.value) == (record.sha, "t:1", None)
    assert first_trainable(chosen) == first_trainable(rejected) == k
    # SFT masking of the same conversation also trains the earlier answer; a pair must not
    ids, sft_labels = encode_messages([*PROMPT, a("A programming language.")], tokenizer, mistral, "t:1")
    assert ids == chosen.input_ids
    sft_trained = tokenizer.decode([t for t, lab in zip(ids, sft_labels, strict=True) if lab != IGNORE_INDEX])
    assert sft_trained == f"A snake.{EOT} A programming language.{EOT}"
    assert "snake" in tokenizer.decode(chosen.input_ids[:k])


def test_truncation_cuts_the_prompt_of_both_samples_equally(tokenizer, mistral):
    record = to_pair_record(
        {"prompt": LONG_PROMPT, "chosen": "The answer is short.", "rejected": "No."}, "t:1"
    )
    whole = encode_unit(record, tokenizer, mistral)
    max_length = 40
    cut = len(whole[0].input_ids) - max_length  # the chosen is the longer sample
    assert cut > 0 and len(whole[1].input_ids) < len(whole[0].input_ids)
    chosen, rejected = truncate_unit(whole, max_length)
    assert len(chosen.input_ids) == max_length and len(rejected.input_ids) < max_length
    for full, short in zip(whole, (chosen, rejected), strict=True):
        assert short.input_ids == full.input_ids[cut:]
        assert short.labels == full.labels[cut:]
        assert trained(short) == trained(full)
    k = first_trainable(chosen)
    assert k == first_trainable(rejected) == first_trainable(whole[0]) - cut
    assert chosen.input_ids[:k] == rejected.input_ids[:k]


def test_a_unit_survives_while_one_prompt_token_is_left(tokenizer, mistral):
    record = to_pair_record({"prompt": LONG_PROMPT, "chosen": LONG_RESPONSE, "rejected": "No."}, "t:1")
    whole = encode_unit(record, tokenizer, mistral)
    longest, k = len(whole[0].input_ids), first_trainable(whole[0])
    assert truncate_unit(whole, longest) == whole
    kept = truncate_unit(whole, longest - k + 1)
    assert [s.input_ids for s in kept] == [s.input_ids[k - 1 :] for s in whole]
    assert [first_trainable(s) for s in kept] == [1, 1]
    assert truncate_unit(whole, longest - k) is None


def test_an_over_long_pair_is_cut_and_one_whose_response_cannot_fit_dropped(tmp_path, tokenizer, mistral):
    rows = [
        pair(0),
        {"prompt": LONG_PROMPT, "chosen": "Fine.", "rejected": "Not fine."},
        {"prompt": "Hi", "chosen": LONG_RESPONSE, "rejected": "Short."},
        pair(3),
    ]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    records, _ = read_pair_records(path)
    # the warning that counts the dropped pairs names them (issue 25 #8)
    dropped = re.escape(
        f"dropped 1 of 4 records that do not fit data.max_seq_length=30 (truncation 'left'; first: {path}:3)"
    )
    with pytest.warns(UserWarning, match=dropped):
        dm = data(tmp_path, path, max_seq_length=30)
    stats = {k.removeprefix("data/train_"): v for k, v in dm.stats.items() if k.startswith("data/train_")}
    assert (stats["samples"], stats["kept"], stats["truncated"], stats["dropped_too_long"]) == (4, 3, 1, 1)
    assert [unit[0].sha for unit in dm.train] == [records[i].sha for i in (0, 1, 3)]
    assert all(len(s.input_ids) <= 30 for unit in dm.train for s in unit)
    want = truncate_unit(encode_unit(records[1], tokenizer, mistral), 30)
    assert [(s.input_ids, s.labels) for s in dm.train[1]] == [(s.input_ids, s.labels) for s in want]


def test_a_truncation_other_than_left_is_refused(tmp_path):
    path = pair_file(tmp_path / "train.jsonl", range(2))
    for truncation in ("right", "drop"):
        with pytest.raises(ValueError, match=rf"data.truncation '{truncation}'.*left of its prompt"):
            PreferenceDataModule(train_files=str(path), tokenizer=str(TOKENIZER_DIR), truncation=truncation)
    assert PreferenceDataModule(train_files=str(path), truncation="left").truncation == "left"


def test_num_proc_encodes_pairs_in_worker_processes_as_one_process_would(tmp_path, monkeypatch):
    pools = []

    class RecordedPool(ProcessPoolExecutor):
        def __init__(self, max_workers: int, **kwargs) -> None:
            pools.append(max_workers)
            super().__init__(max_workers, **kwargs)

    monkeypatch.setattr(chunks, "ProcessPoolExecutor", RecordedPool)
    path = pair_file(tmp_path / "train.jsonl", range(260))  # two chunks of 256 records
    serial = data(tmp_path, path)
    assert pools == []
    parallel = data(tmp_path, path, num_proc=2, tokenized_cache=str(tmp_path / "cache2"))
    assert pools == [2]
    assert parallel.stats == serial.stats and len(parallel.train) == len(serial.train) == 260
    for a_unit, b_unit in zip(serial.train, parallel.train, strict=True):
        assert [(s.input_ids, s.labels, s.sha, s.source, s.value) for s in a_unit] == [
            (s.input_ids, s.labels, s.sha, s.source, s.value) for s in b_unit
        ]


# ---- units: grouping and collating ------------------------------------------------------------------


def test_grouped_hands_out_consecutive_samples_as_units():
    def sample(sha: str, n: int) -> Encoded:
        return Encoded(list(range(1, n + 1)), [IGNORE_INDEX] * n, sha, f"f:{sha}")

    samples = [sample("a", 3), sample("a", 5), sample("b", 2), sample("b", 4)]
    pairs = Grouped(samples, 2)
    assert len(pairs) == 2
    assert list(pairs) == [samples[:2], samples[2:]]
    assert [[s.sha for s in unit] for unit in pairs] == [["a", "a"], ["b", "b"]]
    assert pairs.lengths.tolist() == [8, 6]
    with pytest.raises(IndexError):
        pairs[2]
    assert Grouped(samples[:3], 1).lengths.tolist() == [3, 5, 2]
    with pytest.raises(ValueError, match="3 samples do not make whole units of 2"):
        Grouped(samples[:3], 2)


def test_unpacked_rows_are_chosen_then_rejected_pair_by_pair(units, tokenizer):
    batch = UnitCollator(pad_id=0, packed=False)(units[:2])
    samples = [units[0][0], units[0][1], units[1][0], units[1][1]]
    width = max(len(s.input_ids) for s in samples)
    assert batch.input_ids.shape == (4, width)
    for r, s in enumerate(samples):
        n = len(s.input_ids)
        assert batch.input_ids[r].tolist() == s.input_ids + [0] * (width - n)
        assert batch.labels[r].tolist() == [IGNORE_INDEX, *s.labels[1:]] + [IGNORE_INDEX] * (width - n)
        assert batch.sequence_index[r].tolist() == [r] * n + [-1] * (width - n)
        assert batch.attention_mask[r].tolist() == [1] * n + [0] * (width - n)
    assert batch.shas == [units[0][0].sha] * 2 + [units[1][0].sha] * 2
    values = batch.sequence_values
    assert values[:2].tolist() == [0.5, 0.5] and torch.isnan(values[2:]).all()
    _, last = sequence_layout(batch)
    assert last.tolist() == [r * width + len(s.input_ids) - 1 for r, s in enumerate(samples)]
    assert batch.input_ids.reshape(-1)[last].tolist() == [tokenizer.eos_token_id] * 4


def test_packed_rows_hold_whole_pairs_as_consecutive_sequences(units, tokenizer):
    batch = UnitCollator(pad_id=0, packed=True)([[units[0], units[1]], [units[2]]])
    rows = [[*units[0], *units[1]], [*units[2]]]
    width = max(sum(len(s.input_ids) for s in row) for row in rows)
    assert batch.input_ids.shape == (2, width) and batch.attention_mask is None
    s, last = 0, []
    for r, row in enumerate(rows):
        ids, labels, index, positions = [], [], [], []
        for sample in row:
            n = len(sample.input_ids)
            ids += sample.input_ids
            labels += [IGNORE_INDEX, *sample.labels[1:]]
            index += [s] * n
            positions += list(range(n))
            last.append(r * width + len(ids) - 1)
            s += 1
        used = len(ids)
        assert batch.input_ids[r, :used].tolist() == ids
        assert batch.labels[r].tolist() == labels + [IGNORE_INDEX] * (width - used)
        assert batch.sequence_index[r].tolist() == index + [-1] * (width - used)
        assert batch.position_ids[r, :used].tolist() == positions
    values = batch.sequence_values.tolist()
    assert values[:2] == [0.5, 0.5] and all(math.isnan(v) for v in values[2:])
    _, layout_last = sequence_layout(batch)
    assert layout_last.tolist() == last
    assert batch.input_ids.reshape(-1)[layout_last].tolist() == [tokenizer.eos_token_id] * 6


def test_loss_positions_belong_to_their_sequence(units):
    batch = UnitCollator(pad_id=0, packed=True)([[units[0], units[1]], [units[2]]])
    samples = [s for unit in units for s in unit]
    b, t = batch.input_ids.shape
    hidden = torch.arange(b * t, dtype=torch.float32).reshape(b, t, 1)  # a position's hidden is its index
    inputs = loss_inputs(hidden, nn.Identity(), batch)
    assert torch.bincount(inputs.sequence, minlength=6).tolist() == [s.num_trainable for s in samples]
    for s, sample in enumerate(samples):
        assert inputs.labels[inputs.sequence == s].tolist() == trained(sample)
    _, last = sequence_layout(batch)
    assert inputs.last_hidden[:, 0].long().tolist() == last.tolist()


# ---- the data module: batches of pairs, packing, ranks, resume --------------------------------------


def test_batches_count_pairs_and_each_pair_comes_once_and_whole(tmp_path):
    path = pair_file(tmp_path / "train.jsonl", range(8))
    records, _ = read_pair_records(path)
    dm = data(tmp_path, path, batch_size=3)
    assert isinstance(dm.train, Grouped) and len(dm.train) == 8 and dm.unit_size == 2
    assert [[s.sha for s in unit] for unit in dm.train] == [[r.sha, r.sha] for r in records]
    assert dm.train.lengths.tolist() == [len(c.input_ids) + len(r.input_ids) for c, r in dm.train]
    assert dm.stats["data/train_samples"] == dm.stats["data/train_kept"] == 8  # pairs, not samples
    assert dm.stats["data/train_tokens"] == dm.train.lengths.sum()
    batches = list(dm.train_dataloader())
    assert [len(batch.shas) for batch in batches] == [6, 6, 4]
    seen = []
    for batch in batches:
        shas, values = batch.shas, batch.sequence_values.tolist()
        texts = dm.tokenizer.batch_decode(batch.input_ids, skip_special_tokens=True)
        for p in range(len(shas) // 2):
            i = int(values[2 * p])
            assert shas[2 * p] == shas[2 * p + 1] == records[i].sha and values[2 * p + 1] == i
            assert texts[2 * p].endswith(f"times two? [/INST] It is {2 * i}.")
            assert texts[2 * p + 1].endswith(f"times two? [/INST] Maybe {2 * i + 1}.")
            seen.append(i)
    assert sorted(seen) == list(range(8))


def test_packed_batches_hold_whole_pairs_each_once(tmp_path):
    path = pair_file(tmp_path / "train.jsonl", range(8))
    dm = data(tmp_path, path, batch_size=2, packing=True)
    eos = dm.tokenizer.eos_token_id
    batches = list(dm.train_dataloader())
    assert sum(batch.input_ids.shape[0] for batch in batches) == 4  # two pairs of ~50 tokens a row
    seen = []
    for batch in batches:
        index, values = batch.sequence_index, batch.sequence_values.tolist()
        assert len(values) == int(index.max()) + 1 and len(values) % 2 == 0
        assert ((index >= 0).sum(1) <= 2 * dm.max_seq_length).all()
        for s in range(len(values)):
            assert batch.position_ids[index == s].tolist() == list(range(int((index == s).sum())))
            assert sequence_tokens(batch, s)[-1] == eos
        for p in range(len(values) // 2):
            i = int(values[2 * p])
            assert values[2 * p + 1] == i
            rows = {int(r) for r in (index == 2 * p).nonzero()[:, 0]}
            assert rows == {int(r) for r in (index == 2 * p + 1).nonzero()[:, 0]} and len(rows) == 1
            chosen = dm.tokenizer.decode(sequence_tokens(batch, 2 * p), skip_special_tokens=True)
            rejected = dm.tokenizer.decode(sequence_tokens(batch, 2 * p + 1), skip_special_tokens=True)
            assert chosen == f"[INST] Question {i}: what is {i} times two? [/INST] It is {2 * i}."
            assert rejected == f"[INST] Question {i}: what is {i} times two? [/INST] Maybe {2 * i + 1}."
            seen.append(i)
    assert sorted(seen) == list(range(8))


def test_two_ranks_get_disjoint_shares_of_whole_pairs(tmp_path):
    path = pair_file(tmp_path / "train.jsonl", range(8))
    records, _ = read_pair_records(path)
    shares = []
    for rank in (0, 1):
        dm = data(tmp_path, path, batch_size=3)
        dm.trainer = fake_trainer(rank, 2)
        batches = list(dm.train_dataloader())
        assert [len(batch.shas) for batch in batches] == [6, 2]  # 4 pairs each
        shas = [sha for batch in batches for sha in batch.shas]
        assert shas[0::2] == shas[1::2]
        shares.append(shas[0::2])
    assert set(shares[0]).isdisjoint(shares[1])
    assert sorted(shares[0] + shares[1]) == sorted(r.sha for r in records)


def test_skipping_k_batches_yields_the_rest_of_the_same_epoch(tmp_path):
    dm = data(tmp_path, pair_file(tmp_path / "train.jsonl", range(8)))
    stream = ShuffledBatches(dm.train, dm.collator, batch_size=2, seed=7)
    stream.epoch = 1
    full = list(stream)
    assert len(full) == 4
    for k in (1, 3):
        stream.skip = k
        rest = list(stream)
        assert [b.shas for b in rest] == [b.shas for b in full[k:]]
        assert all(torch.equal(x.input_ids, y.input_ids) for x, y in zip(rest, full[k:], strict=True))
    # through the loader's checkpointed state: the resumed epoch continues after the trained batches
    loader = dm.train_dataloader()
    epoch = [b.shas for b in loader]
    loader.load_state_dict({"epoch": 0, "batches": 2})
    assert [b.shas for b in loader] == epoch[2:]
    assert [b.shas for b in loader] == epoch


# ---- the tokenized cache ----------------------------------------------------------------------------


def test_a_second_run_maps_the_pairs_from_the_cache(tmp_path, monkeypatch):
    train = pair_file(tmp_path / "train.jsonl", range(6))
    val = pair_file(tmp_path / "val.jsonl", range(10, 13))
    first = data(tmp_path, train, val)
    built = entries(tmp_path)
    assert len(built) == 2

    def refuse(*args, **kwargs):
        raise AssertionError("encoded again")

    monkeypatch.setattr(preference_datamodule, "encode_unit_chunks", refuse)
    second = data(tmp_path, train, val)
    assert entries(tmp_path) == built
    for a_split, b_split in ((first.train, second.train), (first.val, second.val)):
        assert len(a_split) == len(b_split) > 0
        for a_unit, b_unit in zip(a_split, b_split, strict=True):
            assert [(s.input_ids, s.labels, s.sha, s.source, s.value) for s in a_unit] == [
                (s.input_ids, s.labels, s.sha, s.source, s.value) for s in b_unit
            ]
    with pytest.raises(AssertionError, match="encoded again"):  # the patch is where new files go
        data(tmp_path, pair_file(tmp_path / "other.jsonl", range(3)))


def test_one_file_read_as_kto_and_as_pairs_gets_two_entries(tmp_path):
    rows = [{**kto(i), "chosen": f"Answer {i}.", "rejected": f"Wrong {i}."} for i in range(4)]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    as_kto = data(tmp_path, path, format="kto")
    as_pairs = data(tmp_path, path, format="trl")
    kto_dir = as_kto.tokenized_splits()["train"].directory
    assert kto_dir != as_pairs.tokenized_splits()["train"].directory and len(entries(tmp_path)) == 2
    assert as_kto.unit_size == 1 and [len(unit) for unit in as_kto.train] == [1] * 4
    assert as_pairs.unit_size == 2 and [len(unit) for unit in as_pairs.train] == [2] * 4
    assert {u[0].sha for u in as_kto.train}.isdisjoint(u[0].sha for u in as_pairs.train)
    # the KTO completion and the chosen response are the same tokens
    assert [u[0].input_ids for u in as_kto.train] == [u[0].input_ids for u in as_pairs.train]


def test_editing_one_rejected_changes_that_pairs_sha_only(tmp_path):
    rows = [pair(i) for i in range(4)]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    before = data(tmp_path, path)
    rows[2] = {**rows[2], "rejected": "Something else entirely."}
    after = data(tmp_path, write_jsonl(path, rows))
    assert len(entries(tmp_path)) == 2
    old = [[s.sha for s in unit] for unit in before.train]
    new = [[s.sha for s in unit] for unit in after.train]
    assert [i for i in range(4) if old[i] != new[i]] == [2]
    assert new[2][0] == new[2][1] == read_pair_records(path)[0][2].sha
    assert before.train[2][0].input_ids == after.train[2][0].input_ids
    assert before.train[2][1].input_ids != after.train[2][1].input_ids


# ---- bad input ----------------------------------------------------------------------------------------


def test_a_pair_missing_rejected_is_refused_naming_its_line(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [pair(0), {"prompt": "Q?", "chosen": "A."}])
    with pytest.raises(DataFormatError, match=re.escape(f"{path}:2: missing field 'rejected'")):
        data(tmp_path, path)


def test_an_identical_pair_is_dropped_with_a_warning_naming_its_line(tmp_path, caplog, monkeypatch):
    rows = [pair(0), {"prompt": "Q?", "chosen": "Same.", "rejected": "Same."}, pair(2)]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="distill.data.pairs"):
        dm = data(tmp_path, path)
    records, stats = read_pair_records(path)
    assert stats.identical_dropped == 1 and all(isinstance(r, PairRecord) for r in records)
    assert [unit[0].sha for unit in dm.train] == [r.sha for r in records] and len(records) == 2
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(f"{path}:2" in m and "chosen equals rejected" in m for m in warnings), warnings
    caplog.clear()

    def refuse(*args, **kwargs):
        raise AssertionError("read the files although the cache holds the pairs")

    monkeypatch.setattr(preference_datamodule, "read_pair_records", refuse)
    with caplog.at_level(logging.WARNING, logger="distill.data.pairs"):
        data(tmp_path, path)  # maps the entry: the warning comes from it
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert (
        len(warnings) == 1
        and f"dropped 1 preference pairs whose chosen equals rejected (first: {path}:2)" in warnings[0]
    ), warnings


def test_pairs_and_kto_samples_cannot_be_mixed_across_splits(tmp_path):
    pairs = pair_file(tmp_path / "pairs.jsonl", range(4))
    pairs_val = pair_file(tmp_path / "pairs_val.jsonl", range(10, 12))
    samples = write_jsonl(tmp_path / "kto.jsonl", [kto(i) for i in range(4)])
    samples_val = write_jsonl(tmp_path / "kto_val.jsonl", [kto(i) for i in range(10, 12)])
    with pytest.raises(ValueError, match="mix preference pairs and KTO samples"):
        data(tmp_path, pairs, samples_val)
    with pytest.raises(ValueError, match="mix preference pairs and KTO samples"):  # within one split
        data(tmp_path, pairs, train_files=[str(pairs), str(samples)])
    # each split cached by an earlier run of one kind: caught when the entries are opened
    data(tmp_path, pairs, pairs_val)
    data(tmp_path, samples, samples_val)
    with pytest.raises(ValueError, match="mix preference pairs and KTO samples"):
        data(tmp_path, pairs, samples_val)


# ---- KTO ----------------------------------------------------------------------------------------------


def test_kto_units_are_single_samples_valued_by_their_label(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [kto(i) for i in range(6)])
    records, _ = read_pair_records(path)
    dm = data(tmp_path, path, batch_size=4)
    assert dm.unit_size == 1 and [len(unit) for unit in dm.train] == [1] * 6
    for (sample,), record in zip(dm.train, records, strict=True):
        assert sample.sha == record.sha and sample.value == float(record.label)
        assert dm.tokenizer.decode(trained(sample)) == record.completion[0]["content"] + EOT
    label = {r.sha: float(r.label) for r in records}
    batches = list(dm.train_dataloader())
    assert [len(batch.shas) for batch in batches] == [4, 2]
    seen = []
    for batch in batches:
        values = batch.sequence_values.tolist()
        assert values == [label[sha] for sha in batch.shas]
        width = batch.input_ids.shape[1]
        for r in range(len(values)):
            n = int(batch.attention_mask[r].sum())
            assert batch.sequence_index[r].tolist() == [r] * n + [-1] * (width - n)
        seen += batch.shas
    assert sorted(seen) == sorted(label) and sorted(label.values()) == [0.0, 0.0, 1.0, 1.0, 1.0, 1.0]


# ---- regressions -----------------------------------------------------------------------------------------


def test_the_same_file_for_training_and_validation(tmp_path, monkeypatch):
    # the wait for the lock is cut short: unpatched, the bug is a hang
    patient = functools.partial(WriterLock, timeout=0.5, poll_seconds=0.05)
    monkeypatch.setattr(tokenized, "WriterLock", patient)
    path = pair_file(tmp_path / "train.jsonl", range(4))
    dm = data(tmp_path, path, path)
    assert [unit[0].sha for unit in dm.val] == [unit[0].sha for unit in dm.train]


def test_predict_batches_with_packing(tmp_path):
    dm = data(tmp_path, pair_file(tmp_path / "train.jsonl", range(4)), packing=True)
    (loader,) = dm.predict_dataloader()
    assert sorted(v for batch in loader for v in batch.sequence_values.tolist()) == [
        0,
        0,
        1,
        1,
        2,
        2,
        3,
        3,
    ]
