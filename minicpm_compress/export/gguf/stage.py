"""The `gguf` stage: writes the file (writer.py, or llama.cpp's quantizer for its mixtures), then measures it in
llama.cpp itself (llama_cpp.py); for MiniCPM-V also the mmproj file, measured through mtmd (mmproj.py)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from ...evaluate.greedy import smoke_test
from ...footprint import DEFAULT_CONTEXT, kv_cache_bytes
from ...manifest import artifact_entry
from ...registry import RunContext, StageConfig, StageOutcome, register_stage
from ...sizes import parse_size
from .llama_cpp import LlamaCppRunner, llama_cpp_quantize
from .mixture import AUTO_TYPES
from .writer import (
    LLAMA_CPP_TYPES,
    NUMPY_TYPES,
    fixed_bytes,
    gguf_architecture,
    write_gguf,
)


class GGUFConfig(StageConfig):
    type: str = Field("Q4_0", description=f"one of {', '.join(NUMPY_TYPES + LLAMA_CPP_TYPES)}, or auto (a mixture "
                      "to target_size / target_bits, types chosen per tensor by measured error)")
    target_size: str | int | None = Field(None, description="auto: the file's size at most (bytes, or e.g. 90MiB, 94MB)")
    target_bits: float | None = Field(None, gt=0, le=32, description="auto: the file's bits per parameter at most")
    candidates: list[str] = Field(list(AUTO_TYPES), min_length=1, description="auto: the types it chooses from")
    requantize: Literal["gptq", "rtn"] = Field(
        "gptq", description="auto: codes for a type the tensor's own codes do not have: GPTQ on its grid, or RTN")
    file: str | None = Field(None, description="file name in the output folder (default model-TYPE.gguf)")
    tokenizer_pre: str | None = Field(None, description="llama.cpp pre-tokenizer name, if not recognised")
    context: int = Field(DEFAULT_CONTEXT, ge=16, description="context length for the RAM estimate")
    imatrix: bool = Field(True, description="llama.cpp types: compute an importance matrix on the calibration text, "
                          "quantize with it and write it beside the file (imatrix.gguf)")
    mmproj_type: str = Field("F16", description="MiniCPM-V: type of the vision file's matmul weights "
                             "(F32, F16, Q8_0, Q5_0, Q5_1, Q4_0, Q4_1)")

    @field_validator("mmproj_type")
    @classmethod
    def _known_mmproj(cls, value: str):
        from .mmproj import MMPROJ_TYPES

        if value not in MMPROJ_TYPES:
            raise ValueError(f"unknown mmproj type '{value}' (known: {', '.join(MMPROJ_TYPES)})")
        return value

    @field_validator("type")
    @classmethod
    def _known(cls, value: str):
        if value not in NUMPY_TYPES + LLAMA_CPP_TYPES + ("auto",):
            raise ValueError(f"unknown GGUF type '{value}' (known: {', '.join(NUMPY_TYPES + LLAMA_CPP_TYPES)}, auto)")
        return value

    @field_validator("candidates")
    @classmethod
    def _known_candidates(cls, value: list[str]):
        unknown = [t for t in value if t not in AUTO_TYPES]
        if unknown:
            raise ValueError(f"candidate type(s) {', '.join(unknown)} not among {', '.join(AUTO_TYPES)}")
        return sorted(set(value), key=AUTO_TYPES.index)

    @model_validator(mode="after")
    def _auto_target(self):
        targets = (self.target_size is not None) + (self.target_bits is not None)
        if self.type == "auto" and targets != 1:
            raise ValueError("type auto needs one of target_size or target_bits")
        if self.type != "auto" and targets:
            raise ValueError("target_size / target_bits apply to type auto only")
        if self.target_size is not None:
            parse_size(self.target_size)  # a clear error now, not after calibration
        return self

    def target_bytes(self, parameters: int) -> int:
        return parse_size(self.target_size) if self.target_size is not None else int(self.target_bits * parameters / 8)


def _write_mixture(config: GGUFConfig, state, ctx: RunContext, path: Path) -> tuple[dict, dict]:
    """`type: auto`: choose every quantized tensor's type to fit the target, write the file; (mixture, paths)."""
    from .mixture import plan_mixture

    params = state.parameter_count(vision=False)
    target = config.target_bytes(params)
    keys = {f"{n}.weight" for n in state.linear_names()} | {state.head_name(), "model.embed_tokens.weight"}
    fixed = fixed_bytes(state, "F32", config.tokenizer_pre, keys, ctx.out_dir / f".{path.name}.directory")
    codes, mixture = plan_mixture(state, ctx.calibration(state), target - fixed, tuple(config.candidates),
                                  config.requantize)
    mixture = {"target_bytes": target, "planned_bytes": fixed + mixture["quantized_bytes"], **mixture}
    paths = write_gguf(state, path, "auto", config.tokenizer_pre, codes)
    own = sum(1 for t in mixture["tensors"].values() if t["codes"] == "own")
    return mixture, {"lossless": own, "requantized": paths["lossless"] - own, "float": 0}


@register_stage("gguf", GGUFConfig, "export a llama.cpp GGUF file and measure it in llama.cpp", transforms=False,
                exports=True, calibrates=lambda c: (c.imatrix and c.type in LLAMA_CPP_TYPES) or c.type == "auto")
def export_gguf(config: GGUFConfig, state, ctx: RunContext) -> StageOutcome:
    path = ctx.out_dir / (config.file or f"model-{config.type}.gguf")
    artifacts, imatrix, mixture = [], None, None
    if config.type in LLAMA_CPP_TYPES:
        if config.imatrix:
            from .imatrix import collect_imatrix, gguf_names, write_imatrix

            data = ctx.recipe.data
            imatrix = gguf_names(state, collect_imatrix(state, ctx.calibration(state)))
            write_imatrix(ctx.out_dir / "imatrix.gguf", imatrix, "minicpm-compress calibration: " + ", ".join(
                f"{name}×{weight:g}" for name, weight in data.calibration_sources()), data.sequence_length)
            artifacts.append(artifact_entry(ctx.out_dir, ctx.out_dir / "imatrix.gguf",
                                            "llama.cpp importance matrix (llama-quantize --imatrix)", 32))
        base = ctx.out_dir / f".{path.name}.source"
        paths = write_gguf(state, base, "stored", config.tokenizer_pre)
        llama_cpp_quantize(base, path, config.type, imatrix)
        base.unlink()
        paths = {"llama.cpp quantizer": paths["float"]}
    elif config.type == "auto":
        mixture, paths = _write_mixture(config, state, ctx, path)
    else:
        paths = write_gguf(state, path, config.type, config.tokenizer_pre)
    bits = max(mixture["types"], key=mixture["types"].get) if mixture else config.type
    artifacts.insert(0, artifact_entry(ctx.out_dir, path, f"GGUF {config.type}", int(re.search(r"\d+", bits).group())))
    vision = {}
    if state.vision is not None:  # MiniCPM-V: the vision half as the mmproj file llama.cpp's mtmd loads
        from ...data.prompts import image_id_text
        from ...models.minicpm import input_scale
        from .mmproj import MtmdRunner, write_mmproj

        mmproj = ctx.out_dir / f"mmproj-{config.mmproj_type}.gguf"
        vision = {"file": mmproj.name, "type": config.mmproj_type, "tensors": write_mmproj(state, mmproj, config.mmproj_type),
                  "image_prefix": image_id_text(state.vision.settings)}
        bits = int(re.search(r"\d+", config.mmproj_type).group())
        artifacts.append(artifact_entry(ctx.out_dir, mmproj, f"GGUF mmproj (MiniCPM-V {state.vision.settings.version} "
                                        f"vision, {config.mmproj_type})", bits))
        runner = MtmdRunner(path, mmproj, ctx.recipe.data.eval_window, input_scale(state.config),
                            image_id_text(state.vision.settings))
    else:
        runner = LlamaCppRunner(path, ctx.recipe.data.eval_window)
    try:
        metrics = ctx.evaluator.measure(runner, desc=f"evaluate gguf {config.type} in llama.cpp")
        smoke = None if vision else smoke_test(state.tokenizer, runner, f"{path.name} in llama.cpp, greedy")
    finally:
        runner.close()
    size = path.stat().st_size
    params = state.parameter_count(vision=False)  # the file holds the LLM
    kv = kv_cache_bytes(state.config, config.context)
    copied = paths.get("lossless", 0)
    details = {
        "summary": f"{path.name}, {size * 8 / params:.2f} bits/weight"
                   + (f", {copied} linears copied" if copied else "") + ", in llama.cpp",
        "type": config.type,
        "file": path.name,
        "architecture": gguf_architecture(state.config)[0],
        "tensors": paths,
        "bits_per_weight": round(size * 8 / params, 3),
        "ram_estimate": {"weights_bytes": size, "kv_cache_bytes": kv, "context_tokens": config.context,
                         "total_bytes": size + kv},
        "measured": "in llama.cpp (llama-cpp-python)" + (", images through mtmd" if vision else ""),
        **({"smoke_test": smoke} if smoke else {}),
        **({"imatrix": {"file": "imatrix.gguf", "tensors": len(imatrix),
                        "tokens": max(count for _, count in imatrix.values())}} if imatrix else {}),
        **({"mixture": mixture} if mixture else {}),
    }
    if mixture:
        details["summary"] += (", " + " + ".join(f"{n} {t}" for t, n in mixture["types"].items())
                               + f" (predicted KLD {mixture['predicted_kld']:.4f})")
    if vision:
        vision["bytes"] = (ctx.out_dir / vision["file"]).stat().st_size
        details["mmproj"] = vision
        details["summary"] += f" + {vision['file']} ({vision['bytes'] / 2**20:.1f} MiB)"
    return StageOutcome(state, metrics, details, artifacts)
