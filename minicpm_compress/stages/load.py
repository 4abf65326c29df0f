"""The `load` stage: read the model (and any quantized weights), and set up the evaluator's reference."""

from __future__ import annotations

from pathlib import Path

from ..data.textsets import evaluation_windows
from ..errors import CompressError
from ..evaluate.evaluator import Evaluator
from ..evaluate.metrics import reference_metrics
from ..models.checkpoint import load_checkpoint
from ..models.source import resolve_model
from ..quant.qweight import load_qweights
from ..state import ModelState
from . import RunContext, StageConfig, StageOutcome, register_stage


class LoadConfig(StageConfig):
    trust_remote_code: bool = False
    allow_pickle: bool = False


def reference_spec(spec: str) -> str:
    """A reference that stays valid from another working directory: a built-in name or an absolute path."""
    return spec if not Path(spec).exists() else str(Path(spec).resolve())


@register_stage("load", LoadConfig, "load the model and measure it against the full-precision reference", transforms=False)
def apply_load(config: LoadConfig, _state, ctx: RunContext) -> StageOutcome:
    recipe = ctx.recipe
    source = resolve_model(recipe.model)
    options = dict(allow_pickle=config.allow_pickle, trust_remote_code=config.trust_remote_code)
    model, tokenizer = load_checkpoint(source.checkpoint, **options)
    state = ModelState(model, tokenizer, source, load_qweights(source.qweights) if source.qweights else {})

    ref_source = resolve_model(recipe.reference) if recipe.reference else resolve_model(source.reference)
    is_reference = not state.qweights and ref_source.checkpoint.resolve() == source.checkpoint.resolve()
    reference = model if is_reference else load_checkpoint(ref_source.checkpoint, **options)[0]
    if reference.get_output_embeddings().weight.shape != model.get_output_embeddings().weight.shape:
        raise CompressError(
            f"{ref_source.spec}: reference vocabulary/hidden size differs from {source.spec}; they cannot be compared"
        )
    data = recipe.data
    windows = evaluation_windows(tokenizer, data.evaluation, data.eval_tokens, data.eval_window)
    ctx.evaluator = Evaluator.against(reference, windows, data.eval_batch_size)
    ctx.reference_model = reference
    details = {
        "model": source.spec,
        "reference": reference_spec(ref_source.spec),
        "model_type": model.config.model_type,
        "parameters": sum(p.numel() for p in model.parameters()),
        "quantized_linears": len(state.qweights),
    }
    metrics = reference_metrics(ctx.evaluator.reference) if is_reference else None
    return StageOutcome(state, metrics, details)
