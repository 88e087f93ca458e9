"""The tokenized-data cache: a split's encoded samples written once to flat arrays on disk, then
memory-mapped by every rank and DataLoader worker, and by every later run with the same inputs.
docs/data.md ("Tokenized-data cache") has the key, the layout of ``<root>/<key>/data/`` and why flat
numpy files rather than Arrow; ``FORMAT_VERSION`` is the layout's version, part of the key.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable, Iterator, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any, overload

import numpy as np
import xxhash
from transformers import PreTrainedTokenizerBase

from distill.cache.lock import WriterLock
from distill.cache.segment import fsync_path
from distill.data.chunks import EncodedChunk, stored_value
from distill.data.encoding import IGNORE_INDEX, Encoded, EncodingStats
from distill.data.hf_datasets import DatasetSplit

FORMAT_VERSION = 2
_ARRAYS = {  # file -> (dtype, what its length counts)
    "input_ids.bin": (np.int32, "tokens"),
    "trainable.bin": (np.uint8, "tokens"),
    "offsets.bin": (np.int64, "samples+1"),
    "sha.bin": (np.uint8, "samples*32"),
    "sources.bin": (np.uint8, "source_bytes"),
    "source_offsets.bin": (np.int64, "samples+1"),
    "values.bin": (np.float32, "samples"),
}


_COUNTS = ("samples", "tokens", "source_bytes")  # meta.json's sizes of the arrays


class DamagedCacheError(RuntimeError):
    """A finished tokenized-cache entry whose files do not match its meta.json."""


def array_checksum(array: np.ndarray) -> str:
    """xxh3-64 of an array's bytes: ~16 GB/s here, so verifying an entry costs little next to a start
    (``benchmarks/tokenized.py``); it guards against damage, not against forgery."""
    return xxhash.xxh3_64_hexdigest(memoryview(np.ascontiguousarray(array)).cast("B"))


def default_root() -> Path:
    """``$DISTILL_DATA_CACHE``, else ``$XDG_CACHE_HOME/distill/tokenized`` (``~/.cache/...``)."""
    if os.environ.get("DISTILL_DATA_CACHE"):
        return Path(os.environ["DISTILL_DATA_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "distill" / "tokenized"


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def split_identity(split: DatasetSplit) -> dict[str, Any]:
    """What a tokenized-cache entry of a dataset split is keyed by: where it is and its content: the
    SHA-256 of its local files (a saved directory's Arrow files, the data files of the config's split),
    or the fingerprint ``datasets`` gives a hub dataset (of its revision)."""
    if split.local:
        saved = [Path(file["filename"]) for file in split.load().cache_files] if split.saved else None
        files = saved if saved is not None else split.data_files()
        content: Any = [(str(path.resolve()), file_digest(path)) for path in files]
    else:
        content = split.load()._fingerprint
    name = str(Path(split.name).resolve()) if split.local else split.name
    pinned = {"revision": split.revision} if split.revision else {}  # keys of unpinned entries unchanged
    return {"dataset": name, "config": split.config, "split": split.split, **pinned, "content": content}


def entry_key(inputs: dict[str, Any]) -> str:
    """The entry's name: a hash of the canonical JSON of everything that changes the encoding."""
    blob = json.dumps({"version": FORMAT_VERSION, **inputs}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A hash of everything of the tokenizer that encoding reads: its full definition (normalizer,
    pre-tokenizer, model, added tokens), special tokens and chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    definition = (
        backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    )
    extra = [
        type(tokenizer).__name__,
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        tokenizer.chat_template,
    ]
    return hashlib.sha256(json.dumps([definition, extra], ensure_ascii=False).encode()).hexdigest()


class TokenizedSamples(Sequence[Encoded]):
    """The samples of a finished entry, read from memory maps; ``Encoded`` objects are made on access
    (without their ``record``) and ``lengths`` serves packing without touching any token."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.meta = self._read_meta()
        self._check_sizes()
        self._maps = {name: self._map(name) for name in _ARRAYS}
        self.lengths = np.diff(self._maps["offsets.bin"])

    def _read_meta(self) -> dict[str, Any]:
        path = self.directory / "meta.json"
        try:
            meta = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise DamagedCacheError(
                f"{path}: unreadable ({error}): the tokenized cache entry is damaged"
            ) from error
        stats = meta.get("stats") if isinstance(meta, dict) else None
        if not (
            isinstance(meta, dict)
            and all(isinstance(meta.get(count), int) and meta[count] >= 0 for count in _COUNTS)
            and isinstance(stats, dict)
            and all(isinstance(stats.get(count), int) for count in EncodingStats.COUNTS)
        ):
            raise DamagedCacheError(
                f"{path}: not the meta.json of a tokenized cache entry (it lacks the counts "
                f"{', '.join(_COUNTS)} or the encoding stats): the entry is damaged"
            )
        return meta

    def verify(self) -> None:
        """Check every array against the checksum its build recorded: bytes edited in place (valid
        token ids, an offset) keep every size and would otherwise train silently. Reads each file
        once; the spawned workers and ranks that unpickle these samples trust the check of their
        parent."""
        checksums = self.meta.get("checksums")
        if not isinstance(checksums, dict):
            raise DamagedCacheError(
                f"{self.directory / 'meta.json'}: no checksums of the arrays (written by an older "
                "distill, or edited): the tokenized cache entry cannot be verified"
            )
        for name, array in self._maps.items():
            if checksums.get(name) != array_checksum(array):
                raise DamagedCacheError(
                    f"{self.directory / name}: its bytes do not match the checksum in meta.json (edited "
                    "or corrupted in place): the tokenized cache entry is damaged"
                )

    def _expected(self, name: str) -> int:
        count = _ARRAYS[name][1]
        n = self.meta["samples"]
        return {
            "tokens": self.meta["tokens"],
            "samples": n,
            "samples+1": n + 1,
            "samples*32": n * 32,
            "source_bytes": self.meta["source_bytes"],
        }[count]

    def _check_sizes(self) -> None:
        for name, (dtype, _) in _ARRAYS.items():
            path = self.directory / name
            want = self._expected(name) * np.dtype(dtype).itemsize
            have = path.stat().st_size if path.exists() else None
            if have != want:
                raise DamagedCacheError(
                    f"{path}: {'missing' if have is None else f'{have:,} bytes'} where meta.json says "
                    f"{want:,}: the tokenized cache entry is damaged"
                )

    def _map(self, name: str) -> np.ndarray:
        dtype = _ARRAYS[name][0]
        if self._expected(name) == 0:  # np.memmap refuses empty files
            return np.zeros(0, dtype)
        return np.memmap(self.directory / name, dtype=dtype, mode="r")

    def __len__(self) -> int:
        return self.meta["samples"]

    @overload
    def __getitem__(self, index: int) -> Encoded: ...
    @overload
    def __getitem__(self, index: slice) -> list[Encoded]: ...
    def __getitem__(self, index: int | slice) -> Encoded | list[Encoded]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} of {len(self)}")
        offsets, source_offsets = self._maps["offsets.bin"], self._maps["source_offsets.bin"]
        start, end = int(offsets[index]), int(offsets[index + 1])
        ids = self._maps["input_ids.bin"][start:end]
        labels = np.where(self._maps["trainable.bin"][start:end].astype(bool), ids, IGNORE_INDEX)
        sha = bytes(self._maps["sha.bin"][index * 32 : (index + 1) * 32]).hex()
        source = bytes(
            self._maps["sources.bin"][int(source_offsets[index]) : int(source_offsets[index + 1])]
        ).decode()
        value = stored_value(float(self._maps["values.bin"][index]))
        return Encoded(ids.tolist(), labels.tolist(), sha, source, value=value)

    def __iter__(self) -> Iterator[Encoded]:
        return (self[i] for i in range(len(self)))

    @property
    def stats(self) -> EncodingStats:
        return EncodingStats(**self.meta["stats"])

    def __getstate__(self) -> dict[str, Any]:
        # a spawned worker or rank maps the files itself instead of receiving copies of them
        return {"directory": self.directory}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["directory"])


class TokenizedEntry:
    """One entry of the cache: whether it is finished, building it (under its lock), opening it."""

    def __init__(self, root: str | Path, inputs: dict[str, Any]) -> None:
        self.inputs = inputs
        self.path = Path(root) / entry_key(inputs)
        self.data = self.path / "data"
        self._reported: str | None = None  # the damage last printed: the caller opens again under the lock

    def open(self) -> TokenizedSamples | None:
        """The finished entry's samples, their sizes and checksums verified; None when it is not built
        (or is damaged: the caller then rebuilds it, after a line naming the file and the damage)."""
        if not (self.data / "meta.json").exists():
            return None
        try:
            samples = TokenizedSamples(self.data)
            samples.verify()
            return samples
        except DamagedCacheError as damage:
            if str(damage) != self._reported:
                print(f"[distill] {damage}; it will be rebuilt", flush=True)
                self._reported = str(damage)
            return None

    def lock(self) -> WriterLock:
        return WriterLock(self.path)

    def build(self, chunks: Iterable[EncodedChunk], extra: dict[str, Any]) -> EncodingStats:
        """Write the samples of ``chunks`` into ``building-<pid>/`` and rename it to ``data/`` once every
        byte is on disk; the caller holds ``lock()``. Returns the summed stats."""
        for stale in self.path.glob("building-*"):  # left by a killed build: we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        shutil.rmtree(self.data, ignore_errors=True)  # only there when open() found it damaged
        building = self.path / f"building-{os.getpid()}"
        building.mkdir(parents=True)
        try:
            return self._write(building, chunks, extra)
        except BaseException:
            shutil.rmtree(building, ignore_errors=True)
            raise

    def _write(self, building: Path, chunks: Iterable[EncodedChunk], extra: dict[str, Any]) -> EncodingStats:
        stats = EncodingStats()
        tokens = source_bytes = samples = 0
        hashes = {name: xxhash.xxh3_64() for name in _ARRAYS}  # of the bytes as written: no second read
        with ExitStack() as opened:
            files = {name: opened.enter_context(open(building / name, "wb")) for name in _ARRAYS}

            def put(name: str, data: bytes) -> None:
                files[name].write(data)
                hashes[name].update(data)

            put("offsets.bin", np.zeros(1, np.int64).tobytes())
            put("source_offsets.bin", np.zeros(1, np.int64).tobytes())
            for chunk in chunks:
                stats.add(chunk.stats)
                sources = [source.encode() for source in chunk.sources]
                source_lengths = np.array([len(b) for b in sources], np.int64)
                put("input_ids.bin", chunk.input_ids.astype(np.int32).tobytes())
                put("trainable.bin", chunk.trainable.astype(np.uint8).tobytes())
                put("offsets.bin", (tokens + np.cumsum(chunk.lengths)).astype(np.int64).tobytes())
                put("sha.bin", b"".join(bytes.fromhex(sha) for sha in chunk.shas))
                put("sources.bin", b"".join(sources))
                put("source_offsets.bin", (source_bytes + np.cumsum(source_lengths)).tobytes())
                put("values.bin", chunk.values.astype(np.float32).tobytes())
                tokens += int(chunk.lengths.sum())
                source_bytes += int(source_lengths.sum())
                samples += len(chunk.lengths)
            for file in files.values():
                file.flush()
                os.fsync(file.fileno())
        meta = {
            "version": FORMAT_VERSION,
            "samples": samples,
            "tokens": tokens,
            "source_bytes": source_bytes,
            "stats": {name: getattr(stats, name) for name in EncodingStats.COUNTS},
            "checksums": {name: digest.hexdigest() for name, digest in hashes.items()},
            "inputs": self.inputs,
            **extra,
        }
        (building / "meta.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False))
        fsync_path(building / "meta.json")
        os.rename(building, self.data)
        fsync_path(self.path)
        return stats
