"""Quantized weights: the one type every compressor produces and every exporter consumes."""
