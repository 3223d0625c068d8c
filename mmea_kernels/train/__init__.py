"""The fine-tuning workflow (needs ASE and a model library): configuration, data, E0s, losses,
the training loop, checkpoints, methods and base models."""
