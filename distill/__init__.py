"""distill: knowledge distillation and fine-tuning of language models on PyTorch Lightning."""

from distill.data.datamodule import DataModule
from distill.data.preference_datamodule import PreferenceDataModule
from distill.data.prompt_datamodule import PromptDataModule
from distill.objectives import GRPO, RLOO, CrossEntropy
from distill.objectives.kd import Distillation
from distill.teacher.datamodule import KDDataModule
from distill.teacher.module import Teacher, TeacherModule
from distill.train.model import LoraOptions
from distill.train.student import StudentModule

__all__ = [
    "GRPO",
    "RLOO",
    "CrossEntropy",
    "DataModule",
    "Distillation",
    "KDDataModule",
    "LoraOptions",
    "PreferenceDataModule",
    "PromptDataModule",
    "StudentModule",
    "Teacher",
    "TeacherModule",
]
__version__ = "0.1.0"
