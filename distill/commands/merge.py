"""``python -m distill merge``: fold a LoRA adapter into its base model and save a plain HF model (a
causal LM, or a sequence classifier for a reward model's adapter).

A QLoRA adapter (trained on a base quantized at load time, ``model.quantization``) merges into its base
loaded unquantized, in the base's own dtype, as MedicalGPT's merge does: folded into 4- or 8-bit weights,
the adapter's small update would be rounded away. A base saved quantized is refused.

The base loads with the ``from_pretrained`` arguments the adapter was trained with (``model.model_kwargs``
in the ``distill_config.yaml`` saved beside it: ``revision``, ``attn_implementation``), or ``--model_kwargs``.
That saved config never turns on ``trust_remote_code``: an adapter folder may come from anyone, and the
option runs the base's own Python code. Only ``--model_kwargs '{"trust_remote_code": true}'`` does.
"""

from __future__ import annotations

import argparse
import json

from distill.train.merge import QuantizedBase, merge_adapter


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m distill merge", description=__doc__)
    parser.add_argument("--adapter", required=True, help="directory of the LoRA adapter (distill's export)")
    parser.add_argument("--output", required=True, help="directory for the merged model")
    parser.add_argument("--base", default=None, help="base model name or path (default: from the adapter)")
    parser.add_argument(
        "--model_kwargs", type=json.loads, default=None,
        help="the base's from_pretrained arguments as JSON (default: the fit's model.model_kwargs, less "
        "trust_remote_code, which only this option turns on)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    try:
        merge_adapter(args.adapter, args.output, args.base, args.model_kwargs)
    except QuantizedBase as error:
        parser.error(str(error))  # exit 2, the message alone
    print(f"merged {args.adapter} into {args.output}")
