"""Where transformers loads a model, config or tokenizer from: a hub name, a directory, or a GGUF file.

A path ending in ``.gguf`` (llama.cpp's single-file format, often quantized) names a model and its
tokenizer at once: transformers reads it from its directory with ``gguf_file``, de-quantizing the
weights (the ``gguf`` package: the ``gguf`` extra)."""

from __future__ import annotations

from importlib.util import find_spec
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase


def is_gguf(name_or_path: str) -> bool:
    return name_or_path.endswith(".gguf")


def pretrained_source(name_or_path: str) -> tuple[str, dict[str, str]]:
    """``from_pretrained``'s first argument and the options that go with it (``gguf_file``)."""
    if not is_gguf(name_or_path):
        return name_or_path, {}
    path = Path(name_or_path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{name_or_path}: no such GGUF file")
    if find_spec("gguf") is None:
        raise ImportError(
            f"{name_or_path}: reading a GGUF file needs the gguf package: pip install 'distill[gguf]' "
            "(or pip install gguf)"
        )
    return str(path.parent), {"gguf_file": path.name}


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    source, options = pretrained_source(name_or_path)
    return AutoTokenizer.from_pretrained(source, **options)
