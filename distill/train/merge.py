"""Folding a LoRA adapter into its base model, and loading an adapter on its base (``generate`` samples
from one). The ``merge`` command (``distill.commands.merge``) documents the rules."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import yaml
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedModel,
)

from distill.train.model import load_causal_lm


def load_adapter(
    adapter_dir: str | Path,
    base: str | None = None,
    model_kwargs: dict | None = None,
    dtype: str | None = None,
) -> torch.nn.Module:
    """The peft model of ``adapter_dir`` on its base (default: the adapter's ``base_model_name_or_path``),
    loaded as training loaded it (with the adapter's tokenizer and ``model_kwargs``, default those of its
    training), so added tokens get their embedding rows before the adapter's trained ones are put in.
    ``dtype``: the base's and the adapter's weights (unset or ``auto``: each as saved)."""
    from peft import PeftConfig, PeftModel

    adapter_dir = Path(adapter_dir)
    config = PeftConfig.from_pretrained(adapter_dir)
    base = base or config.base_model_name_or_path
    options = trained_model_kwargs(adapter_dir) if model_kwargs is None else model_kwargs
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source(adapter_dir, base))
    torch_dtype = getattr(torch, dtype) if dtype and dtype != "auto" else None
    if config.task_type == "SEQ_CLS":  # a reward model's adapter: its head is in the adapter
        model = AutoModelForSequenceClassification.from_pretrained(
            base, num_labels=1, pad_token_id=tokenizer.pad_token_id, dtype=torch_dtype, **options
        )
        if model.get_input_embeddings().num_embeddings < len(tokenizer):  # rows for added tokens
            model.resize_token_embeddings(len(tokenizer))
    else:
        model = load_causal_lm(base, None, tokenizer, dtype, options=options)
    peft_model = PeftModel.from_pretrained(model, adapter_dir)
    # peft loads the adapter's weights as saved (upcasting half ones to float32)
    return peft_model if torch_dtype is None else peft_model.to(torch_dtype)


def merge_adapter(
    adapter_dir: str | Path, output_dir: str | Path, base: str | None = None, model_kwargs: dict | None = None
) -> PreTrainedModel:
    """Merge ``adapter_dir`` into its base, keeping the tokenizer, chat template and generation config.
    A tied embedding whose two sides the adapter trained apart is untied, so neither is lost on save."""
    from peft import PeftConfig

    adapter_dir, output_dir = Path(adapter_dir), Path(output_dir)
    base = base or PeftConfig.from_pretrained(adapter_dir).base_model_name_or_path
    options = trained_model_kwargs(adapter_dir) if model_kwargs is None else model_kwargs
    check_unquantized(base, options)
    merged = load_adapter(adapter_dir, base, options).merge_and_unload()
    inputs, outputs = merged.get_input_embeddings(), merged.get_output_embeddings()
    tied = merged.config.tie_word_embeddings and outputs is not None  # a reward model has no LM head
    if tied and not torch.equal(inputs.weight, outputs.weight):
        merged.config.tie_word_embeddings = False
    merged.save_pretrained(output_dir)
    AutoTokenizer.from_pretrained(tokenizer_source(adapter_dir, base)).save_pretrained(output_dir)
    for extra in ("chat_template.jinja", "distill_config.yaml"):
        if (adapter_dir / extra).exists():
            (output_dir / extra).write_text((adapter_dir / extra).read_text())
    for source_dir in (adapter_dir, Path(base)):
        if (source_dir / "generation_config.json").exists():
            GenerationConfig.from_pretrained(source_dir).save_pretrained(output_dir)
            break
    return merged


class QuantizedBase(ValueError):
    """The base an adapter would be merged into is saved quantized."""


def check_unquantized(base: str, model_kwargs: dict | None = None) -> None:
    """Refuse a base whose config holds a ``quantization_config`` (a checkpoint saved quantized)."""
    config_options = {k: v for k, v in (model_kwargs or {}).items() if k in ("revision", "trust_remote_code")}
    quantization = getattr(AutoConfig.from_pretrained(base, **config_options), "quantization_config", None)
    if quantization is None:
        return
    method = quantization.get("quant_method") if isinstance(quantization, dict) else quantization
    raise QuantizedBase(
        f"the base {base} is saved quantized ({method} quantization_config in its config.json): merged into "
        "quantized weights, the adapter's update would be rounded away; pass --base with the unquantized "
        "model (the one it was quantized from)"
    )


MERGE_OPT_IN = """--model_kwargs '{"trust_remote_code": true}'"""


def trained_model_kwargs(adapter_dir: Path, opt_in: str = MERGE_OPT_IN) -> dict:
    """The ``model.model_kwargs`` of the fit that trained ``adapter_dir``, less ``trust_remote_code``: a
    folder's saved config never runs a model's code, only the user's own option (``opt_in``) does."""
    path = Path(adapter_dir) / "distill_config.yaml"
    if not path.exists():
        return {}
    model = (yaml.safe_load(path.read_text()) or {}).get("model") or {}
    options = dict((model.get("init_args") or model).get("model_kwargs") or {})
    if options.pop("trust_remote_code", False):
        print(
            f"[distill] {path} asks for trust_remote_code: true; not applied, since a saved config never "
            f"runs a model's own code. If you trust the base model's code, pass {opt_in}",
            file=sys.stderr,
        )
    return options


def tokenizer_source(adapter_dir: Path, base: str) -> str | Path:
    """distill saves the tokenizer it trained with beside the adapter; otherwise the base's."""
    return adapter_dir if (adapter_dir / "tokenizer_config.json").exists() else base
