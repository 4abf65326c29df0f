"""Mixed precision to a budget: which decoder linears an int4 stage keeps at int8.

Each calibrating int4 stage (awq, gptq) measures, per linear, the relative output error of its int4
weight and of round-to-nearest int8 at the same grouping, both exactly over the calibration tokens
through the Gram matrix of the linear's inputs. Linears are then promoted to int8 greedily by the error
they remove per extra bit stored, until the average bits per weight of the decoder linears reaches
`target_bits` (or, with `int8_linears: N`, the N linears with the largest int4 error are promoted, as
before). Bits per weight (`QuantScheme.bits_per_weight`) count codes, scales and zero points.
"""

from __future__ import annotations


import torch
from pydantic import BaseModel, Field, model_validator

from ..errors import CompressError
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
    """The 8-bit scheme a budget promotes a linear to: the same grouping, or Q8_0 for a K-quant grid."""
    if scheme.super_block:
        return QuantScheme(layout="Q8_0")
    return scheme.scheme().model_copy(update={"bits": 8})


def int8_error(weight: torch.Tensor, gram: torch.Tensor, scheme: QuantScheme) -> float:
    """Relative output error of `weight` rounded to int8 at `scheme`'s grouping, over the Gram matrix's tokens."""
    from .awq import relative_error  # awq imports this module

    return relative_error(weight, quantize(weight, int8_scheme(scheme)).dequantize(), gram.float())


def choose_int8(config: BudgetConfig, scheme: QuantScheme, shapes: dict[str, tuple[int, int]],
                errors4: dict[str, float], errors8: dict[str, float]) -> tuple[list[str], float]:
    """The linears to keep at int8, and the decoder linears' resulting average bits per weight."""
    total = sum(o * i for o, i in shapes.values())
    bits = {n: (o * i, scheme.bits_per_weight(i), int8_scheme(scheme).bits_per_weight(i)) for n, (o, i) in shapes.items()}
    spent = sum(n * b4 for n, b4, _ in bits.values())
    if config.int8_linears:
        chosen = sorted(errors4, key=errors4.get, reverse=True)[: config.int8_linears]
    elif config.target_bits is not None:
        if config.target_bits < spent / total - 1e-9:
            raise CompressError(f"target_bits {config.target_bits} is below the {spent / total:.3f} bits/weight of "
                                f"{scheme.describe()} for every linear")
        gain = {n: (errors4[n] - errors8[n]) / (bits[n][0] * (bits[n][2] - bits[n][1])) for n in shapes}
        chosen = []
        for name in sorted(gain, key=lambda n: (-gain[n], n)):
            n, b4, b8 = bits[name]
            if gain[name] <= 0 or spent + n * (b8 - b4) > config.target_bits * total:
                continue  # a smaller linear further down may still fit
            spent += n * (b8 - b4)
            chosen.append(name)
    else:
        chosen = []
    if config.int8_linears:
        spent += sum(bits[n][0] * (bits[n][2] - bits[n][1]) for n in chosen)
    return chosen, spent / total


def apply_budget(qweights: dict[str, QuantizedWeight], state, config: BudgetConfig, scheme: QuantScheme,
                 errors4: dict[str, float], errors8: dict[str, float]) -> dict:
    """Replace the chosen linears' int4 weights by int8 ones (round to nearest on the state's float weights);
    return what was done, for the stage's details."""
    shapes = {n: q.shape for n, q in qweights.items()}
    chosen, average = choose_int8(config, scheme, shapes, errors4, errors8)
    for name in chosen:
        qweights[name] = quantize(state.tensor(f"{name}.weight"), int8_scheme(scheme))
    details = {"int8_linears": sorted(chosen), "linear_bits_per_weight": round(average, 4)}
    if config.target_bits is not None:
        details["target_bits"] = config.target_bits
    return details
