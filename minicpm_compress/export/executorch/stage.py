"""The `executorch` stage: the decoder as an ExecuTorch program (.pte, XNNPACK) with a static KV cache,
carrying our int4/int8 codes where XNNPACK holds them exactly, measured in ExecuTorch's runtime."""

from __future__ import annotations

import shutil
from typing import Literal

import numpy as np
import torch
from pydantic import Field

from ... import atomic
from ...errors import CompressError
from ...evaluate.greedy import smoke_test
from ...footprint import kv_cache_bytes
from ...manifest import artifact_entry
from ...quant.qweight import QuantizedWeight, QuantScheme, quantize_rows
from ...registry import RunContext, StageConfig, StageOutcome, register_stage
from ..weights import export_weights
from .program import ByteEmbedding, StaticCacheDecoder, carried_weight, lower, runner_metadata

PROGRAM_NAME = "model.pte"


class ExecuTorchConfig(StageConfig):
    bits: Literal[4, 8, 32] = Field(4, description="4: int4 groups (8da4w), 8: int8 per channel (8da8w), 32: float")
    group_size: int = Field(32, description="int4 group for linears quantized here (it must divide the rows)")
    zero_points: Literal["refuse", "requantize"] = Field(
        "refuse", description="linears with zero points (asymmetric codes), which XNNPACK would silently drop: "
        "stop with an error, or requantize them here (symmetric RTN, counted in the manifest)")
    embeddings: Literal["int8", "float"] = Field(
        "int8", description="token table and output head: int8 per row (RTN here), or float32")
    context: int = Field(2048, ge=16, description="the static KV cache's length: the longest prompt + output")
    folder: str | None = Field(None, description="folder in the output (default executorch-int4 / -int8 / -fp32)")


def fits_xnnpack(q: QuantizedWeight, bits: int) -> bool:
    """Whether XNNPACK's dynamically quantized linears hold q's codes exactly: symmetric integer codes of
    `bits` bits (per channel for int8, groups dividing the row for int4) with positive bfloat16-exact scales
    (its int4 kernels store scales as bfloat16 and reject negative ones)."""
    s = q.scheme
    if s.bits != bits or bits not in (4, 8) or not s.symmetric or s.super_block is not None or s.codebook is not None:
        return False
    if bits == 8 and s.group_size is not None and s.group_size < q.shape[1]:
        return False
    if bits == 4 and (s.group_size is None or q.shape[1] % s.group_size):
        return False
    scales = q.scales
    return bool((scales > 0).all()) and torch.equal(scales.to(torch.bfloat16).to(torch.float32), scales)


def export_scheme(config: ExecuTorchConfig) -> QuantScheme:
    """The scheme linears without fitting codes are requantized to."""
    if config.bits == 8:
        return QuantScheme(bits=8, group_size=None, symmetric=True, scale_dtype="bfloat16")
    return QuantScheme(bits=4, group_size=config.group_size, symmetric=True, scale_dtype="bfloat16")


def refuse_zero_points(state, config: ExecuTorchConfig) -> None:
    if config.zero_points == "refuse" and config.bits != 32:
        for name in state.linear_names():  # the first in layer order
            q = state.qweights.get(name)
            if q is not None and not q.scheme.symmetric:
                raise CompressError(
                    f"executorch: '{name}' has zero points ({q.scheme.describe()}), which XNNPACK's int4/int8 "
                    "linears drop silently; quantize symmetric, or requantize here (--zero-points requantize; "
                    "in a recipe zero_points: requantize)")


def program_model(state, config: ExecuTorchConfig) -> tuple[torch.nn.Module, dict[str, int]]:
    """The whole model as the program computes it: linears holding our codes (or requantized ones) as
    torchao's int8-activation tensors, the token table and head int8 per row; and the path counts."""
    model = state.materialize()
    for p in model.parameters():
        p.requires_grad_(False)
    if config.bits == 32:
        return model, {"float": len(state.linear_names())}
    # a per-channel int8 linear in an int4 file stays int8 (8da8w); grouped int8 (XNNPACK: per channel) is requantized
    weights, paths = export_weights(state, export_scheme(config),
                                    lambda q: q.scheme.bits >= config.bits and fits_xnnpack(q, q.scheme.bits))
    for name in weights:
        linear = model.get_submodule(name)
        linear.weight = torch.nn.Parameter(carried_weight(weights[name]), requires_grad=False)
    if config.embeddings == "int8":
        per_row = QuantScheme(bits=8, group_size=None, symmetric=True, scale_dtype="bfloat16")
        head = quantize_rows(state.tensor(state.head_name()), per_row)
        table = head if state.tied else quantize_rows(state.tensor("model.embed_tokens.weight"), per_row)
        model.model.embed_tokens = ByteEmbedding(table)
        model.lm_head.weight = torch.nn.Parameter(carried_weight(head), requires_grad=False)
    return model, paths


def _carried_exactly(decoder: StaticCacheDecoder, runner, window: torch.Tensor) -> dict:
    """The program's logits against the same program in torch (same codes, same int8 activation rounding
    rule) on one window: how closely ExecuTorch computes what torch does with these weights."""
    with torch.no_grad():
        eager = decoder(window, torch.tensor([0]))
    ran = runner.logits(window)
    agree = (ran.argmax(-1) == eager.argmax(-1)).float().mean()
    return {"tokens": int(window.shape[1]), "top1_agreement": round(float(agree), 4),
            "max_abs_logit_difference": round(float((ran - eager).abs().max()), 6),
            "largest_abs_logit": round(float(eager.abs().max()), 3),
            "note": "the same codes in torch; differences are roundings of the int8 activation codes that float "
                    "summation order flips (XNNPACK holds the weights exactly)"}


@register_stage("executorch", ExecuTorchConfig, "export an ExecuTorch program (.pte, XNNPACK) with a static KV cache "
                "and measure it in ExecuTorch's runtime", transforms=False, whole_model=3, exports=True)
def export_executorch(config: ExecuTorchConfig, state, ctx: RunContext) -> StageOutcome:
    from .runner import ExecuTorchRunner

    if state.vision is not None:
        raise CompressError("executorch: MiniCPM-V models are not exported to ExecuTorch yet "
                            "(use gguf, onnx or coreml)")
    refuse_zero_points(state, config)
    kind = {4: "int4", 8: "int8", 32: "fp32"}[config.bits]
    folder = ctx.out_dir / (config.folder or f"executorch-{kind}")
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    windows = ctx.evaluator.windows
    context = max(config.context, int(windows.shape[1]))
    model, paths = program_model(state, config)
    decoder = StaticCacheDecoder(model, context)
    eos = state.tokenizer.eos_token_id
    eos = [int(e) for e in np.atleast_1d(state.config.eos_token_id if eos is None else eos) if e is not None]
    program = lower(decoder, runner_metadata(state.config, context, state.tokenizer.bos_token_id, eos))
    path = folder / PROGRAM_NAME
    atomic.write_bytes(path, program)
    state.tokenizer.save_pretrained(folder)  # tokenizer.json: what ExecuTorch's LLM runner reads
    runner = ExecuTorchRunner(path, context)
    carried = _carried_exactly(decoder, runner, windows[:1])
    metrics = ctx.evaluator.measure(runner, desc=f"evaluate executorch {kind} in ExecuTorch")
    smoke = smoke_test(state.tokenizer, runner, f"{folder.name}/{PROGRAM_NAME} in ExecuTorch, greedy")
    size = path.stat().st_size
    params = state.parameter_count()
    kv = 2 * kv_cache_bytes(state.config, context)  # float32, allocated whole: the cache is static
    path_text = ", ".join(f"{v} {k}" for k, v in paths.items() if v)
    table = config.embeddings if config.bits != 32 else "float"
    details = {
        "summary": f"{folder.name}/{PROGRAM_NAME}, {size * 8 / params:.2f} bits/weight, {path_text}, {table} table "
                   f"and head, static KV cache of {context} tokens, XNNPACK, in ExecuTorch",
        "bits": config.bits,
        "group_size": config.group_size if config.bits == 4 else None,
        "activations": "float32" if config.bits == 32 else "int8, asymmetric per token (computed at run time)",
        "linears": paths,
        "embeddings": table,
        "context": context,
        "max_context": context,
        "bits_per_weight": round(size * 8 / params, 3),
        "against_torch": carried,
        "ram_estimate": {"weights_bytes": size, "kv_cache_bytes": kv, "context_tokens": context,
                         "total_bytes": size + kv},
        "measured": "in ExecuTorch's runtime (XNNPACK delegate, portable and llama:: custom kernels)",
        "smoke_test": smoke,
    }
    artifacts = [artifact_entry(ctx.out_dir, p, f"ExecuTorch {kind}" if p.name == PROGRAM_NAME else "tokenizer",
                                config.bits if p.name == PROGRAM_NAME else None)
                 for p in sorted(folder.iterdir()) if p.is_file()]
    return StageOutcome(state, metrics, details, artifacts)
