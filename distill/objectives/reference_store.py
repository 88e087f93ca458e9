"""Precomputed reference log-probs: computed once before training, stored per unit SHA, reused by every
rank, epoch and later run with the same reference and data.

A store lives in ``<root>/<key>/``, where the key hashes the reference model's identity (its weights'
digest or hub revision) and dtype and the tokenized-cache entries of the data (which key the files,
the tokenizer, the template and the truncation): any change to one of them is another store, computed
afresh. Each rank computes its share of the units and writes ``part-<rank>-of-<world>.npz`` (to a
temporary name, fsynced, renamed); once all parts are there rank 0 writes ``meta.json``, the store's
completion mark. A crash leaves no part that is read half-written, and a rerun recomputes the parts
that are missing.

Checked on every read, as the teacher cache is: each array of a part carries the CRC-32 that the npz
(zip) format stores with it, which ``zipfile`` verifies as the array is read (the teacher cache's HDF5
chunks carry fletcher32 checksums); shapes and ``meta.json`` are checked too. A part that fails is a
``ReferenceStoreCorruptError`` naming the store and the part; before computing, ``fill`` deletes what
fails (and the completion mark), so the run recomputes exactly those parts and keeps the others.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from distill.cache.segment import atomic_write_text, fsync_path

# what reading a damaged npz raises: a failed CRC or a garbled header (BadZipFile), a cut member
# (EOFError), garbled sizes or array headers (ValueError, KeyError), a garbled compression method
# (NotImplementedError, zlib.error)
_UNREADABLE = (zipfile.BadZipFile, EOFError, ValueError, KeyError, NotImplementedError, zlib.error, OSError)


class ReferenceStoreCorruptError(RuntimeError):
    """A file of a store is missing, cannot be read, or fails its checksum."""

    def __init__(self, path: Path, problem: str) -> None:
        self.path, self.problem = Path(path), problem
        super().__init__(
            f"corrupt precomputed reference store {self.path.parent}: {self.path.name} {problem}. Rerun: "
            "the run deletes what is bad and recomputes exactly that, keeping the rest"
        )


class ReferenceStore:
    def __init__(self, root: str | Path, inputs: dict[str, Any]) -> None:
        blob = json.dumps(inputs, sort_keys=True, ensure_ascii=False).encode()
        self.directory = Path(root) / hashlib.sha256(blob).hexdigest()[:24]
        self.inputs = inputs

    @classmethod
    def at(cls, directory: str | Path) -> ReferenceStore:
        """The complete store in ``directory`` (to read it: its key's inputs are in its meta.json)."""
        store = cls.__new__(cls)
        store.directory = Path(directory)
        meta = _read_meta(store._meta_path)
        if meta is None:
            raise ReferenceStoreCorruptError(store._meta_path, "is missing: the store is incomplete")
        store.inputs = meta["inputs"]
        return store

    @property
    def complete(self) -> bool:
        return self._meta_path.exists()

    @property
    def _meta_path(self) -> Path:
        return self.directory / "meta.json"

    def has_part(self, rank: int, world_size: int) -> bool:
        return self._part(rank, world_size).exists()

    def _part(self, rank: int, world_size: int) -> Path:
        return self.directory / f"part-{rank}-of-{world_size}.npz"

    def fill(
        self,
        rank: int,
        world_size: int,
        compute: Callable[[], tuple[list[str], np.ndarray]],
        barrier: Callable[[str], None],
    ) -> dict[str, np.ndarray]:
        """Every unit's values; this rank's part is first computed (``compute``: its unit SHAs and
        values) where the store lacks it or it failed its check. Called by every rank; ``barrier(name)``
        waits for all of them."""
        if rank == 0:
            for problem in self.repair():
                then = "rewritten" if problem.path == self._meta_path else "its log-probs are computed again"
                warnings.warn(
                    f"[distill] precomputed reference store {self.directory}: {problem.path.name} "
                    f"{problem.problem}: deleted, {then}",
                    stacklevel=2,
                )
        barrier("reference_store_checked")
        if not self.complete and not self.has_part(rank, world_size):
            self.write_part(rank, world_size, *compute())
        barrier("reference_store")
        if rank == 0 and not self.complete:
            self.finish(world_size)
        barrier("reference_store_done")
        return self.load()

    def repair(self) -> list[ReferenceStoreCorruptError]:
        """Check ``meta.json`` and every part it lists (without it: every part there is) by reading
        them in full; delete each that fails, and the completion mark with it, so that the parts are
        computed again. The problems found."""
        problems: list[ReferenceStoreCorruptError] = []
        try:
            meta = self._meta()
        except ReferenceStoreCorruptError as problem:
            problems.append(problem)
            meta = None
        if meta is not None:
            parts = [self._part(rank, meta["parts"]) for rank in range(meta["parts"])]
        else:  # not yet complete: the parts some run wrote, of whatever world size
            parts = sorted(self.directory.glob("part-*-of-*.npz"))
        for path in parts:
            try:
                self._read_part(path)
            except ReferenceStoreCorruptError as problem:
                problems.append(problem)
                path.unlink(missing_ok=True)
        if problems:
            self._meta_path.unlink(missing_ok=True)
            fsync_path(self.directory)
        return problems

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
        atomic_write_text(self._meta_path, json.dumps({"inputs": self.inputs, "parts": world_size}, indent=1))

    def load(self) -> dict[str, np.ndarray]:
        """Unit SHA -> its sequences' reference log-probs, every part checked as it is read."""
        meta = self._meta()
        if meta is None:
            raise ReferenceStoreCorruptError(self._meta_path, "is missing: the store is incomplete")
        values: dict[str, np.ndarray] = {}
        for rank in range(meta["parts"]):
            digests, rows = self._read_part(self._part(rank, meta["parts"]))
            for digest, row in zip(digests, rows, strict=True):
                values[bytes(digest).hex()] = row
        return values

    def _meta(self) -> dict[str, Any] | None:
        """The completion mark, checked to be this store's; None when there is none."""
        meta = _read_meta(self._meta_path)
        if meta is not None and meta["inputs"] != json.loads(json.dumps(self.inputs)):
            raise ReferenceStoreCorruptError(self._meta_path, "holds the inputs of another store")
        return meta

    def _read_part(self, path: Path) -> tuple[np.ndarray, np.ndarray]:
        """(unit SHA digests (units, 32), values (units, sequences per unit)), read in full: every byte
        of both arrays through its CRC-32."""
        try:
            with np.load(path, allow_pickle=False) as part:
                digests, values = part["sha"], part["values"]
        except FileNotFoundError as error:
            raise ReferenceStoreCorruptError(path, "is missing") from error
        except _UNREADABLE as error:
            raise ReferenceStoreCorruptError(
                path, f"cannot be read ({type(error).__name__}: {error})"
            ) from error
        if (
            digests.dtype != np.uint8
            or digests.ndim != 2
            or digests.shape[1] != 32
            or values.dtype != np.float64
            or values.ndim != 2
            or len(values) != len(digests)
        ):
            raise ReferenceStoreCorruptError(
                path, f"holds arrays of the wrong shapes: sha {digests.shape}, values {values.shape}"
            )
        return digests, values


def _read_meta(path: Path) -> dict[str, Any] | None:
    """A store's completion mark, ``{"inputs": ..., "parts": world size}``; None when there is none."""
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:  # ValueError: not UTF-8 or not JSON
        raise ReferenceStoreCorruptError(path, f"cannot be read ({error})") from error
    parts = meta.get("parts") if isinstance(meta, dict) else None
    if not isinstance(parts, int) or parts < 1 or not isinstance(meta.get("inputs"), dict):
        raise ReferenceStoreCorruptError(path, "lacks its 'inputs' or its count of 'parts'")
    return meta
