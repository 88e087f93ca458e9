"""Training objectives: what the student minimises, one small class each on the one training path."""

from distill.objectives.base import Objective, TokenLoss, over_chunks
from distill.objectives.ce import CrossEntropy
from distill.objectives.kd import Distillation

__all__ = ["CrossEntropy", "Distillation", "Objective", "TokenLoss", "over_chunks"]
