"""The `awq` stage: activation-aware weight quantization (Lin et al., MLSys 2024) with clip search.

Layer by layer over the calibration samples (only one layer's activations in memory):
  1. run the float layer, accumulating for each linear the Gram matrix G = XᵀX of its inputs and
     their mean |x| per channel (see layerwise.InputStatistics);
  2. for each scaling group (a norm or linear feeding some linears), search per-input-channel scales
       s = mean|x|^α / mean|ŵ|^(1-α)   (ŵ: |w| normalised by its group's max; α on a grid, plus s = 1)
     minimising the summed squared output error of the group's linears over all calibration tokens,
     tr((W − Q(W·s)/s) G (W − Q(W·s)/s)ᵀ), scoring every candidate in one batched computation;
  3. fold the chosen scales into the preceding norm weight (or the preceding linear's rows) and the
     group's weight columns: the float function is unchanged;
  4. search a clipping ratio per output channel and group (not for q/k, as AutoAWQ), minimising that
     group's output error, and quantize with the project's one quantizer.
Layer outputs passed on are the float layer's, as in AutoAWQ.

Objectives: by default a scaling group is scored by the outputs of the group's linears themselves
(exactly, over every calibration token, through G). `objective: block` scores the norm-fed groups as
AutoAWQ does, by the output of the block they feed (the attention block for q/k/v, the MLP for gate/up),
running the block per candidate on the first `block_tokens` calibration tokens. For v→o and up→down the
two objectives are the same. MiniCPM's muP factors sit outside every scaling group (embedding scale before layer 0, the
residual factor after o_proj/down_proj, the logit divisor after the last layer), so they change layer
inputs, which step 1 captures from the model's own forward, and not the search.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from ..errors import CompressError
from ..layerwise import InputStatistics, run_layer, state_layer_inputs
from ..models.architectures import layer_prefix
from ..progress import progress
from ..registry import RunContext, StageConfig, StageOutcome, register_stage
from .budget import BudgetConfig, apply_budget, promotion_errors
from .output_error import output_error, relative_error
from .qweight import QuantScheme, QuantizedWeight, encode, group_view, quantize, rounded
from .scale_search import SEARCHES, search_params


class AWQConfig(QuantScheme, BudgetConfig, StageConfig):
    grid: int = Field(20, ge=1, description="scale exponents tried per group (the identity is always tried too)")
    clip: bool = Field(True, description="search a clipping ratio per output channel and group")
    clip_grid: int = Field(20, ge=1)
    max_shrink: float = Field(0.5, gt=0, lt=1, description="clip search goes down to (1 - max_shrink) of the range")
    search: Literal[SEARCHES] = Field(
        "clip", description="with clip: the scale search per group (quant/scale_search.py): clip ratios, "
        "importance-weighted least squares, or both (the better per group)")
    objective: Literal["linears", "block"] = Field(
        "linears", description="score a norm-fed group's scales by its linears' outputs (exact, over every calibration "
                               "token) or by the output of the block they feed (AutoAWQ's; over block_tokens tokens)")
    block_tokens: int = Field(4096, ge=1, description="calibration tokens the block objective runs the block on")
    batch_size: int = Field(8, ge=1, description="calibration samples per forward")


def _effective(weight: torch.Tensor, scales: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """Q(W·s)/s for a batch of candidate scales [k, in] → [k, out, in]."""
    k, (out, cols) = scales.shape[0], weight.shape
    scaled = (weight.unsqueeze(0) * scales.unsqueeze(1)).reshape(k * out, cols)
    return rounded(scaled, scheme).reshape(k, out, cols) / scales.unsqueeze(1)


def scale_candidates(weight: torch.Tensor, x_mean: torch.Tensor, scheme: QuantScheme, grid: int
                     ) -> tuple[torch.Tensor, list[float]]:
    """[1 + grid, in] candidate scales (the identity first, then s = mean|x|^α / mean|ŵ|^(1-α)) and their α."""
    group = scheme.fitting(weight.shape[1]).group_size or weight.shape[1]
    g = group_view(weight.abs(), group)
    w_mean = (g / (g.amax(dim=2, keepdim=True) + 1e-6)).reshape(weight.shape[0], -1)[:, : weight.shape[1]].mean(0)
    alphas = [i / grid for i in range(grid)]
    candidates = [torch.ones_like(x_mean)]
    for a in alphas:
        s = (x_mean.pow(a) / (w_mean.pow(1 - a) + 1e-4)).clamp(min=1e-4)
        candidates.append(s / (s.max() * s.min()).sqrt())
    return torch.stack(candidates), alphas


def _best(candidates: torch.Tensor, alphas: list[float], errors: torch.Tensor) -> tuple[torch.Tensor, float, float]:
    best = int(errors.argmin())
    alpha = -1.0 if best == 0 else alphas[best - 1]
    gain = 1 - (errors[best] / errors[0]).item() if errors[0] > 0 else 0.0
    return candidates[best], alpha, gain


def search_scales(weight: torch.Tensor, gram: torch.Tensor, x_mean: torch.Tensor, scheme: QuantScheme,
                  grid: int, chunk: int = 4) -> tuple[torch.Tensor, float, float]:
    """Best per-input-channel scales for the concatenated group weight [out, in], by the group's linears' outputs.

    Returns (scales, chosen α or -1 for the identity, relative error reduction against the identity).
    """
    candidates, alphas = scale_candidates(weight, x_mean, scheme, grid)
    errors = []
    gram = gram.float()
    # Bound the candidates' memory (~0.25 GB of float32 per temporary): fewer candidates at once, then
    # blocks of output rows; quantization is per row and the error sums over rows, so this is exact.
    budget = 256 << 20
    chunk = max(1, min(chunk, budget // max(1, weight.numel() * 4)))
    rows = max(1, budget // (chunk * weight.shape[1] * 4))
    for start in range(0, len(candidates), chunk):
        part = candidates[start : start + chunk]
        error = 0
        for r in range(0, weight.shape[0], rows):
            w = weight[r : r + rows]
            error = error + output_error(w.unsqueeze(0) - _effective(w, part, scheme), gram)
        errors.append(error)
    return _best(candidates, alphas, torch.cat(errors))


class BlockCalls:
    """The calls a decoder layer makes to one of its blocks (attention, MLP) for its first calibration batches,
    with the float outputs: enough to score candidate weights by the block's output, as AutoAWQ does."""

    def __init__(self, block: torch.nn.Module, max_tokens: int):
        self.block, self.max_tokens, self.tokens = block, max_tokens, 0
        self.calls: list[tuple[tuple, dict, torch.Tensor]] = []
        self._handle = block.register_forward_hook(self._record, with_kwargs=True)

    def _record(self, _module, args, kwargs, output):
        hidden = args[0] if args else kwargs["hidden_states"]
        if self.tokens < self.max_tokens:
            self.calls.append((args, kwargs, output[0] if isinstance(output, tuple) else output))
            self.tokens += hidden.shape[:-1].numel()

    def close(self) -> None:
        self._handle.remove()

    def error(self, linears: list[torch.nn.Linear], weights: list[torch.Tensor]) -> float:
        """Σ squared difference of the block's output from the float one with `linears` holding `weights`."""
        saved = [l.weight.data for l in linears]
        try:
            for linear, w in zip(linears, weights):
                linear.weight.data = w
            total = 0.0
            with torch.inference_mode():
                for args, kwargs, reference in self.calls:
                    out = self.block(*args, **kwargs)
                    out = out[0] if isinstance(out, tuple) else out
                    total += (out.float() - reference.float()).pow(2).sum().item()
            return total
        finally:
            for linear, w in zip(linears, saved):
                linear.weight.data = w


def search_scales_by_block(linears: list[torch.nn.Linear], calls: BlockCalls, x_mean: torch.Tensor,
                           scheme: QuantScheme, grid: int) -> tuple[torch.Tensor, float, float]:
    """Best scales for a group of linears by the output of the block they feed (AutoAWQ's objective)."""
    weights = [l.weight.detach() for l in linears]
    candidates, alphas = scale_candidates(torch.cat(weights), x_mean, scheme, grid)
    errors = [calls.error(linears, [_effective(w, s.unsqueeze(0), scheme)[0].to(w.dtype) for w in weights])
              for s in candidates]
    return _best(candidates, alphas, torch.tensor(errors))


def _fold(prev: torch.nn.Module, linears: list[torch.nn.Linear], scales: torch.Tensor) -> None:
    """prev's output ÷ s, the linears' input columns × s: the float function is unchanged."""
    with torch.no_grad():
        if isinstance(prev, torch.nn.Linear):
            prev.weight.div_(scales.unsqueeze(1))
            if prev.bias is not None:
                prev.bias.div_(scales)
        else:  # an RMSNorm-style weight
            prev.weight.div_(scales)
        for linear in linears:
            linear.weight.mul_(scales.unsqueeze(0))


def _record_fold(weights, prefix: str, group, prev: torch.nn.Module, scales: torch.Tensor) -> None:
    """The same fold as scale vectors in the state's weights (the same float operations, in the same order)."""
    weights.divide_rows(f"{prefix}.{group.prev}.weight", scales)
    if getattr(prev, "bias", None) is not None:
        weights.divide_rows(f"{prefix}.{group.prev}.bias", scales)
    for name in group.linears:
        weights.scale_columns(f"{prefix}.{name}.weight", scales)


def scored_block(group, arch) -> str | None:
    """The block (e.g. `self_attn`, `mlp`) whose output the block objective scores `group` by: groups fed by a
    norm; a group fed by a linear (v→o, up→down) is that block's last linear, scored by its own output."""
    if group.prev in arch.linears:
        return None
    return group.linears[0].rsplit(".", 1)[0]


def awq_layer(layer: torch.nn.Module, prefix: str, stats: InputStatistics, arch, config: AWQConfig,
              scheme: QuantScheme, weights=None, blocks: dict[str, BlockCalls] | None = None
              ) -> tuple[dict[str, QuantizedWeight], dict]:
    """Scale, clip and quantize one decoder layer in place (recording the folds in `weights` if given);
    return its quantized weights and a summary. `stats` covers the first linear of each scaling group:
    the group's linears share its input. `blocks`: recorded block calls, for the block objective."""
    grams = {n: stats.gram[g.linears[0]] for g in arch.scaling_groups for n in g.linears}
    alphas, gains, skipped = [], [], []
    for group in arch.scaling_groups:
        prev = layer.get_submodule(group.prev)
        linears = [layer.get_submodule(n) for n in group.linears]
        cols = linears[0].weight.shape[1]
        prev_out = prev.weight.shape[0]
        if prev_out != cols:  # e.g. v_proj → o_proj with grouped-query attention
            skipped.append(f"{group.prev}→{','.join(group.linears)}")
            continue
        first = group.linears[0]
        block = blocks.get(scored_block(group, arch)) if blocks else None
        if block is not None:
            scales, alpha, gain = search_scales_by_block(linears, block, stats.mean_abs(first), scheme, config.grid)
        else:
            weight = torch.cat([l.weight.detach() for l in linears])
            scales, alpha, gain = search_scales(weight, grams[first], stats.mean_abs(first), scheme, config.grid)
        _fold(prev, linears, scales)
        if weights is not None:
            _record_fold(weights, prefix, group, prev, scales)
        s64 = scales.double()
        with torch.inference_mode():  # the statistics were gathered in inference mode
            gram = grams[first].div_(s64.unsqueeze(1)).div_(s64.unsqueeze(0))  # in place: inputs are now x / s
        for name in group.linears:
            grams[name] = gram
        alphas.append(alpha)
        gains.append(gain)

    qweights, errors, errors_up = {}, {}, {}
    for name in arch.linears:
        linear = layer.get_submodule(name)
        weight = linear.weight.detach()
        gram = grams[name].float()
        if config.clip and not name.endswith(("q_proj", "k_proj")):
            q = encode(weight, *search_params(weight, scheme, gram, config.search, config.clip_grid, config.max_shrink),
                       scheme)
        else:
            q = quantize(weight, scheme)
        qweights[f"{prefix}.{name}"] = q.to("cpu")
        errors[f"{prefix}.{name}"] = relative_error(weight, q.dequantize(), gram)
        if config.budgeted:
            errors_up[f"{prefix}.{name}"] = promotion_errors(weight, gram, scheme)
        del gram
    return qweights, {"alphas": alphas, "gains": gains, "skipped": skipped, "errors": errors, "errors_up": errors_up}


def _awq_layers(state, samples: torch.Tensor, arch, config: AWQConfig, scheme: QuantScheme):
    """AWQ over every decoder layer, one at a time; the folds are recorded in `state.weights`."""
    firsts = [g.linears[0] for g in arch.scaling_groups]  # one input statistic per distinct input
    inputs = state_layer_inputs(state, samples, config.batch_size)
    qweights, summary = {}, {"alphas": [], "gains": [], "skipped": set(), "errors": {}, "errors_up": {}}
    for index in progress(range(state.num_layers), desc="awq", total=state.num_layers, unit="layer"):
        with state.layer(index) as layer:
            stats = InputStatistics({n: layer.get_submodule(n) for n in firsts})
            blocks = {}
            if config.objective == "block":
                names = {scored_block(g, arch) for g in arch.scaling_groups} - {None}
                blocks = {b: BlockCalls(layer.get_submodule(b), config.block_tokens) for b in sorted(names)}
            try:
                outputs = run_layer(layer, inputs)  # float outputs: the next layer's inputs
            finally:
                stats.close()
                for calls in blocks.values():
                    calls.close()
            layer_q, layer_summary = awq_layer(layer, layer_prefix(index), stats, arch, config, scheme, state.weights,
                                               blocks)
            del blocks
        qweights.update(layer_q)
        summary["alphas"] += layer_summary["alphas"]
        summary["gains"] += layer_summary["gains"]
        summary["skipped"].update(layer_summary["skipped"])
        summary["errors"].update(layer_summary["errors"])
        summary["errors_up"].update(layer_summary["errors_up"])
        inputs = outputs
        del stats
    return qweights, summary


@register_stage("awq", AWQConfig, "activation-aware weight quantization with scale and clip search", calibrates=True)
def apply_awq(config: AWQConfig, state, ctx: RunContext) -> StageOutcome:
    scheme = config.scheme()
    samples = ctx.calibration(state)
    arch = state.arch
    with state.computing_in(torch.float32):  # the search is float32 whatever the compute dtype
        qweights, summary = _awq_layers(state, samples, arch, config, scheme)
    alphas, gains, skipped = summary["alphas"], summary["gains"], summary["skipped"]
    state.weights_changed()
    if not qweights:
        raise CompressError("awq: the model has no decoder linears to quantize")
    mixed = apply_budget(qweights, state, config, scheme, summary["errors"], summary["errors_up"])
    state.qweights = qweights
    details = {
        "scheme": scheme.describe() + (f", {len(mixed['int8_linears'])} linears int8" if mixed["int8_linears"] else ""),
        "calibration_tokens": samples.numel(),
        "scaling_groups": len(alphas),
        "skipped_groups": sorted(skipped),
        "mean_alpha": round(sum(a for a in alphas if a >= 0) / max(1, sum(a >= 0 for a in alphas)), 4),
        "identity_chosen": sum(a < 0 for a in alphas),
        "mean_error_reduction": round(sum(gains) / max(1, len(gains)), 4),
        "quantized_linears": len(qweights),
        **mixed,
        "alphas": [round(a, 3) for a in alphas],  # per scaling group, layer by layer (-1: identity kept)
        "linear_errors": linear_errors(summary["errors"]),
    }
    return StageOutcome(state, details=details)


def linear_errors(errors: dict) -> dict:
    """Each linear's relative output error on the calibration text, rounded for the manifest (plotted by
    the HTML report as per-layer sensitivity)."""
    return {name: round(float(e), 6) for name, e in errors.items()}
