"""Sampling from the policy: the generation engine and the training rows its completions become."""

from distill.rollout.completions import Completions, rollout_batch, trim_at_stop
from distill.rollout.engine import Engine, Sampling, TransformersEngine

__all__ = ["Completions", "Engine", "Sampling", "TransformersEngine", "rollout_batch", "trim_at_stop"]
