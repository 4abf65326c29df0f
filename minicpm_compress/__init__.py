"""minicpm-compress: turn full-precision MiniCPM / Llama-shaped checkpoints into small, verified artifacts."""

__version__ = "0.1.0"
