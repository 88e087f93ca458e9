"""Training objectives: what the student minimises, one small class each on the one training path."""

from distill.objectives.base import Loss, LossInputs, Objective, over_chunks
from distill.objectives.ce import CrossEntropy
from distill.objectives.grpo import GRPO
from distill.objectives.kd import Distillation
from distill.objectives.kto import KTO
from distill.objectives.onpolicy import OnPolicyDistillation
from distill.objectives.preference import Preference
from distill.objectives.reference import Reference
from distill.objectives.reward import RewardModel
from distill.objectives.rloo import RLOO

__all__ = [
    "GRPO",
    "KTO",
    "RLOO",
    "CrossEntropy",
    "Distillation",
    "Loss",
    "LossInputs",
    "Objective",
    "OnPolicyDistillation",
    "Preference",
    "Reference",
    "RewardModel",
    "over_chunks",
]
