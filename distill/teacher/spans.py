"""Aligning a student's and a teacher's tokens through the text they both read (docs/cross_tokenizer.md).

Each token is placed on the UTF-8 byte axis of the text (``byte_spans``); ``align_spans`` then walks the
two tokenizations once, side by side, and closes a group wherever both reach the same byte boundary:
a group is a run of student tokens and a run of teacher tokens that cover the same bytes. One student
token against one teacher token starting at the same byte is exact (1:1); otherwise the boundaries
differ inside the group (1:n, n:1, n:m).

"The same bytes" is literal: whitespace counts like any other byte. Where one tokenizer attaches a space
to the next word and the other to the previous one, or one keeps ``"  "`` as one token and the other
splits it, their boundaries differ and the tokens land in one larger, inexact group: never a 1:1 pair
shifted by a space. Zero-width tokens (BOS, SentencePiece's own leading ``▁`` before a character, a
special token the caller placed nowhere) join no group: a student position predicting one is unaligned.
A special token takes part only through the span its caller gives it (a template's end-of-turn: the
same span on both sides after the response, so EOS meets EOS as 1:1).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

Span = tuple[int, int]  # [start, end) in bytes


@dataclass(frozen=True)
class Group:
    """Student and teacher token indices covering the same bytes (each run in order)."""

    student: tuple[int, ...]
    teacher: tuple[int, ...]
    same_start: bool  # both runs start at the same byte (False only where a side leaves a gap)

    @property
    def exact(self) -> bool:
        return len(self.student) == 1 and len(self.teacher) == 1 and self.same_start


def byte_spans(text: str, offsets: Sequence[Span], pieces: Sequence[bytes | None]) -> list[Span]:
    """Each token's [start, end) in the UTF-8 bytes of ``text``, from the tokenizer's character
    ``offsets`` and the bytes each token stands for (``pieces``; None for a special token, which keeps
    its offsets).

    Character offsets alone are not enough: a byte-level token holding part of a character (GPT-2 spells
    ``日`` as two tokens) gets the whole character's span, and so does the next one. Walking with a byte
    cursor, each token starts where the previous one ended (or at its own start, if later) and is as long
    as its bytes, where those bytes are the text's there. A piece starting with a space the text does not
    have there is SentencePiece's dummy prefix: the space is not in the text, so it is dropped (a lone
    ``▁`` then spans nothing).
    """
    data = text.encode("utf-8")
    char_to_byte = [0] * (len(text) + 1)
    for index, char in enumerate(text):
        char_to_byte[index + 1] = char_to_byte[index] + len(char.encode("utf-8"))
    spans: list[Span] = []
    cursor = 0
    for (first, last), piece in zip(offsets, pieces, strict=True):
        start, end = char_to_byte[first], char_to_byte[last]
        if piece is not None and end > start:
            start = max(start, cursor)
            if piece.startswith(b" ") and data[start : start + 1] != b" ":
                piece = piece[1:]
            if data[start : start + len(piece)] == piece:
                end = start + len(piece)
        spans.append((start, max(start, end)))
        cursor = max(cursor, end)
    return spans


def align_spans(student: Sequence[Span], teacher: Sequence[Span]) -> list[Group]:
    """The groups of two tokenizations of one text, in order, in one pass over both (linear time).

    Both sides advance token by token, the one whose current token ends first moving on, until their
    ends meet; that closes a group. Zero-width tokens are skipped. Tokens left over on either side when
    the other runs out form one last group (inexact, possibly empty on one side).
    """
    ours = [i for i, (start, end) in enumerate(student) if end > start]
    theirs = [i for i, (start, end) in enumerate(teacher) if end > start]
    groups: list[Group] = []
    a = b = 0
    while a < len(ours) and b < len(theirs):
        first_a, first_b = a, b
        end_a, end_b = student[ours[a]][1], teacher[theirs[b]][1]
        while end_a != end_b:
            if end_a < end_b:
                a += 1
                if a == len(ours):
                    break
                end_a = student[ours[a]][1]
            else:
                b += 1
                if b == len(theirs):
                    break
                end_b = teacher[theirs[b]][1]
        if end_a != end_b:  # one side ran out: the rest of both is one inexact group
            a, b = first_a, first_b
            break
        same_start = student[ours[first_a]][0] == teacher[theirs[first_b]][0]
        groups.append(Group(tuple(ours[first_a : a + 1]), tuple(theirs[first_b : b + 1]), same_start))
        a, b = a + 1, b + 1
    if a < len(ours) or b < len(theirs):
        groups.append(Group(tuple(ours[a:]), tuple(theirs[b:]), False))
    return groups
