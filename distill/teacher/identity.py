"""What makes a cache reusable: fingerprints of models and tokenizers, and the shared-vocabulary check."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from transformers import PreTrainedTokenizerBase

_PEEK_BYTES = 1 << 20  # hashing whole multi-GB weight files would dominate a re-run's start-up


class VocabularyMismatchError(ValueError):
    """Teacher and student do not map tokens to the same ids."""


def model_identity(name_or_path: str | None, config: dict | None = None) -> dict[str, str]:
    """A hub revision or a hash of the local files (names, sizes, config and the first MiB of each)."""
    if name_or_path is None:
        blob = json.dumps(config or {}, sort_keys=True).encode()
        return {"model": "config", "weights_sha": hashlib.sha256(blob).hexdigest()[:16]}
    path = Path(name_or_path)
    if not path.is_dir():
        return {"model": name_or_path, "revision": _hub_revision(name_or_path)}
    digest = hashlib.sha256()
    for file in sorted(p for p in path.iterdir() if p.is_file()):
        if file.suffix in (".safetensors", ".bin", ".json") and file.name != "distill_config.yaml":
            digest.update(f"{file.name}:{file.stat().st_size}".encode())
            with file.open("rb") as handle:
                digest.update(handle.read(_PEEK_BYTES))
    return {"model": str(path.resolve()), "weights_sha": digest.hexdigest()[:16]}


def _hub_revision(name: str) -> str:
    try:
        from huggingface_hub import model_info

        return model_info(name).sha or "unknown"
    except Exception:  # offline: the cached snapshot's commit hash, if any
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(name, local_files_only=True)).name
        except Exception:
            return "unknown"


def tokenizer_hash(tokenizer: PreTrainedTokenizerBase) -> str:
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    special = {
        name: getattr(tokenizer, name) for name in ("bos_token", "eos_token", "pad_token", "unk_token")
    }
    blob = json.dumps([vocab, special], ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def check_same_vocabulary(
    student: PreTrainedTokenizerBase, teacher: PreTrainedTokenizerBase, teacher_name: str = "teacher"
) -> None:
    """Fail unless both tokenizers map every token to the same id and agree on special tokens.

    Compares vocabularies, not embedding sizes: a padded lm_head (e.g. 152,064 rows over 151,936
    tokens) is the same family.
    """
    ours, theirs = student.get_vocab(), teacher.get_vocab()
    differing = sorted(
        (token for token in set(ours) | set(theirs) if ours.get(token) != theirs.get(token)),
        key=lambda token: min(ours.get(token, 1 << 30), theirs.get(token, 1 << 30)),
    )
    if differing:
        shown = ", ".join(
            f"{t!r}: student {ours.get(t)} vs {teacher_name} {theirs.get(t)}" for t in differing[:5]
        )
        raise VocabularyMismatchError(
            f"{teacher_name} and the student do not share a vocabulary ({len(differing)} tokens differ; "
            f"first: {shown}). Distillation over token ids needs the same tokenizer family."
        )
    for name in ("bos_token", "eos_token", "unk_token"):
        if getattr(student, name) != getattr(teacher, name):
            raise VocabularyMismatchError(
                f"{teacher_name}'s {name} is {getattr(teacher, name)!r} but the student's is "
                f"{getattr(student, name)!r}"
            )
