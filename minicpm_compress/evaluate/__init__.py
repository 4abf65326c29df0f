"""The one evaluator (perplexity, KL divergence, top-1 agreement against the reference) and its gates."""
