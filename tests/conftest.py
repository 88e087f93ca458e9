"""Shared fixtures: the bundled tokenizer, a chat-marker variant of it, tiny model configs, data files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

# no hub lookups (they retry for ~48 s offline) and no W&B network
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER_DIR = Path(os.environ.get("DISTILL_TEST_TOKENIZER", ROOT / "distill" / "assets" / "tokenizer"))
CHAT_MARKERS = ["<|im_start|>", "<|im_end|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]

TINY_LLAMA = {
    "model_type": "llama",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "tie_word_embeddings": True,
}


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


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def conversation(i: int, turns: int = 1) -> dict:
    messages = [{"role": "system", "content": "You answer briefly."}]
    for t in range(turns):
        messages.append({"role": "user", "content": f"Question {i}.{t}: what is {i} plus {t}?"})
        messages.append({"role": "assistant", "content": f"It is {i + t}, since {i} plus {t} is {i + t}."})
    return {"messages": messages}


@pytest.fixture
def chat_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "chat.jsonl", [conversation(i, turns=1 + i % 3) for i in range(24)])
