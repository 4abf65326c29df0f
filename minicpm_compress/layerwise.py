"""Walk a decoder layer by layer over calibration samples.

Only one decoder layer's activations are held at a time: the hidden states entering the current layer
for every sample (samples × tokens × hidden floats) plus what the caller accumulates from them. The
inputs of layer 0 are captured from the model's own forward, so everything before the first layer
(MiniCPM's embedding scale included) is applied exactly as at inference.
"""

from __future__ import annotations

from dataclasses import dataclass
import torch

from .models.architectures import decoder_layers


class _Stop(Exception):
    pass


@dataclass
class LayerInputs:
    hidden: list[torch.Tensor]  # one [batch, tokens, hidden] tensor per calibration batch
    kwargs: list[dict]  # the keyword arguments the model passes its layers, per batch


def first_layer_inputs(model: torch.nn.Module, samples: torch.Tensor, batch_size: int) -> LayerInputs:
    captured = LayerInputs([], [])

    def catch(_module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.hidden.append(hidden.detach())
        captured.kwargs.append({k: v for k, v in kwargs.items() if k != "hidden_states"})
        raise _Stop

    handle = decoder_layers(model)[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        with torch.inference_mode():
            for batch in samples.split(batch_size):
                try:
                    model(input_ids=batch, use_cache=False)
                except _Stop:
                    pass
    finally:
        handle.remove()
    return captured


def run_layer(layer: torch.nn.Module, inputs: LayerInputs) -> LayerInputs:
    """The layer's outputs for every batch (the next layer's inputs)."""
    with torch.inference_mode():
        hidden = [layer(h, **kw) for h, kw in zip(inputs.hidden, inputs.kwargs)]
    return LayerInputs([h[0] if isinstance(h, tuple) else h for h in hidden], inputs.kwargs)


class InputStatistics:
    """Per linear: the Gram matrix XᵀX of its inputs and their mean |x| per channel, over all tokens.

    With G = XᵀX the summed squared output error of a linear whose weight W is replaced by W' is
    exactly tr((W − W') G (W − W')ᵀ), so candidate weights can be scored without re-running the
    calibration tokens.
    """

    def __init__(self, linears: dict[str, torch.nn.Linear]):
        self.gram: dict[str, torch.Tensor] = {}
        self.abs_sum: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = {}
        self._handles = [linear.register_forward_pre_hook(self._hook(name)) for name, linear in linears.items()]

    def _hook(self, name: str):
        def accumulate(_module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            gram = (x.T @ x).double()
            if name in self.gram:
                self.gram[name] += gram
                self.abs_sum[name] += x.abs().sum(0).double()
                self.tokens[name] += x.shape[0]
            else:
                self.gram[name], self.abs_sum[name], self.tokens[name] = gram, x.abs().sum(0).double(), x.shape[0]

        return accumulate

    def mean_abs(self, name: str) -> torch.Tensor:
        return (self.abs_sum[name] / self.tokens[name]).float()

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
