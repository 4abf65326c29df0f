"""The `gptq` stage: GPTQ (Frantar et al., ICLR 2023), error-feedback quantization from second-order statistics.

For each linear, with H = XᵀX over its calibration inputs (the Gram matrix AWQ accumulates too; GPTQ's
2XᵀX differs by a factor that cancels), the columns are quantized one at a time and each column's
rounding error is spread onto the columns not yet quantized, in the proportions that minimise the
layer's output error tr(ΔHΔᵀ):

    H ← H + λ·mean(diag H)·I            (dampening)
    U = chol(H⁻¹)ᵀ                      (upper Cholesky factor of the inverse)
    for column j:  q_j = Q(w_j);  e = (w_j − q_j) / U_jj;  w_k −= e·U_jk  for k > j

applied in blocks of columns, with the updates to later blocks batched (the "lazy batch" of the paper).
The sweep computes the same codes without inverting H. With R = U⁻¹ (upper triangular, H = R·Rᵀ: the
Cholesky factor of H with its rows and columns reversed), the errors above are E = (W − Q)·R, so each column as
the sweep reaches it is its original value plus the original-minus-code differences δ_i = w_i − q_i of the
columns before it, weighted by R:

    w'_k = w_k + Σ_{i<k} δ_i · R_ik / R_kk

one Cholesky factorisation instead of three (two, and an inverse: half of GPTQ's time on a 4,864-column
down_proj). Where a group's parameters are chosen as the sweep reaches it, they are chosen from its columns
as the paper's sweep holds them then (compensated for the differences so far, not only at the column itself):
w_G + Δ_F·R_FG·R_GG⁻¹ for the columns F before the group G, a g × g triangular solve per group. (Choosing from
the R-form columns instead measured KLD 0.063 against 0.060 on qwen2.5-0.5b at int4 g128.) Differences reach
the next INNER_BLOCK columns one by one and everything further by matrix products, per inner block and per
block of `block_size` columns (far less memory traffic than rank-1 updates across a whole 128-column block).
Group scales and zero points are chosen from the updated weights when the sweep reaches a group's first
column, by the project's one quantizer (`group_params`), optionally with a clipping ratio searched on
the group's block of H (AWQ's clip search). With `act_order` the columns are visited in decreasing
order of diag(H) and the groups are static (chosen from the weight before the sweep), so the result is
the plain grouped layout every exporter reads: codes, scales and zero points as `quantize` would store.

Layer by layer: the Gram matrices of a layer are gathered from its inputs, which are the outputs of the
already quantized layers before it (as in GPTQ), then its linears are quantized and the quantized layer
produces the next layer's inputs. After an `awq` stage this runs on the AWQ-scaled weights: AWQ's scales
stay folded, GPTQ's error feedback replaces its round-to-nearest codes.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field

from ..errors import CompressError
from ..layerwise import layer_grams, run_layer, state_layer_inputs
from ..models.architectures import layer_prefix
from ..progress import progress
from ..registry import RunContext, StageConfig, StageOutcome, register_stage
from . import awq  # used at call time: importing awq first (it registers its stage) comes back here
from .budget import BudgetConfig, apply_budget, promotion_errors
from .output_error import relative_error
from .qweight import QuantScheme, QuantizedWeight, code_values, group_params, round_codes
from .scale_search import SEARCHES, search_params


INNER_BLOCK = 16  # columns whose errors reach each other one by one; larger spans are updated by matrix products


class GPTQConfig(QuantScheme, BudgetConfig, StageConfig):
    block_size: int = Field(128, ge=1, description="columns per lazy-batch block (rounded up to whole groups)")
    dampening: float = Field(0.01, gt=0, le=1, description="λ: fraction of mean(diag H) added to the diagonal")
    act_order: bool = Field(False, description="quantize columns in decreasing order of diag(H); groups static")
    clip: bool = Field(True, description="search a clipping ratio per group on H's diagonal block (AWQ's clip search)")
    clip_grid: int = Field(20, ge=1)
    max_shrink: float = Field(0.5, gt=0, lt=1)
    search: Literal[SEARCHES] = Field(
        "clip", description="with clip: the scale search per group (quant/scale_search.py): clip ratios, "
        "importance-weighted least squares, or both (the better per group)")
    batch_size: int = Field(8, ge=1, description="calibration samples per forward")


def _params(weight: torch.Tensor, gram: torch.Tensor, scheme: QuantScheme, config: GPTQConfig | None):
    """Scales and zero points for `weight`'s groups, searched on `gram` when asked."""
    if config is not None and config.clip:
        return search_params(weight, scheme, gram, config.search, config.clip_grid, config.max_shrink)
    return group_params(weight, scheme)


def _factor(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """R with H = R·Rᵀ, upper triangular (the Cholesky factor of H with its rows and columns reversed, reversed),
    as P = R / diag(R) column by column (the sweep adds δ_i · P_ik to each later column k) and diag(R)."""
    try:
        r = torch.linalg.cholesky(h.flip(0, 1)).flip(0, 1)
    except torch.linalg.LinAlgError:
        raise CompressError("the dampened Gram matrix of its inputs is not positive definite (raise dampening)") from None
    diagonal = torch.diagonal(r).clone()
    return r.div_(diagonal), diagonal


def _compensated(current: torch.Tensor, original: torch.Tensor, pull: torch.Tensor, diagonal: torch.Tensor
                 ) -> torch.Tensor:
    """A group's columns [g, out] (transposed) as the paper's sweep holds them when it reaches the group: the
    original columns plus the optimal compensation for the differences δ_F of every column before it,
    Δ_F·R_FG·R_GG⁻¹ (H = R·Rᵀ). `current` is what the R-form sweep holds, original + Δ_F·R_FG / diag(R_G)."""
    r_gg = pull * diagonal
    # (Δ_F·R_FG)ᵀ recovered from `current`, then R_GG⁻ᵀ applied by a triangular solve
    return original + torch.linalg.solve_triangular(r_gg.T, (current - original) * diagonal.unsqueeze(1), upper=False)


def gptq_quantize(weight: torch.Tensor, gram: torch.Tensor, scheme: QuantScheme,
                  config: GPTQConfig | None = None) -> QuantizedWeight:
    """GPTQ codes for `weight` [out, in] given its inputs' Gram matrix `gram` [in, in] (any float dtype)."""
    config = config or GPTQConfig(**scheme.model_dump(), clip=False)
    w = weight.detach().to(torch.float32).clone()
    out, cols = w.shape
    h = gram.to(torch.float32).clone()
    dead = torch.diagonal(h) == 0  # inputs that never fire: no error to feed, any code will do
    h[dead, dead] = 1
    w[:, dead] = 0
    scheme = scheme.fitting(cols)
    group = scheme.group_size or cols
    n_groups = math.ceil(cols / group)
    # a K-quant grid ties the groups of a super-block together: its parameters are set once, up front
    static = config.act_order or scheme.group_size is None or scheme.super_block is not None
    if static:  # one set of group parameters, from the weight as it is
        scales, zeros = _params(w, h, scheme, config)
    else:
        scales = torch.empty(out, n_groups, device=w.device)
        zeros = None if scheme.symmetric else torch.empty(
            out, n_groups, dtype=torch.uint8 if scheme.zero_point == "int" else torch.float32, device=w.device)
    order = (torch.argsort(torch.diagonal(h), descending=True, stable=True) if config.act_order
             else torch.arange(cols, device=w.device))
    w, h = w[:, order], h[order][:, order]
    h.diagonal().add_(config.dampening * h.diagonal().mean())
    pull, diagonal = _factor(h)
    column_group = order // group
    block = group * math.ceil(config.block_size / group) if not static else config.block_size
    inner = INNER_BLOCK if static else math.gcd(group, INNER_BLOCK)  # a group's first column starts an inner block
    # The sweep runs on the transposed weight, so that each column it visits is a contiguous row (2–3× faster).
    device = w.device
    wt, codes = w.T.contiguous(), torch.empty(cols, out, device=device)
    del w  # the sweep holds the weight transposed twice (as updated, as it was) and the codes: three copies
    original = wt.clone()
    for b0 in range(0, cols, block):
        b1 = min(b0 + block, cols)
        wb, deltas, pb = wt[b0:b1], torch.empty(b1 - b0, out, device=device), pull[b0:b1, b0:b1]
        # each column's scale and zero point, gathered once per block (per group as it starts when not static)
        if static:
            sb = scales[:, column_group[b0:b1]].T.contiguous()
            zb = None if zeros is None else zeros[:, column_group[b0:b1]].T.to(torch.float32).contiguous()
        else:
            sb = torch.empty(b1 - b0, out, device=device)
            zb = None if zeros is None else torch.empty(b1 - b0, out, device=device)
        for c0 in range(0, b1 - b0, inner):
            c1 = min(c0 + inner, b1 - b0)
            for i in range(c0, c1):
                j = b0 + i
                if not static and j % group == 0:  # a new group: parameters from the weights as updated so far
                    g, end = j // group, min(j + group, cols) - b0
                    span = slice(j, b0 + end)
                    seen = _compensated(wb[i:end], original[span], pull[span, span], diagonal[span])
                    gs, gz = _params(seen.T.contiguous(), h[span, span],
                                     scheme.model_copy(update={"group_size": None}), config)
                    scales[:, g] = gs[:, 0]
                    sb[i:end] = gs[:, 0]
                    if zeros is not None:
                        zeros[:, g] = gz[:, 0]
                        zb[i:end] = gz[:, 0].to(torch.float32)
                s = sb[i]
                z = None if zb is None else zb[i]
                c = round_codes(wb[i], s, z, scheme)
                codes[j] = c
                delta = deltas[i]
                torch.sub(original[j], code_values(c, s, z, scheme), out=delta)
                wb[i + 1 : c1].addr_(pb[i, i + 1 : c1], delta)  # to the inner block's later columns
            wb[c1:].addmm_(pb[c0:c1, c1:].T, deltas[c0:c1])  # the inner block's, to the block's later columns
        wt[b1:].addmm_(pull[b0:b1, b1:].T, deltas)  # the block's, to every later column
    codes = codes.T[:, torch.argsort(order)]
    dtype = torch.int8 if scheme.symmetric else torch.uint8
    return QuantizedWeight(codes.to(dtype).contiguous(), scales.contiguous(), zeros, scheme)


def gptq_layer(layer: torch.nn.Module, prefix: str, grams: dict[str, torch.Tensor], arch, scheme: QuantScheme,
               config: GPTQConfig) -> tuple[dict[str, QuantizedWeight], dict[str, float], dict[str, list[float]]]:
    """GPTQ codes for every linear of one decoder layer (`grams`: each one's input Gram matrix; linears sharing
    one are quantized in one sweep), their relative output errors, and (with a bit budget) those of round-to-nearest
    at each promotion (budget.promotions)."""
    qweights, errors, errors_up = {}, {}, {}
    shared: dict[int, list[str]] = {}  # linears fed the same input (q/k/v; gate/up) share one Gram matrix
    for name in arch.linears:
        shared.setdefault(id(grams[name]), []).append(name)
    for names in shared.values():
        # one sweep over the linears' rows stacked: GPTQ treats rows independently, so this is each linear's GPTQ
        weights = [layer.get_submodule(name).weight.detach().float() for name in names]
        try:
            stacked = gptq_quantize(torch.cat(weights), grams[names[0]], scheme, config)
        except CompressError as e:
            linears = ", ".join(f"'{prefix}.{name}'" for name in names)
            raise CompressError(f"gptq: {linears} (one shared input): {e}") from None
        gram = grams[names[0]].float()
        start = 0
        for name, weight in zip(names, weights):
            rows = torch.arange(start, start + weight.shape[0], device=weight.device)
            start += weight.shape[0]
            q = stacked.rows(rows).to("cpu")  # indexed, so a copy of its own
            errors[f"{prefix}.{name}"] = relative_error(weight, q.dequantize().to(weight.device), gram)
            if config.budgeted:
                errors_up[f"{prefix}.{name}"] = promotion_errors(weight, gram, scheme)
            qweights[f"{prefix}.{name}"] = q
    return {f"{prefix}.{name}": qweights[f"{prefix}.{name}"] for name in arch.linears}, errors, errors_up


@register_stage("gptq", GPTQConfig, "GPTQ: error-feedback weight quantization from calibration statistics",
                calibrates=True)
def apply_gptq(config: GPTQConfig, state, ctx: RunContext) -> StageOutcome:
    scheme = config.scheme()
    samples = ctx.calibration(state)
    arch = state.arch
    qweights, errors, errors_up = {}, {}, {}
    with state.computing_in(torch.float32):
        inputs = state_layer_inputs(state, samples, config.batch_size)
        for index in progress(range(state.num_layers), desc="gptq", total=state.num_layers, unit="layer"):
            prefix = layer_prefix(index)
            with state.layer(index) as layer:
                grams, _ = layer_grams(layer, arch, inputs)
                layer_q, layer_errors, layer_errors_up = gptq_layer(layer, prefix, grams, arch, scheme, config)
                del grams
                with torch.no_grad():  # the next layer sees this one as deployed
                    for name in arch.linears:
                        layer.get_submodule(name).weight.copy_(layer_q[f"{prefix}.{name}"].dequantize())
                inputs = run_layer(layer, inputs)
            qweights.update(layer_q)
            errors.update(layer_errors)
            errors_up.update(layer_errors_up)
    if not qweights:
        raise CompressError("gptq: the model has no decoder linears to quantize")
    mixed = apply_budget(qweights, state, config, scheme, errors, errors_up)
    state.qweights = qweights
    details = {
        "scheme": scheme.describe() + (f", {len(mixed['int8_linears'])} linears int8" if mixed["int8_linears"] else ""),
        "calibration_tokens": samples.numel(),
        "act_order": config.act_order,
        "clip": config.clip,
        "dampening": config.dampening,
        "mean_relative_output_error": round(sum(errors.values()) / len(errors), 6),
        "quantized_linears": len(qweights),
        **mixed,
        "linear_errors": awq.linear_errors(errors),
    }
    return StageOutcome(state, details=details)
