"""The ML core: network, losses, metrics, inference, post-processing, checkpoints, the trainer and run dirs."""
