"""The `evaluate` stage: measure the current state, optionally on other held-out text, and gate it."""

from __future__ import annotations

from pydantic import Field

from ..data.textsets import TextSource, evaluation_windows
from ..evaluate.evaluator import Evaluator
from ..registry import RunContext, StageConfig, StageOutcome, register_stage


class EvaluateConfig(StageConfig):
    evaluation: list[TextSource] | None = Field(None, description="held-out sets or files; default: the recipe's data")
    eval_tokens: int | None = Field(None, ge=16)


@register_stage("evaluate", EvaluateConfig, "measure the current model against the reference", transforms=False)
def apply_evaluate(config: EvaluateConfig, state, ctx: RunContext) -> StageOutcome:
    if config.evaluation is None and config.eval_tokens is None:
        return StageOutcome(state)  # the pipeline measures with the recipe's evaluator
    data = ctx.recipe.data
    sets = config.evaluation or data.evaluation
    windows = evaluation_windows(state.tokenizer, sets, config.eval_tokens or data.eval_tokens, data.eval_window)
    evaluator = Evaluator.against(ctx.reference, windows, data.eval_batch_size)
    details = {"summary": f"on {', '.join(sets)} ({windows.numel()} tokens; own reference)", "evaluation": sets}
    return StageOutcome(state, evaluator.measure(state), details)
