"""Lightning callbacks of distill, usable by class path in configs (e.g. ``callbacks.HFExport``)."""

from callbacks.hf_export import HFExport
from callbacks.memory import PeakMemory
from callbacks.teacher_cache import TeacherCacheWriter
from callbacks.throughput import TokenThroughput

__all__ = ["HFExport", "PeakMemory", "TeacherCacheWriter", "TokenThroughput"]
