"""Quantized loading (QLoRA): 8- or 4-bit bitsandbytes weights through transformers' BitsAndBytesConfig.

A student loads quantized only under a LoRA adapter (bitsandbytes' packed weights take no gradient
step); teachers, references and reward models load quantized for inference.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from transformers import BitsAndBytesConfig


@dataclass
class Quantization:
    """Load the model's linear layers quantized by bitsandbytes (a CUDA GPU and the ``bnb`` extra)."""

    load_in_8bit: bool = False
    """LLM.int8() weights: half the memory of bfloat16 ones."""
    load_in_4bit: bool = False
    """4-bit weights, a quarter of the memory of bfloat16 ones: QLoRA's base."""
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = "nf4"
    """4-bit data type: ``nf4`` (NormalFloat, QLoRA's: levels fitted to normally distributed weights) or
    ``fp4``."""
    bnb_4bit_use_double_quant: bool = True
    """Quantize the per-block scales too (about 0.4 bits per weight saved)."""
    bnb_4bit_compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    """Dtype the 4-bit weights are dequantized to for each matrix product."""

    def check(self, owner: str) -> None:
        """Refuse options that name no single width, then a machine that cannot load them (``owner``
        names the option in the messages, e.g. ``model.quantization``)."""
        if self.load_in_8bit == self.load_in_4bit:
            both = "both are set" if self.load_in_8bit else "neither is set"
            raise ValueError(f"{owner}: set exactly one of load_in_8bit and load_in_4bit ({both})")
        reason = unavailable_reason()
        if reason is not None:
            raise ValueError(
                f"{owner}: load_in_{8 if self.load_in_8bit else 4}bit needs a CUDA GPU and the bitsandbytes "
                f"package (pip install -e '.[bnb]'); {reason}"
            )

    def identity(self) -> str:
        """What the weights depend on, e.g. ``4bit-nf4-double-bfloat16`` (a teacher cache's key)."""
        if self.load_in_8bit:
            return "8bit"
        double = "-double" if self.bnb_4bit_use_double_quant else ""
        return f"4bit-{self.bnb_4bit_quant_type}{double}-{self.bnb_4bit_compute_dtype}"

    def config(self) -> BitsAndBytesConfig:
        """What ``from_pretrained(quantization_config=...)`` takes (the 4-bit fields only at 4 bits)."""
        if self.load_in_8bit:
            return BitsAndBytesConfig(load_in_8bit=True)
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=self.bnb_4bit_quant_type,
            bnb_4bit_use_double_quant=self.bnb_4bit_use_double_quant,
            bnb_4bit_compute_dtype=getattr(torch, self.bnb_4bit_compute_dtype),
        )


def check_quantization(quantization: Quantization | None, owner: str) -> None:
    """Constructors call it, so a run that cannot load its models stops before any data is tokenised."""
    if quantization is not None:
        quantization.check(owner)


def unavailable_reason() -> str | None:
    """Why bitsandbytes' quantized layers cannot run here, or None when they can."""
    if not torch.cuda.is_available():
        return "this machine has no CUDA device"
    if importlib.util.find_spec("bitsandbytes") is None:
        return "bitsandbytes is not installed"
    return None


def prepare_for_kbit_training(model: nn.Module, gradient_checkpointing: bool) -> nn.Module:
    """peft's preparation of a quantized base for an adapter (frozen, its norms, embeddings and head in
    float32), with gradient checkpointing as the student's option says (peft's default: on), and
    non-reentrant as on the unquantized path (so no hook has to make the embeddings' outputs need grad)."""
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(
        model,
        use_gradient_checkpointing=gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )
