"""Evaluation: sample quality, purification robustness under adaptive attacks, corruption removal."""
