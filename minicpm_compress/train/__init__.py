"""Training: the distillation loop shared by QAT and pruning's healing."""
