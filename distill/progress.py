"""Progress of work outside Lightning's loops (encoding a dataset): a tqdm bar on a terminal, plain lines
in a log file (SLURM, ``> log.txt``), where a bar's carriage returns would show nothing until the end."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from tqdm.auto import tqdm


def format_seconds(seconds: float) -> str:
    """``1h02m05s``, ``3m20s``, ``12s``."""
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class Progress:
    """``with Progress(total, "encoding train", "records") as progress: progress.update(n)``. Not on a
    terminal: a line every ``every_seconds`` and at the end. ``enabled=False`` (other ranks): silent."""

    def __init__(
        self,
        total: int,
        what: str,
        unit: str = "items",
        every_seconds: float = 30.0,
        enabled: bool = True,
        stream: TextIO | None = None,
    ) -> None:
        self.total, self.what, self.unit, self.every_seconds = total, what, unit, every_seconds
        self.stream, self.enabled, self.done = stream or sys.stderr, enabled, 0
        self._bar = None
        if enabled and self.stream.isatty():
            self._bar = tqdm(total=total, desc=f"[distill] {what}", unit=f" {unit}", file=self.stream)
        self._start = self._last_line = time.monotonic()

    def update(self, count: int) -> None:
        self.done += count
        if self._bar is not None:
            self._bar.update(count)
        elif self.enabled and time.monotonic() - self._last_line >= self.every_seconds:
            self._line()

    def _line(self) -> None:
        self._last_line = now = time.monotonic()
        elapsed = now - self._start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else float("nan")
        eta_text = format_seconds(eta) if eta == eta else "?"
        share = self.done / self.total if self.total else 1.0
        print(
            f"[distill] {self.what}: {self.done:,}/{self.total:,} {self.unit} ({share:.0%}), "
            f"{rate:,.0f} {self.unit}/s, elapsed {format_seconds(elapsed)}, ETA {eta_text}",
            file=self.stream,
            flush=True,
        )

    def close(self) -> None:
        """The last line (or closes the bar): call when the work is done."""
        if self._bar is not None:
            self._bar.close()
        elif self.enabled:
            self._line()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.close()
        elif self._bar is not None:
            self._bar.close()
