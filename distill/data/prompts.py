"""Read RL prompts (GRPO, RLOO): a conversation to answer, plus the fields its reward functions read.

The formats (``question``, ``messages``, ``prompt``; detected per record or forced with ``fmt``) are
docs/rl.md's. Every top-level key but the prompt's, ``system`` and ``tools`` is kept in ``fields`` for the
reward functions. ``read_response_records`` reads SFT files as prompts with the dataset's responses
(on-policy distillation mixes them with student samples).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from distill.data.formats import (
    DataFormatError,
    Source,
    _iter_raw,
    any_turns,
    check_system_first,
    content_sha,
    find_files,
    nonempty_field,
    open_with_system,
    read_records,
    record_kind,
)
from distill.data.hf_datasets import as_list

PromptFormat = Literal["auto", "question", "messages", "prompt"]
PROMPT_FORMATS: tuple[str, ...] = ("question", "messages", "prompt")
# keys the rollout adds to each completion's fields: a record must not bring its own
RESERVED_FIELDS = frozenset({"completion_length", "stopped", "messages"})
# the keys that hold the prompt, by the format they mark (auto-detection)
_PROMPT_KEYS = {
    "question": "question",
    "messages": "messages",
    "conversations": "messages",
    "prompt": "prompt",
}
# keys that become part of the prompt itself, never fields
_PROMPT_PARTS = frozenset({"system", "tools"})


@dataclass(frozen=True)
class PromptRecord:
    """A conversation ending with a user turn, the record's other keys, and where it came from."""

    source: str  # "path:line" (JSONL) or "path[index]" (JSON array)
    messages: tuple[dict[str, str], ...]
    fields: dict[str, Any] = field(default_factory=dict)
    response: str | None = None  # the dataset's answer to the last user turn, where the file has one

    @property
    def sha(self) -> str:
        content: dict[str, Any] = {"messages": list(self.messages), "fields": self.fields}
        if self.response is not None:
            content["response"] = self.response
        return content_sha(content)


def read_prompt_records(sources: Source | list[Source], fmt: PromptFormat = "auto") -> list[PromptRecord]:
    """Read every prompt record of ``sources`` (files, directories or dataset splits) in order."""
    if fmt != "auto" and fmt not in PROMPT_FORMATS:
        raise ValueError(f"unknown prompt format {fmt!r}; expected 'auto' or one of {PROMPT_FORMATS}")
    sources = as_list(sources)
    if not sources:
        raise DataFormatError("no prompt files given")
    paths = [path for source in sources for path in find_files(source)]
    records = [to_prompt_record(raw, where, fmt) for path in paths for raw, where in _iter_raw(path)]
    if not records:
        raise DataFormatError(f"{', '.join(map(str, paths))}: no prompt records")
    return records


def read_response_records(sources: Source | list[Source]) -> list[PromptRecord]:
    """SFT records as prompts with their responses: the last turn (an assistant's) is the response."""
    records = []
    for record in read_records(sources):
        turns = list(record.messages or ())
        if record.text is not None or turns[-1]["role"] != "assistant":
            what = "plain text" if record.text is not None else f"its last turn is {turns[-1]['role']!r}"
            raise DataFormatError(
                f"{record.source}: a prompt with a response is a conversation ending with the assistant's "
                f"answer; this record is {what}"
            )
        prompt = turns[:-1]
        if not prompt or prompt[-1]["role"] != "user":
            raise DataFormatError(f"{record.source}: the response must answer a user turn")
        records.append(PromptRecord(record.source, tuple(prompt), response=turns[-1]["content"]))
    if not records:
        raise DataFormatError(f"{', '.join(map(str, as_list(sources)))}: no records")
    return records


def detect_prompt_format(raw: dict, where: str) -> str:
    keys = [key for key in _PROMPT_KEYS if key in raw]
    if not keys:
        raise DataFormatError(
            f"{where}: unknown prompt record format with keys {sorted(raw)}; expected 'question' "
            "(question), 'messages' or 'conversations' (messages) or 'prompt' (prompt)"
        )
    if len(keys) > 1:  # which one is the prompt would be a guess
        raise DataFormatError(
            f"{where}: the record has several prompt keys {keys}: keep one, or set the format"
        )
    return _PROMPT_KEYS[keys[0]]


def to_prompt_record(raw: object, where: str, fmt: PromptFormat = "auto") -> PromptRecord:
    """Normalise one raw JSON value into a ``PromptRecord``; raise ``DataFormatError`` naming ``where``."""
    kind = record_kind(raw, where, fmt, lambda raw: detect_prompt_format(raw, where), "")
    if kind == "messages":
        key = "messages" if "messages" in raw or "conversations" not in raw else "conversations"
        turns = _turns(raw.get(key), key, where)
    else:
        key = kind  # the question, or TRL's prompt: a string, or a list of turns
        if kind == "prompt" and isinstance(raw.get(key), list):
            turns = _turns(raw[key], key, where)
        else:
            turns = [{"role": "user", "content": nonempty_field(raw, key, where)}]
    messages = _prompt_messages(turns, raw, where)
    fields = {k: v for k, v in raw.items() if k != key and k not in _PROMPT_PARTS}
    reserved = sorted(RESERVED_FIELDS & fields.keys())
    if reserved:
        raise DataFormatError(
            f"{where}: field(s) {reserved} are reserved (the rollout sets them on every completion): "
            "rename them"
        )
    return PromptRecord(source=where, messages=tuple(messages), fields=fields)


def _turns(value: object, key: str, where: str) -> list[dict[str, str]]:
    """A non-empty list of ShareGPT or OpenAI turns."""
    if not isinstance(value, list) or not value:
        raise DataFormatError(f"{where}: '{key}' must be a non-empty list of turns")
    return any_turns(value, where)


def _prompt_messages(turns: list[dict[str, str]], raw: dict, where: str) -> list[dict[str, str]]:
    """``turns`` opened by the record's ``system`` and ``tools``, checked to end with a user turn."""
    turns = open_with_system(turns, raw, where)
    check_system_first(turns, where)
    last = turns[-1]
    if last["role"] != "user":
        raise DataFormatError(
            f"{where}: the last turn is {last['role']!r}: a prompt must end with a user turn (the one to "
            "answer)"
        )
    if not last["content"].strip():
        raise DataFormatError(f"{where}: the last user turn is empty")
    return turns
