"""Training: checkpoints, metric writing, the generic loop and one module per stage."""
