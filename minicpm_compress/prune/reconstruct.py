"""FFN channels or KV-head groups removed in one layer walk, each layer refit to what the unpruned one computed.

Layer i is fed the outputs of the already pruned layers before it. Its down_proj (FFN) or o_proj (heads)
inputs give the Gram matrix G; which units go is decided on it (by the error left after the refit with
`importance: reconstruction`, else by the importance scores of scores.py), and the kept columns are refit
by least squares (refit.py) so the layer's output stays as close as possible to the unpruned layer's on
the same inputs. The pruned layer's outputs feed layer i + 1, so later layers correct what earlier ones
could not. Every layer keeps the same number of units (a standard config).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ..layerwise import InputStatistics, LayerInputs, run_layer, state_layer_inputs
from ..progress import progress
from .refit import output_error, refit_columns, remove_units
from .scores import activation_scores, group_columns, weight_scores

if TYPE_CHECKING:
    from ..state import ModelState

LINEAR = {"ffn": "mlp.down_proj", "heads": "self_attn.o_proj"}
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
                    batch_size: int, seed: int) -> LayerwisePruning:
    """Walk the decoder: in every layer keep `kept` units (FFN channels or KV-head groups), refit."""
    chooser = _Chooser(state.config, method, kept, importance, torch.Generator().manual_seed(seed))
    result = LayerwisePruning()
    with state.computing_in(torch.float32):
        inputs = state_layer_inputs(state, samples, batch_size)
        for index in progress(range(state.num_layers), desc=f"prune: {method}", total=state.num_layers,
                              unit="layer"):
            with state.layer(index) as layer:
                inputs = chooser.prune(layer, inputs, result)
    return result


@dataclass
class _Chooser:
    config: object
    method: str
    kept: int
    importance: str
    generator: torch.Generator

    def prune(self, layer, inputs: LayerInputs, result: LayerwisePruning) -> LayerInputs:
        """Choose and refit this layer's units; the pruned layer's outputs (the next layer's inputs)."""
        units = unit_columns(self.config, self.method)
        linear = layer.get_submodule(LINEAR[self.method])
        stats = InputStatistics({n: layer.get_submodule(n) for n in LINEAR.values()})
        try:
            run_layer(layer, inputs)
        finally:
            stats.close()
        gram = stats.gram[LINEAR[self.method]]
        weight = linear.weight.detach().double()
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
        return run_layer(layer, inputs)

    def _ranked(self, layer, stats: InputStatistics, count: int) -> torch.Tensor:
        """Unit indices, most important first, by the cut-only scores (on the pruned model's inputs)."""
        if self.importance == "activation":
            ffn, groups = activation_scores(layer, self.config, stats)
        elif self.importance == "magnitude":
            ffn, groups = weight_scores(layer, self.config)
        else:
            ffn = groups = torch.rand(count, generator=self.generator)
        return torch.argsort(ffn if self.method == "ffn" else groups, descending=True, stable=True)
