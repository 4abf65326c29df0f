"""The `coreml` stage: checks (and if needed rewrites) the model for float16 compute, writes the decoder
package (program.py) whole or in chunks (chunks.py) and, for MiniCPM-V, the vision package (vision.py),
reads its weights back and measures them."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, model_validator

from ...errors import CompressError
from ...footprint import DEFAULT_CONTEXT, kv_cache_bytes
from ...manifest import artifact_entry
from ...quant.qweight import QuantizedWeight, QuantScheme, quantize_rows
from ...registry import RunContext, StageConfig, StageOutcome, register_stage
from ..weights import export_weights
from .float16_fit import (
    FLOAT16_MAX,
    SIMULATED_WINDOWS,
    activation_maxima,
    fit_float16,
    float16_overflow,
    peaks_of,
    simulate_float16,
)
from .program import (
    PACKAGE_NAME,
    QUANTIZED_OP,
    decoder_program,
    embedding_matrices,
    fits_coreml,
    import_coremltools,
    quantize_constants,
    read_back_model,
    read_back_weights,
    save_package,
)


class CoreMLConfig(StageConfig):
    bits: Literal[4, 8] = Field(4, description="4: int4 blocks, 8: int8 (per channel when requantized)")
    block_size: int = Field(32, description="int4 block size for linears quantized here (multiple of 8)")
    context: int = Field(DEFAULT_CONTEXT, ge=16, description="KV-cache state length: the longest prompt + output")
    embeddings: Literal["int8", "float"] = Field(
        "int8", description="token embedding (and untied lm_head): int8 per row (RTN here), or float (compute precision)"
    )
    precision: Literal["auto", "float16", "float32"] = Field(
        "auto", description="compute precision; auto: float16 (Neural Engine) unless the measured activations overflow it"
    )
    folder: str | None = Field(None, description="folder in the output (default coreml-int4 / coreml-int8)")
    chunks: int = Field(1, ge=1, description="1: one package; N: embed, N packages of consecutive decoder layers "
                        "and head, converted one at a time (for models too large to convert whole)")

    @model_validator(mode="after")
    def _check(self):
        if self.block_size < 8 or self.block_size % 8:
            raise ValueError("block_size must be a multiple of 8")
        return self

    def requantize_scheme(self) -> QuantScheme:
        return QuantScheme(bits=self.bits, group_size=self.block_size if self.bits == 4 else None, symmetric=True)


def write_coreml(state, folder: Path, config: CoreMLConfig, precision: Literal["float16", "float32"],
                 embed_scale: float | None = None, model: torch.nn.Module | None = None,
                 factors: dict[str, float] | None = None) -> tuple[dict[str, QuantizedWeight], dict[str, int]]:
    """Write model.mlpackage (+ tokenizer files) into `folder`; return the weights written and path counts.
    `model` replaces the state's float model (a float16 fit of it), whose linears hold their weights ×
    `factors` (powers of two: the quantized weights' scales are multiplied alike)."""
    model = model if model is not None else state.model
    factors = factors or {}
    quantized, paths = export_weights(state, config.requantize_scheme(), lambda q: fits_coreml(q, config.bits))
    weights = {name: (model.get_submodule(name).weight, q.scaled(factors[name]) if name in factors else q)
               for name, q in quantized.items()}
    if config.embeddings == "int8":
        for name, weight in embedding_matrices(model).items():
            weights[name] = (weight, quantize_rows(weight, QuantScheme(bits=8, group_size=None, symmetric=True)))
            paths["embedding int8 per row"] = paths.get("embedding int8 per row", 0) + 1
    prog = decoder_program(model, config.context, precision, embed_scale)
    quantize_constants(prog, weights)
    folder.mkdir(parents=True, exist_ok=True)
    c = model.config
    metadata = {"producer": "minicpm-compress", "architecture": c.model_type, "bits": str(config.bits),
                "precision": precision,
                "context": str(config.context), "inputs": "input_ids [1,S] int32; causal_mask [1,1,S,P+S] float16"
                + ("; image_embeds [1,S,D] float16; image_mask [1,S,1] float16 (1: the image row replaces the token)"
                   if embed_scale is not None else ""),
                "states": "key_cache, value_cache [layers,1,kv_heads,context,head_dim] float16"}
    save_package(prog, folder / PACKAGE_NAME, f"{c.model_type} decoder, int{config.bits} weights, stateful KV cache",
                 metadata, precision)
    state.tokenizer.save_pretrained(str(folder))
    return {name: q for name, (_, q) in weights.items()}, paths


# Converting a whole model, coremltools holds the traced program and its MIL passes' copies of the
# constants besides the float32 model: the minicpmv-qwen2.5 recipe, whose Core ML stage converts its 0.63B
# LLM whole, peaked at 13.7 GB, 5.3 × that LLM's 2.6 GB in float32 (an upper bound: the process held earlier
# stages' state too); the former estimate, 3 ×, was below it. In chunks, one package's weights × 3 are held
# (8.22 GiB measured against 10.27 estimated on the 8B shape).
WHOLE_CONVERSION = 5


@register_stage("coreml", CoreMLConfig, "export a stateful Core ML mlpackage (iOS 18) with blockwise int4/int8 weights",
                transforms=False, whole_model=lambda c: WHOLE_CONVERSION if c.chunks == 1 else None, exports=True,
                layer_groups=lambda c: c.chunks if c.chunks > 1 else None)
def export_coreml(config: CoreMLConfig, state, ctx: RunContext) -> StageOutcome:
    from . import chunks as chunked

    kind = f"int{config.bits}"
    folder = ctx.out_dir / (config.folder or f"coreml-{kind}")
    if folder.exists():
        shutil.rmtree(folder)
    samples = ctx.calibration(state, n_samples=8, images=False)
    maxima = activation_maxima(state.evaluated_model(), samples) if config.chunks == 1 else None
    peaks = peaks_of(maxima) if maxima is not None else chunked.streamed_peaks(state, samples)
    problem = original = float16_overflow(peaks)
    fit = fitted = None
    if problem and config.precision != "float32" and config.chunks == 1 and state.vision is None:
        fit, fitted, problem = fit_float16(state, samples, problem, maxima)  # problem: None once the rewrite fits
    precision = config.precision
    if precision == "auto":
        precision = "float32" if problem else "float16"
    elif precision == "float16" and problem:
        raise CompressError(f"coreml: float16 compute would overflow: {problem}; use precision float32 (or auto)")
    if peaks["kv_output"]["peak"] >= FLOAT16_MAX:  # Core ML states are float16 whatever the compute precision
        raise CompressError(f"coreml: '{peaks['kv_output']['module']}' outputs {peaks['kv_output']['peak']:.0f}, "
                            "beyond the float16 KV-cache state")
    embed_scale = None
    if state.vision is not None:
        from ...models.minicpm import input_scale

        embed_scale = input_scale(state.config)
    if config.chunks == 1:
        factors = fit.weight_factors(state.config.num_hidden_layers) if fitted is not None else None
        weights, paths = write_coreml(state, folder, config, precision, embed_scale, fitted, factors)
        package = folder / PACKAGE_NAME
        stored, ops = read_back_weights(package)
        # a model holding the weights read back (the float16 fit's, when there is one)
        subject = read_back_model(fitted if fitted is not None else state.model, stored, weights, package)
    else:
        quantized, paths, embeddings = chunked.write_chunks(state, folder, config, precision, embed_scale or 1.0,
                                                            state.vision is not None)
        state.tokenizer.save_pretrained(str(folder))
        tables, ops = chunked.read_back_chunks(folder, quantized, embeddings, state.tied)
        subject = chunked.with_tables(state, tables)  # our codes and int8 tables, checked equal to the packages
    packages = [p for p in sorted(folder.glob("*.mlpackage")) if p.name != "vision.mlpackage"]
    features, vision = None, None
    if state.vision is not None:  # MiniCPM-V: vision.mlpackage beside the decoder, its weights read back too
        from .vision import export_vision

        features, vision = export_vision(state, folder, config.precision, ctx)
    metrics = ctx.evaluator.measure(subject, desc=f"evaluate coreml {kind} weights read back", features=features)
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    size = sum(p.stat().st_size for package in packages for p in package.rglob("*") if p.is_file())
    params = state.parameter_count(vision=False)
    kv = kv_cache_bytes(state.config, config.context)
    path_text = ", ".join(f"{v} {k}" for k, v in paths.items() if v)
    where = PACKAGE_NAME if config.chunks == 1 else f"{len(packages)} packages (embed, {config.chunks} × layers, head)"
    details = {
        "summary": f"{folder.name}/{where}, {size * 8 / params:.2f} bits/weight, {path_text}, "
                   f"{precision} compute, weights read back",
        "bits": config.bits, "block_size": config.block_size, "context": config.context, "chunks": config.chunks,
        "max_context": config.context,  # the KV-cache state's length
        "packages": [p.name for p in packages],
        "spec_version": max(import_coremltools().utils.load_spec(str(p)).specificationVersion for p in packages),
        "precision": precision, "float16_check": {**peaks, "overflow": original},
        **({"float16_fit": {**fit.describe(), "fits": fitted is not None}} if fit is not None else {}),
        **({"float16_simulation": simulate_float16(subject, ctx.evaluator.windows[:SIMULATED_WINDOWS])}
           if precision == "float16" and config.chunks == 1 and state.vision is None else {}),
        "linears": paths, "quantized_constants": ops.get(QUANTIZED_OP, 0),
        "bits_per_weight": round(size * 8 / params, 3),
        "ram_estimate": {"weights_bytes": size, "kv_cache_bytes": kv, "context_tokens": config.context,
                         "total_bytes": size + kv},
        "measured": "weights read back from the mlpackage" + ("s" if config.chunks > 1 else "")
                    + ", evaluated in torch (float32); not on-device predictions",
    }
    if vision:
        details["vision"] = vision
        details["summary"] += f" + vision.mlpackage {vision['precision']} ({vision['bytes'] / 2**20:.1f} MiB)"

    def kind_of(p: Path) -> tuple[str, int | None]:
        if "vision.mlpackage" in p.parts:
            return "Core ML vision mlpackage", 16 if p.name == "weight.bin" and vision["precision"] == "float16" else None
        if any(part.endswith(".mlpackage") for part in p.parts):
            return "Core ML mlpackage", config.bits if p.name == "weight.bin" else None
        return "tokenizer", None

    artifacts = [artifact_entry(ctx.out_dir, p, *kind_of(p)) for p in files]
    return StageOutcome(state, metrics, details, artifacts)
