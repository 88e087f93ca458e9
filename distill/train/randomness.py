"""The randomness of a training step (dropout, LoRA's included, NEFTune's noise, whatever a step samples
from the global generators) as a function of (the run's seed, rank, epoch, batch), so a fit resumed from
a checkpoint draws what the uninterrupted fit drew.

Restoring the generators' states saved with the checkpoint (Lightning Fabric's ``_collect_rng_states``;
Lightning's Trainer restores none) is not enough: between that save and its next batch the uninterrupted
run may draw for other work (a new epoch's DataLoader iterator draws its base seed; validation; a callback
that samples), while the resumed run draws for its own (building the model, the sanity check, its
iterator). Each training micro-batch starts instead from a seed of its position, as its rows come from
(seed, epoch) (``distill.data.resume``). The run's seed is drawn once at the start of the fit, from the
generators as ``seed_everything`` left them, the same on every rank (rank 0's), and kept in the
checkpoint. Each rank seeds apart: ranks draw their own dropout masks.
"""

from __future__ import annotations

import random

import numpy as np
import torch

from distill.rollout.engine import rollout_seed

CHECKPOINT_KEY = "distill_run_seed"


def draw_run_seed() -> int:
    """A seed for the run's training steps, from the global torch generator."""
    return int(torch.randint(0, 2**62, ()).item())


def seed_step(run_seed: int, rank: int, epoch: int, batch: int) -> None:
    """Seed torch (CPU and CUDA), numpy and ``random`` for micro-batch ``batch`` of ``epoch`` on ``rank``."""
    seed = rollout_seed(run_seed, "training step", rank, epoch, batch)
    torch.manual_seed(seed)  # also seeds every CUDA device
    np.random.seed(seed % 2**32)
    random.seed(seed)
