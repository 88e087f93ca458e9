"""Read preference pairs (DPO, reward models) and unpaired KTO records, normalised to chat messages.

The formats (``medicalgpt``, ``medicalgpt_reward``, ``trl``, ``hh``, ``kto``; detected per record or
forced with ``fmt``) and their optional fields are docs/preference.md's. A pair whose chosen equals its
rejected teaches nothing: it is dropped and counted.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from distill.data.formats import (
    DataFormatError,
    Source,
    _iter_raw,
    any_turns,
    check_system_first,
    content_sha,
    find_files,
    open_with_system,
    record_kind,
)
from distill.data.hf_datasets import as_list

logger = logging.getLogger(__name__)

PairFormat = Literal["auto", "medicalgpt", "medicalgpt_reward", "trl", "hh", "kto"]
PAIR_FORMATS: tuple[str, ...] = ("medicalgpt", "medicalgpt_reward", "trl", "hh", "kto")
Messages = tuple[dict[str, str], ...]

# (prompt, chosen, rejected) keys of the formats that name their prompt
_PAIR_KEYS = {
    "medicalgpt": ("conversations", "chosen", "rejected"),
    "medicalgpt_reward": ("question", "response_chosen", "response_rejected"),
    "trl": ("prompt", "chosen", "rejected"),
}
_SHOWN_DROPPED = 5


@dataclass(frozen=True)
class PairRecord:
    """A prompt with a preferred and a dispreferred response, and where it came from."""

    source: str  # "path:line" (JSONL) or "path[index]" (JSON array)
    prompt: Messages  # system first if any; ends with a user or tool turn
    chosen: Messages  # assistant turns (and tool results between them)
    rejected: Messages
    margin: float | None = None

    @property
    def sha(self) -> str:
        prompt, chosen, rejected = list(self.prompt), list(self.chosen), list(self.rejected)
        return content_sha({"prompt": prompt, "chosen": chosen, "rejected": rejected, "margin": self.margin})


@dataclass(frozen=True)
class UnpairedRecord:
    """A KTO sample: one completion of a prompt, labelled desirable or not."""

    source: str
    prompt: Messages
    completion: Messages
    label: bool

    @property
    def sha(self) -> str:
        completion = list(self.completion)
        return content_sha({"prompt": list(self.prompt), "completion": completion, "label": self.label})


@dataclass
class PairReadStats:
    records: int = 0
    identical_dropped: int = 0
    identical_first: list[str] = field(default_factory=list)  # the first few dropped, as path:line


def warn_identical_dropped(count: int, first: Sequence[str], read_from: str = "") -> None:
    """The warning for the pairs whose chosen equals rejected; ``read_from`` names where the count was
    read when the files were not (a tokenized cache entry)."""
    logger.warning(
        "dropped %d preference pairs whose chosen equals rejected (first: %s)%s",
        count,
        ", ".join(first[:_SHOWN_DROPPED]),
        f" [counted when {read_from} was built]" if read_from else "",
    )


def read_pair_records(
    sources: Source | list[Source], fmt: PairFormat = "auto"
) -> tuple[list[PairRecord | UnpairedRecord], PairReadStats]:
    """Read every pair or KTO record of ``sources`` (files, directories or dataset splits) in order."""
    sources = as_list(sources)
    records: list[PairRecord | UnpairedRecord] = []
    dropped: list[str] = []
    for source in sources:
        for path in find_files(source):
            first: tuple[str, str] | None = None  # kind and source of the file's first record
            for raw, where in _iter_raw(path):
                record = to_pair_record(raw, where, fmt)
                kind = "KTO" if isinstance(record, UnpairedRecord) else "preference pair"
                if first is None:
                    first = (kind, where)
                elif kind != first[0]:
                    raise DataFormatError(
                        f"{where}: a {kind} record in a file of {first[0]} records (the first at "
                        f"{first[1]}); keep preference pairs and KTO records in separate files"
                    )
                if record is None:
                    dropped.append(where)
                else:
                    records.append(record)
    if dropped:
        warn_identical_dropped(len(dropped), dropped)
    stats = PairReadStats(len(records), len(dropped), dropped[:_SHOWN_DROPPED])
    return records, stats


def detect_pair_format(raw: dict) -> str | None:
    if "label" in raw or "completion" in raw:
        return "kto"
    if "question" in raw or "response_chosen" in raw or "response_rejected" in raw:
        return "medicalgpt_reward"
    if "chosen" not in raw and "rejected" not in raw:
        return None
    if "conversations" in raw:
        return "medicalgpt"
    if "prompt" in raw or "messages" in raw:
        return "trl"
    return "hh"


def to_pair_record(raw: object, where: str, fmt: PairFormat = "auto") -> PairRecord | UnpairedRecord | None:
    """Normalise one raw JSON value; ``None`` for a pair whose chosen equals rejected."""
    known = (
        "preference record format with keys {keys}; expected 'conversations'/'chosen'/'rejected' "
        "(medicalgpt), 'question'/'response_chosen'/'response_rejected' (medicalgpt_reward), "
        "'prompt'/'chosen'/'rejected' (trl), 'chosen'/'rejected' conversations (hh) or "
        "'prompt'/'completion'/'label' (kto)"
    )
    kind = record_kind(raw, where, fmt, detect_pair_format, known)
    if kind == "kto":
        return _kto_record(raw, where)
    if kind == "hh":
        prompt, chosen, rejected = _hh_split(raw, where)
    elif kind in _PAIR_KEYS:
        prompt_key, chosen_key, rejected_key = _PAIR_KEYS[kind]
        if kind == "trl" and "prompt" not in raw and "messages" in raw:
            prompt_key = "messages"
        turns = _turns(raw.get(prompt_key), where, prompt_key, "user")
        if kind == "medicalgpt_reward":
            turns = _history(raw.get("history"), where) + turns
        prompt = _prompt(turns, raw, where)
        chosen = _response(raw.get(chosen_key), prompt, where, chosen_key)
        rejected = _response(raw.get(rejected_key), prompt, where, rejected_key)
    else:
        raise ValueError(f"unknown pair format {fmt!r}; expected 'auto' or one of {PAIR_FORMATS}")
    margin = _margin(raw, where)
    if chosen == rejected:
        return None
    return PairRecord(where, tuple(prompt), tuple(chosen), tuple(rejected), margin)


def _history(history: object, where: str) -> list[dict[str, str]]:
    """MedicalGPT's earlier exchanges, ``[[question, answer], ...]``, as user and assistant turns."""
    if history is None:
        return []
    turns = []
    for index, exchange in enumerate(history if isinstance(history, list) else [None]):
        if not (
            isinstance(exchange, list) and len(exchange) == 2 and all(isinstance(t, str) for t in exchange)
        ):
            raise DataFormatError(
                f"{where}: 'history' must be a list of [question, answer] string pairs (entry {index} is not)"
            )
        turns += [{"role": "user", "content": exchange[0]}, {"role": "assistant", "content": exchange[1]}]
    return turns


def _kto_record(raw: dict, where: str) -> UnpairedRecord:
    if "label" not in raw:
        raise DataFormatError(f"{where}: missing field 'label'")
    label = raw["label"]
    if not isinstance(label, bool):  # "true", 1 or null would be a guess at what was meant
        raise DataFormatError(f"{where}: 'label' must be a JSON boolean (true or false), got {label!r}")
    if "prompt" in raw or "completion" in raw:
        prompt = _prompt(_turns(raw.get("prompt"), where, "prompt", "user"), raw, where)
        completion = _response(raw.get("completion"), prompt, where, "completion")
    else:
        messages = _turns(raw.get("messages"), where, "messages", "user")
        if messages[-1]["role"] != "assistant":
            raise DataFormatError(f"{where}: 'messages' must end with the assistant completion")
        prompt = _prompt(messages[:-1], raw, where)
        completion = messages[-1:]
        _check_response(completion, where, "messages")
    return UnpairedRecord(where, tuple(prompt), tuple(completion), label)


def _hh_split(raw: dict, where: str) -> tuple[list[dict[str, str]], ...]:
    """The common leading turns of two conversations as the prompt, the rest as the responses."""
    chosen = _turns(raw.get("chosen"), where, "chosen", "assistant")
    rejected = _turns(raw.get("rejected"), where, "rejected", "assistant")
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    # turns the two share just before they differ belong to both responses, not to the prompt
    while shared and chosen[shared - 1]["role"] == "assistant":
        shared -= 1
    if not shared:
        raise DataFormatError(
            f"{where}: 'chosen' and 'rejected' share no prompt (no 'prompt' field and no common "
            "leading turns)"
        )
    if any(m["role"] == "user" for m in chosen[shared:] + rejected[shared:]):
        raise DataFormatError(
            f"{where}: 'chosen' and 'rejected' differ before the last user turn (at turn {shared}); "
            "they may differ only in the final assistant response"
        )
    prompt = _prompt(chosen[:shared], raw, where)
    for key, turns in (("chosen", chosen[shared:]), ("rejected", rejected[shared:])):
        _check_response(turns, where, key)
    return prompt, chosen[shared:], rejected[shared:]


def _turns(value: object, where: str, key: str, role: str) -> list[dict[str, str]]:
    """A string as one ``role`` turn, or a list of ShareGPT or OpenAI turns."""
    if value is None:
        raise DataFormatError(f"{where}: missing field '{key}'")
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if not isinstance(value, list) or not value:
        raise DataFormatError(f"{where}: '{key}' must be a string or a non-empty list of messages")
    return any_turns(value, f"{where} ('{key}')")


def _prompt(turns: list[dict[str, str]], raw: dict, where: str) -> list[dict[str, str]]:
    """``turns`` opened by the record's ``system`` and ``tools``, checked to be something to answer."""
    turns = open_with_system(turns, raw, where)
    if not any(m["content"].strip() for m in turns if m["role"] != "system"):
        raise DataFormatError(f"{where}: empty prompt")
    check_system_first(turns, where, "prompt turn")
    last = turns[-1]["role"]
    if last == "assistant":
        raise DataFormatError(f"{where}: the prompt ends with an assistant turn: nothing to respond to")
    if last not in ("user", "tool"):
        raise DataFormatError(f"{where}: the prompt must end with a user or tool turn, not {last}")
    return turns


def _response(value: object, prompt: list[dict[str, str]], where: str, key: str) -> list[dict[str, str]]:
    turns = _turns(value, where, key, "assistant")
    # UltraFeedback stores the whole conversation; it may or may not repeat the system message
    bare = prompt[1:] if prompt[0]["role"] == "system" else prompt
    for prefix in (prompt, bare):
        if len(turns) > len(prefix) and turns[: len(prefix)] == prefix:
            turns = turns[len(prefix) :]
            break
    _check_response(turns, where, key)
    return turns


def _check_response(turns: list[dict[str, str]], where: str, key: str) -> None:
    if not turns:
        raise DataFormatError(f"{where}: '{key}' has no response")
    if turns[0]["role"] != "assistant":
        raise DataFormatError(
            f"{where}: '{key}' must start with an assistant turn (or repeat the prompt first), "
            f"not a {turns[0]['role']} turn"
        )
    for index, message in enumerate(turns):
        if message["role"] in ("user", "system"):
            raise DataFormatError(
                f"{where}: '{key}' turn {index} is a {message['role']} turn: a response holds only "
                "assistant turns and the tool results between them"
            )
        if message["role"] == "assistant" and not message["content"].strip():
            raise DataFormatError(f"{where}: '{key}' turn {index} is an empty response")


def _margin(raw: dict, where: str) -> float | None:
    value = raw.get("margin")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DataFormatError(f"{where}: 'margin' must be a finite number, got {value!r}")
    return float(value)
