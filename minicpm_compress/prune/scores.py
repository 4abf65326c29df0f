"""How much each prunable structure contributes, measured on calibration text.

One layer-by-layer pass over the calibration samples (see layerwise.py) gives, per decoder layer:
  * FFN channel j: the energy of its contribution to the MLP output over all tokens,
    ‖h_j‖² · ‖W_down[:, j]‖², with h the input of down_proj (act(gate) · up). This is |W| × ‖x‖
    (Wanda-style) for a whole channel, and exact: the squared output norm of that channel alone;
  * KV-head group g (its key/value head and the query heads that share it): the energy of the group's
    part of o_proj's output, tr(W_o[:, g] G_gg W_o[:, g]ᵀ) with G the Gram matrix of o_proj's input;
  * the layer itself: block influence, 1 − mean cosine similarity between the hidden state entering
    and leaving the layer (a layer that barely turns the hidden state is the cheapest to drop).
"magnitude" scores use the weights alone, "random" scores are seeded noise (the baseline).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..layerwise import InputStatistics, run_layer, state_layer_inputs
from ..models import architectures
from ..progress import progress

if TYPE_CHECKING:
    from ..state import ModelState


@dataclass
class LayerScores:
    ffn: torch.Tensor  # [intermediate]
    groups: torch.Tensor  # [num_key_value_heads]
    influence: float


def _head_layout(config) -> tuple[int, int, int]:
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    head_dim = architectures.head_dim(config)
    return heads, kv, head_dim


def group_columns(config) -> torch.Tensor:
    """[kv, columns]: o_proj input columns of each KV-head group (its query heads' outputs)."""
    heads, kv, head_dim = _head_layout(config)
    return torch.arange(heads * head_dim).reshape(kv, heads // kv * head_dim)


def weight_scores(layer: torch.nn.Module, config) -> tuple[torch.Tensor, torch.Tensor]:
    """Magnitude-only scores: (FFN channel norms of gate, up and down; group norms of o_proj)."""
    mlp, attn = layer.mlp, layer.self_attn
    ffn = mlp.gate_proj.weight.norm(dim=1) * mlp.up_proj.weight.norm(dim=1) * mlp.down_proj.weight.norm(dim=0)
    groups = torch.stack([attn.o_proj.weight[:, cols].norm() for cols in group_columns(config)])
    return ffn.detach(), groups.detach()


def activation_scores(layer: torch.nn.Module, config, stats: InputStatistics) -> tuple[torch.Tensor, torch.Tensor]:
    down = layer.mlp.down_proj.weight.detach().double()
    ffn = stats.gram["mlp.down_proj"].diagonal() * (down**2).sum(0)
    o = layer.self_attn.o_proj.weight.detach().double()
    gram = stats.gram["self_attn.o_proj"]
    groups = torch.stack([((o[:, cols] @ gram[cols][:, cols]) * o[:, cols]).sum() for cols in group_columns(config)])
    return ffn.float(), groups.float()


def block_influence(inputs: list[torch.Tensor], outputs: list[torch.Tensor]) -> float:
    total, count = 0.0, 0
    for x, y in zip(inputs, outputs):
        cos = torch.nn.functional.cosine_similarity(x.float(), y.float(), dim=-1)
        total += cos.sum().item()
        count += cos.numel()
    return 1.0 - total / count


def measure(state: "ModelState", samples: torch.Tensor, importance: str, batch_size: int,
            seed: int) -> list[LayerScores]:
    """Scores of every decoder layer's structures, one layer in memory at a time (calibration activations
    are always used for influence)."""
    config = state.config
    inputs = state_layer_inputs(state, samples, batch_size)
    generator = torch.Generator().manual_seed(seed)
    scores = []
    for index in progress(range(state.num_layers), desc="prune: scoring", total=state.num_layers, unit="layer"):
        with state.layer(index) as layer:
            stats = InputStatistics({n: layer.get_submodule(n) for n in ("mlp.down_proj", "self_attn.o_proj")})
            try:
                outputs = run_layer(layer, inputs)
            finally:
                stats.close()
            scores.append(_layer_scores(layer, config, stats, importance, generator, inputs, outputs))
        inputs = outputs
    return scores


def _layer_scores(layer, config, stats, importance, generator, inputs, outputs) -> LayerScores:
    """One layer's scores from its input statistics and the hidden states entering and leaving it."""
    if importance in ("activation", "reconstruction"):  # layers: reconstruction has no refit, block influence
        ffn, groups = activation_scores(layer, config, stats)
    elif importance == "magnitude":
        ffn, groups = weight_scores(layer, config)
    else:
        ffn = torch.rand(config.intermediate_size, generator=generator)
        groups = torch.rand(config.num_key_value_heads, generator=generator)
    influence = block_influence(inputs.hidden, outputs.hidden)
    if importance == "random":
        influence = torch.rand(1, generator=generator).item()
    return LayerScores(ffn, groups, influence)
