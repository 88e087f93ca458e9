"""Build the demo assets that ship inside ``distill/assets`` (tokenizer and a small real corpus).

The generated files are committed, so nothing here is needed at run time. To rebuild them you need:

* ``apt-get install -y --no-install-recommends python3.11-doc`` (Debian 12: python3.11-doc 3.11.2-6+deb12u9),
  read from ``/usr/share/doc/python3.11/html/_sources``; PSF License;
* the PyPI package ``mistral-common`` installed (for ``data/tokenizer.model.v1``); Apache-2.0;
* the PyPI wheel ``chatterbot-corpus==1.3.3`` (downloaded with pip into a temporary folder unless
  ``--chatterbot-wheel`` is given; it never becomes a dependency); BSD-3-Clause.

Usage::

    python scripts/build_demo_data.py

Everything is deterministic (fixed seed, sorted file lists), so a rebuild from the same sources gives
byte-identical files. Attribution and licenses: ``distill/assets/NOTICE.md``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import random
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "distill" / "assets"
PYTHON_DOCS = Path("/usr/share/doc/python3.11/html/_sources")
PY_RELEASE = "3.11"
CHATTERBOT_REQ = "chatterbot-corpus==1.3.3"

SEED = 1234
VAL_FRACTION = 0.05
TEXT_BUDGET_CHARS = 2_400_000  # total characters of plain text (train + val)
MIN_CHARS, SOFT_CHARS, MAX_CHARS = 200, 800, 2000  # text chunk sizes
MAX_ANSWER_CHARS = 1500
REF_TITLES: dict[str, str] = {}  # reST cross-reference label -> section title, filled by main()
SYSTEM_FRACTION = 0.3  # share of conversations that get a system prompt


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


# Python doc folders used for plain text (faq/ is kept for chat; whatsnew/ and c-api/ are mostly lists).
TEXT_SOURCES = sorted(_words("tutorial howto reference library using extending installing distributing"))
TEXT_SOURCES.append("glossary.rst.txt")

PYTHON_SYSTEM_PROMPTS = (
    "You are a helpful assistant that answers questions about the Python programming language.",
    "You are an expert Python developer. Answer clearly and concisely.",
    "You are a patient teacher who explains Python to programmers.",
)
CHAT_SYSTEM_PROMPTS = (
    "You are a friendly chatbot.",
    "You are a helpful assistant. Keep your replies short.",
    "You are a chatbot having a casual conversation with a user.",
)

Message = dict[str, str]
Conversation = list[Message]

# ---------------------------------------------------------------------------------------------------------
# reStructuredText -> readable text
# ---------------------------------------------------------------------------------------------------------

CODE = "\x00"  # marks literal (code) lines between rst_to_lines and rst_to_blocks
DIRECTIVE_RE = re.compile(r"^(\s*)\.\.\s+([\w:-]+)::\s*(.*)$")
COMMENT_RE = re.compile(r"^(\s*)\.\.(\s|$)")
ADORNMENT_RE = re.compile(r"^([=\-~^\"*+#`'.:_])\1{2,}\s*$")
SIMPLE_TABLE_BORDER_RE = re.compile(r"^\s*=+( +=+)+\s*$")
DROPPED_FIELD_RE = re.compile(r"^:(tocdepth|orphan|nosearch|mod|Release|Date):")
LIST_ITEM_RE = re.compile(r"^(\*|-|\+|#\.|\d+\.|\(?[a-z0-9]\)|>>>|\.\.\.|\|)\s")

DROP_DIRECTIVES = _words(
    """index module currentmodule moduleauthor sectionauthor highlight toctree include literalinclude
    tabularcolumns contents only image figure testsetup testcleanup audit-event productionlist raw list-table
    table csv-table limited-api-list miscnews program c:namespace c:namespace-push c:namespace-pop
    default-role role"""
)
CODE_DIRECTIVES = {"code-block", "sourcecode", "code", "doctest", "testcode", "testoutput", "parsed-literal"}
LABELS = {
    "note": "Note:",
    "warning": "Warning:",
    "seealso": "See also:",
    "important": "Important:",
    "caution": "Caution:",
    "tip": "Tip:",
    "hint": "Hint:",
    "attention": "Attention:",
    "danger": "Danger:",
    "impl-detail": "CPython implementation detail:",
    "availability": "Availability:",
}
VERSION_LABELS = {
    "versionadded": "New in version {}.",
    "versionchanged": "Changed in version {}:",
    "deprecated": "Deprecated since version {}:",
}
DESCRIPTION_DIRECTIVES = _words(
    """function method class attribute data exception decorator decoratormethod classmethod staticmethod
    abstractmethod coroutinefunction coroutinemethod awaitablefunction awaitablemethod object describe
    cmdoption option envvar opcode pdbcommand 2to3fixer monitoring-event"""
)
CODE_ROLES = _words(
    """func meth class mod data attr exc const obj envvar option program file samp keyword makevar kbd code
    source opcode token mimetype macro type member var struct expr"""
)


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _dedent(lines: list[str]) -> list[str]:
    width = min((_indent(line) for line in lines if line.strip()), default=0)
    return [line[width:] if line.strip() else "" for line in lines]


def collect_ref_titles(docs: Path) -> dict[str, str]:
    """Map each ``.. _label:`` target that precedes a section heading to that heading's title."""
    titles: dict[str, str] = {}
    for path in sorted(docs.rglob("*.rst.txt")):
        lines = [*path.read_text("utf-8").split("\n"), ""]
        labels: list[str] = []
        for i, line in enumerate(lines[:-1]):
            if target := re.match(r"^\.\. _([^:`]+):\s*$", line):
                labels.append(target.group(1).lower())
            elif line.strip() and labels:
                title = lines[i + 1] if ADORNMENT_RE.match(line) else line
                if ADORNMENT_RE.match(lines[i + 1]) or ADORNMENT_RE.match(line):
                    titles.update(dict.fromkeys(labels, title.strip()))
                labels = []
    return titles


def _role(match: re.Match[str]) -> str:
    role, text = match.group(1).split(":")[-1], match.group(2)
    explicit = re.fullmatch(r"(.*?)\s*<([^<>]+)>", text, flags=re.S)
    if explicit and explicit.group(1):
        text = explicit.group(1)
    elif explicit:
        text = explicit.group(2)
    elif role == "ref" and text.lower() in REF_TITLES:  # Sphinx shows the title of the referenced section
        text = clean_inline(REF_TITLES[text.lower()])
    elif role in {"ref", "doc"}:
        text = re.sub(r"[-_]+", " ", text.split("/")[-1]).strip()
    if text.startswith("~"):
        text = text[1:].split(".")[-1]
    text = text.lstrip("!")
    if role == "pep":
        return f"PEP {text}"
    if role == "rfc":
        return f"RFC {text}"
    if role in {"func", "meth"} and not text.endswith(")"):
        text += "()"
    return f"`{text}`" if role in CODE_ROLES else text


def clean_inline(text: str) -> str:
    """Strip inline reST markup: roles, links, literals, footnote references, substitutions."""
    text = re.sub(r"(?<![:`\w])`([^`<]+?)\s*<[^`>]+>`__?(?!\w)", r"\1", text)  # `text <url>`_
    text = re.sub(r"(?<![:`\w])`(?!\s)([^`]+?)`__?(?!\w)", r"\1", text)  # `reference`_
    text = re.sub(r":([\w:+-]+):`([^`]+)`", _role, text)
    text = re.sub(r"``(.+?)``", r"`\1`", text, flags=re.S)
    text = re.sub(r"\s?\[(#\w*|\d+)\]_", "", text)
    text = text.replace("|release|", PY_RELEASE).replace("|version|", PY_RELEASE)
    return text.replace("\\ ", "").replace("\\*", "*").replace("\\_", "_")


def _directive_block(lines: list[str], start: int) -> tuple[list[str], int]:
    """Lines belonging to the directive (or comment) at ``start``: blank or indented deeper."""
    indent, end = _indent(lines[start]), start + 1
    while end < len(lines) and (not lines[end].strip() or _indent(lines[end]) > indent):
        end += 1
    while end > start + 1 and not lines[end - 1].strip():
        end -= 1
    return _dedent(lines[start + 1 : end]), end


def _split_head(body: list[str]) -> tuple[list[str], list[str]]:
    """Split a directive body into its head (arguments and options, up to a blank line) and content."""
    if not body or not body[0].strip():
        return [], body
    blank = next((i for i, line in enumerate(body) if not line.strip()), len(body))
    return body[:blank], body[blank:]


def _render_directive(
    name: str, argument: str, body: list[str], styles: dict[tuple[str, bool], int]
) -> list[str]:
    if name in DROP_DIRECTIVES:
        return []
    if name in CODE_DIRECTIVES:
        head, content = _split_head(body)
        code = [line for line in head if not line.lstrip().startswith(":")] + content
        return [""] + [CODE + "    " + line if line else "" for line in _dedent(code)] + [""]
    if name in DESCRIPTION_DIRECTIVES or name.startswith("c:"):
        head, content = _split_head(body)
        signatures: list[str] = []
        for line in [argument] + [line.strip() for line in head if not line.lstrip().startswith(":")]:
            if signatures and signatures[-1].endswith("\\"):  # a signature continued on the next line
                signatures[-1] = signatures[-1][:-1].rstrip() + " " + line
            else:
                signatures.append(line)
        lines = [""]
        for sig in filter(None, signatures):
            lines += [f"`{sig}`", ""]
        return lines + rst_to_lines(content, styles) + [""]
    content = [line for line in body if not re.match(r"^:[\w-]+:( |$)", line)]
    if name in VERSION_LABELS or name == "deprecated-removed":
        version, _, rest = argument.partition(" ")
        if name == "deprecated-removed":
            removed, _, rest = rest.partition(" ")
            label = f"Deprecated since version {version}, will be removed in version {removed}:"
        else:
            label = VERSION_LABELS[name].format(version)
        content = ([rest] if rest else []) + content
    elif name in LABELS:
        label = LABELS[name]
        content = ([argument] if argument else []) + content
    else:  # topic, sidebar, rubric, glossary, epigraph, ...: keep the title and the content
        label = ""
        content = ([argument, ""] if argument else []) + content
    text = rst_to_lines(content, styles)
    while text and not text[0].strip():
        text.pop(0)
    if label and text and text[0][:1] not in ("", " ", CODE) and not LIST_ITEM_RE.match(text[0]):
        text[0] = f"{label} {text[0]}"
    elif label:
        text.insert(0, label)
    return ["", *text, ""]


def _heading_level(styles: dict[tuple[str, bool], int], char: str, overline: bool) -> int:
    return styles.setdefault((char, overline), len(styles) + 1)


def rst_to_lines(lines: list[str], styles: dict[tuple[str, bool], int]) -> list[str]:
    """Convert reST lines to readable lines (headings become Markdown ``#`` lines, code stays indented)."""
    out: list[str] = []
    literal_indent: int | None = None  # indentation of the paragraph that opened a ``::`` literal block
    i = 0
    while i < len(lines):
        line = lines[i].rstrip()
        nxt = lines[i + 1].rstrip() if i + 1 < len(lines) else ""
        if literal_indent is not None:
            if not line.strip() or _indent(line) > literal_indent:
                out.append(CODE + line if line.strip() else "")
                i += 1
                continue
            literal_indent = None
        if not line.strip():
            out.append("")
            i += 1
        elif directive := DIRECTIVE_RE.match(line):
            body, i = _directive_block(lines, i)
            name, argument = directive.group(2), clean_inline(directive.group(3).strip())
            out.extend(_render_directive(name, argument, body, styles))
        elif COMMENT_RE.match(line):  # comments, targets (.. _x:), footnotes, substitution definitions
            _, i = _directive_block(lines, i)
        elif (
            ADORNMENT_RE.match(line) and i + 2 < len(lines) and lines[i + 2].rstrip() == line and nxt.strip()
        ):
            level = _heading_level(styles, line[0], True)
            out.extend(["", f"{'#' * level} {nxt.strip()}", ""])
            i += 3
        elif (
            ADORNMENT_RE.match(nxt)
            and _indent(line) == 0
            and len(nxt) >= len(line.strip())
            and not ADORNMENT_RE.match(line)
        ):
            level = _heading_level(styles, nxt[0], False)
            out.extend(["", f"{'#' * level} {line.strip()}", ""])
            i += 2
        elif line.lstrip().startswith(("+-", "+=")):  # grid table: drop it whole
            while i < len(lines) and lines[i].strip():
                i += 1
        elif ADORNMENT_RE.match(line) or SIMPLE_TABLE_BORDER_RE.match(line) or DROPPED_FIELD_RE.match(line):
            i += 1
        else:
            text = line
            if text.endswith("::"):
                literal_indent = _indent(line)
                text = text[:-2]  # "text::" -> "text:", "text ::" -> "text", "::" -> ""
                text = text.rstrip() if not text.strip() or text.endswith(" ") else text + ":"
            out.append(re.sub(r"^:(\w[\w ]*):\s", r"\1: ", text))
            i += 1
    return out


def _is_heading(block: str) -> bool:
    return bool(re.match(r"^#{1,6} ", block)) and "\n" not in block


def _unwrap(block: str) -> str:
    """Join the hard-wrapped lines of a plain paragraph; lists, code, and indented blocks stay as they are."""
    lines = block.split("\n")
    if (
        _is_heading(block)
        or any(_indent(line) for line in lines)
        or any(LIST_ITEM_RE.match(x) for x in lines)
    ):
        return block
    return " ".join(line.strip() for line in lines)


def _finish_block(block: str) -> str:
    """Clean inline markup in the prose lines of a block and unwrap them; code lines pass through."""
    parts: list[str] = []
    for is_code, group in itertools.groupby(block.split("\n"), key=lambda line: line.startswith(CODE)):
        lines = list(group)
        parts.append("\n".join(x[1:] for x in lines) if is_code else _unwrap(clean_inline("\n".join(lines))))
    return "\n".join(parts)


def rst_to_blocks(text: str) -> list[str]:
    """reST source -> list of paragraphs (blocks separated by blank lines)."""
    lines = rst_to_lines(text.expandtabs(8).split("\n"), {})
    joined = re.sub(r"\n{3,}", "\n\n", "\n".join(line.rstrip() for line in lines)).strip("\n")
    blocks = [_finish_block(block) for block in joined.split("\n\n") if block.strip()]
    return [block for block in blocks if block.strip(" :")]


# ---------------------------------------------------------------------------------------------------------
# Plain-text corpus
# ---------------------------------------------------------------------------------------------------------


def _split_long(block: str, limit: int) -> Iterator[str]:
    piece = ""
    for line in block.split("\n"):
        while len(line) > limit:  # a single very long line: cut at a sentence end or a space
            cut = max(line.rfind(". ", 0, limit) + 1, line.rfind(" ", 0, limit), limit // 2)
            yield line[:cut].rstrip()
            line = line[cut:].lstrip()
        if piece and len(piece) + 1 + len(line) > limit:
            yield piece
            piece = ""
        piece = f"{piece}\n{line}" if piece else line
    if piece.strip():
        yield piece


def chunk_blocks(blocks: Iterable[str]) -> Iterator[str]:
    """Pack consecutive paragraphs into documents of MIN_CHARS..MAX_CHARS, preferring section starts."""
    current: list[str] = []
    size = 0
    for block in blocks:
        pieces = [block] if len(block) <= MAX_CHARS else list(_split_long(block, MAX_CHARS))
        for piece in pieces:
            if current and (size + 2 + len(piece) > MAX_CHARS or (_is_heading(piece) and size >= SOFT_CHARS)):
                yield "\n\n".join(current)
                current, size = [], 0
            current.append(piece)
            size += len(piece) + (2 if size else 0)
    if current:
        yield "\n\n".join(current)


def _good_chunk(chunk: str) -> bool:
    prose = [b for b in chunk.split("\n\n") if not _is_heading(b) and not b.startswith(" ")]
    return len(chunk) >= MIN_CHARS and sum(map(len, prose)) >= MIN_CHARS // 2


def build_text(docs: Path, rng: random.Random) -> list[str]:
    chunks: list[str] = []
    for source in TEXT_SOURCES:
        root = docs / source
        files = [root] if root.is_file() else sorted(root.rglob("*.rst.txt"))
        for path in files:
            chunks.extend(c for c in chunk_blocks(rst_to_blocks(path.read_text("utf-8"))) if _good_chunk(c))
    rng.shuffle(chunks)
    selected, total = [], 0
    for chunk in chunks:
        if total >= TEXT_BUDGET_CHARS:
            break
        selected.append(chunk)
        total += len(chunk)
    return selected


# ---------------------------------------------------------------------------------------------------------
# Chat corpus
# ---------------------------------------------------------------------------------------------------------


@dataclass
class QA:
    question: str
    answer: str
    group: str  # questions in the same group may be chained into one multi-turn conversation


def truncate_answer(blocks: list[str], limit: int = MAX_ANSWER_CHARS) -> str:
    """Keep whole paragraphs up to ``limit`` characters; never end on a paragraph announcing code."""
    kept: list[str] = []
    for block in blocks:
        if kept and len("\n\n".join([*kept, block])) > limit:
            break
        kept.append(block)
    while len(kept) > 1 and kept[-1].rstrip().endswith(":"):
        kept.pop()
    text = "\n\n".join(kept)
    if len(text) > limit:  # a single long first paragraph: cut at a sentence end
        cut = text.rfind(". ", 0, limit)
        text = text[: cut + 1] if cut > 0 else text[:limit].rsplit(" ", 1)[0]
    return text.strip()


def parse_faq(path: Path) -> list[QA]:
    """Split a FAQ page into (section title, section body) pairs; titles are the questions."""
    lines = path.read_text("utf-8").expandtabs(8).split("\n")
    headings = [
        i
        for i in range(len(lines) - 1)
        if lines[i].strip()
        and _indent(lines[i]) == 0
        and not ADORNMENT_RE.match(lines[i])
        and ADORNMENT_RE.match(lines[i + 1])
        and len(lines[i + 1].rstrip()) >= len(lines[i].rstrip())
    ]
    pairs: list[QA] = []
    for n, start in enumerate(headings):
        title, char = lines[start].strip(), lines[start + 1][0]
        overlined = start > 0 and lines[start - 1].rstrip() == lines[start + 1].rstrip()
        if overlined or not (char == "-" or title.endswith("?")):
            continue
        end = headings[n + 1] - 1 if n + 1 < len(headings) else len(lines)
        answer = truncate_answer(rst_to_blocks("\n".join(lines[start + 2 : end])))
        if answer:
            pairs.append(QA(clean_inline(title), answer, path.stem))
    return pairs


def _broken_code(text: str) -> bool:
    """A few corpus answers lost their ``[...]`` literals (``numbers =``, ``{x for x in}``): skip those."""
    code = re.findall(r"```(.*?)(?:```|\Z)", text, flags=re.S)
    return any(re.search(r"(=|#|\bin)\s*$|\bin\}", line) for block in code for line in block.split("\n"))


def load_chatterbot(wheel: Path) -> list[tuple[str, list[str]]]:
    """(topic, turns) for each distinct English conversation of the chatterbot corpus wheel."""
    seen: set[tuple[str, ...]] = set()
    conversations: list[tuple[str, list[str]]] = []
    with zipfile.ZipFile(wheel) as zf:
        names = sorted(n for n in zf.namelist() if re.match(r"chatterbot_corpus/data/english/\w+\.yml$", n))
        for name in names:
            data = yaml.safe_load(zf.read(name).decode("utf-8"))
            for raw in data.get("conversations") or []:
                turns = [str(t).strip() for t in raw]
                if len(turns) % 2:  # a final user turn without a reply
                    turns = turns[:-1]
                if len(turns) < 2 or not all(turns) or tuple(turns) in seen or any(map(_broken_code, turns)):
                    continue
                seen.add(tuple(turns))
                conversations.append((Path(name).stem, turns))
    return conversations


def _pairs_to_messages(pairs: list[tuple[str, str]]) -> Conversation:
    messages: Conversation = []
    for question, answer in pairs:
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return messages


def group_pairs(items: list[QA], rng: random.Random) -> list[Conversation]:
    """Chain consecutive Q/A pairs of the same group into conversations of 1-3 exchanges."""
    conversations: list[Conversation] = []
    i = 0
    while i < len(items):
        size = rng.choices((1, 2, 3), weights=(5, 3, 2))[0]
        group = [items[i]]
        while (
            len(group) < size
            and i + len(group) < len(items)
            and items[i + len(group)].group == items[i].group
            and items[i + len(group)].question not in {qa.question for qa in group}
        ):
            group.append(items[i + len(group)])
        conversations.append(_pairs_to_messages([(qa.question, qa.answer) for qa in group]))
        i += len(group)
    return conversations


def chatterbot_conversations(raw: list[tuple[str, list[str]]], rng: random.Random) -> list[Conversation]:
    multi = [turns for _, turns in raw if len(turns) > 2]
    single = [
        QA(turns[0], truncate_answer(turns[1].split("\n\n")), topic)
        for topic, turns in raw
        if len(turns) == 2
    ]
    by_topic: dict[str, list[QA]] = {}
    for qa in single:
        by_topic.setdefault(qa.group, []).append(qa)
    for items in by_topic.values():
        rng.shuffle(items)
    grouped = group_pairs([qa for topic in sorted(by_topic) for qa in by_topic[topic]], rng)
    native = [_pairs_to_messages([(t[k], t[k + 1]) for k in range(0, len(t), 2)]) for t in multi]
    return grouped + native


def add_system_prompts(
    conversations: list[Conversation], prompts: tuple[str, ...], rng: random.Random
) -> None:
    for messages in conversations:
        if rng.random() < SYSTEM_FRACTION:
            messages.insert(0, {"role": "system", "content": rng.choice(prompts)})


def split(items: list, rng: random.Random) -> tuple[list, list]:
    """Seeded shuffle, then the first VAL_FRACTION (at least one item) goes to validation."""
    items = list(items)
    rng.shuffle(items)
    n_val = max(1, math.ceil(len(items) * VAL_FRACTION))
    return items[n_val:], items[:n_val]


# ---------------------------------------------------------------------------------------------------------
# Small format examples
# ---------------------------------------------------------------------------------------------------------


def to_sharegpt(messages: Conversation) -> dict:
    names = {"system": "system", "user": "human", "assistant": "gpt"}
    return {"conversations": [{"from": names[m["role"]], "value": m["content"]} for m in messages]}


def to_alpaca(messages: Conversation, use_input: bool) -> dict:
    system = [m["content"] for m in messages if m["role"] == "system"]
    user, assistant = (m["content"] for m in messages if m["role"] != "system")
    item = {"instruction": user, "input": "", "output": assistant}
    if use_input:
        item.update(instruction="Answer the following question about Python.", input=user)
    if system:
        item["system"] = system[0]
    return item


def format_samples(faq: list[Conversation], chat: list[Conversation]) -> tuple[list[dict], list[dict]]:
    """~20 ShareGPT conversations (single and multi-turn) and ~20 Alpaca items, from the train split."""
    multi = [c for c in faq + chat if sum(m["role"] == "user" for m in c) > 1]
    single_faq = [c for c in faq if sum(m["role"] == "user" for m in c) == 1]
    single_chat = [c for c in chat if sum(m["role"] == "user" for m in c) == 1]
    sharegpt = [to_sharegpt(c) for c in multi[:8] + single_faq[:6] + single_chat[:6]]
    alpaca = [to_alpaca(c, use_input=i % 2 == 1) for i, c in enumerate(single_faq[6:16])]
    alpaca += [to_alpaca(c, use_input=False) for c in single_chat[6:16]]
    return sharegpt, alpaca


# ---------------------------------------------------------------------------------------------------------
# Tokenizer, I/O, summary
# ---------------------------------------------------------------------------------------------------------

TOKENIZER_CONFIG = {
    "tokenizer_class": "LlamaTokenizer",
    "bos_token": "<s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
    "pad_token": "<unk>",
    "add_bos_token": True,
    "add_eos_token": False,
    "model_max_length": 32768,
    "padding_side": "right",
    "clean_up_tokenization_spaces": False,
}


def build_tokenizer(out: Path) -> None:
    import mistral_common

    source = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, out / "tokenizer.model")
    (out / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2) + "\n", "utf-8")


def fetch_chatterbot_wheel(tmp: Path) -> Path:
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--quiet",
        "--no-deps",
        "--only-binary",
        ":all:",
        "--dest",
        str(tmp),
        CHATTERBOT_REQ,
    ]
    subprocess.run(cmd, check=True)
    return next(tmp.glob("chatterbot_corpus-*.whl"))


def write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def write_json(path: Path, rows: list[dict]) -> None:
    path.write_text(json.dumps(rows, ensure_ascii=False, indent=2) + "\n", "utf-8", newline="\n")


def count_tokens(tokenizer, texts: Iterable[str]) -> int:
    return sum(len(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"])


def summarize(data_dir: Path, tokenizer_dir: Path, written: dict[str, int]) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    print(f"{'file':<24}{'samples':>9}{'bytes':>11}")
    for name, count in written.items():
        print(f"{name:<24}{count:>9}{(data_dir / name).stat().st_size:>11,}")
    for name in ("text_train.jsonl", "chat_train.jsonl"):
        rows = [json.loads(line) for line in (data_dir / name).read_text("utf-8").splitlines()]
        texts = (
            [r["text"] for r in rows]
            if "text" in rows[0]
            else [m["content"] for r in rows for m in r["messages"]]
        )
        tokens = count_tokens(tokenizer, texts)
        print(f"tokens in {name} (message/text content only, no special tokens or template): {tokens:,}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python-docs", type=Path, default=PYTHON_DOCS, help="Python docs _sources folder")
    parser.add_argument(
        "--chatterbot-wheel", type=Path, help="chatterbot_corpus wheel (default: pip download)"
    )
    parser.add_argument("--out", type=Path, default=ASSETS, help="assets folder to write into")
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args()
    if not args.python_docs.is_dir():
        sys.exit(f"{args.python_docs} not found: apt-get install -y --no-install-recommends python3.11-doc")

    build_tokenizer(args.out / "tokenizer")
    REF_TITLES.update(collect_ref_titles(args.python_docs))
    data_dir = args.out / "data"
    data_dir.mkdir(parents=True, exist_ok=True)

    text_train, text_val = split(
        build_text(args.python_docs, random.Random(args.seed)), random.Random(args.seed + 1)
    )

    rng = random.Random(args.seed + 2)
    faq_pairs = [
        qa for path in sorted((args.python_docs / "faq").glob("*.rst.txt")) for qa in parse_faq(path)
    ]
    faq = group_pairs(faq_pairs, rng)
    add_system_prompts(faq, PYTHON_SYSTEM_PROMPTS, rng)
    with tempfile.TemporaryDirectory() as tmp:
        wheel = args.chatterbot_wheel or fetch_chatterbot_wheel(Path(tmp))
        chat = chatterbot_conversations(load_chatterbot(wheel), rng)
    add_system_prompts(chat, CHAT_SYSTEM_PROMPTS, rng)
    faq_train, faq_val = split(faq, rng)
    chat_train, chat_val = split(chat, rng)
    sharegpt, alpaca = format_samples(faq_train, chat_train)
    chat_train, chat_val = chat_train + faq_train, chat_val + faq_val
    rng.shuffle(chat_train)
    rng.shuffle(chat_val)

    outputs: dict[str, list[dict]] = {
        "text_train.jsonl": [{"text": t} for t in text_train],
        "text_val.jsonl": [{"text": t} for t in text_val],
        "chat_train.jsonl": [{"messages": m} for m in chat_train],
        "chat_val.jsonl": [{"messages": m} for m in chat_val],
        "sharegpt_sample.jsonl": sharegpt,
        "alpaca_sample.json": alpaca,
    }
    for name, rows in outputs.items():
        (write_json if name.endswith(".json") else write_jsonl)(data_dir / name, rows)
    print(
        f"FAQ pairs: {len(faq_pairs)}, FAQ conversations: {len(faq)}, chatterbot conversations: {len(chat)}"
    )
    summarize(data_dir, args.out / "tokenizer", {name: len(rows) for name, rows in outputs.items()})


if __name__ == "__main__":
    main()
