"""The `hf_awq` export: a Hugging Face AWQ checkpoint (quant_method awq, GEMM packing).

Per quantized linear of shape [out, in] with group size g:
  qweight  int32 [in, out / 8]   eight 4-bit codes per int32, column c·8 + AWQ_ORDER[i] in nibble i
  qzeros   int32 [in / g, out / 8]   zero points, packed the same way
  scales   float16 [in / g, out]
and w = (code − zero) · scale. Symmetric codes c ∈ [−8, 7] are stored as c + 8 with zero point 8, which
is the same value exactly. Every other tensor is stored in float16, as AWQ checkpoints are. The codes
are ours (from rtn/awq/qat), copied, never re-quantized. A MiniCPM-V model is written whole, as its
checkpoints are: the LLM under `llm.`, the vision half (`vpm.*`, `resampler.*`) in float16 and listed in
`modules_to_not_convert`.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import numpy as np
import torch
from pydantic import Field

from ..errors import CompressError
from ..manifest import artifact_entry
from ..models.checkpoint import WEIGHTS_NAME, save_checkpoint, untied_state_dict
from ..models.minicpmv import LLM_PREFIX, VisionPart
from ..models.tensors import MemoryTensors
from ..quant.qweight import QuantizedWeight
from ..stages import RunContext, StageConfig, StageOutcome, register_stage

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def pack_int4(values: torch.Tensor) -> torch.Tensor:
    """[rows, cols] integers in 0..15 → int32 [rows, cols / 8] in AWQ's interleaved nibble order."""
    v = values.to(torch.int64).numpy().astype(np.uint32)
    rows, cols = v.shape
    v = v.reshape(rows, cols // 8, 8)[:, :, list(AWQ_ORDER)]
    packed = np.zeros((rows, cols // 8), dtype=np.uint32)
    for i in range(8):
        packed |= v[:, :, i] << np.uint32(4 * i)
    return torch.from_numpy(packed.view(np.int32))


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_int4 → uint8 [rows, cols]."""
    p = packed.numpy().view(np.uint32)
    nibbles = np.stack([(p >> np.uint32(4 * i)) & np.uint32(15) for i in range(8)], axis=-1)
    out = np.empty_like(nibbles)
    out[:, :, list(AWQ_ORDER)] = nibbles
    return torch.from_numpy(out.reshape(p.shape[0], -1).astype(np.uint8))


def to_awq(name: str, q: QuantizedWeight) -> dict[str, torch.Tensor]:
    out, cols = q.shape
    if q.scheme.bits != 4:
        raise CompressError(f"hf_awq: '{name}' is {q.scheme.bits}-bit; AWQ checkpoints hold 4-bit weights only")
    if not q.scheme.symmetric and q.scheme.zero_point != "int":
        raise CompressError(f"hf_awq: '{name}' has float zero points; AWQ stores integer zero points")
    if cols % q.group_size or out % 8:
        raise CompressError(
            f"hf_awq: '{name}' [{out}, {cols}] does not split into groups of {q.group_size} (AWQ needs whole groups "
            "and out divisible by 8); quantize with a group size that divides the input size, e.g. 32 or 64"
        )
    if q.scheme.symmetric:
        codes, zeros = (q.codes.to(torch.int16) + 8).to(torch.uint8), torch.full_like(q.scales, 8, dtype=torch.uint8)
    else:
        codes, zeros = q.codes, q.zeros
    return {
        f"{name}.qweight": pack_int4(codes.T.contiguous()),
        f"{name}.qzeros": pack_int4(zeros.T.contiguous()),
        f"{name}.scales": q.scales.T.contiguous().to(torch.float16),
    }


def from_awq(tensors: dict[str, torch.Tensor], name: str, group_size: int) -> torch.Tensor:
    """The float [out, in] weight an AWQ loader computes from `name`'s packed tensors."""
    codes = unpack_int4(tensors[f"{name}.qweight"]).to(torch.float32)
    zeros = unpack_int4(tensors[f"{name}.qzeros"]).to(torch.float32).repeat_interleave(group_size, dim=0)
    scales = tensors[f"{name}.scales"].to(torch.float32).repeat_interleave(group_size, dim=0)
    return ((codes - zeros) * scales).T.contiguous()


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
