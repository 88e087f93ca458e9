"""NEFTune (Jain et al., 2023): uniform noise on the input embeddings of the forwards that train, bounded
by alpha / sqrt(L * d) (L the row's length, d the embedding width), as transformers' and TRL's
``neftune_noise_alpha`` and MedicalGPT's ``--neft_alpha`` add it."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle


def add_embedding_noise(model: nn.Module, alpha: float) -> RemovableHandle:
    """Noise ``model``'s input embeddings in forwards that train (training mode, gradients on): a
    reference or rollout forward of the same model, under ``no_grad``, and validation see them clean."""

    def noised(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
        if not (module.training and torch.is_grad_enabled()):
            return output
        bound = alpha / math.sqrt(output.size(-2) * output.size(-1))
        return output + torch.empty_like(output).uniform_(-bound, bound)

    return model.get_input_embeddings().register_forward_hook(noised)
