"""Training one model: the loop (``trainer``), its logs, checkpoints and signal handling."""
