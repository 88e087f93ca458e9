"""Reward functions for the RL objectives (GRPO, RLOO).

A reward function is any callable ``fn(prompts, completions, **fields) -> list[float]`` (TRL's convention,
so it must accept ``**kwargs``): one finite number per completion. ``fields`` holds one list per key: the
prompt record's extra keys (``answer``...), ``completion_length``, ``stopped`` and ``messages``. Optional
attributes: ``weight`` (default 1.0) in the weighted total, and ``name`` for the logged metrics.
"""

from distill.rewards.builtin import Accuracy, Format, Function, Length, TokenF1
from distill.rewards.model import ModelReward
from distill.rewards.scoring import RewardError, names, reward_name, score, weights

__all__ = [
    "Accuracy",
    "Format",
    "Function",
    "Length",
    "ModelReward",
    "RewardError",
    "TokenF1",
    "names",
    "reward_name",
    "score",
    "weights",
]
