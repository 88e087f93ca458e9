"""Load or build a Hugging Face causal LM, optionally wrapped in a peft LoRA adapter."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase


@dataclass
class LoraOptions:
    """A peft LoRA adapter on the student."""

    r: int = 16
    """Rank of the update matrices."""
    alpha: int = 32
    """Scaling numerator: updates are scaled by alpha / r."""
    dropout: float = 0.05
    """Dropout on the adapter's input."""
    target_modules: list[str] | str = "all-linear"
    """Module names to adapt, or ``all-linear`` for every linear layer but the output head."""
    modules_to_save: list[str] | None = None
    """Modules trained in full and saved with the adapter (e.g. ``[embed_tokens, lm_head]``)."""
    extra: dict = field(default_factory=dict)
    """Any other ``peft.LoraConfig`` argument (e.g. ``use_rslora: true``)."""


def load_causal_lm(
    name_or_path: str | None,
    config: dict | None,
    tokenizer: PreTrainedTokenizerBase,
    dtype: str | None = None,
) -> PreTrainedModel:
    """From a hub name or local path, or built from a config dict (random init, for tests and demos)."""
    torch_dtype = getattr(torch, dtype) if dtype and dtype != "auto" else dtype
    if name_or_path is not None:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=torch_dtype)
    elif config is not None:
        config = dict(config)
        config.setdefault("vocab_size", len(tokenizer))
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            config.setdefault(key, getattr(tokenizer, key))
        built_dtype = None if torch_dtype == "auto" else torch_dtype  # a fresh model has no stored dtype
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config), dtype=built_dtype)
    else:
        raise ValueError("set model.model (a name or path) or model.model_config (a config dict)")
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        # the tokenizer has tokens the model lacks (e.g. added chat markers): give them rows
        model.resize_token_embeddings(len(tokenizer))
    return model


def add_lora(model: PreTrainedModel, options: LoraOptions) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=options.r,
        lora_alpha=options.alpha,
        lora_dropout=options.dropout,
        target_modules=options.target_modules,
        modules_to_save=options.modules_to_save,
        task_type="CAUSAL_LM",
        **options.extra,
    )
    return get_peft_model(model, config)
