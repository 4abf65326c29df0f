"""The `prune` stage: remove FFN channels, KV-head groups or whole decoder layers, driven by calibration text.

FFN channels and KV-head groups are removed in one layer walk that refits what stays (reconstruct.py):
by default the units with the least activation energy on the pruned model's own inputs go and
down_proj / o_proj's kept columns are refit by least squares (`importance: reconstruction` chooses by
the error left after the refit instead: better on minicpm-smollm2, worse on qwen2.5-0.5b). Whole layers
are chosen by block influence; after the cut every kept layer's down_proj is refit towards the unpruned
model's stream (reconstruct.refit_towards_reference), so the layers after a gap take over what the
removed ones added. `refit: false` is the older cut-only path:
units ranked by importance scores measured on the unpruned model, cut, nothing refit.

How much goes is set by `target_params` (the fraction of the model's parameters to keep, embeddings
included) or by `ratio` (the fraction of the method's structures to remove in every layer, or of the
layers). The same number of channels / groups is removed from every layer, so the config stays a
standard one; the FFN width is rounded down to a multiple of `multiple_of` (GGUF's blocks run along it).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field, model_validator

from ..errors import CompressError
from ..models.architectures import decoder_layers
from ..registry import RunContext, StageConfig, StageOutcome, register_stage
from .reconstruct import LayerwisePruning, prune_layerwise, refit_towards_reference
from .scores import LayerScores, measure
from .surgery import keep_ffn_channels, keep_head_groups, keep_layers

UNITS = {"ffn": "FFN channels per layer", "heads": "KV-head groups per layer", "layers": "decoder layers"}


class PruneConfig(StageConfig):
    method: Literal["ffn", "heads", "layers"] = "ffn"
    target_params: float | None = Field(None, gt=0, lt=1, description="fraction of the parameters to keep")
    ratio: float | None = Field(None, ge=0, le=1, description="fraction of the method's structures to remove")
    importance: Literal["reconstruction", "activation", "magnitude", "random"] = Field(
        "activation", description="activation energy measured in the layer walk (the default: best on "
        "qwen2.5-0.5b), the output error a removal leaves after the refit (reconstruction), weight magnitudes, or "
        "a seeded random baseline. Layers: block influence for both reconstruction and activation"
    )
    refit: bool = Field(True, description="refit down_proj / o_proj's kept columns by least squares, layer by "
                        "layer on the pruned model's own inputs; layers: every kept layer's down_proj refit towards "
                        "the unpruned model's stream after the cut (false: cut only)")
    correct_drift: bool = Field(False, description="ffn / heads: aim each refit at the unpruned model's own hidden "
                                "states, walked alongside, so it also corrects the drift the pruned layers before it "
                                "left (what the layers refit always does)")
    multiple_of: int = Field(32, ge=1, description="FFN width kept a multiple of this (GGUF Q4_0/Q8_0 blocks are 32 wide)")
    calibration_samples: int = Field(32, ge=1, description="calibration sequences for the scores")
    batch_size: int = Field(8, ge=1)

    @model_validator(mode="after")
    def _one_amount(self):
        if (self.target_params is None) == (self.ratio is None):
            raise ValueError("give exactly one of target_params (fraction of parameters to keep) or ratio")
        if self.correct_drift and (not self.refit or self.method == "layers"):
            raise ValueError("correct_drift changes the ffn / heads refit's target: it needs refit: true (the "
                             "layers refit always aims at the unpruned model's stream)")
        if self.importance == "reconstruction" and not self.refit and self.method != "layers":
            raise ValueError("importance 'reconstruction' scores the error left after the refit: it needs "
                             "refit: true (or choose activation, magnitude or random)")
        return self


def parameter_count(model: torch.nn.Module) -> int:
    """Distinct parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def _units(model: torch.nn.Module, method: str) -> tuple[int, int]:
    """(structures available to this method, parameters each one removes from the whole model)."""
    c = model.config
    layers = decoder_layers(model)
    if method == "ffn":
        mlp = layers[0].mlp
        per = sum(p.numel() for p in mlp.parameters()) // c.intermediate_size
        return c.intermediate_size, per * len(layers)
    if method == "heads":
        attn = layers[0].self_attn
        per = sum(p.numel() for n, p in attn.named_parameters() if "norm" not in n) // c.num_key_value_heads
        return c.num_key_value_heads, per * len(layers)
    return len(layers), sum(p.numel() for p in layers[0].parameters())


def units_to_keep(config: PruneConfig, model: torch.nn.Module) -> int:
    units, per_unit = _units(model, config.method)
    total = parameter_count(model)
    if config.ratio is not None:
        remove = round(config.ratio * units)
    else:
        remove = math.ceil((1 - config.target_params) * total / per_unit)
    if remove == 0:
        return units
    kept = units - remove
    if config.method == "ffn":
        kept = kept // config.multiple_of * config.multiple_of
    if kept < 1:
        most = (units - (config.multiple_of if config.method == "ffn" else 1)) * per_unit / total
        amount = f"ratio {config.ratio}" if config.ratio is not None else f"target_params {config.target_params}"
        raise CompressError(
            f"prune: {amount} would remove all {units} {UNITS[config.method]}; method '{config.method}' can "
            f"remove at most {max(most, 0):.1%} of the parameters"
        )
    if config.method == "heads":
        c = model.config
        heads = kept * c.num_attention_heads // c.num_key_value_heads
        if c.hidden_size % heads:
            raise CompressError(
                f"prune: keeping {kept} KV-head groups leaves {heads} attention heads, which do not divide "
                f"hidden_size {c.hidden_size}; transformers would refuse the checkpoint (choose another amount)"
            )
    return kept


def prune_model(model: torch.nn.Module, config: PruneConfig, scores: list[LayerScores] | LayerwisePruning | None):
    """The pruned model (a new one; `model` is left as it was) and what was removed.

    `scores`: from prune.scores.measure (cut only), or the layer walk's choices and refits
    (reconstruct.prune_layerwise); None when nothing is to be removed.
    """
    units, _ = _units(model, config.method)
    kept = units_to_keep(config, model)
    before = parameter_count(model)
    details = {"method": config.method, "importance": config.importance, "refit": config.refit,
               "correct_drift": config.correct_drift,
               "units": UNITS[config.method], "units_before": units, "units_after": kept,
               "parameters_before": before}
    pruned = model
    if kept < units and config.method == "layers":
        ranked = sorted(range(units), key=lambda i: scores[i].influence)
        pruned = keep_layers(model, sorted(ranked[units - kept:]))
        details["removed_layers"] = sorted(ranked[: units - kept])
        details["block_influence"] = [round(s.influence, 5) for s in scores]
    elif kept < units and isinstance(scores, LayerwisePruning):
        surgery = keep_ffn_channels if config.method == "ffn" else keep_head_groups
        pruned = surgery(model, scores.keep, scores.weights)
        details["relative_output_error"] = [round(e, 5) for e in scores.relative_errors]
    elif kept < units:
        per_layer = [s.ffn if config.method == "ffn" else s.groups for s in scores]
        keep = [torch.topk(s, kept).indices.sort().values.cpu() for s in per_layer]  # the model is held on the CPU
        pruned = (keep_ffn_channels if config.method == "ffn" else keep_head_groups)(model, keep)
    after = parameter_count(pruned)
    details.update({"parameters_after": after, "parameters_kept": round(after / before, 4)})
    return pruned, details


@register_stage("prune", PruneConfig, "structured pruning of FFN channels, KV-head groups or whole layers",
                whole_model=2, calibrates=True)
def apply_prune(config: PruneConfig, state, ctx: RunContext) -> StageOutcome:
    if state.qweights:
        raise CompressError("prune: the model already has quantized weights; prune before rtn/awq/qat")
    scores = None
    kept = units_to_keep(config, state.model)
    if kept < _units(state.model, config.method)[0]:
        samples = ctx.calibration(state, config.calibration_samples)
        if config.refit and config.method != "layers":
            scores = prune_layerwise(state, samples, config.method, kept, config.importance, config.batch_size,
                                     ctx.recipe.seed, config.correct_drift)
        else:
            scores = measure(state, samples, config.importance, config.batch_size, ctx.recipe.seed)
    pruned, details = prune_model(state.model, config, scores)
    if config.method == "layers" and config.refit and "removed_layers" in details:
        kept_layers = [i for i in range(state.num_layers) if i not in details["removed_layers"]]
        details["stream_distance_after_refit"] = [round(d, 5) for d in refit_towards_reference(
            state, pruned, kept_layers, samples, config.batch_size)]
    state.model = pruned
    return StageOutcome(state, details=details)
