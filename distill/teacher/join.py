"""The training-time join of a cache in a teacher's own terms with a student of another tokenizer
(docs/cross_tokenizer.md): per sample and turn, the student's positions and the teacher's meet on the
text (``align_spans``) and the teacher's rows become the student's (``cross_targets``).

What alignment kept is counted per teacher (``JoinStats``): the share of the student's trained positions
with a teacher distribution (exact or merged) and the teacher's probability mass kept in the student's
vocabulary at those positions. A position aligned with nothing carries a placeholder row and trains on
the hard label alone (``BatchTargets.aligned``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from distill.data.encoding import Encoded
from distill.targets import SparseTargets, concat_targets
from distill.teacher.alignment import end_of_turn_id
from distill.teacher.cross import TextAxis
from distill.teacher.projection import UNALIGNED, cross_targets, pad_width
from distill.teacher.spans import align_spans
from distill.teacher.vocab_map import build_vocab_map


@dataclass
class Joined:
    """A batch's targets from one teacher of another tokenizer, one row per student trained position."""

    targets: SparseTargets
    aligned: Tensor  # (P,) bool: a teacher distribution exists (else hard label only)
    mapped_mass: Tensor  # (P,) the teacher's mass kept in the student's vocabulary, 0 where unaligned


@dataclass
class JoinStats:
    positions: int = 0
    aligned: int = 0
    mass: float = 0.0

    def add(self, joined: Joined) -> None:
        self.positions += len(joined.aligned)
        self.aligned += int(joined.aligned.sum())
        self.mass += float(joined.mapped_mass.double().sum())

    @property
    def aligned_share(self) -> float:
        return self.aligned / max(self.positions, 1)

    @property
    def mapped_mass(self) -> float:
        """Mean over the aligned positions."""
        return self.mass / max(self.aligned, 1)


class CrossJoin:
    """Aligns one teacher's cached rows (its vocabulary, with their spans) to a student's samples."""

    def __init__(self, teacher: TextAxis, student: TextAxis) -> None:
        self.teacher, self.student = teacher, student
        self._vocab_map: Tensor | None = None

    @property
    def vocab_map(self) -> Tensor:
        """Built once per pair: teacher id -> student id, the two templates' end-of-turns paired."""
        if self._vocab_map is None:
            eot = _eot(self.teacher), _eot(self.student)
            pairs = {eot[0]: eot[1]} if None not in eot else {}
            self._vocab_map = build_vocab_map(self.teacher.tokenizer, self.student.tokenizer, pairs)
        return self._vocab_map

    def __call__(self, samples: list[Encoded], rows: list[SparseTargets], spans: list[np.ndarray]) -> Joined:
        """The student's targets of ``samples`` (in order) from the teacher's ``rows`` and ``spans``."""
        parts = [self.sample(s, r, t) for s, r, t in zip(samples, rows, spans, strict=True)]
        width = max(p.targets.ids.shape[1] for p in parts)
        targets = concat_targets([pad_width(p.targets, width) for p in parts])
        return Joined(
            targets, torch.cat([p.aligned for p in parts]), torch.cat([p.mapped_mass for p in parts])
        )

    def sample(self, sample: Encoded, rows: SparseTargets, teacher: np.ndarray) -> Joined:
        # placed again at each batch (a few ms): kept per sample, a corpus's spans would grow without bound
        student = self.student.sample_spans(sample)
        size, width = len(student), rows.ids.shape[1] + 1
        out = SparseTargets(
            torch.zeros((size, width), dtype=torch.long),
            torch.full((size, width), -math.inf, dtype=rows.logits.dtype),
            torch.zeros(size, dtype=rows.lse.dtype),
        )
        source = torch.full((size,), UNALIGNED, dtype=torch.int8)
        mass = torch.zeros(size, dtype=torch.float32)
        for turn in np.unique(student[:, 1]).tolist():
            ours = np.flatnonzero(student[:, 1] == turn)
            theirs = np.flatnonzero(teacher[:, 1] == turn)
            groups = align_spans(_spans(student[ours]), _spans(teacher[theirs]))
            picked = SparseTargets(rows.ids[theirs], rows.logits[theirs], rows.lse[theirs])
            found = cross_targets(
                groups, student[ours, 0].tolist(), teacher[theirs, 0].tolist(), picked, self.vocab_map
            )
            found_rows = pad_width(found.targets, width)
            at = torch.as_tensor(ours)
            out.ids[at], out.logits[at], out.lse[at] = found_rows.ids, found_rows.logits, found_rows.lse
            source[at], mass[at] = found.source, found.mapped_mass.float()
        return Joined(_trim(out, rows.ids.shape[1]), source != UNALIGNED, mass)


def _spans(rows: np.ndarray) -> list[tuple[int, int]]:
    return [(int(start), int(end)) for start, end in rows[:, 2:4]]


def _trim(rows: SparseTargets, width: int) -> SparseTargets:
    """The rows at the cache's width when no merged row used the slot beyond it (exact rows then come
    back as the cache has them)."""
    if bool(torch.isfinite(rows.logits[:, width:]).any()):
        return rows
    return SparseTargets(rows.ids[:, :width], rows.logits[:, :width], rows.lse)


def _eot(axis: TextAxis) -> int | None:
    return end_of_turn_id(axis.tokenizer, axis.template)
