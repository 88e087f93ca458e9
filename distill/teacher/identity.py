"""What makes a cache reusable: fingerprints of models and tokenizers, and the checks that a teacher
shares the student's vocabulary and has a row for every token."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

from lightning.pytorch.utilities import rank_zero_info
from transformers import PreTrainedTokenizerBase

from distill.pretrained import check_gguf_file, is_gguf, load_tokenizer, pretrained_source

_HASHED = (".safetensors", ".bin", ".json")
_MEMO_FILE = ".distill_hash.json"
# a file changed within this long of its hashing may change again under the same mtime (coarse
# file-system clocks): its digest is not trusted from the memo, as git treats "racily clean" entries
_RACY_NS = 2_000_000_000
_ANNOUNCE_BYTES = 1 << 30  # hashing more takes seconds: say why the start is slow


class VocabularyMismatchError(ValueError):
    """Teacher and student do not map tokens to the same ids."""


def model_identity(name_or_path: str | None, config: dict | None = None) -> dict[str, str]:
    """A hub revision, or a SHA-256 over the names and full contents of a local model's weight and
    config files (independent of where the directory is)."""
    if name_or_path is None:
        blob = json.dumps(config or {}, sort_keys=True).encode()
        return {"model": "config", "weights_sha": hashlib.sha256(blob).hexdigest()[:16]}
    path = Path(name_or_path)
    if is_gguf(name_or_path) and path.is_file():  # weights, config and tokenizer in one file
        return {"weights_sha": _file_digest(path)[:16]}
    if not path.is_dir():
        return {"model": name_or_path, "revision": _hub_revision(name_or_path)}
    return {"weights_sha": weights_digest(path)[:16]}


def check_model_source(
    owner: str, name_or_path: str, config_file: str | None = "config.json", what: str = "model"
) -> None:
    """A local directory must hold a ``what`` (its ``config_file``; None: anything), a ``.gguf`` file must
    be there and readable (it holds a model's config, weights and tokenizer), and a name that can only be
    a local path (refused by the hub's repo id rule: absolute, ``./``, ``../``, ``~``; or ``dir/name``
    with ``dir`` a local directory) must exist: transformers would send it to the hub, which answers
    with something unrelated. Any other name is left to the hub (offline, to its cache)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    check_gguf_file(name_or_path, owner)
    path = Path(name_or_path).expanduser()
    if is_gguf(name_or_path) and what == "model":
        return
    if path.is_dir() or is_gguf(name_or_path):
        if config_file is not None and not (path / config_file).is_file():
            raise ValueError(
                f"{owner} {name_or_path}: the directory holds no {what} (no {config_file}); give the "
                f"directory a fit exported (its HFExport dirpath) or a hub {what} name"
            )
        return
    try:
        validate_repo_id(name_or_path)
        local = Path(name_or_path.split("/")[0]).is_dir() and "/" in name_or_path
    except HFValidationError:
        local = True
    if path.exists() or local:
        state = "is a file" if path.exists() else "does not exist"
        raise ValueError(
            f"{owner} {name_or_path}: no such directory ({path.resolve()} {state}); give a {what}'s "
            f"directory or a hub {what} name ('name' or 'namespace/name')"
        )


def weights_digest(directory: Path) -> str:
    """SHA-256 over the weight and config files of ``directory``. Per-file digests are memoised by
    (size, mtime, ctime, inode) in ``.distill_hash.json`` beside the files (or under the user cache when
    the directory is read-only), so repeated starts read no weights."""
    files = sorted(p for p in directory.iterdir() if p.suffix in _HASHED and not p.name.startswith("."))
    files = [p for p in files if p.is_file()]
    memo_path = _memo_path(directory)
    memo = _read_memo(memo_path)
    stamps = {file.name: _stamp(file) for file in files}
    todo = {file.name for file in files if not _settled(memo.get(file.name), stamps[file.name])}
    size = sum(stamps[name]["size"] for name in todo)
    if size > _ANNOUNCE_BYTES:
        rank_zero_info(
            f"[distill] hashing {size / 1e9:.1f} GB of {directory} to identify its weights (once: the "
            f"digests are kept in {memo_path})"
        )
    fresh: dict[str, dict] = {}
    digest = hashlib.sha256()
    for file in files:
        entry = memo.get(file.name)
        if file.name in todo:
            stamp = stamps[file.name]
            settled = max(stamp["mtime_ns"], stamp["ctime_ns"]) < time.time_ns() - _RACY_NS
            entry = {"stamp": stamp, "sha256": _file_digest(file), "trusted": settled}
        fresh[file.name] = entry
        digest.update(f"{file.name}:{entry['sha256']}\n".encode())
    if fresh != memo:
        _write_memo(memo_path, fresh)
    return digest.hexdigest()


def _settled(entry: object, stamp: dict[str, int]) -> bool:
    """Whether a memo entry still holds the file's digest (same stamp, not hashed racily)."""
    ok = isinstance(entry, dict) and entry.get("stamp") == stamp and entry.get("trusted") is True
    return ok and isinstance(entry.get("sha256"), str)


def _file_digest(file: Path) -> str:
    with file.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _stamp(file: Path) -> dict[str, int]:
    st = file.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "inode": st.st_ino}


def _memo_path(directory: Path) -> Path:
    if os.access(directory, os.W_OK):
        return directory / _MEMO_FILE
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "distill" / "weights"
    return root / (hashlib.sha256(str(directory.resolve()).encode()).hexdigest()[:16] + ".json")


def _read_memo(path: Path) -> dict[str, dict]:
    try:
        memo = json.loads(path.read_text())
    except (OSError, ValueError):  # none yet, or unreadable: hash again
        return {}
    return memo if isinstance(memo, dict) else {}


def _write_memo(path: Path, memo: dict[str, dict]) -> None:
    """Atomically, by rename; a memo that cannot be written only costs the next start a re-hash."""
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text(json.dumps(memo, indent=1, sort_keys=True))
        os.replace(partial, path)
    except OSError:
        partial.unlink(missing_ok=True)


def _hub_revision(name: str) -> str:
    from huggingface_hub import model_info, snapshot_download

    try:
        return model_info(name).sha or "unknown"
    except Exception:  # offline: the cached snapshot's commit hash, if any
        try:
            return Path(snapshot_download(name, local_files_only=True)).name
        except Exception:
            return "unknown"


def tokenizer_hash(tokenizer: PreTrainedTokenizerBase) -> str:
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    special = {n: getattr(tokenizer, n) for n in ("bos_token", "eos_token", "pad_token", "unk_token")}
    blob = json.dumps([vocab, special], ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def describe_tokenizer(tokenizer: PreTrainedTokenizerBase) -> str:
    """``tokenizer /path (32,000 tokens)``: how errors name a tokenizer."""
    return f"tokenizer {tokenizer.name_or_path or '<unnamed>'} ({len(tokenizer):,} tokens)"


def check_same_vocabulary(
    student: PreTrainedTokenizerBase, teacher: PreTrainedTokenizerBase, teacher_name: str = "teacher"
) -> None:
    """Fail unless both tokenizers map every token to the same id and agree on special tokens (not the
    embedding sizes: a padded lm_head, e.g. 152,064 rows over 151,936 tokens, is the same family)."""
    ours, theirs = student.get_vocab(), teacher.get_vocab()
    differing = sorted(
        (token for token in set(ours) | set(theirs) if ours.get(token) != theirs.get(token)),
        key=lambda token: min(ours.get(token, 1 << 30), theirs.get(token, 1 << 30)),
    )
    both = f"{teacher_name}'s {describe_tokenizer(teacher)} vs the student's {describe_tokenizer(student)}"
    if differing:
        shown = ", ".join(
            f"{t!r}: student {ours.get(t)} vs {teacher_name} {theirs.get(t)}" for t in differing[:5]
        )
        raise VocabularyMismatchError(
            f"{teacher_name} and the student do not share a vocabulary ({both}; {len(differing)} tokens "
            f"differ; first: {shown}). Distillation over token ids needs the same tokenizer family; for "
            f"a teacher of another family, give it its own tokenizer (teachers: - tokenizer: model, or a "
            "path): KD across tokenizers, docs/cross_tokenizer.md"
        )
    for name in ("bos_token", "eos_token", "unk_token"):
        if getattr(student, name) != getattr(teacher, name):
            raise VocabularyMismatchError(
                f"{teacher_name}'s {name} is {getattr(teacher, name)!r} but the student's is "
                f"{getattr(student, name)!r} ({both})"
            )


def check_embedding_rows(
    rows: int, tokenizer: PreTrainedTokenizerBase, model: str, role: str = "teacher"
) -> None:
    """A teacher or reference needs a trained row for every token id of the tokenizer: resizing it would
    give the missing ids random logits, and every target over them would be meaningless."""
    if rows < len(tokenizer):
        raise ValueError(
            f"{role} {model}: its embedding has {rows:,} rows but the {describe_tokenizer(tokenizer)} "
            f"has ids up to {len(tokenizer) - 1:,}; a {role} is never resized (the new rows would be "
            f"random). Use the tokenizer the {role} was trained with, or a {role} whose vocabulary "
            "covers the student's tokenizer."
        )


def check_teacher_vocabulary(
    tokenizer: PreTrainedTokenizerBase, name_or_path: str | None, config: dict | None, name: str
) -> None:
    """Before any model loads (its config's vocab_size, not its weights): the teacher's tokenizer is the
    student's family, with an embedding row for every token of ``tokenizer``."""
    rows = (config or {}).get("vocab_size")
    if name_or_path is not None:
        from transformers import AutoConfig

        check_same_vocabulary(tokenizer, load_tokenizer(name_or_path), name)
        source, located = pretrained_source(name_or_path)
        rows = getattr(AutoConfig.from_pretrained(source, **located).get_text_config(), "vocab_size", None)
    if rows is not None:
        check_embedding_rows(rows, tokenizer, f"{name} ({name_or_path or 'model_config'})")
