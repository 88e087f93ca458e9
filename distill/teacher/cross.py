"""Where each trained token of a conversation lies in its text, for KD across tokenizers
(docs/cross_tokenizer.md): the axis on which a teacher's cached positions and a student's meet.

Each trained position gets ``(token, turn, start, end)``: the token it predicts, the index of the
assistant turn (or 0 for a plain text) it belongs to, and its [start, end) in the UTF-8 bytes of that
turn's response, counted from where the response starts. The response's own text is the same under
every template, so the two sides' spans are comparable whatever wraps them; positions of different
turns never meet. The end-of-turn token (one or several tokens of a tokenizer) stands for no text: its
first token gets [L, L + 1), L the response's length, on both sides, so the two end-of-turns meet 1:1;
any further piece of it spans nothing (unaligned).
"""

from __future__ import annotations

from collections.abc import Sequence

import jinja2
import numpy as np
from transformers import PreTrainedTokenizerBase

from distill.data.encoding import IGNORE_INDEX, Encoded
from distill.data.formats import Record
from distill.data.templates import ChatTemplate, TemplateError
from distill.teacher.spans import byte_spans
from distill.teacher.vocab_map import token_bytes


def require_offsets(tokenizer: PreTrainedTokenizerBase, teacher: str) -> None:
    """KD across tokenizers places tokens by their character offsets, which only fast tokenizers give."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"teacher {teacher!r}: its tokenizer {tokenizer.name_or_path or '<unnamed>'} is a slow "
            "(Python) tokenizer without offsets, which KD across tokenizers needs to align positions "
            "through the text; give teacher.tokenizer a fast one (a directory with tokenizer.json)"
        )


class TextAxis:
    """One tokenizer's (and template's) trained positions on the response byte axis."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, template: ChatTemplate | None, owner: str) -> None:
        require_offsets(tokenizer, owner)
        self.tokenizer, self.template, self.owner = tokenizer, template, owner
        self._pieces: list[bytes | None] | None = None

    @property
    def pieces(self) -> list[bytes | None]:
        """Per token id, the bytes it stands for (None: a special token)."""
        if self._pieces is None:
            self._pieces = [None if entry is None else entry[0] for entry in token_bytes(self.tokenizer)]
        return self._pieces

    def render(self, record: Record) -> tuple[str, list[tuple[int, int]], int]:
        """The record's text, its trained character spans (each turn's response up to its end-of-turn)
        and the end-of-turn's length in characters (0: a plain text, whose end is the EOS alone)."""
        if record.text is not None:
            return record.text, [(0, len(record.text))], 0
        if self.template is None:
            raise TemplateError(f"{self.owner}: {record.source} is a conversation: it needs a chat template")
        try:
            text, spans = self.template.render_with_spans(
                self.tokenizer, list(record.messages or ()), where=record.source
            )
        except (TemplateError, jinja2.TemplateError) as error:
            raise TemplateError(
                f"{self.owner}: template {self.template.name!r} cannot render {record.source} (sample "
                f"{record.sha[:12]}): {error}. Give it a template that renders every conversation of the data"
            ) from error
        return text, spans, len(self.template.end_of_turn)

    def encode(self, record: Record) -> tuple[Encoded, np.ndarray]:
        """The record's encoding (not truncated; labels on the responses) and its (P, 4) spans."""
        text, turns, eot = self.render(record)
        plain = record.text is not None
        encoding = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = list(encoding["input_ids"]), list(encoding["offset_mapping"])
        eos_last = False
        if plain:  # as encode_record: BOS + text + EOS, every token trained
            bos, eos = self.tokenizer.bos_token_id, self.tokenizer.eos_token_id
            eos_last = eos is not None
            ids = ([bos] if bos is not None else []) + ids + ([eos] if eos_last else [])
            end = [(len(text), len(text))] if eos_last else []
            offsets = ([(0, 0)] if bos is not None else []) + offsets + end
        pieces = [None if i >= len(self.pieces) else self.pieces[i] for i in ids]
        placed = byte_spans(text, offsets, pieces)
        labels, rows = [IGNORE_INDEX] * len(ids), []
        ends = [0] * len(turns)  # tokens of the end-of-turn placed so far, per turn
        # per turn, once (per token it would be quadratic in the text): where its response starts in the
        # text's bytes, and the response's length in bytes without its end-of-turn
        bases = [len(text[:start].encode("utf-8")) for start, _ in turns]
        lengths = [
            len(text[: end - eot].encode("utf-8")) - base for (_, end), base in zip(turns, bases, strict=True)
        ]
        for j, (first, last) in enumerate(offsets):
            turn = 0 if plain else _turn_of(turns, first, last)
            if turn is None:
                continue
            labels[j] = ids[j]
            end_char, base, length = turns[turn][1], bases[turn], lengths[turn]
            if (first >= end_char - eot and eot) or (plain and j == len(ids) - 1 and eos_last):
                span = (length + min(ends[turn], 1), length + 1)  # the end-of-turn (or a text's EOS)
                ends[turn] += 1
            else:
                span = (max(placed[j][0] - base, 0), min(placed[j][1] - base, length))
            if j > 0:  # position j - 1 predicts token j; the first token is no target
                rows.append((ids[j], turn, span[0], max(span)))
        spans = np.array(rows, dtype=np.int32).reshape(-1, 4)
        return Encoded(ids, labels, record.sha, record.source, record), spans

    def sample_spans(self, sample: Encoded) -> np.ndarray:
        """The spans of a (possibly truncated) sample's trained positions: the full record's, cut to the
        positions the sample kept (its first ones when cut on the right, its last when cut on the left)."""
        full, spans = self.encode(_record(sample, self.owner))
        count = sample.num_trainable
        if count > len(spans):
            raise ValueError(
                f"{sample.source} (sample {sample.sha[:12]}): {count} trained positions but its record under "
                f"the {self.owner}'s template has {len(spans)}; KD across tokenizers needs "
                "data.train_on_responses_only: true and the record's own template"
            )
        kept_start = full.input_ids[: len(sample.input_ids)] == sample.input_ids
        return spans[:count] if kept_start else spans[len(spans) - count :]


def _turn_of(turns: Sequence[tuple[int, int]], first: int, last: int) -> int | None:
    """The trained turn a token of character offsets [first, last) overlaps (as ``encode_messages``
    labels it), or None."""
    for index, (start, end) in enumerate(turns):
        if last > start and first < end:
            return index
    return None


def _record(sample: Encoded, owner: str) -> Record:
    if sample.record is None:
        raise ValueError(
            f"{sample.source}: the sample does not carry its record, so the {owner} cannot place its "
            "tokens in the text (encode it with distill.data.encoding.encode_record)"
        )
    return sample.record


def teacher_view(axis: TextAxis, sample: Encoded) -> tuple[Encoded, np.ndarray]:
    """A student sample as a teacher of another tokenizer reads it: the whole record in the teacher's
    template and tokenizer, and the spans of its trained positions."""
    return axis.encode(_record(sample, axis.owner))
