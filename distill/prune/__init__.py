"""Structured pruning of a causal LM (depth and width, Minitron style): docs/prune.md."""
