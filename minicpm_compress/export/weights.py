"""The quantized weight each exporter writes for every decoder linear, and which path it took.

Exporters that store integer codes (ONNX MatMulNBits, Core ML blockwise constants) carry the model's own
quantized weights when their layout fits the format ("lossless"); every other linear is quantized by
the project's quantizer (RTN) to the format's default scheme first ("requantized").
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..models.architectures import quantizable_linears
from ..quant.qweight import QuantizedWeight, QuantScheme, quantize


def export_weights(state, scheme: QuantScheme, fits: Callable[[QuantizedWeight], bool]
                   ) -> tuple[dict[str, tuple[torch.Tensor, QuantizedWeight]], dict[str, int]]:
    """name → (float weight, quantized weight) for every decoder linear, and how many took each path."""
    weights, paths = {}, {"lossless": 0, "requantized": 0}
    for name, linear in quantizable_linears(state.model).items():
        q = state.qweights.get(name)
        if q is not None and fits(q):
            paths["lossless"] += 1
        else:
            q = quantize(linear.weight, scheme)
            paths["requantized"] += 1
        weights[name] = (linear.weight, q)
    return weights, paths
