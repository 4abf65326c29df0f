"""The `hf_awq` stage: writes the checkpoint (checkpoint.py) into `hf-awq/`, reads it back, dequantizes it as AWQ
loaders do, and measures it."""

from __future__ import annotations

import copy
from dataclasses import replace

import torch
from pydantic import Field

from ...errors import CompressError
from ...manifest import artifact_entry
from ...models.checkpoint import WEIGHTS_NAME, save_checkpoint, untied_state_dict
from ...models.minicpmv import LLM_PREFIX, VisionPart
from ...models.tensors import MemoryTensors
from ...registry import RunContext, StageConfig, StageOutcome, register_stage
from .checkpoint import from_awq, to_awq


class HFAWQConfig(StageConfig):
    folder: str = Field("hf-awq", description="folder inside the output folder")


@register_stage("hf_awq", HFAWQConfig, "export a Hugging Face AWQ (GEMM) checkpoint and measure it read back",
                transforms=False, whole_model=2, exports=True)
def export_hf_awq(config: HFAWQConfig, state, ctx: RunContext) -> StageOutcome:
    if not state.qweights:
        raise CompressError("hf_awq: the model has no quantized weights (run rtn or awq first)")
    # linears a bit budget kept at int8: AWQ kernels are 4-bit only, so they are written in float16 and
    # listed in modules_to_not_convert (the loaders keep them as plain linears)
    int4 = {n: q for n, q in state.qweights.items() if q.scheme.bits == 4}
    kept = sorted(n for n in state.qweights if n not in int4)
    groups = {q.group_size for q in int4.values()}
    if len(groups) != 1:
        raise CompressError(f"hf_awq: one group size is needed for the int4 linears, found {sorted(groups)}")
    group = groups.pop()
    symmetric = {q.scheme.symmetric for q in int4.values()}
    prefix = LLM_PREFIX if state.vision is not None else ""
    tensors = {}
    for name, q in sorted(int4.items()):
        tensors.update(to_awq(prefix + name, q))
    for name in kept:
        tensors[f"{prefix}{name}.weight"] = state.qweights[name].dequantize().to(torch.float16)
    quantized = {f"{name}.weight" for name in state.qweights}
    for key, value in untied_state_dict(state.model).items():
        if key not in quantized:
            tensors[prefix + key] = value.detach().to(torch.float16)
    if state.vision is not None:
        tensors.update({name: state.vision.tensor(name).to(torch.float16) for name in state.vision.names()})
    folder = ctx.out_dir / config.folder
    quantization_config = {
        "quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True, "version": "gemm",
        "modules_to_not_convert": (["vpm", "resampler"] if state.vision is not None else []) + [prefix + n for n in kept]
        or None,
    }
    save_checkpoint(state.model, state.tokenizer, folder, tensors,
                    {"quantization_config": quantization_config, "dtype": "float16"}, config=state.config_dict())

    # Measure what was written: read the file back and dequantize it the way AWQ loaders do.
    from safetensors.torch import load_file

    written = load_file(str(folder / WEIGHTS_NAME))
    features = None
    if state.vision is not None:  # the image rows of the float16 vision half as written
        vision = VisionPart(state.vision.settings, state.vision.raw_config,
                            MemoryTensors({n: written[n] for n in state.vision.names()}))
        features = vision.features(replace(ctx.evaluator.windows, features=None)).features
        written = {k.removeprefix(prefix): v for k, v in written.items() if k.startswith(prefix)}
    model = copy.deepcopy(state.model)  # every quantized and float16 tensor is replaced below
    with torch.no_grad():
        for key, param in model.named_parameters():
            name = key.removesuffix(".weight")
            if name in int4:
                param.copy_(from_awq(written, name, group))
            elif key in written:
                param.copy_(written[key].to(torch.float32))
    metrics = ctx.evaluator.measure(model, desc="evaluate hf_awq", features=features)
    artifacts = [artifact_entry(ctx.out_dir, p, "Hugging Face AWQ checkpoint (GEMM)" if p.name == WEIGHTS_NAME
                                else "checkpoint metadata", 4 if p.name == WEIGHTS_NAME else None)
                 for p in sorted(folder.iterdir())]
    details = {
        "summary": f"{config.folder}/, int4 g{group}, codes copied, read back"
                   + (f", {len(kept)} int8 linears in float16 (not converted)" if kept else ""),
        "folder": config.folder,
        "group_size": group,
        "path": "codes copied (lossless)",
        "symmetric_stored_as_zero_point_8": True in symmetric,
        "not_converted_linears": kept,
        "measured": "read back, dequantized in torch",
    }
    return StageOutcome(state, metrics, details, artifacts)
