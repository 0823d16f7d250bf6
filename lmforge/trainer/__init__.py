"""The trainer: the model, its training loop on DeepSpeed, generation and export (needs the trainer extra)."""
