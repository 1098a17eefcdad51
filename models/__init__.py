"""robustdiff models: diffusion and consistency networks, samplers, checkpoints, data and training."""
