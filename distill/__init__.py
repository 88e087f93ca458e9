"""distill: knowledge distillation and fine-tuning of language models on PyTorch Lightning."""

from distill.datamodule import DataModule
from distill.hf_model import LoraOptions
from distill.kd import Distillation
from distill.kd_data import KDDataModule
from distill.objectives import CrossEntropy
from distill.student import StudentModule
from distill.teacher import Teacher, TeacherModule

__all__ = [
    "CrossEntropy",
    "DataModule",
    "Distillation",
    "KDDataModule",
    "LoraOptions",
    "StudentModule",
    "Teacher",
    "TeacherModule",
]
__version__ = "0.1.0"
