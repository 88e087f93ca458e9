"""A teacher's sparse rows, in its own vocabulary, turned into targets for a student of another tokenizer
(docs/cross_tokenizer.md): mapped through the vocabulary map, merged over a span where one student
token covers several teacher tokens, or flagged where no honest target exists.

Rows keep the cache's format (``SparseTargets``: ascending head ids, logits, the teacher's full
log-sum-exp), so the KD losses read them unchanged. A teacher head id with no student counterpart is
dropped from the head; ``lse`` is kept, so its probability falls into the tail bucket, where the mass
outside the teacher's top-K already is: mapped + tail = 1, nothing created or lost. With the identity
map every row comes back exactly as it went in.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from distill.targets import SparseTargets
from distill.teacher.spans import Group
from distill.teacher.vocab_map import UNMAPPED

UNALIGNED, EXACT, MERGED = 0, 1, 2  # where a student position's target came from
_LAST = torch.iinfo(torch.long).max  # sorts a dropped slot after every real id


def map_ids(ids: Tensor, vocab_map: Tensor) -> Tensor:
    """``vocab_map[ids]``, with ids beyond the map (a model's padded vocabulary rows) unmapped."""
    inside = ids < len(vocab_map)
    return torch.where(inside, vocab_map[ids.clamp(max=len(vocab_map) - 1)], UNMAPPED)


def _rows(ids: Tensor, logits: Tensor, lse: Tensor) -> SparseTargets:
    """Sparse rows from (P, W) student ids (``UNMAPPED``: dropped) and logits: sorted ascending, tokens
    mapped twice merged by log-add-exp, dropped slots padded with -inf behind the row's last id."""
    keep = (ids >= 0) & torch.isfinite(logits)
    key, order = torch.where(keep, ids, _LAST).sort(dim=-1, stable=True)
    kept = keep.gather(-1, order)
    values = logits.gather(-1, order).masked_fill(~kept, -math.inf)
    twice = kept[:, 1:] & (key[:, 1:] == key[:, :-1])  # slot j + 1 holds the id of slot j
    for j in reversed(range(twice.shape[1]) if bool(twice.any()) else ()):  # right to left: runs add up
        merged = torch.logaddexp(values[:, j], values[:, j + 1])
        values[:, j] = torch.where(twice[:, j], merged, values[:, j])
        values[:, j + 1] = values[:, j + 1].masked_fill(twice[:, j], -math.inf)
    out_ids = torch.where(kept, key, -1).cummax(dim=-1).values.clamp(min=0)
    return SparseTargets(out_ids, values, lse)


def _require_topk(targets: SparseTargets) -> None:
    if targets.sample_ids is not None:
        raise ValueError(
            "KD across tokenizers maps the teacher's exact top-k rows; a sampled or hybrid cache's draws "
            "cannot carry their unmapped share into a tail bucket: collect with sparsity.scheme: topk"
        )


def project(targets: SparseTargets, vocab_map: Tensor) -> SparseTargets:
    """Teacher rows (teacher vocabulary) as rows over the student's vocabulary, through ``vocab_map``."""
    _require_topk(targets)
    return _rows(map_ids(targets.ids, vocab_map), targets.logits, targets.lse)


def head_log_probs(targets: SparseTargets, tokens: Tensor) -> Tensor:
    """(P,) log-probability of ``tokens[p]`` in row p, NaN where it is outside the row's head."""
    hit = targets.ids == tokens[:, None]
    found = hit & torch.isfinite(targets.logits)
    picked = targets.logits.masked_fill(~found, -math.inf).amax(-1) - targets.lse
    return picked.masked_fill(~found.any(-1), math.nan)


def merge_span(
    first: SparseTargets, first_tokens: Tensor, path_log_probs: Tensor, targets: Tensor, vocab_map: Tensor
) -> SparseTargets:
    """One student row per group where one student token covers a run of teacher tokens.

    GOLD (TRL's ``_merge_probabilities_with_alignment_groups``) multiplies the teacher's distribution at
    the run's first position by the probabilities of the run's actual later tokens. The product's value
    at the actual first token is the teacher's probability of the whole span along its own tokenization:
    that is what the student's one token stands for, so it goes to the student's token (``targets``).
    The first row's other head tokens are texts that diverge from the span at its first byte: they keep
    their own probability (GOLD scales them by the same product, which makes the row sum below one with
    no account of the rest), mapped like any row. What the first token leads to other than this span is
    unknown to the student's vocabulary: it stays in the tail. Mapped + tail = 1.

    first: (G, K) the teacher rows at each run's first position; first_tokens: (G,) the runs' first teacher
    tokens; path_log_probs: (G,) log of the product over each run; targets: (G,) the student tokens.
    """
    _require_topk(first)
    ids = map_ids(first.ids, vocab_map).masked_fill(first.ids == first_tokens[:, None], UNMAPPED)
    ids = torch.cat([ids, targets[:, None]], dim=1)
    logits = torch.cat([first.logits, (first.lse + path_log_probs)[:, None].to(first.logits.dtype)], dim=1)
    return _rows(ids, logits, first.lse)


@dataclass
class CrossTargets:
    """A student's targets from a teacher of another tokenizer, one row per student position."""

    targets: SparseTargets  # placeholder rows (all -inf) where ``source`` is UNALIGNED
    source: Tensor  # (P,) int8 UNALIGNED / EXACT / MERGED: unaligned positions train on the hard label only
    mapped_mass: Tensor  # (P,) the teacher's probability mass kept in the student's head, 0 where unaligned


def pad_width(rows: SparseTargets, width: int) -> SparseTargets:
    """Rows widened to ``width`` slots with empty (-inf) ones behind the last id."""
    extra = width - rows.ids.shape[1]
    if extra == 0:
        return rows
    last = rows.ids[:, -1:] if rows.ids.shape[1] else rows.ids.new_zeros((len(rows.ids), 1))
    ids = torch.cat([rows.ids, last.expand(-1, extra)], dim=1)
    logits = torch.cat([rows.logits, rows.logits.new_full((len(ids), extra), -math.inf)], dim=1)
    return SparseTargets(ids, logits, rows.lse)


def cross_targets(
    groups: Sequence[Group],
    student_tokens: Sequence[int],
    teacher_tokens: Sequence[int],
    teacher: SparseTargets,
    vocab_map: Tensor,
) -> CrossTargets:
    """Targets for the positions predicting ``student_tokens`` from teacher rows (row j predicts
    ``teacher_tokens[j]``), through ``groups`` = ``align_spans`` of the two tokens' spans.

    1:1 groups whose teacher token maps to the student's token are projected (EXACT); a student token
    covering a run of teacher tokens whose probabilities are all in their rows' heads is merged
    (MERGED); every other student position is UNALIGNED (a group of several student tokens: the
    teacher never predicted their inner boundaries; a pair covering the same bytes as tokens of
    different spelling, as SentencePiece's dummy ``▁`` at the start of a text).
    """
    size = len(student_tokens)
    tokens = torch.tensor(teacher_tokens, dtype=torch.long)
    known = head_log_probs(teacher, tokens)
    mapped = map_ids(tokens, vocab_map)
    exact: list[tuple[int, int]] = []  # (student position, teacher row)
    merged: list[tuple[int, int, float]] = []  # (student position, first teacher row, path log-prob)
    for group in groups:
        if len(group.student) != 1 or not group.teacher or not group.same_start:
            continue
        (s,), run = group.student, list(group.teacher)
        if len(run) == 1 and int(mapped[run[0]]) == student_tokens[s]:
            exact.append((s, run[0]))
        elif len(run) > 1 and not bool(known[run].isnan().any()):
            merged.append((s, run[0], float(known[run].sum())))
    width = teacher.ids.shape[1] + (1 if merged else 0)
    out = SparseTargets(
        torch.zeros((size, width), dtype=torch.long),
        torch.full((size, width), -math.inf, dtype=teacher.logits.dtype),
        torch.zeros(size, dtype=teacher.lse.dtype),
    )
    source = torch.full((size,), UNALIGNED, dtype=torch.int8)
    parts = []
    if exact:
        at, rows = map(list, zip(*exact, strict=True))
        parts.append((at, project(_select(teacher, rows), vocab_map), EXACT))
    if merged:
        at, rows, paths = map(list, zip(*merged, strict=True))
        first = _select(teacher, rows)
        targets = torch.tensor([student_tokens[s] for s in at], dtype=torch.long)
        parts.append((at, merge_span(first, tokens[rows], torch.tensor(paths), targets, vocab_map), MERGED))
    for at, rows, kind in parts:
        rows = pad_width(rows, width)
        out.ids[at], out.logits[at], out.lse[at] = rows.ids, rows.logits, rows.lse
        source[at] = kind
    mass = (torch.logsumexp(out.logits, -1) - out.lse).exp().masked_fill(source == UNALIGNED, 0.0)
    return CrossTargets(out, source, mass)


def _select(targets: SparseTargets, rows: list[int]) -> SparseTargets:
    return SparseTargets(targets.ids[rows], targets.logits[rows], targets.lse[rows])
