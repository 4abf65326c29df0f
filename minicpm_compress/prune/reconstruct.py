"""FFN channels or KV-head groups removed in one layer walk, each layer refit to what the unpruned one computed.

Layer i is fed the outputs of the already pruned layers before it. Its down_proj (FFN) or o_proj (heads)
inputs give the Gram matrix G; which units go is decided on it (by the error left after the refit with
`importance: reconstruction`, else by the importance scores of scores.py), and the kept columns are refit
by least squares (refit.py) so the layer's output stays as close as possible to the unpruned layer's on
the same inputs. The pruned layer's outputs feed layer i + 1. Every layer keeps the same number of units
(a standard config).

With `correct_drift`, the unpruned model's own hidden states are walked alongside (the reference stream),
and the refit's target is what the unpruned model has in its residual stream after this branch, not the
unpruned layer applied to the pruned stream: down_proj / o_proj then also correct, as far as a linear map
of their inputs can, the drift the pruned layers before them left. In closed form the target weight is
W̃ = W + E G⁻¹ with E = Σ (reference − pruned residual stream)ᵀ X over the calibration tokens (divided by
the branch's residual scale, MiniCPM's scale_depth/√L), and W̃ is then pruned and refit as W is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ..layerwise import InputStatistics, LayerInputs, run_layer, state_layer_inputs
from ..models.architectures import decoder_layers
from ..progress import progress
from .refit import corrected_target, output_error, refit_columns, remove_units
from .scores import activation_scores, group_columns, weight_scores

if TYPE_CHECKING:
    from ..state import ModelState

LINEAR = {"ffn": "mlp.down_proj", "heads": "self_attn.o_proj"}
MID = "post_attention_layernorm"  # its input is the residual stream between the attention and the FFN branch
CHANNEL_BLOCK = 64  # FFN channels removed per update of W and H (chosen one by one among 4x as many)


@dataclass
class LayerwisePruning:
    keep: list[torch.Tensor] = field(default_factory=list)  # kept unit indices per layer
    weights: list[torch.Tensor] = field(default_factory=list)  # refit down_proj / o_proj per layer (kept columns)
    relative_errors: list[float] = field(default_factory=list)  # per layer: output error / output energy


def unit_columns(config, method: str) -> torch.Tensor:
    """[units, columns per unit]: the down_proj / o_proj input columns each unit owns."""
    if method == "ffn":
        return torch.arange(config.intermediate_size).unsqueeze(1)
    return group_columns(config)


def prune_layerwise(state: "ModelState", samples: torch.Tensor, method: str, kept: int, importance: str,
                    batch_size: int, seed: int, correct_drift: bool = False) -> LayerwisePruning:
    """Walk the decoder: in every layer keep `kept` units (FFN channels or KV-head groups), refit."""
    chooser = _Chooser(state.config, method, kept, importance, torch.Generator().manual_seed(seed))
    result = LayerwisePruning()
    with state.computing_in(torch.float32):
        inputs = state_layer_inputs(state, samples, batch_size)
        reference = inputs if correct_drift else None
        for index in progress(range(state.num_layers), desc=f"prune: {method}", total=state.num_layers,
                              unit="layer"):
            with state.layer(index) as layer:
                inputs, reference = chooser.prune(layer, inputs, result, reference)
    return result


def refit_towards_reference(state: "ModelState", pruned: torch.nn.Module, kept_layers: list[int], samples,
                            batch_size: int) -> list[float]:
    """After whole layers are removed: walk the unpruned model (the state, one layer at a time) and the pruned
    one side by side; each kept layer's down_proj, all columns kept, is refit towards the unpruned model's
    stream after the same layer, so it takes over what the removed layers before it added, as far as a
    linear map of its inputs can. Per kept layer: the stream's relative distance to the unpruned one after
    the refit, on the calibration tokens."""
    distances = []
    layers = decoder_layers(pruned)
    with state.computing_in(torch.float32):
        inputs = reference = state_layer_inputs(state, samples, batch_size)
        for index in progress(range(state.num_layers), desc="prune: refit after the removed layers",
                              total=state.num_layers, unit="layer"):
            with state.layer(index) as original:
                targets, reference = _reference_run(original, "ffn", reference)
            if index not in kept_layers:
                continue
            layer = layers[kept_layers.index(index)]
            inputs = _refit_towards(layer, "ffn", inputs, targets)
            distances.append(sum(float((a - b).pow(2).sum()) for a, b in zip(inputs.hidden, reference.hidden))
                             / max(sum(float(b.pow(2).sum()) for b in reference.hidden), 1e-30))
    return distances


def _refit_towards(layer: torch.nn.Module, method: str, inputs: LayerInputs, targets: list) -> LayerInputs:
    """Refit the layer's down_proj / o_proj (all columns) so the residual stream after its branch comes as
    close as a least-squares fit can to `targets`; the refit layer's outputs."""
    linear = layer.get_submodule(LINEAR[method])
    _, weight = _measured_run(layer, method, inputs, targets)
    linear.weight = torch.nn.Parameter(weight.to(linear.weight.dtype), requires_grad=False)
    return run_layer(layer, inputs)


def _measured_run(layer: torch.nn.Module, method: str, inputs: LayerInputs,
                  targets: list | None) -> tuple[InputStatistics, torch.Tensor]:
    """Run the layer on `inputs`: the input statistics of down_proj and o_proj, and the weight the refit
    aims at — the linear's own W, or with `targets` (the unpruned stream after the branch) W̃ = W + E G⁻¹."""
    stats = InputStatistics({n: layer.get_submodule(n) for n in LINEAR.values()})
    streams = _Streams(layer, method) if targets is not None else None
    try:
        outputs = run_layer(layer, inputs)
    finally:
        stats.close()
        if streams is not None:
            streams.close()
    weight = layer.get_submodule(LINEAR[method]).weight.detach().double()
    if streams is not None:
        drift = _drift_correlation(streams, inputs, outputs, targets)
        weight = weight + corrected_target(stats.gram[LINEAR[method]], drift)
    return stats, weight


class _Streams:
    """While a layer runs: per batch, the pruned linear's inputs X and outputs Y and the residual stream
    just before and after its branch (for down_proj: between the branches and the layer's output; for
    o_proj: the layer's input and between the branches)."""

    def __init__(self, layer: torch.nn.Module, method: str, linear_io: bool = True):
        self.method, self.x, self.y, self.mid = method, [], [], []
        self._handles = [layer.get_submodule(MID).register_forward_pre_hook(self._mid)]
        if linear_io:  # the reference run needs only the residual stream
            self._handles.append(layer.get_submodule(LINEAR[method]).register_forward_hook(self._linear))

    def _linear(self, _module, args, output) -> None:
        self.x.append(args[0])
        self.y.append(output)

    def _mid(self, _module, args) -> None:
        self.mid.append(args[0])

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()

    def before_after(self, inputs: LayerInputs, outputs: LayerInputs, batch: int):
        if self.method == "ffn":
            return self.mid[batch], outputs.hidden[batch]
        return inputs.hidden[batch], self.mid[batch]


def _reference_run(layer: torch.nn.Module, method: str, reference: LayerInputs) -> tuple[list, LayerInputs]:
    """The unpruned layer on the reference stream: the residual stream after the branch, and its outputs."""
    streams = _Streams(layer, method, linear_io=False)
    try:
        outputs = run_layer(layer, reference)
    finally:
        streams.close()
    return [streams.before_after(reference, outputs, b)[1] for b in range(len(outputs.hidden))], outputs


def _drift_correlation(streams: _Streams, inputs: LayerInputs, outputs: LayerInputs, targets: list) -> torch.Tensor:
    """E = Σ_batches ((target − after) / c)ᵀ X: how the residual stream's drift from the reference correlates
    with the linear's inputs, in the linear's own output units (c: the branch's residual scale, read off
    after − before = c · Y)."""
    correlation = None
    for b, target in enumerate(targets):
        before, after = streams.before_after(inputs, outputs, b)
        y = streams.y[b].double()
        scale = float(((after - before).double() * y).sum() / (y * y).sum().clamp_min(1e-30))
        drift = ((target - after).double() / scale).reshape(-1, y.shape[-1])
        x = streams.x[b].double().reshape(-1, streams.x[b].shape[-1])
        term = drift.T @ x
        correlation = term if correlation is None else correlation + term
    return correlation


@dataclass
class _Chooser:
    config: object
    method: str
    kept: int
    importance: str
    generator: torch.Generator

    def prune(self, layer, inputs: LayerInputs, result: LayerwisePruning,
              reference: LayerInputs | None = None) -> tuple[LayerInputs, LayerInputs | None]:
        """Choose and refit this layer's units: the pruned layer's outputs (the next layer's inputs) and,
        when correcting drift, the unpruned layer's outputs on the reference stream."""
        units = unit_columns(self.config, self.method)
        linear = layer.get_submodule(LINEAR[self.method])
        targets = None
        if reference is not None:
            targets, reference = _reference_run(layer, self.method, reference)
        stats, weight = _measured_run(layer, self.method, inputs, targets)
        gram = stats.gram[LINEAR[self.method]]
        if self.importance == "reconstruction":
            block = CHANNEL_BLOCK if self.method == "ffn" else 1
            keep, new = remove_units(weight, gram, units, len(units) - self.kept, block)
        else:
            keep = self._ranked(layer, stats, len(units))[: self.kept].sort().values
            new = refit_columns(weight, gram, units[keep].reshape(-1))
        energy = float(((weight @ gram) * weight).sum())
        result.relative_errors.append(output_error(weight, new, gram) / max(energy, 1e-30))
        result.keep.append(keep)
        result.weights.append(new[:, units[keep].reshape(-1)].float())
        # the pruned layer computes exactly this: the removed units' columns are zero
        linear.weight = torch.nn.Parameter(new.to(linear.weight.dtype), requires_grad=False)
        return run_layer(layer, inputs), reference

    def _ranked(self, layer, stats: InputStatistics, count: int) -> torch.Tensor:
        """Unit indices, most important first, by the cut-only scores (on the pruned model's inputs)."""
        if self.importance == "activation":
            ffn, groups = activation_scores(layer, self.config, stats)
        elif self.importance == "magnitude":
            ffn, groups = weight_scores(layer, self.config)
        else:
            ffn = groups = torch.rand(count, generator=self.generator)
        return torch.argsort(ffn if self.method == "ffn" else groups, descending=True, stable=True)
