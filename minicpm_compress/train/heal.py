"""The `heal` stage: a short distillation of the float model towards the full-precision reference.

After pruning, the smaller model is trained (every decoder-layer parameter; embeddings frozen) to match
the unpruned reference's next-token distribution on calibration text. Quantized weights would not
follow a change of the float weights, so healing refuses a model that has them: train those with `qat`.
"""

from __future__ import annotations


from pydantic import Field

from ..errors import CompressError
from ..registry import RunContext, StageConfig, StageOutcome, register_stage
from .distill import DistillSettings, ParamGroup, checkpoint_path, distill


class HealConfig(DistillSettings, StageConfig):
    lr: float = Field(5e-5, gt=0, description="peak learning rate (Adam), decayed linearly to 10%")


@register_stage("heal", HealConfig, "distil the float model towards the full-precision reference (after pruning)",
                whole_model=5)
def apply_heal(config: HealConfig, state, ctx: RunContext) -> StageOutcome:
    if state.qweights:
        raise CompressError("heal: the model has quantized weights, which healing would not update; "
                            "heal before rtn/awq, or train the quantized model with qat")
    recipe = ctx.recipe
    teacher = ctx.teacher()
    student = state.materialize()  # the whole float model: training cannot stream (see README)
    tokens = ctx.calibration(state, config.samples, config.sequence_length, images=False)
    params = {n: p for n, p in student.named_parameters() if n.startswith("model.layers.")}
    resume = checkpoint_path("heal", state.fingerprint(), config.model_dump(mode="json", exclude={"gate"}),
                             recipe.seed, tokens)
    log = distill(student, teacher, [ParamGroup(params, config.lr)], tokens, config, recipe.seed, resume=resume,
                  desc="heal")
    state.model = student
    details = {"trainable_parameters": sum(p.numel() for p in params.values()),
               "training_tokens_distinct": tokens.numel(), **log.summary()}
    return StageOutcome(state, details=details)
