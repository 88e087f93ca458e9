"""Lightning callbacks of distill, usable by class path in configs (e.g. ``distill.callbacks.HFExport``)."""

from distill.callbacks.completions import CompletionLog
from distill.callbacks.hf_export import HFExport
from distill.callbacks.memory import PeakMemory
from distill.callbacks.preemption import PreemptionCheckpoint
from distill.callbacks.progress import LoopProgress
from distill.callbacks.stage_results import StageResults
from distill.callbacks.summary import ModelSummary
from distill.callbacks.teacher_cache import TeacherCacheWriter
from distill.callbacks.throughput import TokenThroughput

__all__ = [
    "CompletionLog",
    "HFExport",
    "LoopProgress",
    "ModelSummary",
    "PeakMemory",
    "PreemptionCheckpoint",
    "StageResults",
    "TeacherCacheWriter",
    "TokenThroughput",
]
