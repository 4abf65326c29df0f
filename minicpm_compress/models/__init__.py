"""Model loading, MiniCPM's own implementation, the architecture table and the built-in models."""
