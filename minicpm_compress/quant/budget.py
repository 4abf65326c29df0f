"""Mixed precision to a budget: which decoder linears an int4 stage keeps at more bits, and how many.

Each calibrating int4 stage (awq, gptq) measures, per linear, the relative output error of its own int4
weight and of round-to-nearest at each promotion — int8 at the same grouping, or for a K-quant layout
each rung up Q2_K → Q3_K → Q4_K → Q5_K → Q6_K → Q8_0 — exactly over the calibration tokens through the Gram matrix
of the linear's inputs. Linears are then promoted greedily by the error a promotion removes per extra
bit stored, until the average bits per weight of the decoder linears reaches `target_bits` (or, with
`int8_linears: N`, the N linears with the largest int4 error go to int8). Bits per weight
(`QuantScheme.bits_per_weight`) count codes, scales and zero points.
"""

from __future__ import annotations


import torch
from pydantic import BaseModel, Field, model_validator

from ..errors import CompressError
from .output_error import relative_error
from .qweight import QuantScheme, QuantizedWeight, quantize


class BudgetConfig(BaseModel):
    int8_linears: int = Field(0, ge=0, description="keep the N linears with the largest int4 output error at int8")
    target_bits: float | None = Field(
        None, gt=0, le=16,
        description="average bits per weight of the decoder linears: promote linears to int8 until it is reached")

    @model_validator(mode="after")
    def _int8_needs_int4(self):
        if (self.int8_linears or self.target_bits is not None) and getattr(self, "bits", 4) != 4:
            raise ValueError("int8_linears / target_bits (mixed precision) apply to bits: 4 only")
        if self.int8_linears and self.target_bits is not None:
            raise ValueError("give int8_linears or target_bits, not both")
        return self

    @property
    def budgeted(self) -> bool:
        return self.target_bits is not None


def int8_scheme(scheme: QuantScheme) -> QuantScheme:
    """The 8-bit scheme a budget promotes a linear to: the same grouping, or Q8_0 for a K-quant grid or IQ4_NL."""
    if scheme.super_block or scheme.codebook:
        return QuantScheme(layout="Q8_0")
    return scheme.scheme().model_copy(update={"bits": 8})


def promotions(scheme: QuantScheme) -> list[QuantScheme]:
    """The schemes a budget may promote a linear of `scheme` to, in increasing size: up the K-quant ladder
    (Q2_K → Q3_K → Q4_K → Q5_K → Q6_K → Q8_0), or straight to int8 at the same grouping."""
    ladder = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
    if scheme.super_block and scheme.layout in ladder:
        return [QuantScheme(layout=name) for name in ladder[ladder.index(scheme.layout) + 1:]] + [int8_scheme(scheme)]
    return [int8_scheme(scheme)]


def promotion_errors(weight: torch.Tensor, gram: torch.Tensor, scheme: QuantScheme) -> list[float]:
    """Relative output error of `weight` rounded to nearest at each promotion, over the Gram matrix's tokens."""
    return [relative_error(weight, quantize(weight, up).dequantize(), gram.float()) for up in promotions(scheme)]


def choose_promotions(config: BudgetConfig, scheme: QuantScheme, shapes: dict[str, tuple[int, int]],
                      errors: dict[str, float], errors_up: dict[str, list[float]]) -> tuple[dict[str, int], float]:
    """Which linears to promote, to which rung of `promotions(scheme)` (index), and the decoder linears'
    resulting average bits per weight. Greedy on the error removed per extra bit, any rung up at a time."""
    ladder = [scheme] + promotions(scheme)
    total = sum(o * i for o, i in shapes.values())
    bits = {n: [s.bits_per_weight(i) for s in ladder] for n, (o, i) in shapes.items()}
    size = {n: o * i for n, (o, i) in shapes.items()}
    spent = sum(size[n] * bits[n][0] for n in shapes)
    if config.int8_linears:
        chosen = {n: len(ladder) - 2 for n in sorted(errors, key=errors.get, reverse=True)[: config.int8_linears]}
        spent += sum(size[n] * (bits[n][-1] - bits[n][0]) for n in chosen)
        return chosen, spent / total
    if config.target_bits is None:
        return {}, spent / total
    if config.target_bits < spent / total - 1e-9:
        raise CompressError(f"target_bits {config.target_bits} is below the {spent / total:.3f} bits/weight of "
                            f"{scheme.describe()} for every linear")
    costs = {n: [size[n] * b for b in bits[n]] for n in shapes}
    level = climb(costs, {n: [errors[n]] + list(errors_up[n]) for n in shapes}, config.target_bits * total)
    spent = sum(costs[n][level[n]] for n in shapes)
    return {n: lvl - 1 for n, lvl in level.items() if lvl}, spent / total


def climb(costs: dict[str, list[float]], errors: dict[str, list[float]], budget: float) -> dict[str, int]:
    """The option (index) each item takes: every item starts at its option 0 and moves to any option that
    costs more and errs less, the move removing the most error per extra cost first, while the total cost
    stays within `budget`. Errors add up across items (relative output errors, one per linear)."""
    level = {n: 0 for n in costs}
    spent = sum(c[0] for c in costs.values())
    while True:
        best = None  # (error removed per extra cost, name, option)
        for n in sorted(costs):
            here = level[n]
            for option in range(len(costs[n])):
                extra = costs[n][option] - costs[n][here]
                removed = errors[n][here] - errors[n][option]
                if extra <= 0 or removed <= 0 or spent + extra > budget:
                    continue
                if best is None or removed / extra > best[0]:
                    best = (removed / extra, n, option)
        if best is None:
            return level
        _, n, option = best
        spent += costs[n][option] - costs[n][level[n]]
        level[n] = option


def apply_budget(qweights: dict[str, QuantizedWeight], state, config: BudgetConfig, scheme: QuantScheme,
                 errors: dict[str, float], errors_up: dict[str, list[float]]) -> dict:
    """Replace the chosen linears' weights by their promotions (round to nearest on the state's float weights);
    return what was done, for the stage's details."""
    shapes = {n: q.shape for n, q in qweights.items()}
    chosen, average = choose_promotions(config, scheme, shapes, errors, errors_up)
    ladder = promotions(scheme)
    for name, rung in chosen.items():
        qweights[name] = quantize(state.tensor(f"{name}.weight"), ladder[rung])
    details = {"int8_linears": sorted(n for n, rung in chosen.items() if ladder[rung].bits == 8),
               "linear_bits_per_weight": round(average, 4)}
    if len(ladder) > 1:
        details["promoted"] = {n: qweights[n].scheme.describe() for n in sorted(chosen)}
    if config.target_bits is not None:
        details["target_bits"] = config.target_bits
    return details
