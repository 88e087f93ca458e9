"""What a stage reads besides its config: the content of its local data files, so that data edited in
place reruns the stage that reads it (and the later ones), as a changed config does. Hashes are
remembered by size and mtime in ``data_hashes.json`` (docs/pipeline.md).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from distill.data.hf_datasets import DatasetSplit, split_sources
from distill.data.tokenized import file_digest


class ContentHashes:
    """sha256 of files, remembered by (size, mtime) in ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.known: dict[str, dict[str, Any]] = json.loads(path.read_text())
        except (OSError, ValueError):
            self.known = {}

    def of(self, file: Path) -> str:
        stat = file.stat()
        seen = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        name = str(file.resolve())
        entry = self.known.get(name)
        if entry is None or {k: entry.get(k) for k in seen} != seen:
            entry = self.known[name] = {**seen, "sha256": file_digest(file)}
        return entry["sha256"]

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_name(f"{self.path.name}.{os.getpid()}.partial")
        partial.write_text(json.dumps(self.known, indent=1, sort_keys=True))
        os.replace(partial, self.path)  # a reader never sees half a file


def data_files(config: dict[str, Any]) -> list[Path]:
    """The local files the stage's data module reads: ``train_files``/``val_files`` (files, or every
    file below a directory), or a local ``dataset_name``'s files. Options ``fit`` would refuse count
    nothing here: the fit names what is wrong."""
    data = config.get("data") or {}
    nested = {"init_args", "class_path"} & set(data)  # a fit stage's; a prune stage's data is flat
    options = (data.get("init_args") or {}) if nested else data
    try:
        train, val = split_sources(
            options.get("train_files"),
            options.get("val_files"),
            options.get("dataset_name"),
            options.get("dataset_config"),
            options.get("split", "train"),
            options.get("val_split"),
            options.get("dataset_revision"),
        )
    except ValueError:
        return []
    files: list[Path] = []
    for source in [*train, *val]:
        if isinstance(source, DatasetSplit):
            files += dataset_files(source) if source.local else []
            continue
        path = Path(source)
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file() and not hidden(p.relative_to(path)))
        elif path.is_file():
            files.append(path)
    return files


def dataset_files(split: DatasetSplit) -> list[Path]:
    """A local dataset's files: a ``save_to_disk`` directory's (not the ``cache-*`` files a map writes
    into it), or the data files of the split."""
    if not split.saved:
        return split.data_files()
    root = Path(split.name)
    return sorted(
        p
        for p in root.rglob("*")
        if p.is_file() and not hidden(p.relative_to(root)) and not p.name.startswith("cache-")
    )


def hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def data_digest(config: dict[str, Any], hashes: ContentHashes) -> str:
    """sha256 over the stage's data files, named as the config names them, and their contents."""
    content = [(str(file), hashes.of(file)) for file in data_files(config)]
    return hashlib.sha256(json.dumps(content).encode()).hexdigest()
