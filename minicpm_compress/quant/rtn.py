"""The `rtn` stage: round-to-nearest quantization of every decoder-layer linear."""

from __future__ import annotations

from ..models.architectures import quantizable_linears
from ..progress import progress
from ..stages import RunContext, StageConfig, StageOutcome, register_stage
from .qweight import QuantScheme, quantize


class RTNConfig(QuantScheme, StageConfig):
    """A quantization scheme (bits, group_size, symmetric, zero_point) and a gate."""


@register_stage("rtn", RTNConfig, "round-to-nearest weight quantization of every decoder linear")
def apply_rtn(config: RTNConfig, state, ctx: RunContext) -> StageOutcome:
    scheme = config.scheme()
    linears = quantizable_linears(state.model)
    state.qweights = {
        name: quantize(linear.weight, scheme)
        for name, linear in progress(linears.items(), desc="rtn", total=len(linears), unit="linear")
    }
    return StageOutcome(state, details={"scheme": scheme.describe(), "quantized_linears": len(linears)})
