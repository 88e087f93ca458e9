"""Precomputed reference log-probs: computed once before training, stored per unit SHA, reused by every
rank, epoch and later run with the same reference and data.

A store lives in ``<root>/<key>/``, where the key hashes the reference model's identity (its weights'
digest or hub revision) and dtype and the tokenized-cache entries of the data (which key the files,
the tokenizer, the template and the truncation): any change to one of them is another store, computed
afresh. Each rank computes its share of the units and writes ``part-<rank>.npz`` (to a temporary name,
fsynced, renamed); once all parts are there rank 0 writes ``meta.json``, the store's completion mark. A
crash leaves no part that is read half-written, and a rerun recomputes the parts that are missing.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from distill.cache.segment import fsync_path


class ReferenceStore:
    def __init__(self, root: str | Path, inputs: dict[str, Any]) -> None:
        blob = json.dumps(inputs, sort_keys=True, ensure_ascii=False).encode()
        self.directory = Path(root) / hashlib.sha256(blob).hexdigest()[:24]
        self.inputs = inputs

    @classmethod
    def at(cls, directory: str | Path) -> ReferenceStore:
        """The store in ``directory`` (to read it: its key's inputs are in its meta.json)."""
        store = cls.__new__(cls)
        store.directory = Path(directory)
        store.inputs = json.loads((store.directory / "meta.json").read_text())["inputs"]
        return store

    @property
    def complete(self) -> bool:
        return (self.directory / "meta.json").exists()

    def has_part(self, rank: int, world_size: int) -> bool:
        return self._part(rank, world_size).exists()

    def _part(self, rank: int, world_size: int) -> Path:
        return self.directory / f"part-{rank}-of-{world_size}.npz"

    def write_part(self, rank: int, world_size: int, shas: list[str], values: np.ndarray) -> None:
        """This rank's units: ``values`` (units, sequences per unit), float64."""
        self.directory.mkdir(parents=True, exist_ok=True)
        final = self._part(rank, world_size)
        partial = final.with_name(f".{final.name}.{os.getpid()}")
        digests = np.frombuffer(b"".join(bytes.fromhex(sha) for sha in shas), np.uint8).reshape(-1, 32)
        with open(partial, "wb") as file:
            np.savez(file, sha=digests, values=values.astype(np.float64))
            file.flush()
            os.fsync(file.fileno())
        os.replace(partial, final)
        fsync_path(self.directory)

    def finish(self, world_size: int) -> None:
        """Mark the store complete (rank 0, once every rank's part is written)."""
        missing = [rank for rank in range(world_size) if not self.has_part(rank, world_size)]
        if missing:
            raise FileNotFoundError(
                f"{self.directory}: no reference log-probs of ranks {missing} after they wrote them: "
                "objective.reference_cache must be a directory every node shares"
            )
        meta = {"inputs": self.inputs, "parts": world_size}
        partial = self.directory / f".meta.json.{os.getpid()}"
        partial.write_text(json.dumps(meta, indent=1))
        fsync_path(partial)
        os.replace(partial, self.directory / "meta.json")
        fsync_path(self.directory)

    def load(self) -> dict[str, np.ndarray]:
        """Unit SHA -> its sequences' reference log-probs."""
        parts = json.loads((self.directory / "meta.json").read_text())["parts"]
        values: dict[str, np.ndarray] = {}
        for rank in range(parts):
            with np.load(self._part(rank, parts)) as part:
                for digest, row in zip(part["sha"], part["values"], strict=True):
                    values[bytes(digest).hex()] = row
        return values
