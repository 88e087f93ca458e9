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


def check_gguf_file(name_or_path: str, owner: str = "") -> None:
    """A name ending in ``.gguf`` is a local file, never a hub name: refuse one that is not there, or
    that cannot be read without the ``gguf`` package (``owner``: who gave it, named first). ValueErrors,
    not an ImportError: the CLI prints a ValueError as the one-line config error it is."""
    if not is_gguf(name_or_path):
        return
    path = Path(name_or_path).expanduser()
    given = f"{owner} {name_or_path}" if owner else name_or_path
    if not path.is_file():
        state = "is a directory" if path.is_dir() else "does not exist"
        raise ValueError(
            f"{given}: no such GGUF file ({path.resolve()} {state}); a name ending in .gguf is read as a "
            "llama.cpp model file: give the path of an existing one"
        )
    if find_spec("gguf") is None:
        raise ValueError(
            f"{given}: reading a GGUF file needs the gguf package: pip install 'distill[gguf]' (or pip "
            "install gguf), or give the model's Hugging Face directory"
        )


def pretrained_source(name_or_path: str) -> tuple[str, dict[str, str]]:
    """``from_pretrained``'s first argument and the options that go with it (``gguf_file``)."""
    if not is_gguf(name_or_path):
        return name_or_path, {}
    check_gguf_file(name_or_path)
    path = Path(name_or_path).expanduser()
    return str(path.parent), {"gguf_file": path.name}


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    source, options = pretrained_source(name_or_path)
    return AutoTokenizer.from_pretrained(source, **options)
