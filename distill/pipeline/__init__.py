"""Stage pipelines: several fits in order, each stage starting from the model the one before it trained."""
