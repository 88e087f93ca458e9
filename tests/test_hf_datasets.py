"""Hugging Face ``datasets`` as data: a saved dataset, a directory of data files (with configs and splits)
and parquet/arrow/csv files give the samples of the same records as JSONL; errors name the row; the
tokenized cache follows the dataset's content; a stream over a table or a dataset equals the JSONL
stream and resumes at the exact row; the CLI takes a dataset on top of a config with files."""

from __future__ import annotations

import re
from itertools import islice
from pathlib import Path

import datasets
import pytest
import torch

from distill.cli import run_cli
from distill.data.batch import TokenBatch
from distill.data.datamodule import DataModule
from distill.data.formats import DataFormatError, read_records
from distill.data.hf_datasets import DatasetSplit, without_nulls
from distill.data.preference_datamodule import PreferenceDataModule
from distill.data.prompt_datamodule import PromptDataModule
from distill.data.streaming import StreamingLoader, StreamingRows
from tests.helpers import ROOT, TOKENIZER_DIR, conversation, preference_pair, write_jsonl


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch) -> Path:
    """``load_dataset``'s cache in the test's directory, never the user's."""
    path = tmp_path / "hf_cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", path)
    return path


def sft_rows() -> list[dict]:
    """Every format, rows of different keys, alpaca with and without input, a tool call with null content."""
    tool_call = {
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"type": "function", "function": {"name": "weather", "arguments": '{"c": 1}'}}
                ],
            },
            {"role": "tool", "content": "sunny"},
            {"role": "assistant", "content": "It is sunny."},
        ]
    }
    rows = [conversation(0), tool_call, {"text": "A plain document about the number seven."}]
    for i in range(1, 7):
        rows.append(conversation(i, turns=1 + i % 2))
        rows.append(
            {"conversations": [{"from": "human", "value": f"Q{i}?"}, {"from": "gpt", "value": f"A{i}."}]}
        )
        rows.append(alpaca_row(i))
    return rows


def alpaca_row(i: int) -> dict:
    row = {"instruction": f"Add {i} and one.", "output": f"{i + 1}."}
    return {**row, "input": f"{i} + 1"} if i % 2 else row


def as_table(rows: list[dict]) -> datasets.Dataset:
    """The rows as a dataset: every row has every column, null where the JSON row has no such key."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    return datasets.Dataset.from_list([{key: row.get(key) for key in columns} for row in rows])


def module(tmp_path: Path, **data) -> DataModule:
    data.setdefault("tokenized_cache", str(tmp_path / "tokenized"))
    return DataModule(tokenizer=str(TOKENIZER_DIR), template="mistral", max_seq_length=256, **data)


def samples(data: DataModule | PreferenceDataModule, split: str = "train") -> list[tuple]:
    return [(s.input_ids, s.labels, s.sha) for s in data.tokenized_splits()[split]]


def test_tables_and_datasets_give_the_samples_of_the_same_jsonl(tmp_path):
    rows = sft_rows()
    jsonl = write_jsonl(tmp_path / "train.jsonl", rows)
    table = as_table(rows)
    table.save_to_disk(tmp_path / "saved")
    (tmp_path / "files").mkdir()
    table.to_parquet(tmp_path / "files" / "train.parquet")
    want = samples(module(tmp_path, train_files=str(jsonl)))
    assert len(want) == len(rows) and len({sha for _, _, sha in want}) == len(rows)
    arrow = next((tmp_path / "saved").glob("*.arrow"))
    for source in [tmp_path / "files" / "train.parquet", tmp_path / "files", arrow]:
        assert samples(module(tmp_path, train_files=str(source))) == want, source
    for name in [tmp_path / "saved", tmp_path / "files"]:  # load_from_disk, load_dataset
        assert samples(module(tmp_path, dataset_name=str(name))) == want, name

    flat = [row for row in rows if "instruction" in row or "text" in row]  # what a csv can hold
    as_table(flat).to_csv(tmp_path / "flat.csv", index=False)
    flat_jsonl = write_jsonl(tmp_path / "flat.jsonl", flat)
    csv = samples(module(tmp_path, train_files=str(tmp_path / "flat.csv")))
    assert csv == samples(module(tmp_path, train_files=str(flat_jsonl)))

    records = read_records(tmp_path / "files" / "train.parquet")
    assert records[2].source == f"{tmp_path / 'files' / 'train.parquet'}, row 2" and records[2].text


def test_nulls_are_dropped_as_json_has_no_such_keys():
    assert without_nulls({"a": None, "b": [{"c": None, "d": 1}], "e": {"f": None}}) == {
        "b": [{"d": 1}],
        "e": {},
    }


def test_a_bad_row_names_the_dataset_split_and_row(tmp_path):
    rows = [conversation(0), {"messages": [{"role": "user", "content": "no answer"}]}]
    as_table(rows).save_to_disk(tmp_path / "saved")
    where = re.escape(f"dataset {tmp_path / 'saved'} (split train), row 1")
    with pytest.raises(DataFormatError, match=f"^{where}: conversation has no assistant turn"):
        module(tmp_path, dataset_name=str(tmp_path / "saved")).load_records()
    as_table(rows).to_parquet(tmp_path / "bad.parquet")
    where = re.escape(f"{tmp_path / 'bad.parquet'}, row 1")
    with pytest.raises(DataFormatError, match=f"^{where}: conversation has no assistant turn"):
        read_records(tmp_path / "bad.parquet")
    with pytest.raises(FileNotFoundError, match=r"save_to_disk: pass it as data\.dataset_name"):
        read_records(tmp_path / "saved")


def configs_dir(tmp_path: Path) -> Path:
    """A directory of parquet files with two configs (its README's metadata), each with two splits."""
    root = tmp_path / "configs"
    metadata = ["---", "configs:"]
    for config in ("a", "b"):
        metadata += [f"- config_name: {config}", "  data_files:"]
        for split in ("train", "validation"):
            (root / config).mkdir(parents=True, exist_ok=True)
            texts = [{"text": f"{config} {split} {i}"} for i in range(6 if split == "train" else 2)]
            datasets.Dataset.from_list(texts).to_parquet(root / config / f"{split}.parquet")
            metadata += [f"  - split: {split}", f"    path: {config}/{split}.parquet"]
    (root / "README.md").write_text("\n".join([*metadata, "---", ""]))
    return root


def test_config_and_splits_select_the_data(tmp_path):
    root = configs_dir(tmp_path)
    train, val = module(
        tmp_path, dataset_name=str(root), dataset_config="b", val_split="validation"
    ).load_records()
    assert [r.text for r in train] == [f"b train {i}" for i in range(6)]
    assert [r.text for r in val] == ["b validation 0", "b validation 1"]
    assert val[1].source == f"dataset {root} (config b, split validation), row 1"
    train, val = module(
        tmp_path, dataset_name=str(root), dataset_config="a", split="validation"
    ).load_records()
    assert [r.text for r in train] == ["a validation 0", "a validation 1"] and val == []
    # no validation split: val_fraction holds some training records out, as with files
    train, val = module(tmp_path, dataset_name=str(root), dataset_config="a", val_fraction=0.5).load_records()
    assert len(train) == len(val) == 3 and {r.text for r in train + val} == {f"a train {i}" for i in range(6)}

    datasets.Dataset.from_list([{"text": "x"}, {"text": ""}]).to_parquet(root / "b" / "validation.parquet")
    with pytest.raises(DataFormatError, match=re.escape("(config b, split validation), row 1: empty 'text'")):
        module(tmp_path, dataset_name=str(root), dataset_config="b", val_split="validation").load_records()
    with pytest.raises(ValueError, match=r"set data\.train_files"):
        module(tmp_path)
    with pytest.raises(ValueError, match=r"select a data\.dataset_name"):
        module(tmp_path, train_files="x.jsonl", val_split="validation")
    datasets.DatasetDict({"train": datasets.Dataset.from_list([{"text": "x"}])}).save_to_disk(
        tmp_path / "dict"
    )
    with pytest.raises(ValueError, match=r"no such split; the directory holds \['train'\]"):
        module(tmp_path, dataset_name=str(tmp_path / "dict"), val_split="validation").load_records()


def test_the_tokenized_cache_follows_the_dataset_content(tmp_path):
    rows = [conversation(i) for i in range(6)]
    saved = tmp_path / "saved"
    as_table(rows).save_to_disk(saved)

    def entry() -> tuple[str, list[tuple]]:
        data = module(tmp_path, dataset_name=str(saved))
        return data.tokenized_splits()["train"].directory.parent.name, samples(data)

    first, want = entry()
    assert entry() == (first, want)  # found again, not rebuilt into another entry
    rows[3] = conversation(30)
    as_table(rows).save_to_disk(saved)
    second, changed = entry()
    assert second != first and changed != want and changed[:3] == want[:3]
    as_table(rows).to_parquet(tmp_path / "train.parquet")
    parquet = module(tmp_path, train_files=str(tmp_path / "train.parquet"))
    assert samples(parquet) == changed
    assert parquet.tokenized_splits()["train"].directory.parent.name not in (first, second)


WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa"]
LENGTH, BATCH = 16, 2


def documents(n: int) -> list[dict]:
    """Documents of 3 to ~40 tokens: some share a row of 16, some span three."""
    return [
        {"text": f"doc {i}: " + " ".join(WORDS[(i + j) % len(WORDS)] for j in range(i * 5 % 17 + 1))}
        for i in range(n)
    ]


def stream_loader(source, tokenizer, trained: list[int]) -> StreamingLoader:
    """Rank 1 of 2, two workers: shards 2 and 3 of 4."""
    rows = StreamingRows(source, tokenizer, LENGTH, BATCH, rank=1, world_size=2, seed=0)
    return StreamingLoader(rows, lambda: trained[0], num_workers=2)


def same(got: list[TokenBatch], want: list[TokenBatch]) -> bool:
    assert len(got) == len(want)
    pairs = [
        (x, y)
        for a, b in zip(got, want, strict=True)
        for x, y in zip(vars(a).values(), vars(b).values(), strict=True)
    ]
    return all(torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y for x, y in pairs)


def test_a_stream_over_tables_and_datasets_is_the_jsonl_stream_and_resumes_exactly(tmp_path, tokenizer):
    rows = documents(20)
    jsonl = write_jsonl(tmp_path / "corpus.jsonl", rows)
    table = datasets.Dataset.from_list(rows)
    table.to_parquet(tmp_path / "corpus.parquet")
    (tmp_path / "hub").mkdir()
    table.to_parquet(tmp_path / "hub" / "train.parquet")
    table.save_to_disk(tmp_path / "saved")
    full = list(islice(stream_loader(jsonl, tokenizer, [0]), 16))  # past two passes over the corpus
    sources = [
        tmp_path / "corpus.parquet",
        DatasetSplit(str(tmp_path / "saved")),
        DatasetSplit(str(tmp_path / "hub")),  # load_dataset(..., streaming=True)
    ]
    for source in sources:
        trained = [0]
        assert same(list(islice(stream_loader(source, tokenizer, trained), 16)), full), source
        for k in (1, 6):  # saved after k trained batches (a few more were fetched ahead)
            first = stream_loader(source, tokenizer, trained)
            list(islice(first, k + 3))
            trained[0] = k
            state = first.state_dict()
            resumed = stream_loader(source, tokenizer, trained)
            resumed.load_state_dict(state)
            assert same(list(islice(resumed, 16 - k)), full[k:]), (source, k)
    state = stream_loader(sources[1], tokenizer, [0]).state_dict()
    with pytest.raises(ValueError, match="cannot resume the data stream: files"):
        stream_loader(sources[2], tokenizer, [0]).load_state_dict(state)


def test_a_bad_streamed_row_names_its_row(tmp_path, tokenizer):
    datasets.Dataset.from_list([{"text": "one"}, {"text": None}, {"text": "three"}]).to_parquet(
        tmp_path / "a.parquet"
    )
    rows = StreamingRows(tmp_path / "a.parquet", tokenizer, 8, 1)
    with pytest.raises(
        DataFormatError, match=re.escape(f"{tmp_path / 'a.parquet'}, row 1: missing field 'text'")
    ):
        list(islice(rows, 4))
    as_table([{"text": "one"}, conversation(1)]).save_to_disk(tmp_path / "saved")
    rows = StreamingRows(DatasetSplit(str(tmp_path / "saved")), tokenizer, 8, 1)
    with pytest.raises(
        DataFormatError, match=r"\(split train\), row 1: a messages record, but streaming is for"
    ):
        list(islice(rows, 4))


def test_a_config_with_files_trains_on_a_dataset_given_on_the_command_line(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    train = [conversation(i) for i in range(5)]
    splits = {"train": as_table(train), "validation": as_table([conversation(9), conversation(10)])}
    datasets.DatasetDict(splits).save_to_disk(tmp_path / "saved")
    args = ["--config", "configs/sft.yaml", "--data.init_args.dataset_name", str(tmp_path / "saved")]
    cli = run_cli([*args, "--data.init_args.val_split", "validation"], run=False)
    cli.datamodule.setup("fit")
    want = read_records(write_jsonl(tmp_path / "train.jsonl", train))
    assert [s.sha for s in cli.datamodule.train] == [r.sha for r in want] and len(cli.datamodule.val) == 2


def test_prompts_from_a_dataset_are_those_of_the_jsonl(tmp_path):
    rows = [{"question": f"What is {i} plus {i}?", "answer": str(2 * i)} for i in range(6)]
    rows[2]["system"] = "Answer with a number."
    as_table(rows).save_to_disk(tmp_path / "saved")
    jsonl = write_jsonl(tmp_path / "prompts.jsonl", rows)

    def prompts(**data) -> list[tuple]:
        module = PromptDataModule(tokenizer=str(TOKENIZER_DIR), template="mistral", **data)
        module.setup("fit")
        return [(p.input_ids, p.fields, p.sha) for p in module.train]

    want = prompts(train_files=str(jsonl))
    assert prompts(dataset_name=str(tmp_path / "saved")) == want and want[0][1] == {"answer": "0"}


def test_preference_pairs_from_parquet_are_those_of_the_jsonl(tmp_path):
    rows = [preference_pair(i) for i in range(4)]
    jsonl = write_jsonl(tmp_path / "pairs.jsonl", rows)
    as_table(rows).to_parquet(tmp_path / "pairs.parquet")

    def pairs(path: Path) -> list[tuple]:
        data = PreferenceDataModule(
            train_files=str(path),
            tokenizer=str(TOKENIZER_DIR),
            template="mistral",
            max_seq_length=64,
            tokenized_cache=str(tmp_path / "tokenized"),
        )
        return samples(data)

    want = pairs(jsonl)
    assert len(want) == 8 and pairs(tmp_path / "pairs.parquet") == want


def test_a_hub_dataset_loads_at_its_pinned_revision(tmp_path, monkeypatch):
    asked = []

    def load_dataset(name, config=None, **options):
        asked.append((name, config, options))
        return datasets.Dataset.from_list([{"text": f"pinned {i}"} for i in range(4)])

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    data = module(tmp_path, dataset_name="org/corpus", dataset_revision="v1.2", val_fraction=0.5)
    train, val = data.load_records()
    assert asked and all(options["revision"] == "v1.2" for *_, options in asked)
    assert asked[0][:2] == ("org/corpus", None) and len(train) == len(val) == 2
    assert train[0].source.startswith("dataset org/corpus (revision v1.2, split train), row ")
    assert DatasetSplit("org/corpus", revision="v1.2") != DatasetSplit("org/corpus")  # other cache keys

    with pytest.raises(ValueError, match="a local directory has no revisions"):
        module(tmp_path, dataset_name=str(configs_dir(tmp_path)), dataset_revision="v1").load_records()
    with pytest.raises(ValueError, match=r"data\.dataset_revision .* select a data\.dataset_name"):
        module(tmp_path, train_files="x.jsonl", dataset_revision="v1")


def test_an_empty_saved_split_names_the_dataset_and_the_split(tmp_path):
    """A split saved without rows has no Arrow file, on which ``datasets`` fails with a bare IndexError."""
    rows = datasets.Dataset.from_list([{"text": "hello"}, {"text": "world"}])
    datasets.DatasetDict({"train": rows, "validation": rows.select([])}).save_to_disk(tmp_path / "dict")
    name = str(tmp_path / "dict")
    train, val = module(tmp_path, dataset_name=name).load_records()  # the other split, empty, is not read
    assert [r.text for r in train] == ["hello", "world"] and val == []
    empty = re.escape(f"dataset {name} (split validation): the split is empty")
    with pytest.raises(ValueError, match=f"^{empty}.*choose another split"):
        module(tmp_path, dataset_name=name, val_split="validation").load_records()
    rows.select([]).save_to_disk(tmp_path / "one")
    with pytest.raises(
        ValueError, match=re.escape(f"dataset {tmp_path / 'one'} (split train): the split is empty")
    ):
        module(tmp_path, dataset_name=str(tmp_path / "one")).load_records()
