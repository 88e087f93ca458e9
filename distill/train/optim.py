"""Optimizers with device-aware defaults, given to the module as ``OptimizerCallable`` class paths."""

from __future__ import annotations

from collections.abc import Iterable

import torch


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
            tensors = [
                p for group in params for p in (group["params"] if isinstance(group, dict) else [group])
            ]
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
