"""Locks of a cache directory: one writer at a time (an exclusive ``flock`` on ``.writer.lock``, whose text
names the holder), and readers that keep the segments they index (a shared ``flock`` on
``.readers.lock``; a compaction deletes superseded segments only when it can take it exclusively).
``flock`` locks belong to an open file, so a killed process never leaves a stale lock.
"""

from __future__ import annotations

import fcntl
import os
import socket
import sys
import time
from pathlib import Path

WRITER_LOCK = ".writer.lock"
READERS_LOCK = ".readers.lock"
LOCK_FILES = (WRITER_LOCK, READERS_LOCK)


class CacheLockedError(RuntimeError):
    """Another process holds the writer lock of a cache for longer than the timeout."""


class WriterLock:
    """Exclusive lock of a cache directory for everything that adds or removes segments.

    ``timeout`` None waits for as long as the holder works (it logs whom it waits for); a number of
    seconds raises ``CacheLockedError`` naming the holder once it has waited that long. ``what`` names
    the directory in those messages (a pipeline locks its output directory with this lock too).
    """

    def __init__(
        self,
        directory: str | Path,
        timeout: float | None = None,
        poll_seconds: float = 0.5,
        what: str = "cache",
    ):
        self.path = Path(directory) / WRITER_LOCK
        self.timeout = timeout
        self.poll_seconds = poll_seconds
        self.what = what
        self._fd: int | None = None

    def holder(self) -> str:
        try:
            return self.path.read_text().strip() or "an unknown process"
        except OSError:
            return "an unknown process"

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        start = time.monotonic()
        told = False
        while not _try_flock(fd, fcntl.LOCK_EX):
            waited = time.monotonic() - start
            if self.timeout is not None and waited >= self.timeout:
                os.close(fd)
                raise CacheLockedError(
                    f"{self.path.parent}: another run writes this {self.what} ({self.holder()}); gave up "
                    f"after {waited:.0f} s. Wait for it to finish, or use another {self.what} directory."
                )
            if not told:
                print(
                    f"[distill] {self.what} {self.path.parent} is being written by {self.holder()}: waiting",
                    file=sys.stderr,
                    flush=True,
                )
                told = True
            time.sleep(self.poll_seconds)
        os.ftruncate(fd, 0)
        holder = f"pid {os.getpid()} on {socket.gethostname()}: {' '.join(sys.argv)}"
        os.pwrite(fd, holder.encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing the file drops the flock
            self._fd = None

    def __enter__(self) -> WriterLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def hold_readers_lock(directory: Path) -> int | None:
    """A shared lock on the directory's readers lock, held until the returned descriptor is closed;
    None where the directory cannot hold one (read-only media: nobody can compact it either)."""
    try:
        fd = os.open(directory / READERS_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        return None
    fcntl.flock(fd, fcntl.LOCK_SH)  # waits only while a compaction deletes superseded files
    return fd


def nobody_reads(directory: Path) -> int | None:
    """The readers lock taken exclusively (a descriptor to close when done) if no reader holds it,
    else None: superseded segments may be deleted only while this is held."""
    try:
        fd = os.open(directory / READERS_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        return None
    if _try_flock(fd, fcntl.LOCK_EX):
        return fd
    os.close(fd)
    return None


def _try_flock(fd: int, mode: int) -> bool:
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True
