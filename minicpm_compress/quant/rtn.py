"""The `rtn` stage: round-to-nearest quantization of every decoder-layer linear, one weight at a time."""

from __future__ import annotations

from ..progress import progress
from ..registry import RunContext, StageConfig, StageOutcome, register_stage
from .qweight import QuantScheme, quantize


class RTNConfig(QuantScheme, StageConfig):
    """A quantization scheme (bits, group_size, symmetric, zero_point) and a gate."""


@register_stage("rtn", RTNConfig, "round-to-nearest weight quantization of every decoder linear")
def apply_rtn(config: RTNConfig, state, ctx: RunContext) -> StageOutcome:
    scheme = config.scheme()
    names = state.linear_names()
    state.qweights = {
        name: quantize(state.tensor(f"{name}.weight").to(state.device), scheme).to("cpu")
        for name in progress(names, desc="rtn", total=len(names), unit="linear")
    }
    return StageOutcome(state, details={"scheme": scheme.describe(), "quantized_linears": len(names)})
