"""Teachers with their own chat template (docs/cache.md): the teacher reads each sample in its format,
the cache stores one row per student trainable position.

Positions are aligned by content: the student's response targets must equal the teacher's, a prefix
(the student was cut on the right) or a suffix (cut on the left), where the student template's
end-of-turn id matches the teacher template's (``<|im_end|>`` vs ``<|eot_id|>``); anything else is an
``AlignmentError`` naming the sample and showing the first differing tokens.

On every row of an aligned conversation the teacher's end-of-turn probability is moved onto the
student's end-of-turn id (``merge_token``) on the full logits, before the sparse distribution is taken,
so the stored row is exact for the remapped distribution (sorted ids, same log-sum-exp, the true top-k).
Content rows too: there the teacher's end-of-turn mass is its probability of stopping early, which a
student in its own format expresses with its own end-of-turn.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from distill.data.encoding import IGNORE_INDEX, Encoded, encode_record
from distill.data.templates import BUILTIN_TEMPLATES, ChatTemplate, TemplateError, resolve_template
from distill.pretrained import load_tokenizer

_SHOWN = 6  # tokens shown on each side of the first difference


class AlignmentError(ValueError):
    """A sample whose response tokens differ between the student's and a teacher's template."""


@dataclass
class TeacherSample:
    """A student sample as one teacher reads it, and where the student's rows are in its output."""

    teacher: Encoded  # under the teacher's template, cut after the last position the student needs
    rows: list[int]  # per student trainable position, the index of the aligned teacher trainable position
    merge_eot: bool  # move the teacher's end-of-turn mass onto the student's (the two ids differ)


def target_positions(sample: Encoded) -> list[int]:
    """Positions ``t`` that predict a trained token (``labels[t + 1]`` is not masked), in order."""
    labels = sample.labels
    return [t for t in range(len(labels) - 1) if labels[t + 1] != IGNORE_INDEX]


def targets(sample: Encoded) -> list[int]:
    """The token ids the trainable positions predict, in order."""
    return [sample.labels[t + 1] for t in target_positions(sample)]


def end_of_turn_id(tokenizer: PreTrainedTokenizerBase, template: ChatTemplate | None) -> int | None:
    """The template's end-of-turn as one token id, or None (no template, or it is several tokens)."""
    if template is None:
        return None
    ids = tokenizer(template.end_of_turn, add_special_tokens=False)["input_ids"]
    return ids[0] if len(ids) == 1 else None


def align(
    student: Encoded,
    teacher: Encoded,
    student_eot: int | None = None,
    teacher_eot: int | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    teacher_name: str = "teacher",
    cut: Literal["right", "left"] | None = None,
) -> list[int]:
    """For each trainable position of ``student`` (in order), the index of the teacher trainable position
    predicting the same token, ``teacher`` being the same record under the teacher's template.
    ``cut="left"`` tries the suffix first (which matters only for responses repeating themselves);
    ``tokenizer`` decodes the differing tokens of an ``AlignmentError``.
    """
    ours, theirs = targets(student), targets(teacher)

    def same(s: int, t: int) -> bool:
        return s == t or (student_eot is not None and s == student_eot and t == teacher_eot)

    offsets = [0, len(theirs) - len(ours)]
    for offset in dict.fromkeys(reversed(offsets) if cut == "left" else offsets):
        if offset >= 0 and all(same(s, theirs[offset + i]) for i, s in enumerate(ours)):
            return list(range(offset, offset + len(ours)))
    raise AlignmentError(_explain(student, ours, theirs, same, tokenizer, teacher_name))


def _explain(student, ours, theirs, same, tokenizer, teacher_name) -> str:
    n, m = len(ours), len(theirs)
    common = min(n, m)
    # tokens agreeing from the start (student cut on the right, or not at all) and from the end (cut left)
    forward = next((i for i in range(common) if not same(ours[i], theirs[i])), common)
    backward = next((i for i in range(common) if not same(ours[n - 1 - i], theirs[m - 1 - i])), common)
    s_at = t_at = forward
    where = f"they first differ at response token {forward}"
    if m > n and backward > forward:
        s_at, t_at = n - 1 - backward, m - 1 - backward
        where = f"reading from the end, they first differ at the student's response token {s_at}"
    elif forward == common:
        where = f"they agree on the first {forward}, then the teacher's end"
    return (
        f"{student.source} (sample {student.sha[:12]}): cannot align the template of teacher "
        f"{teacher_name!r} with the student's: the responses are {n} tokens under the student's template "
        f"and {m} under the teacher's; {where}:\n"
        f"  student: {_show(ours, s_at, tokenizer)}\n"
        f"  teacher: {_show(theirs, t_at, tokenizer)}\n"
        "A teacher's template may differ from the student's only outside the responses (and in the "
        "end-of-turn token): each response must tokenize to the same ids under both (a template that adds "
        "a space or newline before or inside a response changes its tokens). Use a template whose "
        "responses tokenize the same, or drop the teacher's template."
    )


def _show(ids: Sequence[int], at: int, tokenizer: PreTrainedTokenizerBase | None) -> str:
    """The tokens around ``at`` (marked ``>> <<``), as token strings (spaces visible) and as text."""
    before, here, after = ids[max(0, at - _SHOWN) : at], ids[at : at + 1], ids[at + 1 : at + 1 + _SHOWN]
    if tokenizer is None:
        return f"{list(before)} >>{list(here) or 'nothing'}<< {list(after)}"
    tokens = tokenizer.convert_ids_to_tokens
    marked = f"{tokens(here[0])!r} (id {here[0]})" if here else "nothing"
    text = tokenizer.decode([*before, *here, *after], skip_special_tokens=False)
    return f"{tokens(list(before))} >>{marked}<< {tokens(list(after))}  text {text!r}"


def encode_for_teacher(
    samples: Sequence[Encoded],
    tokenizer: PreTrainedTokenizerBase,
    template: ChatTemplate,
    student_template: ChatTemplate | None,
    teacher_name: str = "teacher",
) -> dict[str, TeacherSample]:
    """Each sample (by sha) under the teacher's ``template``, aligned with the student's encoding.

    The teacher's encoding is not truncated but cut right after the last position the student needs: a
    student cut on the left gives the teacher the whole beginning of the conversation as context.
    Plain-text records read the same under every template: their teacher sample is the student's own.
    """
    student_eot = end_of_turn_id(tokenizer, student_template)
    teacher_eot = end_of_turn_id(tokenizer, template)
    merge = student_eot is not None and teacher_eot is not None and student_eot != teacher_eot
    aligned: dict[str, TeacherSample] = {}
    for sample in samples:
        record = sample.record
        if record is None:
            raise ValueError(
                f"{sample.source}: the sample does not carry its record, so teacher {teacher_name!r} "
                "cannot render it in its template (encode it with distill.data.encoding.encode_record)"
            )
        if record.messages is None:
            aligned[sample.sha] = TeacherSample(sample, list(range(sample.num_trainable)), False)
            continue
        if student_template is None:
            raise ValueError(f"{sample.source}: a conversation needs the student's chat template")
        if IGNORE_INDEX not in sample.labels:
            raise AlignmentError(
                f"{sample.source} (sample {sample.sha[:12]}): teacher {teacher_name!r} reads its own "
                "template, so only the responses can be aligned, but the student trains on the whole "
                "conversation: set data.train_on_responses_only: true"
            )
        full = encode_record(record, tokenizer, template, train_on_responses_only=True)
        cut = None
        if sample.num_trainable < full.num_trainable:  # truncated: which end did the student lose?
            whole = encode_record(record, tokenizer, student_template, train_on_responses_only=True)
            cut = "right" if whole.input_ids[: len(sample.input_ids)] == sample.input_ids else "left"
        rows = align(sample, full, student_eot, teacher_eot, tokenizer, teacher_name, cut)
        if rows:
            end = target_positions(full)[rows[-1]] + 2  # the input up to the last needed position + its label
            full = Encoded(full.input_ids[:end], full.labels[:end], full.sha, full.source, record)
        aligned[sample.sha] = TeacherSample(full, rows, merge)
    return aligned


def same_template(a: ChatTemplate | None, b: ChatTemplate | None) -> bool:
    return a is not None and b is not None and (a.source, a.end_of_turn) == (b.source, b.end_of_turn)


def resolve_teacher_template(
    tokenizer: PreTrainedTokenizerBase,
    name: str,
    end_of_turn: str | None = None,
    model: str | None = None,
) -> ChatTemplate:
    """A teacher's template: a built-in name, a Jinja string, or ``model`` for the chat template saved
    with the teacher's own tokenizer (an instruct model's format)."""
    if name == "model":
        if model is None:
            raise TemplateError("template 'model' needs a teacher loaded from a name or path")
        own = load_tokenizer(model)
        if not own.chat_template:
            raise TemplateError(f"teacher {model!r} has no chat_template of its own; name a template")
        return resolve_template(own, None, end_of_turn)
    return resolve_template(tokenizer, name, end_of_turn)


def template_identity(name: str, end_of_turn: str | None = None) -> str:
    """A short stable name for a teacher's template in the cache spec."""
    if name in BUILTIN_TEMPLATES or name == "model":
        ident = name
    else:
        ident = "jinja:" + hashlib.sha256(name.encode()).hexdigest()[:16]
    return ident if end_of_turn is None else f"{ident};eot={end_of_turn}"


def merge_token(logits: Tensor, source: int, target: int, rows: Tensor | None = None) -> Tensor:
    """``logits`` with the probability of ``source`` moved onto ``target`` (on ``rows``, a bool mask, or
    all rows): target gets ``logaddexp`` of both, source ``-inf``; the log-sum-exp is unchanged."""
    if rows is not None and not bool(rows.any()):
        return logits
    out = logits.clone()
    pick = slice(None) if rows is None else rows
    merged = torch.logaddexp(out[pick, target].float(), out[pick, source].float())
    out[pick, target] = merged.to(out.dtype)
    out[pick, source] = float("-inf")
    return out
