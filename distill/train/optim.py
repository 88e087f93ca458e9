"""Optimizers with device-aware defaults (``OptimizerCallable`` class paths) and their weight decay groups."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

NORMS = (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm)


def decays(module_name: str, module: nn.Module, param_name: str) -> bool:
    """Whether weight decay applies to ``module``'s own parameter ``param_name``: not to biases, nor to
    the weights of normalisation layers, told by their class (``LayerNorm``, ``LlamaRMSNorm``, ...) or,
    where a wrapper hides the class, by their name (GPT-2's ``ln_1``/``ln_f``, ``input_layernorm``)."""
    kind = type(module).__name__
    norm = isinstance(module, NORMS) or kind.endswith("Norm") or "LayerNorm" in kind or "RMSNorm" in kind
    if param_name == "bias" or norm:  # not "Norm" anywhere: Baichuan's NormHead is the output matrix
        return False
    last = module_name.rsplit(".", 1)[-1].lower()
    return not ("norm" in last or last == "ln" or last.startswith("ln_"))


def weight_decay_groups(model: nn.Module) -> list[dict]:
    """The trainable parameters of ``model`` in a decayed group and a group with ``weight_decay`` 0 (empty
    groups left out: DeepSpeed drops them, and a schedule made for two groups no longer fits)."""
    decayed, kept, seen = [], [], set()
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:  # tied weights: once
                continue
            seen.add(id(param))
            (decayed if decays(module_name, module, param_name) else kept).append(param)
    groups = [{"params": decayed}, {"params": kept, "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]


class AdamW(torch.optim.AdamW):
    """torch AdamW that takes the fused kernel when every parameter is on CUDA (``fused=None``)."""

    def __init__(
        self,
        params: Iterable,
        lr: float = 2e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        fused: bool | None = None,
    ) -> None:
        params = list(params)
        if fused is None:
            tensors = [p for g in params for p in (g["params"] if isinstance(g, dict) else [g])]
            fused = bool(tensors) and all(p.is_cuda for p in tensors)
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=fused)
        # The fused kernel can unscale fp16 gradients itself, and Lightning then refuses gradient
        # clipping, even under bf16 where nothing is scaled. Declining that lets clipping work; a
        # GradScaler (fp16) then unscales before the step, as for any optimizer.
        self._step_supports_amp_scaling = False


class AdamW8bit(torch.optim.Optimizer):
    """bitsandbytes' 8-bit AdamW; needs CUDA and the ``bnb`` extra, and says so before any work."""

    def __new__(  # returns bitsandbytes' optimizer itself; this class only checks and builds it
        cls,
        params: Iterable,
        lr: float = 2e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> torch.optim.Optimizer:
        if not torch.cuda.is_available():
            raise RuntimeError(
                "distill.train.optim.AdamW8bit needs a CUDA GPU (bitsandbytes keeps 8-bit states on it); "
                "use distill.train.optim.AdamW on this machine"
            )
        try:
            import bitsandbytes as bnb
        except ImportError as err:
            raise RuntimeError(
                "distill.train.optim.AdamW8bit needs bitsandbytes: pip install 'distill[bnb]'"
            ) from err
        return bnb.optim.AdamW8bit(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
