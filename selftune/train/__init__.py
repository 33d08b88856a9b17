"""Fine-tuning: the recipe, plan, losses, loop, checkpoints, run logs, replay, distributed."""
