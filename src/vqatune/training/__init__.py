"""Fine-tuning: `train:` config, collation, the trainer, a run with its checkpoints, and DDP."""
