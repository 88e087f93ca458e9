"""Training objectives: what the student minimises, one small class each on the one training path."""

from distill.objectives.base import Loss, LossInputs, Objective, over_chunks
from distill.objectives.ce import CrossEntropy
from distill.objectives.kd import Distillation

__all__ = ["CrossEntropy", "Distillation", "Loss", "LossInputs", "Objective", "over_chunks"]
