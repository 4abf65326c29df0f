"""The `load` stage: open the model (and any quantized weights) lazily, and set up the evaluator's reference."""

from __future__ import annotations

from pathlib import Path

from ..data.images import read_images
from ..data.prompts import image_prompts
from ..data.textsets import evaluation_windows
from ..devices import compute_device
from ..errors import CompressError
from ..evaluate.evaluator import Evaluator
from ..evaluate.metrics import reference_metrics
from ..footprint import check_memory, stage_memory
from ..resolve import model_license, resolve_model
from ..state import ModelState
from ..registry import RunContext, StageConfig, StageOutcome, register_stage


class LoadConfig(StageConfig):
    trust_remote_code: bool = False
    allow_pickle: bool = False


def reference_spec(spec: str) -> str:
    """A reference that stays valid from another working directory: a built-in name or an absolute path."""
    return spec if not Path(spec).exists() else str(Path(spec).resolve())


def tokenizer_facts(tokenizer) -> dict:
    """What an app needs to tokenize like the model: the special tokens and the chat template."""
    return {
        "class": type(tokenizer).__name__,
        "vocab_size": len(tokenizer),
        "bos_token": tokenizer.bos_token,
        "eos_token": tokenizer.eos_token,
        "adds_bos": bool(tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id]) if tokenizer.bos_token_id is not None
        else False,
        "chat_template": getattr(tokenizer, "chat_template", None),
    }


@register_stage("load", LoadConfig, "load the model and measure it against the full-precision reference", transforms=False)
def apply_load(config: LoadConfig, _state, ctx: RunContext) -> StageOutcome:
    recipe = ctx.recipe
    device, dtype = compute_device(recipe.device, recipe.dtype)
    options = dict(allow_pickle=config.allow_pickle, trust_remote_code=config.trust_remote_code, device=device,
                   dtype=dtype)
    source = resolve_model(recipe.model)
    state = ModelState.open(source, **options)  # headers only: the weights are read layer by layer
    check_memory("load", stage_memory(state, None, recipe.data), recipe.memory_check)

    ref_source = resolve_model(recipe.reference) if recipe.reference else resolve_model(source.reference)
    is_reference = (not state.qweights and not state.weights.changed()
                    and ref_source.checkpoint.resolve() == source.checkpoint.resolve())
    reference = ModelState.open(ref_source, **options)
    if reference.weights.shape(reference.head_name()) != state.weights.shape(state.head_name()):
        raise CompressError(
            f"{ref_source.spec}: reference vocabulary/hidden size differs from {source.spec}; they cannot be compared"
        )
    data = recipe.data
    windows = evaluation_windows(state.tokenizer, data.evaluation, data.eval_tokens, data.eval_window)
    if state.vision is not None:  # MiniCPM-V: the same held-out text, each window after a held-out image
        windows = image_prompts(state.tokenizer, state.vision.settings, read_images(data.evaluation_images), windows)
    ctx.evaluator = Evaluator.against(reference, windows, data.eval_batch_size)
    ctx.reference = reference
    details = {
        "model": source.spec,
        "reference": reference_spec(ref_source.spec),
        "model_type": state.config.model_type if state.vision is None
        else f"minicpmv {state.vision.settings.version} ({state.config.model_type} LLM)",
        "parameters": state.parameter_count(),
        "quantized_linears": len(state.qweights),
        "device": str(state.device),
        "dtype": str(state.dtype).removeprefix("torch."),
        "license": model_license(ref_source.reference, ref_source.checkpoint),
        "tokenizer": tokenizer_facts(state.tokenizer),
    }
    if state.vision is not None:
        details["vision"] = {"version": state.vision.settings.version, "parameters": state.vision.parameter_count(),
                             "query_num": state.vision.settings.query_num,
                             "evaluation_images": data.evaluation_images}
    metrics = reference_metrics(ctx.evaluator.reference, state.vision is not None) if is_reference else None
    return StageOutcome(state, metrics, details)
