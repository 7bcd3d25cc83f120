"""Training: supervised and two-stream finetuning, IDEAL pretraining, checkpoints, progress."""
