"""Structured pruning: scores from calibration activations, surgery, and the `prune` stage."""
