"""The quantized weight each exporter writes for every decoder linear, and which path it took.

Exporters that store integer codes (ONNX MatMulNBits, Core ML blockwise constants) carry the model's own
quantized weights when their layout fits the format ("lossless"); every other linear is quantized by
the project's quantizer (RTN) to the format's default scheme first ("requantized"), when it is asked
for, so a streamed exporter holds one requantized weight at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from ..quant.qweight import QuantizedWeight, QuantScheme, quantize


class ExportWeights(Mapping):
    """name → quantized weight for every decoder linear of `state`, in layer order."""

    def __init__(self, state, scheme: QuantScheme, fits: Callable[[QuantizedWeight], bool]):
        self.state, self.scheme = state, scheme
        self.names = state.linear_names()
        # names only: a model's quantized weights are read when each is written, not held together
        self.lossless = {n for n in self.names if n in state.qweights and fits(state.qweights[n])}
        self.paths = {"lossless": len(self.lossless), "requantized": len(self.names) - len(self.lossless)}

    def __getitem__(self, name: str) -> QuantizedWeight:
        if name in self.lossless:
            return self.state.qweights[name]
        if name not in self.names:
            raise KeyError(name)
        return quantize(self.state.tensor(f"{name}.weight"), self.scheme)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def export_weights(state, scheme: QuantScheme, fits: Callable[[QuantizedWeight], bool]
                   ) -> tuple[ExportWeights, dict[str, int]]:
    """The quantized weight of every decoder linear (computed on access where requantized), and the path counts."""
    weights = ExportWeights(state, scheme, fits)
    return weights, dict(weights.paths)
