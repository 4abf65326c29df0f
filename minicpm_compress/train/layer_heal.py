"""The `heal_layers` stage: block-wise distillation that streams, one decoder layer in memory at a time.

Each decoder layer of the (pruned) model is trained to reproduce what the unpruned reference's layer of
the same index outputs. The two models are walked side by side over the calibration text: the reference
layer i turns the reference's own hidden states into the target; the student layer i is fed the
student's hidden states (the outputs of the already healed layers before it), so a later layer learns to
correct what an earlier one could not. The loss is the mean squared error relative to the target's
energy. Only layer i of each model, its Adam state and the two streams of hidden states are in memory:
a model too large to train end to end (`heal`) heals on the same machine. Run it before `heal`, or
instead of it.

Layers must correspond one to one: after `prune: {method: layers}` use `heal`.
"""

from __future__ import annotations

import time

import torch
from pydantic import BaseModel, ConfigDict, Field

from ..errors import CompressError
from ..layerwise import LayerInputs, run_layer, state_layer_inputs
from ..progress import progress
from ..registry import RunContext, StageConfig, StageOutcome, register_stage
from .distill import batch_indices


class LayerHealSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    steps: int = Field(32, ge=0, description="optimizer steps per decoder layer (0: no training)")
    batch_size: int = Field(4, ge=1, description="sequences per step")
    sequence_length: int = Field(256, ge=8, description="tokens per training sequence")
    samples: int = Field(64, ge=1, description="distinct calibration sequences (a multiple of batch_size)")
    lr: float = Field(1e-4, gt=0, description="peak learning rate (Adam), decayed linearly to 10% within each layer")


class LayerHealConfig(LayerHealSettings, StageConfig):
    pass


def _trainable(tensor):
    """A copy autograd can use (the layer walk's hidden states and kwargs are inference-mode tensors)."""
    if isinstance(tensor, torch.Tensor):
        return tensor.clone()
    if isinstance(tensor, tuple):
        return tuple(_trainable(t) for t in tensor)
    return tensor


def _relative_error(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (output - target).pow(2).mean() / target.pow(2).mean().clamp_min(1e-30)


def heal_layer(layer: torch.nn.Module, inputs: LayerInputs, targets: list[torch.Tensor],
               settings: LayerHealSettings, seed: int) -> tuple[float, float]:
    """Train every parameter of `layer` so that its outputs on `inputs` approach `targets` (one tensor per
    batch); the relative error before and after, over all batches."""
    batches = len(inputs.hidden)
    hidden = [_trainable(h) for h in inputs.hidden]
    kwargs = [{k: _trainable(v) for k, v in kw.items()} for kw in inputs.kwargs]

    def error() -> float:
        outputs = run_layer(layer, LayerInputs(hidden, kwargs)).hidden
        return float(sum(_relative_error(o, t) for o, t in zip(outputs, targets)) / batches)

    before = error()
    params = [p for p in layer.parameters()]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=settings.lr)
    try:
        for step in range(settings.steps):
            optimizer.param_groups[0]["lr"] = settings.lr * (1.0 - 0.9 * step / max(1, settings.steps))
            (b,) = batch_indices(step, 1, batches, seed)
            out = layer(hidden[b], **kwargs[b])
            loss = _relative_error(out[0] if isinstance(out, tuple) else out, targets[b])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
    finally:
        for p in params:
            p.requires_grad_(False)
    return before, error()


@register_stage("heal_layers", LayerHealConfig,
                "block-wise distillation: each decoder layer towards the reference's, one layer in memory at a time",
                calibrates=True)
def apply_layer_heal(config: LayerHealConfig, state, ctx: RunContext) -> StageOutcome:
    if state.qweights:
        raise CompressError("heal_layers: the model has quantized weights, which healing would not update; "
                            "heal before rtn/awq, or train the quantized model with qat")
    reference = ctx.reference
    if reference is None or reference.num_layers != state.num_layers:
        raise CompressError("heal_layers: the model's decoder layers must match the reference's one to one "
                            f"({state.num_layers} against {reference.num_layers if reference else 'none'}); "
                            "after removing whole layers use heal")
    samples = config.samples - config.samples % config.batch_size or config.batch_size
    tokens = ctx.calibration(state, samples, config.sequence_length, images=False)
    began = time.perf_counter()
    errors_before, errors_after = [], []
    with state.computing_in(torch.float32), reference.computing_in(torch.float32):
        student = state_layer_inputs(state, tokens, config.batch_size)
        teacher = state_layer_inputs(reference, tokens, config.batch_size)
        for i in progress(range(state.num_layers), desc="heal layers", total=state.num_layers, unit="layer"):
            with reference.layer(i) as layer:
                teacher = run_layer(layer, teacher)
            with state.layer(i) as layer:
                before, after = heal_layer(layer, student, teacher.hidden, config, ctx.recipe.seed * 1000 + i)
                for name, p in layer.named_parameters():
                    state.weights.set(f"model.layers.{i}.{name}", p.detach())
                student = run_layer(layer, student)
            errors_before.append(round(before, 6))
            errors_after.append(round(after, 6))
    state.weights_changed()
    wall = time.perf_counter() - began
    details = {"layers": state.num_layers, "steps_per_layer": config.steps,
               "training_tokens_distinct": tokens.numel(),
               # sequences × tokens through every layer once, forward and backward: the compute of this many
               # tokens of end-to-end training
               "tokens": config.steps * config.batch_size * config.sequence_length,
               "wall_s": round(wall, 1), "relative_error_before": errors_before, "relative_error_after": errors_after}
    return StageOutcome(state, details=details)
