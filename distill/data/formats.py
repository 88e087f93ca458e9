"""Read JSON/JSONL files (and, through ``distill.data.hf_datasets``, parquet, arrow and csv files and
dataset splits) and normalise every record to chat messages or plain text.

The formats (``sharegpt``, OpenAI ``messages``, ``alpaca``, ``text``; detected per record or forced with
``format``) and the tool-use convention are README's "Data" section. A tool call is an assistant turn
holding the call's JSON (``{"name", "arguments"}``, a list when there are several), trained on; a tool
result is a ``tool`` turn, never trained on; declared ``tools`` open the system message as
``TOOLS_HEADER`` + their JSON. Errors name the record: ``path:line``, ``path[index]`` or ``path, row 17``.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal

from distill.data.hf_datasets import TABLE_BUILDERS, DatasetSplit, as_list, is_saved_dataset, table_rows

Format = Literal["auto", "sharegpt", "messages", "alpaca", "text"]
DATA_SUFFIXES = (".json", ".jsonl", *TABLE_BUILDERS)
Source = str | Path | DatasetSplit  # a file, a directory of files, or a dataset's split

_SHAREGPT_ROLES = {
    "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
    "function_call": "assistant", "system": "system", "observation": "tool", "tool": "tool",
}  # fmt: skip
KNOWN_FORMATS = (
    "record format with keys {keys}; expected one of 'conversations' (sharegpt), 'messages', "
    "'instruction'/'output' (alpaca) or 'text'"
)
_MESSAGE_ROLES = dict(system="system", user="user", assistant="assistant", tool="tool", function="tool")
BOM = b"\xef\xbb\xbf"  # UTF-8 byte-order mark, allowed at the start of a file
TOOLS_HEADER = "You can call these tools:\n"
# content parts that carry text; any other part (image_url, input_audio, file, ...) cannot be trained on
_TEXT_PARTS = {"text": "text", "refusal": "refusal"}


def content_sha(content: dict) -> str:
    """SHA-256 of a record's content alone, so moving a sample between files or lines keeps its key."""
    canonical = json.dumps(content, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


class DataFormatError(ValueError):
    """A record that cannot be read; the message names the file and line (a table's or dataset's row)."""


@dataclass(frozen=True)
class Record:
    """One training sample: either a conversation or a plain text, with where it came from."""

    source: str  # "path:line" (JSONL), "path[index]" (JSON array) or "path, row index" (tables)
    messages: tuple[dict[str, str], ...] | None = None
    text: str | None = None

    @property
    def sha(self) -> str:
        content = {"text": self.text} if self.text is not None else {"messages": list(self.messages or ())}
        return content_sha(content)


def split_held_out(records: list, fraction: float, seed: int) -> tuple[list, list]:
    """(kept, held out): a ``fraction`` of ``records`` (at least one) drawn by ``seed``, order kept."""
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    held_out = set(order[: max(1, round(len(records) * fraction))])
    kept = [r for i, r in enumerate(records) if i not in held_out]
    return kept, [r for i, r in enumerate(records) if i in held_out]


def find_files(source: Source) -> list[Path | DatasetSplit]:
    """A file, or every data file (``DATA_SUFFIXES``) below a directory, in a stable order; a dataset's
    split is its own single source."""
    if isinstance(source, DatasetSplit):
        return [source]
    path = Path(source)
    if path.is_dir():
        if is_saved_dataset(path):  # its .json files are no records
            raise FileNotFoundError(f"{path}: a dataset saved by save_to_disk: pass it as data.dataset_name")
        files = sorted(p for p in path.rglob("*") if p.suffix in DATA_SUFFIXES and p.is_file())
        if not files:
            raise FileNotFoundError(f"{path}: directory has no {', '.join(DATA_SUFFIXES)} files")
        return files
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such data file or directory")
    return [path]


def read_records(sources: Source | list[Source], fmt: Format = "auto") -> list[Record]:
    """Read every record of ``sources`` (files, directories or dataset splits) in order."""
    paths = (path for source in as_list(sources) for path in find_files(source))  # lazily: in order
    return [to_record(raw, where, fmt) for path in paths for raw, where in _iter_raw(path)]


def _iter_raw(path: Path | DatasetSplit) -> Iterator[tuple[object, str]]:
    """Each raw record of a source with where it is. A JSONL file is read a line at a time (a corpus
    need not fit in memory); a JSON array is parsed whole, as its format requires."""
    if isinstance(path, DatasetSplit) or path.suffix in TABLE_BUILDERS:
        with naming_undecodable(path):
            yield from table_rows(path)
        return
    with path.open("rb", buffering=1 << 20) as handle:
        if path.suffix == ".jsonl" or _first_byte(handle) != b"[":
            yield from _jsonl_records(path, handle)
            return
        data = handle.read()
    start = len(BOM) if data.startswith(BOM) else 0
    try:
        text = data[start:].decode("utf-8")
    except UnicodeDecodeError as err:
        offset = start + err.start
        raise not_utf8(path, data.count(b"\n", 0, offset) + 1, offset, err) from None
    try:
        items = json.loads(text)
    except json.JSONDecodeError as err:
        raise malformed(f"{path}:{err.lineno}", err) from None
    for index, item in enumerate(items):
        yield item, f"{path}[{index}]"


def _jsonl_records(path: Path, handle: BinaryIO) -> Iterator[tuple[object, str]]:
    # a binary file's lines end at b"\n" only: str.splitlines() would also cut at U+2028 and friends,
    # valid inside a JSON string
    offset = 0
    for lineno, raw in enumerate(handle, start=1):
        content = raw.removeprefix(BOM) if lineno == 1 else raw  # a byte-order mark is no part of a record
        line = decode_line(content, path, lineno, offset + len(raw) - len(content))
        offset += len(raw)
        if not line.strip():
            continue
        try:
            yield json.loads(line), f"{path}:{lineno}"
        except json.JSONDecodeError as err:
            raise malformed(f"{path}:{lineno}", err) from None


def malformed(where: str, err: json.JSONDecodeError) -> DataFormatError:
    return DataFormatError(f"{where}: malformed JSON ({err.msg} at column {err.colno})")


def _first_byte(handle: BinaryIO) -> bytes:
    """The file's first byte after its byte-order mark and whitespace (b"" when none); rewinds."""
    first = b""
    handle.seek(len(BOM) if handle.read(len(BOM)) == BOM else 0)
    while not first and (chunk := handle.read(1 << 16)):
        first = chunk.lstrip()[:1]
    handle.seek(0)
    return first


def decode_line(raw: bytes, path: Path, line: int, offset: int) -> str:
    """Line ``line`` of ``path`` (its bytes ``raw``, from byte ``offset`` of the file) as text; a byte
    that is not UTF-8 is a ``DataFormatError`` naming the file, the line and the byte's offset."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise not_utf8(path, line, offset + err.start, err) from None


@contextmanager
def naming_undecodable(source: Path | DatasetSplit) -> Iterator[None]:
    """Reading a CSV file (by ``datasets``), whose decode error names a position in a chunk of it: the
    error names the file, the line and the byte offset instead, found by a pass over its lines."""
    try:
        yield
    except UnicodeDecodeError as err:
        if not isinstance(source, Path) or source.suffix != ".csv":  # a binary file has no lines
            raise
        with source.open("rb", buffering=1 << 20) as handle:
            offset = 0
            for line, raw in enumerate(handle, start=1):
                decode_line(raw, source, line, offset)  # no character holds b"\n": a line decodes alone
                offset += len(raw)
        raise DataFormatError(f"{source}: not UTF-8 ({err.reason})") from err


def not_utf8(path: Path, line: int, offset: int, err: UnicodeDecodeError) -> DataFormatError:
    """The error for a byte that is not UTF-8 at byte ``offset`` of ``path``, on line ``line``."""
    return DataFormatError(
        f"{path}:{line}: not UTF-8: byte 0x{err.object[err.start]:02x} at byte offset {offset} of the file "
        f"({err.reason}); data files are read as UTF-8: re-encode it (e.g. iconv -f latin1 -t utf-8)"
    )


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


def record_kind(raw: object, where: str, fmt: str, detect: Callable[[dict], str | None], known: str) -> str:
    """``fmt``, or the format ``detect`` finds; an error naming ``where`` unless ``raw`` is an object of
    a ``known`` format (``{keys}`` in it: the object's keys)."""
    if not isinstance(raw, dict):
        raise DataFormatError(f"{where}: expected a JSON object, got {type(raw).__name__}")
    if (kind := detect(raw) if fmt == "auto" else fmt) is None:
        raise DataFormatError(f"{where}: unknown {known.format(keys=sorted(raw))}")
    return kind


def to_record(raw: object, where: str, fmt: Format = "auto") -> Record:
    """Normalise one raw JSON value into a ``Record``; raise ``DataFormatError`` naming ``where``."""
    kind = record_kind(raw, where, fmt, detect_format, KNOWN_FORMATS)
    if kind == "text":
        return Record(source=where, text=nonempty_field(raw, "text", where))
    if kind == "alpaca":
        messages = _alpaca_messages(raw, where)
    else:
        key = "conversations" if kind == "sharegpt" else "messages"
        turns = raw.get(key)
        if not isinstance(turns, list) or not turns:
            raise DataFormatError(f"{where}: '{key}' must be a non-empty list")
        turn = _sharegpt_turn if kind == "sharegpt" else _message_turn
        messages = _with_tools([turn(t, i, where) for i, t in enumerate(turns)], raw.get("tools"), where)
    _check_conversation(messages, where)
    return Record(source=where, messages=tuple(messages))


def nonempty_field(raw: dict, key: str, where: str) -> str:
    text = _field(raw, key, where)
    if not text.strip():
        raise DataFormatError(f"{where}: empty '{key}'")
    return text


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


def _role(turn: object, index: int, where: str, key: str, roles: dict[str, str]) -> str:
    if not isinstance(turn, dict):
        raise DataFormatError(f"{where}: turn {index} must be an object")
    if (role := roles.get(str(turn.get(key)))) is None:
        raise DataFormatError(
            f"{where}: turn {index} has unknown {key} {turn.get(key)!r}; expected one of {sorted(roles)}"
        )
    return role


def _sharegpt_turn(turn: Any, index: int, where: str) -> dict[str, str]:
    role = _role(turn, index, where, "from", _SHAREGPT_ROLES)
    content = turn.get("value")
    if not isinstance(content, str):
        raise DataFormatError(f"{where}: turn {index} is missing a string 'value'")
    return {"role": role, "content": content}


def _message_turn(turn: Any, index: int, where: str) -> dict[str, str]:
    role = _role(turn, index, where, "role", _MESSAGE_ROLES)
    calls = turn.get("tool_calls") or []
    if calls and role != "assistant":
        raise DataFormatError(f"{where}: turn {index}: only an assistant turn can make tool_calls")
    content = turn.get("content")
    if content is None and calls:
        content = ""
    texts = [_content_text(content, index, where)] if content != "" else []
    if calls:
        texts.append(_calls_json(calls, index, where))
    return {"role": role, "content": "\n".join(texts)}


def any_turns(turns: list, where: str) -> list[dict[str, str]]:
    """A list of turns, each ShareGPT (``from``/``value``) or OpenAI (``role``/``content``)."""
    return [
        (_sharegpt_turn if isinstance(turn, dict) and "from" in turn else _message_turn)(turn, i, where)
        for i, turn in enumerate(turns)
    ]


def _content_text(content: object, index: int, where: str) -> str:
    """A string, or the text parts of an OpenAI list of content parts joined as chat templates join them."""
    if isinstance(content, str):
        return content
    if content is None:
        raise DataFormatError(f"{where}: turn {index} is missing a string 'content'")
    if not isinstance(content, list):
        raise DataFormatError(
            f"{where}: turn {index}: 'content' must be a string or a list of parts, "
            f"got {type(content).__name__}"
        )
    texts = []
    for number, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in _TEXT_PARTS:
            raise DataFormatError(
                f"{where}: turn {index}, content part {number} is of type {kind!r}: only text parts "
                f"({sorted(_TEXT_PARTS)}) can be trained on by a text model; remove the part or the sample"
            )
        text = part.get(_TEXT_PARTS[kind])
        if not isinstance(text, str):
            raise DataFormatError(
                f"{where}: turn {index}, content part {number} has no string {_TEXT_PARTS[kind]!r}"
            )
        texts.append(text)
    return "".join(texts)


def _calls_json(calls: object, index: int, where: str) -> str:
    """OpenAI ``tool_calls`` as the JSON a ShareGPT ``function_call`` holds: ``{"name", "arguments"}``."""
    if not isinstance(calls, list):
        raise DataFormatError(f"{where}: turn {index}: 'tool_calls' must be a list")
    normalised = []
    for number, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise DataFormatError(f"{where}: turn {index}, tool call {number} has no function name")
        arguments = function.get("arguments", {})
        if isinstance(arguments, str):  # OpenAI sends the arguments as a JSON string
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                raise DataFormatError(
                    f"{where}: turn {index}, tool call {number}: 'arguments' is not valid JSON"
                ) from None
        normalised.append({"name": function["name"], "arguments": arguments})
    value = normalised[0] if len(normalised) == 1 else normalised
    return json.dumps(value, ensure_ascii=False)


def _with_tools(messages: list[dict[str, str]], tools: object, where: str) -> list[dict[str, str]]:
    """``messages`` with the declared tools opening the system message (one is added if there is none)."""
    if isinstance(tools, str):
        try:
            tools = json.loads(tools) if tools.strip() else None
        except json.JSONDecodeError:
            raise DataFormatError(f"{where}: 'tools' is a string but not valid JSON") from None
    if not tools:
        return messages
    if not isinstance(tools, list):
        raise DataFormatError(f"{where}: 'tools' must be a list of tool schemas")
    declared = TOOLS_HEADER + json.dumps(tools, ensure_ascii=False)
    if messages and messages[0]["role"] == "system":
        system = messages[0]["content"]
        return [
            {"role": "system", "content": f"{declared}\n\n{system}" if system else declared},
            *messages[1:],
        ]
    return [{"role": "system", "content": declared}, *messages]


def open_with_system(turns: list[dict[str, str]], raw: dict, where: str) -> list[dict[str, str]]:
    """``turns`` opened by the record's ``system`` string (unless they open with a system turn) and its
    declared ``tools``: how prompt and pair records take them."""
    system = raw.get("system")
    if system is not None and not isinstance(system, str):
        raise DataFormatError(f"{where}: field 'system' must be a string, got {type(system).__name__}")
    if system and system.strip() and not (turns and turns[0]["role"] == "system"):
        turns = [{"role": "system", "content": system}, *turns]
    return _with_tools(turns, raw.get("tools"), where)


def check_system_first(turns: list[dict[str, str]], where: str, label: str = "turn") -> None:
    for index, message in enumerate(turns):
        if message["role"] == "system" and index != 0:
            raise DataFormatError(f"{where}: {label} {index}: a system message must come first")


def _check_conversation(messages: list[dict[str, str]], where: str) -> None:
    if not any(m["role"] == "assistant" for m in messages):
        raise DataFormatError(f"{where}: conversation has no assistant turn")
    for index, message in enumerate(messages):
        if message["role"] == "assistant" and not message["content"].strip():
            raise DataFormatError(f"{where}: turn {index} is an empty assistant response")
        if message["role"] == "system" and index != 0:
            raise DataFormatError(f"{where}: turn {index}: a system message must come first")
