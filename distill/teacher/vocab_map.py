"""The vocabulary map of a (teacher tokenizer, student tokenizer) pair: for each teacher token id, the
student id that stands for the same text, or -1 (docs/cross_tokenizer.md).

Tokens are compared as the raw bytes they stand for, so each family's spelling is undone first:
byte-level BPE (GPT-2, Llama 3, Qwen) spells bytes in GPT-2's printable alphabet (``Ġ`` is a space);
SentencePiece spells a space ``▁`` and bytes it has no piece for ``<0xNN>`` (byte fallback). A teacher
token maps to the student token of the same bytes and kind (a byte-fallback token to a byte-fallback
token), else to the student's regular piece of those bytes, else to its byte-fallback token: a tokenizer
uses byte fallback only for bytes it has no piece for, so the regular piece is the one it would produce.
Two tokenizers that are the same give the identity.

Special and added tokens (``<s>``, ``<|im_end|>``) stand for no text: one maps to the student token
spelled the same (``<|im_end|>`` in both), the teacher's EOS to the student's EOS, and ``pairs`` adds
what a caller knows (the two templates' end-of-turn ids); any other maps to nothing.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from functools import cache

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

UNMAPPED = -1
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_SPACE = "\u2581"  # SentencePiece's visible space


@cache
def _byte_decoder() -> dict[str, int]:
    """GPT-2's ``bytes_to_unicode`` inverted: printable character -> the byte it spells."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


def is_byte_level(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the tokenizer spells bytes in GPT-2's alphabet (its decoder is ``ByteLevel``)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(
            f"tokenizer {tokenizer.name_or_path!r} is not a fast tokenizer: KD across tokenizers reads the "
            "fast (tokenizers-backed) one's vocabulary and offsets; load it with use_fast=True"
        )
    return "ByteLevel(" in repr(backend.decoder)  # alone or inside a Sequence


def special_ids(tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """Ids that stand for no text: special tokens and added tokens."""
    return {*tokenizer.all_special_ids, *tokenizer.get_added_vocab().values()}


def token_bytes(tokenizer: PreTrainedTokenizerBase) -> list[tuple[bytes, bool] | None]:
    """Per token id: (the bytes it stands for, whether it is a byte-fallback token), or None for a special
    token or one whose spelling cannot be read (a character outside GPT-2's alphabet)."""
    byte_level = is_byte_level(tokenizer)
    decoder = _byte_decoder()
    specials = special_ids(tokenizer)
    table: list[tuple[bytes, bool] | None] = []
    for index, token in enumerate(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))):
        if index in specials or token is None:
            table.append(None)
        elif byte_level:
            raw = [decoder.get(c) for c in token]
            table.append(None if None in raw else (bytes(raw), False))
        elif fallback := _BYTE_FALLBACK.fullmatch(token):
            table.append((bytes([int(fallback.group(1), 16)]), True))
        else:
            table.append((token.replace(_SPACE, " ").encode("utf-8"), False))
    return table


def build_vocab_map(
    teacher: PreTrainedTokenizerBase,
    student: PreTrainedTokenizerBase,
    pairs: Mapping[int, int] | None = None,
) -> Tensor:
    """(len(teacher),) int64: per teacher id, the student id of the same bytes, or ``UNMAPPED`` (-1).

    ``pairs``: teacher id -> student id for special tokens the caller pairs by role (end-of-turn).
    """
    student_table = token_bytes(student)
    exact: dict[tuple[bytes, bool], int] = {}
    regular: dict[bytes, int] = {}
    fallback: dict[bytes, int] = {}
    for index, entry in enumerate(student_table):
        if entry is not None:
            exact.setdefault(entry, index)
            (fallback if entry[1] else regular).setdefault(entry[0], index)
    any_kind = {**fallback, **regular}  # a regular piece beats a byte-fallback token
    out = [
        UNMAPPED if entry is None else exact.get(entry, any_kind.get(entry[0], UNMAPPED))
        for entry in token_bytes(teacher)
    ]
    student_specials = {student.convert_ids_to_tokens(i): i for i in special_ids(student)}
    for index in special_ids(teacher):
        out[index] = student_specials.get(teacher.convert_ids_to_tokens(index), UNMAPPED)
    if teacher.eos_token_id is not None and student.eos_token_id is not None:
        out[teacher.eos_token_id] = student.eos_token_id
    for source, target in (pairs or {}).items():
        out[source] = target
    return torch.tensor(out, dtype=torch.long)
