"""Pure loss functions, no Lightning: sparse KD losses over teacher top-K/sampled targets (``kd``)."""

from distill.losses.kd import LOSSES, KDTerms, kd_loss, mix_teachers

__all__ = ["LOSSES", "KDTerms", "kd_loss", "mix_teachers"]
