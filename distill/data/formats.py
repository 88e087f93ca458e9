"""Read JSON/JSONL training files and normalise every record to chat messages or plain text.

Supported formats (detected per record, or forced with ``format``):

- ``sharegpt``: ``{"conversations": [{"from": "human"|"gpt"|"system", "value": ...}]}``
- ``messages`` (OpenAI): ``{"messages": [{"role": "user"|"assistant"|"system", "content": ...}]}``
- ``alpaca``: ``{"instruction", "input"?, "output", "system"?}``
- ``text``: ``{"text": ...}`` for continued pretraining
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Format = Literal["auto", "sharegpt", "messages", "alpaca", "text"]
FORMATS: tuple[str, ...] = ("sharegpt", "messages", "alpaca", "text")

_SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "system": "system",
}


class DataFormatError(ValueError):
    """A record that cannot be read; the message names the file and line."""


@dataclass(frozen=True)
class Record:
    """One training sample: either a conversation or a plain text, with where it came from."""

    source: str  # "path:line" (JSONL) or "path[index]" (JSON array)
    messages: tuple[dict[str, str], ...] | None = None
    text: str | None = None

    @property
    def sha(self) -> str:
        """SHA-256 of the content alone, so moving a sample between files or lines keeps its key."""
        content = {"text": self.text} if self.text is not None else {"messages": list(self.messages or ())}
        canonical = json.dumps(content, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def find_files(source: str | Path) -> list[Path]:
    """A file, or every ``*.json``/``*.jsonl`` below a directory, in a stable order."""
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in (".json", ".jsonl") and p.is_file())
        if not files:
            raise FileNotFoundError(f"{path}: directory has no .json or .jsonl files")
        return files
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such data file or directory")
    return [path]


def read_records(sources: str | Path | list[str | Path], fmt: Format = "auto") -> list[Record]:
    """Read every record of ``sources`` (files or directories) in order."""
    if isinstance(sources, (str, Path)):
        sources = [sources]
    records: list[Record] = []
    for source in sources:
        for path in find_files(source):
            records.extend(to_record(raw, where, fmt) for raw, where in _iter_raw(path))
    return records


def _iter_raw(path: Path) -> Iterator[tuple[object, str]]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl" or not text.lstrip().startswith("["):
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                yield json.loads(line), f"{path}:{lineno}"
            except json.JSONDecodeError as err:
                raise DataFormatError(
                    f"{path}:{lineno}: malformed JSON ({err.msg} at column {err.colno})"
                ) from None
        return
    try:
        items = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataFormatError(
            f"{path}:{err.lineno}: malformed JSON ({err.msg} at column {err.colno})"
        ) from None
    for index, item in enumerate(items):
        yield item, f"{path}[{index}]"


def detect_format(raw: dict) -> str | None:
    if "conversations" in raw:
        return "sharegpt"
    if "messages" in raw:
        return "messages"
    if "instruction" in raw or "output" in raw:
        return "alpaca"
    if "text" in raw:
        return "text"
    return None


def to_record(raw: object, where: str, fmt: Format = "auto") -> Record:
    """Normalise one raw JSON value into a ``Record``; raise ``DataFormatError`` naming ``where``."""
    if not isinstance(raw, dict):
        raise DataFormatError(f"{where}: expected a JSON object, got {type(raw).__name__}")
    kind = detect_format(raw) if fmt == "auto" else fmt
    if kind is None:
        raise DataFormatError(
            f"{where}: unknown record format with keys {sorted(raw)}; expected one of "
            "'conversations' (sharegpt), 'messages', 'instruction'/'output' (alpaca) or 'text'"
        )
    if kind == "text":
        text = _field(raw, "text", where)
        if not text.strip():
            raise DataFormatError(f"{where}: empty 'text'")
        return Record(source=where, text=text)
    if kind == "alpaca":
        messages = _alpaca_messages(raw, where)
    else:
        key, role_key, content_key = (
            ("conversations", "from", "value") if kind == "sharegpt" else ("messages", "role", "content")
        )
        turns = raw.get(key)
        if not isinstance(turns, list) or not turns:
            raise DataFormatError(f"{where}: '{key}' must be a non-empty list")
        messages = [_turn(turn, i, role_key, content_key, where) for i, turn in enumerate(turns)]
    _check_conversation(messages, where)
    return Record(source=where, messages=tuple(messages))


def _field(raw: dict, key: str, where: str, required: bool = True) -> str:
    value = raw.get(key)
    if value is None:
        if required:
            raise DataFormatError(f"{where}: missing field '{key}'")
        return ""
    if not isinstance(value, str):
        raise DataFormatError(f"{where}: field '{key}' must be a string, got {type(value).__name__}")
    return value


def _alpaca_messages(raw: dict, where: str) -> list[dict[str, str]]:
    instruction = _field(raw, "instruction", where)
    extra = _field(raw, "input", where, required=False)
    prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    messages = [
        {"role": "user", "content": prompt},
        {"role": "assistant", "content": _field(raw, "output", where)},
    ]
    system = _field(raw, "system", where, required=False)
    return [{"role": "system", "content": system}, *messages] if system.strip() else messages


def _turn(turn: object, index: int, role_key: str, content_key: str, where: str) -> dict[str, str]:
    if not isinstance(turn, dict):
        raise DataFormatError(f"{where}: turn {index} must be an object")
    role = turn.get(role_key)
    if role_key == "from":
        role = _SHAREGPT_ROLES.get(str(role))
    if role not in ("system", "user", "assistant"):
        raise DataFormatError(f"{where}: turn {index} has unknown {role_key} {turn.get(role_key)!r}")
    content = turn.get(content_key)
    if not isinstance(content, str):
        raise DataFormatError(f"{where}: turn {index} is missing a string '{content_key}'")
    return {"role": role, "content": content}


def _check_conversation(messages: list[dict[str, str]], where: str) -> None:
    if not any(m["role"] == "assistant" for m in messages):
        raise DataFormatError(f"{where}: conversation has no assistant turn")
    for index, message in enumerate(messages):
        if message["role"] == "assistant" and not message["content"].strip():
            raise DataFormatError(f"{where}: turn {index} is an empty assistant response")
        if message["role"] == "system" and index != 0:
            raise DataFormatError(f"{where}: turn {index}: a system message must come first")
