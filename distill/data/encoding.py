"""Records -> token ids + labels: response-only masking by character spans, truncation, counting."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, fields, replace
from typing import ClassVar, Literal

from transformers import PreTrainedTokenizerBase

from distill.data.formats import Record
from distill.data.templates import ChatTemplate

IGNORE_INDEX = -100
Truncation = Literal["right", "left", "drop"]


class NoTrainableTokensError(ValueError):
    """Every label of a dataset is masked: training would learn nothing."""


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]  # aligned with input_ids; IGNORE_INDEX where no loss is taken
    sha: str
    source: str
    record: Record | None = field(default=None, repr=False, compare=False)
    """The record it was encoded from, so a teacher with its own chat template can render it again."""
    value: float | None = None
    """A number the objective reads of the record besides its tokens (a pair's reward margin, a KTO
    label as 1.0 or 0.0)."""

    @property
    def num_trainable(self) -> int:
        # labels[0] is never predicted (nothing precedes it), so it is not counted
        return sum(label != IGNORE_INDEX for label in self.labels[1:])


@dataclass
class EncodingStats:
    samples: int = 0
    kept: int = 0
    truncated: int = 0
    dropped_too_long: int = 0
    dropped_no_trainable: int = 0
    tokens: int = 0
    trainable_tokens: int = 0
    examples_without_labels: list[Encoded] = field(default_factory=list, repr=False)
    too_long: list[str] = field(default_factory=list, repr=False)  # where the first dropped ones are
    COUNTS: ClassVar[tuple[str, ...]]  # the int fields above, in order (set below the class)
    EXAMPLES: ClassVar[int] = 3  # fully masked samples kept to show in the error
    SHOWN_TOO_LONG: ClassVar[int] = 5  # places of dropped over-long records kept to name in the warning

    @property
    def trainable_share(self) -> float:
        return self.trainable_tokens / max(self.tokens, 1)

    def count(self, unit: list[Encoded] | None, truncated: bool, source: str) -> bool:
        """Count one record's outcome (the record at ``source``), its samples after truncation (a pair
        has two; None: dropped as too long); whether it is kept, i.e. every sample has a trainable token."""
        self.samples += 1
        if unit is None:
            self.dropped_too_long += 1
            if len(self.too_long) < self.SHOWN_TOO_LONG:
                self.too_long.append(source)
            return False
        self.truncated += truncated
        untrained = [sample for sample in unit if sample.num_trainable == 0]
        if untrained:
            self.dropped_no_trainable += 1
            if len(self.examples_without_labels) < self.EXAMPLES:
                self.examples_without_labels.append(untrained[0])
            return False
        self.kept += 1
        self.tokens += sum(len(sample.input_ids) for sample in unit)
        self.trainable_tokens += sum(sample.num_trainable for sample in unit)
        return True

    def add(self, other: EncodingStats) -> None:
        for name in self.COUNTS:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        room = self.EXAMPLES - len(self.examples_without_labels)
        self.examples_without_labels.extend(other.examples_without_labels[:room])
        self.too_long.extend(other.too_long[: self.SHOWN_TOO_LONG - len(self.too_long)])

    def as_dict(self) -> dict[str, float]:
        counts = {n: getattr(self, n) for n in self.COUNTS if n != "trainable_tokens"}
        return {**counts, "trainable_share": round(self.trainable_share, 4)}


EncodingStats.COUNTS = tuple(f.name for f in fields(EncodingStats) if f.type == "int")


def encode_record(
    record: Record,
    tokenizer: PreTrainedTokenizerBase,
    template: ChatTemplate | None,
    train_on_responses_only: bool = True,
) -> Encoded:
    """Tokenize one record; labels are kept on assistant spans only when ``train_on_responses_only``."""
    if record.text is not None:
        ids = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        ids += tokenizer(record.text, add_special_tokens=False)["input_ids"]
        ids += [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        return Encoded(ids, list(ids), record.sha, record.source, record)
    if template is None:
        raise ValueError(f"{record.source}: a conversation needs a chat template")
    messages = list(record.messages or ())
    ids, labels = encode_messages(messages, tokenizer, template, record.source, train_on_responses_only)
    return Encoded(ids, labels, record.sha, record.source, record)


def encode_messages(
    messages: list[dict[str, str]],
    tokenizer: PreTrainedTokenizerBase,
    template: ChatTemplate,
    where: str,
    responses_only: bool = True,
    trained_from: int = 0,
) -> tuple[list[int], list[int]]:
    """Token ids and labels of a rendered conversation: labels on the assistant turns that start at or
    after character ``trained_from`` (a preference pair trains its response, not the prompt's earlier
    answers), or on every token when not ``responses_only``."""
    text, spans = template.render_with_spans(tokenizer, messages, where=where)
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = encoding["input_ids"]
    if not responses_only:
        return ids, list(ids)
    spans = [(s, e) for s, e in spans if s >= trained_from]
    labels = [
        token if any(end > s and start < e for s, e in spans) else IGNORE_INDEX
        for token, (start, end) in zip(ids, encoding["offset_mapping"], strict=True)
    ]
    return ids, labels


def truncate(sample: Encoded, max_length: int, policy: Truncation) -> Encoded | None:
    """Cut to ``max_length`` tokens (keep the start or the end), or ``None`` when the policy drops it."""
    if len(sample.input_ids) <= max_length:
        return sample
    if policy == "drop":
        return None
    cut = slice(None, max_length) if policy == "right" else slice(-max_length, None)
    return replace(sample, input_ids=sample.input_ids[cut], labels=sample.labels[cut])


def encode_chunk(
    records: Iterable[Record],
    tokenizer: PreTrainedTokenizerBase,
    template: ChatTemplate | None,
    max_length: int,
    truncation: Truncation = "right",
    train_on_responses_only: bool = True,
) -> tuple[list[Encoded], EncodingStats]:
    """Encode, truncate and filter; samples without a trainable token are dropped and counted."""
    stats = EncodingStats()
    kept: list[Encoded] = []
    for record in records:
        encoded = encode_record(record, tokenizer, template, train_on_responses_only)
        sample = truncate(encoded, max_length, truncation)
        if stats.count(None if sample is None else [sample], sample is not encoded, record.source):
            kept.append(sample)
    return kept, stats


def check_some_trainable(stats: EncodingStats, tokenizer: PreTrainedTokenizerBase, max_length: int) -> None:
    """Raise ``NoTrainableTokensError`` when every sample lost all its labels (showing the first)."""
    if stats.samples and not stats.kept and stats.examples_without_labels:
        example = stats.examples_without_labels[0]
        raise NoTrainableTokensError(
            f"all {stats.samples} samples have every label masked (no response token survives masking "
            f"and truncation to {max_length} tokens). Check the template and max_seq_length. First sample "
            f"({example.source}), masked tokens shown as [...]:\n{show_labels(example, tokenizer)}"
        )


def encode_all(
    records: Iterable[Record],
    tokenizer: PreTrainedTokenizerBase,
    template: ChatTemplate | None,
    max_length: int,
    truncation: Truncation = "right",
    train_on_responses_only: bool = True,
) -> tuple[list[Encoded], EncodingStats]:
    """``encode_chunk`` on all records, refusing a dataset whose every label is masked."""
    kept, stats = encode_chunk(records, tokenizer, template, max_length, truncation, train_on_responses_only)
    check_some_trainable(stats, tokenizer, max_length)
    return kept, stats


def show_labels(sample: Encoded, tokenizer: PreTrainedTokenizerBase) -> str:
    """Decode a sample with its masked stretches wrapped in ``[...]`` so the trained part stands out."""
    pieces, run, masked = [], [], None
    for token, label in zip(sample.input_ids, sample.labels, strict=True):
        is_masked = label == IGNORE_INDEX
        if masked is not None and is_masked != masked:
            pieces.append(_decode_run(run, masked, tokenizer))
            run = []
        run.append(token)
        masked = is_masked
    if run:
        pieces.append(_decode_run(run, bool(masked), tokenizer))
    return "".join(pieces)


def _decode_run(ids: list[int], masked: bool, tokenizer: PreTrainedTokenizerBase) -> str:
    text = tokenizer.decode(ids, skip_special_tokens=False)
    return f"[{text}]" if masked else text
