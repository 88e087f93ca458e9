"""Build ``distill/assets/tokenizer_gpt2``: GPT-2's byte-level BPE (50,257 tokens) as a fast tokenizer.

A second real tokenizer family beside the bundled Mistral SentencePiece, for KD across tokenizers
(docs/cross_tokenizer.md). The source is ``whisper/assets/gpt2.tiktoken`` of the PyPI sdist
``openai-whisper==20250625`` (MIT; downloaded with pip into a temporary folder unless ``--tiktoken`` is
given; it never becomes a dependency). transformers' ``TikTokenConverter`` turns its ranks into the BPE
vocabulary and merges; the pre-tokenizer uses GPT-2's own split pattern (the one whisper hands tiktoken),
not the converter's default (cl100k's).

Usage::

    python scripts/build_gpt2_tokenizer.py

Deterministic: a rebuild from the same file gives byte-identical output. Attribution and license:
``distill/assets/NOTICE.md``.
"""

from __future__ import annotations

import argparse
import base64
import json
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from tokenizers import AddedToken
from transformers import PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import TikTokenConverter

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "distill" / "assets" / "tokenizer_gpt2"
WHISPER_REQ = "openai-whisper==20250625"
# GPT-2's split pattern (whisper/tokenizer.py, get_encoding("gpt2"))
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
EOS = "<|endoftext|>"  # id 50256, right after the 50,256 ranks
# Plain role markers; an assistant turn ends with EOS. The generation prompt stops before the space, so a
# response's first word is one BPE token with its leading space (" Hello" -> "ĠHello").
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m.role == 'assistant' %}Assistant: {{ m.content }}{{ eos_token }}\n"
    "{% else %}{{ m.role | capitalize }}: {{ m.content }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
TOKENIZER_CONFIG = {
    "tokenizer_class": "PreTrainedTokenizerFast",
    "bos_token": EOS,
    "eos_token": EOS,
    "unk_token": EOS,
    "pad_token": EOS,
    "add_bos_token": False,
    "add_eos_token": False,
    "model_max_length": 32768,  # a tokenizer limit only: the models trained on it set their own context
    "padding_side": "right",
    "clean_up_tokenization_spaces": False,
    "chat_template": CHAT_TEMPLATE,
}


def load_ranks(path: Path) -> dict[bytes, int]:
    """A ``.tiktoken`` file: one ``base64(token bytes) rank`` per line (what tiktoken's loader reads)."""
    ranks = {}
    for line in path.read_text("ascii").splitlines():
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
    return ranks


class GPT2Converter(TikTokenConverter):
    def __init__(self, path: Path) -> None:
        super().__init__(str(path), pattern=GPT2_PATTERN, extra_special_tokens=[EOS])

    @staticmethod
    def load_tiktoken_bpe(tiktoken_url: str) -> dict[bytes, int]:  # no tiktoken package needed
        return load_ranks(Path(tiktoken_url))


def fetch_tiktoken(tmp: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:"]
    subprocess.run([*cmd, "--dest", str(tmp), WHISPER_REQ], check=True)
    (sdist,) = tmp.glob("openai_whisper-*.tar.gz")
    with tarfile.open(sdist) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith("whisper/assets/gpt2.tiktoken"))
        tar.extract(member, tmp, filter="data")
    return tmp / member.name


def build(tiktoken: Path, out: Path) -> None:
    backend = GPT2Converter(tiktoken).converted()
    backend.add_special_tokens([AddedToken(EOS, normalized=False, special=True)])
    out.mkdir(parents=True, exist_ok=True)
    spec = json.loads(backend.to_str())
    # "a b" merges (byte-level symbols never hold a space) keep the file at 2 MB instead of 2.4
    spec["model"]["merges"] = [f"{a} {b}" for a, b in spec["model"]["merges"]]
    text = json.dumps(spec, ensure_ascii=False, separators=(",", ":"))
    (out / "tokenizer.json").write_text(text, "utf-8")
    (out / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2) + "\n", "utf-8")
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(out))
    assert len(tokenizer) == 50257 and tokenizer.eos_token_id == 50256, (
        len(tokenizer),
        tokenizer.eos_token_id,
    )
    # the canonical GPT-2 ids of a sentence (as tiktoken's "gpt2" encoding gives them)
    assert tokenizer("Hello world, it's 2024!")["input_ids"] == [15496, 995, 11, 340, 338, 48609, 0]
    print(f"{out}: {len(tokenizer)} tokens, {(out / 'tokenizer.json').stat().st_size:,} bytes")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiktoken", type=Path, help="gpt2.tiktoken (default: from the whisper sdist)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    if args.tiktoken is not None:
        build(args.tiktoken, args.out)
        return
    with tempfile.TemporaryDirectory() as tmp:
        build(fetch_tiktoken(Path(tmp)), args.out)


if __name__ == "__main__":
    main()
