"""Storage and tracking: checkpoints (read without unpickling), the run directory and
MLflow."""
