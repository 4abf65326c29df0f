"""Walk a decoder layer by layer over token windows (calibration samples or held-out text).

Only one decoder layer's weights and activations are held at a time: the hidden states entering the
current layer for every window (windows × tokens × hidden floats) plus what the caller accumulates from
them. The inputs of layer 0 are captured from the model's own forward (run on a skeleton whose layers
are not materialised), so everything before the first layer (MiniCPM's embedding scale included) is
applied exactly as at inference. Evaluation, the reference statistics, AWQ and pruning scores all walk
the model this way.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .data.prompts import ImagePrompts
from .models.architectures import decoder_layers
from .progress import progress

if TYPE_CHECKING:
    from .state import ModelState


class _Stop(Exception):
    pass


@dataclass
class LayerInputs:
    hidden: list[torch.Tensor]  # one [batch, tokens, hidden] tensor per calibration batch
    kwargs: list[dict]  # the keyword arguments the model passes its layers, per batch


@contextlib.contextmanager
def image_features(model: torch.nn.Module, batch):
    """The token ids of `batch`; for image prompts, layer 0 meanwhile takes their image features in the slots
    (MiniCPM-V puts them after the embedding scale, so they enter the first layer as they are)."""
    if not isinstance(batch, ImagePrompts):
        yield batch
        return
    if batch.features is None:
        raise ValueError("image prompts without image features (run them through a vision half first)")
    features = torch.cat(batch.features)

    def inject(_module, args, kwargs):
        hidden = (args[0] if args else kwargs["hidden_states"]).clone()
        hidden[batch.slots.to(hidden.device)] = features.to(hidden.device, hidden.dtype)
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    handle = decoder_layers(model)[0].register_forward_pre_hook(inject, with_kwargs=True, prepend=True)
    try:
        yield batch.ids
    finally:
        handle.remove()


def first_layer_inputs(model: torch.nn.Module, samples, batch_size: int) -> LayerInputs:
    """Layer 0's inputs for `samples` (token windows, or image prompts with their features)."""
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
                with image_features(model, batch) as ids:
                    try:
                        model(input_ids=ids, use_cache=False)
                    except _Stop:
                        pass
    finally:
        handle.remove()
    return captured


def state_layer_inputs(state: "ModelState", samples, batch_size: int, quantized: bool = False) -> LayerInputs:
    """The inputs of layer 0 for `samples`, from a state whose layers stay unmaterialised (image prompts
    without features get them from the state's vision half; `quantized`: the embedding as deployed when the
    state holds it quantized)."""
    if isinstance(samples, ImagePrompts) and samples.features is None:
        if state.vision is None:
            raise ValueError("image prompts need a MiniCPM-V model (this one has no vision half)")
        samples = state.vision.features(samples)
    with state.modules("model.embed_tokens", quantized=quantized) as skeleton:
        return first_layer_inputs(skeleton, samples.to(state.device), batch_size)


def head_inputs(state: "ModelState", windows, batch_size: int, quantized: bool,
                desc: str = "layers") -> list[torch.Tensor]:
    """The output head's input (final norm output) for every batch of `windows`, one layer at a time."""
    inputs = state_layer_inputs(state, windows, batch_size, quantized)
    for index in progress(range(state.num_layers), desc=desc, total=state.num_layers, unit="layer"):
        with state.layer(index, quantized) as layer:
            inputs = run_layer(layer, inputs)
    with state.modules("model.norm") as model:
        with torch.inference_mode():
            return [model.model.norm(h) for h in inputs.hidden]


def run_layer(layer: torch.nn.Module, inputs: LayerInputs) -> LayerInputs:
    """The layer's outputs for every batch (the next layer's inputs)."""
    with torch.inference_mode():
        hidden = [layer(h, **kw) for h, kw in zip(inputs.hidden, inputs.kwargs)]
    return LayerInputs([h[0] if isinstance(h, tuple) else h for h in hidden], inputs.kwargs)


def gram_matrix(x: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """XᵀX for x [tokens, n]: for wide inputs (n > 2·block) only the blocks on and above the diagonal are
    multiplied and the rest mirrored (~30% less time at n = 4,864, 4,096 tokens; exactly symmetric)."""
    n = x.shape[1]
    if n <= 2 * block:
        return x.T @ x
    gram = torch.empty(n, n, dtype=x.dtype, device=x.device)
    for i in range(0, n, block):
        gram[i : i + block, i:] = x[:, i : i + block].T @ x[:, i:]
        gram[i + block :, i : i + block] = gram[i : i + block, i + block :].T
    return gram


class InputStatistics:
    """Per linear: the Gram matrix XᵀX of its inputs and their mean |x| per channel, over all tokens.

    With G = XᵀX the summed squared output error of a linear whose weight W is replaced by W' is
    exactly tr((W − W') G (W − W')ᵀ), so candidate weights can be scored without re-running the
    calibration tokens.
    """

    def __init__(self, linears: dict[str, torch.nn.Linear], gram: bool = True):
        self.gram: dict[str, torch.Tensor] = {}
        self.abs_sum: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = {}
        self._full = gram  # False: only the diagonal Σx² per channel (an importance matrix's statistic)
        self._handles = [linear.register_forward_pre_hook(self._hook(name)) for name, linear in linears.items()]

    def _hook(self, name: str):
        def accumulate(_module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            gram = gram_matrix(x).double() if self._full else x.double().pow(2).sum(0)
            if name in self.gram:
                self.gram[name] += gram
                self.abs_sum[name] += x.abs().sum(0).double()
                self.tokens[name] += x.shape[0]
            else:
                self.gram[name], self.abs_sum[name], self.tokens[name] = gram, x.abs().sum(0).double(), x.shape[0]

        return accumulate

    def mean_abs(self, name: str) -> torch.Tensor:
        return (self.abs_sum[name] / self.tokens[name]).float()

    def sum_squares(self, name: str) -> torch.Tensor:
        """Σ x² per input channel over all tokens (the Gram matrix's diagonal)."""
        g = self.gram[name]
        return torch.diagonal(g) if self._full else g

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


def layer_grams(layer: torch.nn.Module, arch, inputs: LayerInputs) -> tuple[dict[str, torch.Tensor], LayerInputs]:
    """Run `inputs` through `layer`: the Gram matrix of every linear's inputs (linears fed the same input,
    as q/k/v are, share one) and the layer's outputs."""
    firsts = [g.linears[0] for g in arch.scaling_groups]
    stats = InputStatistics({n: layer.get_submodule(n) for n in firsts})
    try:
        outputs = run_layer(layer, inputs)
    finally:
        stats.close()
    return {n: stats.gram[g.linears[0]] for g in arch.scaling_groups for n in g.linears}, outputs
