"""Load or build a Hugging Face causal LM, optionally quantized or wrapped in a peft LoRA adapter."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from distill.pretrained import load_tokenizer, pretrained_source
from distill.teacher.identity import check_embedding_rows, check_model_source
from distill.train.quantization import Quantization


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
    """Modules trained in full and saved with the adapter (e.g. ``[lm_head]``). The embedding and the head
    are added by themselves when the tokenizer has tokens the saved model has no rows for."""
    extra: dict = field(default_factory=dict)
    """Any other ``peft.LoraConfig`` argument (e.g. ``use_rslora: true``)."""
    adapter: str | None = None
    """A saved adapter to go on training (an earlier stage's export, MedicalGPT's ``--peft_path``) instead
    of a new one: its own rank, alpha and target modules apply, the options above do not."""


def student_tokenizer(model: str | None, tokenizer: str | None) -> PreTrainedTokenizerBase | None:
    """The student's tokenizer (``tokenizer``, else ``model``'s; None without either), once both are
    checked (``check_model_source``): a missing local path or an unreadable ``.gguf`` is one line naming
    its option before any work, not transformers' hub error (or the gguf import) at the first load."""
    if model is not None:
        check_model_source("model.model", model)
    if tokenizer is not None:
        check_model_source("model.tokenizer", tokenizer, config_file=None, what="tokenizer")
    source = tokenizer or model
    return load_tokenizer(source) if source else None


def load_causal_lm(
    name_or_path: str | None,
    config: dict | None,
    tokenizer: PreTrainedTokenizerBase,
    dtype: str | None = None,
    role: str = "student",
    quantization: Quantization | None = None,
    device: torch.device | str | int | None = None,
    options: dict | None = None,
) -> PreTrainedModel:
    """From a hub name, a local directory or a ``.gguf`` file (de-quantized), or built from a config dict
    (random init, for tests and demos).
    A ``student`` whose embedding lacks rows for the tokenizer's tokens is resized; any other ``role``
    refuses it (the new rows would be random). Quantized weights load straight onto ``device`` (default:
    the current CUDA device) and stay there. ``options``: other ``from_pretrained`` arguments."""
    options = dict(options or {})
    torch_dtype = getattr(torch, dtype) if dtype and dtype != "auto" else dtype
    if quantization is not None:
        if name_or_path is None:
            raise ValueError(f"a quantized {role} loads from model (a saved checkpoint), not model_config")
        placement = torch.cuda.current_device() if device is None else device
        options.update(quantization_config=quantization.config(), device_map={"": placement})
    if name_or_path is not None:
        source, located = pretrained_source(name_or_path)
        if located:
            options = {**unpacked_gguf(), **options}
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, **located, **options)
    elif config is not None:
        config = dict(config)
        config.setdefault("vocab_size", len(tokenizer))
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            config.setdefault(key, getattr(tokenizer, key))
        built_dtype = None if torch_dtype == "auto" else torch_dtype  # a fresh model has no stored dtype
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config), dtype=built_dtype)
    else:
        raise ValueError("set model.model (a name or path) or model.model_config (a config dict)")
    rows = model.get_input_embeddings().num_embeddings
    if rows < len(tokenizer):
        if role != "student":
            check_embedding_rows(rows, tokenizer, f"{name_or_path or 'model_config'}", role)
        # the tokenizer has tokens the model lacks (e.g. added chat markers): give them rows
        model.resize_token_embeddings(len(tokenizer))
        rank_zero_info(
            f"[distill] {role} {name_or_path or 'model_config'}: {len(tokenizer) - rows:,} embedding rows "
            f"added for the tokenizer's {len(tokenizer):,} tokens ({rows:,} in the model; the new rows "
            "start untrained)"
        )
    return model


def unpacked_gguf() -> dict:
    """``from_pretrained`` options that unpack a GGUF file's weights into plain tensors: trainable and
    exported as an ordinary checkpoint. Left packed (transformers 5 keeps GGUF blocks where a matmul
    kernel is installed), a model cannot be saved. Transformers before ``GgufConfig`` always unpack."""
    try:
        from transformers import GgufConfig
    except ImportError:
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def add_lora(model: PreTrainedModel, options: LoraOptions) -> torch.nn.Module:
    """A peft LoRA adapter on ``model``. Embedding rows the saved model lacks (added tokens) start
    untrained: the input embedding and the output head are then trained in full and saved with the
    adapter (``modules_to_save``, tied when the model ties them). peft's ``trainable_token_indices``
    would train only the new rows, but it needs FSDP's ``use_orig_params``, which the LoRA wrap policy
    turns off, and covers an untied head only through tying."""
    from peft import LoraConfig, get_peft_model

    if options.adapter is not None:
        return load_trainable_adapter(model, options.adapter)
    modules_to_save = list(options.modules_to_save or [])
    extra = dict(options.extra)
    if _has_rows_beyond_saved_vocabulary(model):
        modules_to_save += [name for name in _embedding_names(model) if name not in modules_to_save]
        extra.setdefault("ensure_weight_tying", bool(getattr(model.config, "tie_word_embeddings", False)))
    config = LoraConfig(
        r=options.r,
        lora_alpha=options.alpha,
        lora_dropout=options.dropout,
        target_modules=options.target_modules,
        modules_to_save=modules_to_save or None,
        task_type="CAUSAL_LM",
        **extra,
    )
    return get_peft_model(model, config)


def load_trainable_adapter(model: PreTrainedModel, adapter: str) -> torch.nn.Module:
    """The saved LoRA ``adapter`` on ``model``, its weights trainable."""
    from peft import PeftConfig, PeftModel

    if not (Path(adapter) / "adapter_config.json").is_file():
        raise FileNotFoundError(
            f"model.lora.adapter: {adapter} holds no adapter_config.json (a peft adapter)"
        )
    config = PeftConfig.from_pretrained(adapter)
    if config.peft_type != "LORA" or config.task_type not in (None, "CAUSAL_LM"):
        raise ValueError(
            f"model.lora.adapter: {adapter} is a {config.peft_type} adapter for {config.task_type}, not a "
            "causal LM's LoRA adapter"
        )
    saved_base, base = config.base_model_name_or_path, model.name_or_path
    if saved_base and base and _resolved(saved_base) != _resolved(base):
        rank_zero_warn(
            f"model.lora.adapter {adapter} was trained on {saved_base}; it goes on training on {base}"
        )
    return PeftModel.from_pretrained(model, adapter, is_trainable=True)


def _resolved(name_or_path: str) -> str:
    return str(Path(name_or_path).resolve()) if Path(name_or_path).exists() else name_or_path


def _has_rows_beyond_saved_vocabulary(model: PreTrainedModel) -> bool:
    if not model.name_or_path:  # built from a config: no saved model to fall back on
        return False
    saved = AutoConfig.from_pretrained(model.name_or_path).get_text_config().vocab_size
    return model.get_input_embeddings().num_embeddings > saved


def _embedding_names(model: PreTrainedModel) -> list[str]:
    """The names peft matches ``modules_to_save`` by (``embed_tokens``, ``lm_head``; ``wte`` in GPT-2)."""
    layers = [model.get_input_embeddings(), model.get_output_embeddings()]
    return [name.rsplit(".", 1)[-1] for name, m in model.named_modules() if any(m is x for x in layers)]
