"""The `qat` stage: quantization-aware training distilled from the full-precision model.

Every decoder linear becomes a fake-quantized linear: its float weight (trained) is quantized and
dequantized on the fly by `qweight.fake_quantize` with learnable per-group scales (LSQ: the scales
receive gradients through the rounding), and the model is trained by `train.distill` to match the
full-precision reference's next-token distribution on calibration text.

Initialisation: linears that already carry quantized weights of the configured scheme (from AWQ or
RTN, or their int8 mixed-precision variant) start from those codes' scales and zero points, with the
float model the stage was given (AWQ's scaled weights); the others start from round-to-nearest.
Scales are learnt as `initial × exp(gain)` and rounded to float16 in the forward pass (gradients pass
straight through), so zero steps reproduce the initialisation exactly and the exported codes are
exactly the values the trained model computed with. Integer zero points stay fixed.

Why not torchao's QAT: torchao 0.18 installs and fake-quantizes on this CPU, but it chooses its scales
from each step's weights with its own conventions (symmetric int4 divides the range by 7.5, not 7) and
does not start from given scales, so neither AWQ's search nor exact export of the trained values
would carry over; the fake quantizer here is the project's own quantizer with a straight-through round.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from pydantic import Field

from ..models.architectures import quantizable_linears
from ..registry import RunContext, StageConfig, StageOutcome, register_stage
from ..train.distill import DistillSettings, ParamGroup, checkpoint_path, distill
from .budget import int8_scheme
from .qweight import MIN_SCALE, QuantizedWeight, QuantScheme, encode, exact_scales, fake_quantize, quantize


class QATConfig(QuantScheme, DistillSettings, StageConfig):
    scale_lr: float = Field(1e-3, ge=0, description="peak learning rate of the log-scale gains (0: fixed scales)")


class _ExactScalesSTE(torch.autograd.Function):
    """Scales rounded to the scheme's scale dtype going forward, the gradient passed straight through."""

    @staticmethod
    def forward(ctx, x, scheme):
        return exact_scales(x, scheme)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class FakeQuantLinear(torch.nn.Module):
    """A linear computing with its fake-quantized weight; `export()` gives the matching QuantizedWeight."""

    def __init__(self, linear: torch.nn.Linear, init: QuantizedWeight):
        super().__init__()
        self.linear = linear
        self.scheme = init.scheme
        device = linear.weight.device  # the initial codes may come from the CPU, the model be on an accelerator
        self.register_buffer("initial_scales", init.scales.to(device).clone())
        self.register_buffer("zeros", None if init.zeros is None else init.zeros.to(device).clone())
        self.gain = torch.nn.Parameter(torch.zeros_like(self.initial_scales))

    def scales(self) -> torch.Tensor:
        # a symmetric scheme's scales may be negative (the full grid): the gain scales their magnitude
        sign = torch.where(self.initial_scales < 0, -1.0, 1.0)
        return _ExactScalesSTE.apply(sign * (self.initial_scales.abs() * torch.exp(self.gain)).clamp(min=MIN_SCALE),
                                     self.scheme)

    def quantized_weight(self) -> torch.Tensor:
        return fake_quantize(self.linear.weight, self.scales(), self.zeros, self.scheme)

    def forward(self, x):
        return F.linear(x, self.quantized_weight(), self.linear.bias)

    def export(self) -> QuantizedWeight:
        with torch.no_grad():
            return encode(self.linear.weight, self.scales(), self.zeros, self.scheme)


def _initial(name: str, linear: torch.nn.Linear, existing: dict[str, QuantizedWeight], scheme: QuantScheme):
    """The starting quantized weight of one linear, and where it came from."""
    q = existing.get(name)
    if q is not None and q.scheme in (scheme.fitting(q.shape[1]), int8_scheme(scheme)):
        return q, "given"
    return quantize(linear.weight, scheme), "rtn"


def attach_fake_quant(model: torch.nn.Module, existing: dict[str, QuantizedWeight],
                      scheme: QuantScheme) -> tuple[dict[str, FakeQuantLinear], dict[str, int]]:
    """Replace every decoder linear of `model` by a FakeQuantLinear (in place)."""
    wrapped, origins = {}, {"given": 0, "rtn": 0}
    for name, linear in quantizable_linears(model).items():
        init, origin = _initial(name, linear, existing, scheme)
        origins[origin] += 1
        wrapped[name] = FakeQuantLinear(linear, init)
        model.set_submodule(name, wrapped[name])
    return wrapped, origins


def detach_fake_quant(model: torch.nn.Module, wrapped: dict[str, FakeQuantLinear]) -> dict[str, QuantizedWeight]:
    """Put the plain linears (holding the trained float weights) back; return the exported quantized weights."""
    qweights = {}
    for name, module in wrapped.items():
        qweights[name] = module.export().to("cpu")
        model.set_submodule(name, module.linear)
    return qweights


@register_stage("qat", QATConfig, "quantization-aware training (LSQ scales, straight-through rounding), distilled",
                whole_model=5)
def apply_qat(config: QATConfig, state, ctx: RunContext) -> StageOutcome:
    recipe = ctx.recipe
    scheme = config.scheme()
    teacher = ctx.teacher()
    student = state.materialize()  # the whole float model: training cannot stream (see README)
    wrapped, origins = attach_fake_quant(student, state.qweights, scheme)
    tokens = ctx.calibration(state, config.samples, config.sequence_length, images=False)
    groups = [ParamGroup({f"{n}.weight": m.linear.weight for n, m in wrapped.items()}, config.lr)]
    if config.scale_lr:
        groups.append(ParamGroup({f"{n}.gain": m.gain for n, m in wrapped.items()}, config.scale_lr))
    resume = checkpoint_path(
        "qat", state.fingerprint(), config.model_dump(mode="json", exclude={"gate"}), recipe.seed,
        tokens, *[m.initial_scales for m in wrapped.values()],
    )
    log = distill(student, teacher, groups, tokens, config, recipe.seed, resume=resume, desc="qat")
    state.qweights = detach_fake_quant(student, wrapped)
    state.model = student
    details = {
        "scheme": scheme.describe(),
        "initialised_from": origins,
        "trainable_parameters": sum(p.numel() for g in groups for p in g.params.values()),
        "training_tokens_distinct": tokens.numel(),
        **log.summary(),
    }
    return StageOutcome(state, details=details)
