"""``verify_cache``: read every byte of every segment (HDF5 checks each chunk's fletcher32 checksum) and
every value, and list the segments that fail; ``repair`` deletes those, so that the next sync lists
exactly their samples as missing and collects them again."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from distill.cache.lock import WriterLock
from distill.cache.reader import CacheReader
from distill.cache.segment import CacheCorruptError, named_samples, open_segment, replaced_names


@dataclass
class BadSegment:
    path: Path
    problem: str
    shas: list[str] = field(default_factory=list)  # the samples it held, where its index is readable

    @property
    def samples(self) -> int | None:
        """How many samples it held: its name says so even when its bytes are lost (a truncated file),
        else its index, if readable."""
        held = named_samples(self.path)
        return len(self.shas) if held is None and self.shas else held


def verify_cache(directory: Path) -> tuple[int, list[BadSegment]]:
    """(segments checked, the bad ones): every live segment read in full and decoded."""
    paths = sorted(Path(directory).glob("*.h5"))
    bad, replaced = [], set()
    for p in paths:
        try:
            replaced.update(replaced_names(p))
        except CacheCorruptError as error:
            bad.append(BadSegment(p, str(error.__cause__ or error)))
    unreadable = {b.path for b in bad}
    live = [p for p in paths if p.name not in replaced and p not in unreadable]
    for p in live:
        reader = CacheReader(p)
        try:
            for name in reader.teachers():
                for _ in reader.iter_chunks(reader.shas(name), 256, name):
                    pass
        except CacheCorruptError as error:
            bad.append(BadSegment(p, str(error.__cause__ or error), _stored_shas(p)))
        finally:
            reader.close()
    return len(live) + len(unreadable), bad


def repair_cache(directory: Path, bad: list[BadSegment], lock_timeout: float | None = None) -> None:
    """Delete the bad segments under the writer lock: their samples become missing, hence recollected."""
    with WriterLock(directory, lock_timeout):
        for b in bad:
            b.path.unlink(missing_ok=True)


def _stored_shas(path: Path) -> list[str]:
    try:
        with open_segment(path) as f:
            return sorted({s.decode() for g in f["teachers"].values() for s in g["sha"][:]})
    except (OSError, CacheCorruptError):
        return []
