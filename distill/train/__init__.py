"""Training: the StudentModule, model loading and LoRA, optimizers, sharding, metrics, adapter merge."""
