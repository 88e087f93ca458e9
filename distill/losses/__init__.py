"""Pure loss functions, no Lightning: sparse KD losses over teacher top-K/sampled targets (``kd``)."""

from distill.losses.kd import LOSSES, cross_entropy, kd_loss, mix_teachers, student_log_probs

__all__ = ["LOSSES", "cross_entropy", "kd_loss", "mix_teachers", "student_log_probs"]
