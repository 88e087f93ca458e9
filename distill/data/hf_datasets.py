"""Hugging Face ``datasets`` as data: a split of a hub or local dataset (``DatasetSplit``), and parquet,
arrow and csv files beside the JSON/JSONL ones, read row by row as the plain dicts that
``distill.data.formats`` normalises as it does a parsed JSON object (docs/data.md, "Hugging Face
datasets"). Rows are turned into Python only where they are read: a stream's shard decodes its own rows
and skips the others'. ``datasets`` is imported inside the functions, so ``import distill`` stays fast.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pyarrow as pa
    from datasets import Dataset, IterableDataset

# suffix -> the ``datasets`` builder that reads it
TABLE_BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".csv": "csv"}
_BATCH_ROWS = 1024  # rows per Arrow table read at once


@dataclass(frozen=True)
class DatasetSplit:
    """One split of a dataset: a hub id, a directory written by ``save_to_disk``, or a directory of data
    files ``datasets.load_dataset`` reads; with its config name."""

    name: str
    config: str | None = None
    split: str = "train"
    revision: str | None = None  # of a hub dataset: a branch, tag or commit

    def __str__(self) -> str:
        config = f"config {self.config}, " if self.config else ""
        revision = f"revision {self.revision}, " if self.revision else ""
        return f"dataset {self.name} ({config}{revision}split {self.split})"

    @property
    def saved(self) -> bool:
        """Whether ``name`` is a directory written by ``Dataset(Dict).save_to_disk``."""
        return is_saved_dataset(Path(self.name))

    @property
    def local(self) -> bool:
        return Path(self.name).exists()

    def load(self, streaming: bool = False) -> Dataset | IterableDataset:
        """The split: memory-mapped from a saved directory, streamed from a local directory's data files,
        prepared once in the ``datasets`` cache from the hub (or, with ``streaming``, streamed from it)."""
        import datasets

        if self.revision is not None and self.local:
            raise ValueError(f"{self}: a local directory has no revisions: unset data.dataset_revision")
        if not self.saved:
            # a local directory's files are read as they are: the datasets cache misses an edit of a
            # file that a README config names; a hub dataset is cached per revision
            streaming = streaming or self.local
            return datasets.load_dataset(
                self.name, self.config, split=self.split, streaming=streaming, revision=self.revision
            )
        if self.config:
            raise ValueError(f"{self}: a directory written by save_to_disk has no configs: unset the config")
        directory = Path(self.name)
        splits_file = directory / "dataset_dict.json"
        if splits_file.is_file():  # a DatasetDict: its split alone is opened, another may be empty
            splits = json.loads(splits_file.read_text())["splits"]
            if self.split not in splits:
                raise ValueError(f"{self}: no such split; the directory holds {sorted(splits)}")
            directory = directory / self.split
        elif self.split != "train":
            raise ValueError(
                f"{self}: the directory holds one dataset (Dataset.save_to_disk), not splits: it is the "
                "training split; hold out validation with val_fraction, or save a DatasetDict"
            )
        # ``datasets`` fails on a split saved without rows (no Arrow file) with a bare IndexError
        if not json.loads((directory / "state.json").read_text()).get("_data_files"):
            raise ValueError(
                f"{self}: the split is empty (saved by save_to_disk with no rows, {directory} holds no "
                "Arrow file): save it with rows, or choose another split (data.split, data.val_split)"
            )
        return datasets.load_from_disk(str(directory))  # memory-mapped: streaming reads it batch by batch

    def data_files(self) -> list[Path]:
        """The local data files of the split, as ``datasets`` resolves them (patterns, README configs)."""
        import datasets

        builder = datasets.load_dataset_builder(self.name, self.config, revision=self.revision)
        found = builder.config.data_files or {}
        by_split = {str(split): files for split, files in found.items()}
        if self.split not in by_split:
            raise ValueError(f"{self}: no such split; the dataset has {sorted(by_split)}")
        return [Path(file) for file in by_split[self.split]]


def is_saved_dataset(path: Path) -> bool:
    """Whether ``path`` is a directory written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``."""
    return (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()


def _open(source: Path | DatasetSplit, streaming: bool) -> Dataset | IterableDataset:
    if isinstance(source, DatasetSplit):
        return source.load(streaming)
    import datasets

    builder = TABLE_BUILDERS[source.suffix]
    options: dict[str, Any] = {}
    if builder == "csv":
        # CSV has no types: pandas would make the answer "2." the float 2.0 and the text "NA" a null;
        # every cell is a string, and only an empty one is missing
        with source.open(newline="", encoding="utf-8-sig") as file:
            header = next(csv.reader(file), [])
        strings = datasets.Features({name: datasets.Value("string") for name in header})
        options = {"features": strings, "keep_default_na": False, "na_values": [""]}
    # streamed from the file: nothing is written to the datasets cache, the rows come in file order
    return datasets.load_dataset(builder, data_files=str(source), split="train", streaming=True, **options)


def arrow_batches(source: Path | DatasetSplit, start: int = 0, streaming: bool = False) -> Iterator[pa.Table]:
    """The rows of a table file or a dataset split from row ``start`` on, as Arrow tables of consecutive
    rows. ``iter`` rather than ``__iter__``: a ``datasets.IterableDataset`` iterated in a DataLoader worker
    would keep only that worker's share of the rows, and the stream deals the rows itself."""
    rows = _open(source, streaming).with_format("arrow")
    seen = 0
    for table in rows.iter(batch_size=_BATCH_ROWS):
        if seen + table.num_rows > start:  # rows before ``start`` are skipped undecoded
            yield table.slice(max(start - seen, 0))
        seen += table.num_rows


def without_nulls(value: Any) -> Any:
    """``value`` with the null entries of its dicts dropped, as a JSON object would not have them."""
    if isinstance(value, dict):
        return {key: without_nulls(item) for key, item in value.items() if item is not None}
    if isinstance(value, list):
        return [without_nulls(item) for item in value]
    return value


def row_at(table: pa.Table, index: int) -> dict[str, Any]:
    """Row ``index`` of ``table`` as a plain dict without nulls."""
    return without_nulls(table.slice(index, 1).to_pylist()[0])


def row_where(source: Path | DatasetSplit, index: int) -> str:
    """How an error names a row: ``path, row 3`` or ``dataset foo (config c, split train), row 3`` (the
    index ``datasets`` gives it, from 0)."""
    return f"{source}, row {index}"


def table_rows(source: Path | DatasetSplit) -> Iterator[tuple[dict[str, Any], str]]:
    """Every row of a table file or a dataset split, as a plain dict, with where it is."""
    index = 0
    for table in arrow_batches(source):
        for row in table.to_pylist():
            yield without_nulls(row), row_where(source, index)
            index += 1


def split_sources(
    train_files: str | list[str] | None,
    val_files: str | list[str] | None,
    dataset_name: str | None,
    dataset_config: str | None,
    split: str,
    val_split: str | None,
    revision: str | None = None,
) -> tuple[list[str | DatasetSplit], list[str | DatasetSplit]]:
    """(training sources, validation sources: empty when none is given) of a data module's options.
    ``dataset_name`` replaces the files, so that one flag on top of a config with files trains on it."""
    if dataset_name is None:
        if train_files is None:
            raise ValueError("set data.train_files (files or directories) or data.dataset_name")
        if dataset_config is not None or val_split is not None or revision is not None:
            raise ValueError(
                "data.dataset_config, data.dataset_revision and data.val_split select a data.dataset_name: "
                "set it"
            )
        return as_list(train_files), as_list(val_files) if val_files else []
    if train_files or val_files:
        from lightning.pytorch.utilities import rank_zero_info

        rank_zero_info(f"[distill] reading data.dataset_name {dataset_name}, not data.train_files/val_files")
    val = [DatasetSplit(dataset_name, dataset_config, val_split, revision)] if val_split else []
    return [DatasetSplit(dataset_name, dataset_config, split, revision)], val


def as_list(sources: str | Path | DatasetSplit | list) -> list:
    """One data source (a file, a directory, a dataset's split) or several, as a list."""
    return [sources] if isinstance(sources, (str, Path, DatasetSplit)) else list(sources)
