"""Reward functions for the RL objectives (GRPO, RLOO): any callable ``fn(prompts, completions, **fields)
-> list[float]`` (TRL's convention), with optional ``weight`` and ``name`` attributes (docs/rl.md,
"Rewards", has the fields a function receives and the built-in ones).
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
