"""Shared fixtures: the bundled tokenizer, a chat-marker variant of it, tiny saved teachers, data files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers import CHAT_MARKERS, TOKENIZER_DIR, conversation, save_tiny_teacher, write_jsonl

# no hub lookups (they retry for ~48 s offline) and no W&B network
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def tokenized_cache(tmp_path_factory) -> Path:
    """One tokenized-data cache for the session (subprocesses inherit it), never the user's own."""
    path = tmp_path_factory.mktemp("tokenized")
    os.environ["DISTILL_DATA_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)


@pytest.fixture(scope="session")
def chat_tokenizer_dir(tmp_path_factory) -> Path:
    """The bundled tokenizer plus chatml/llama3 markers as special tokens, saved to disk."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    tok.add_special_tokens({"additional_special_tokens": CHAT_MARKERS})
    path = tmp_path_factory.mktemp("chat_tokenizer")
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def chat_tokenizer(chat_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(chat_tokenizer_dir)


@pytest.fixture
def chat_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "chat.jsonl", [conversation(i, turns=1 + i % 3) for i in range(24)])


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory) -> Path:
    """A tiny saved teacher (the student's width) with the bundled tokenizer."""
    return save_tiny_teacher(tmp_path_factory.mktemp("teacher"))


@pytest.fixture(scope="session")
def kd_teacher_dir(tmp_path_factory) -> Path:
    """A tiny saved teacher wider than the student, for distillation runs."""
    return save_tiny_teacher(tmp_path_factory.mktemp("kd_teacher"), hidden_size=48)
