"""The `onnx` stage: writes the decoder (decoder.py's fused graph or traced.py's), onnxruntime-genai's files
(genai.py) and, for MiniCPM-V, the vision graphs (vision.py); chooses MatMulNBits' accuracy level by
measurement; measures the folder in onnxruntime (runner.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from ...errors import CompressError
from ...evaluate.greedy import smoke_test
from ...footprint import DEFAULT_CONTEXT, kv_cache_bytes
from ...manifest import artifact_entry
from ...quant.qweight import QuantScheme
from ...registry import RunContext, StageConfig, StageOutcome, register_stage
from ..weights import export_weights
from .graph import fits_matmul_nbits, set_accuracy_level
from .runner import OnnxRunner, decode_tokens_per_s
from .traced import write_graph


class OnnxConfig(StageConfig):
    bits: Literal[4, 8, 32] = Field(4, description="4 or 8 (MatMulNBits), or 32 for a float graph")
    block_size: int = Field(32, description="MatMulNBits block size (a power of two, 16-256)")
    int8: Literal["matmulnbits", "dynamic"] = Field(
        "matmulnbits", description="bits 8: weight-only MatMulNBits, or onnxruntime's dynamic quantization"
    )
    accuracy_level: Literal[0, 1, 2, 3, 4, "auto"] = Field(
        "auto", description="MatMulNBits compute precision: 0 float activations (exact), 4 int8 activations "
        "(faster); auto: time both on this machine and keep the faster one that passes the stage's gate")
    folder: str | None = Field(None, description="folder in the output (default onnx-int4 / onnx-int8 / onnx-fp32)")
    vision: Literal["float32", "int8"] = Field(
        "float32", description="MiniCPM-V: the vision graph's weights (int8: onnxruntime's dynamic quantization)")
    context: int = Field(DEFAULT_CONTEXT, ge=16, description="context length for the RAM estimate")
    embeddings: Literal["int8", "int4", "float"] = Field(
        "int8", description="token embedding and output head (a tied head shares the embedding's codes): "
        "int8 or int4 blocks (GatherBlockQuantized + MatMulNBits), or float32; MatMulNBits graphs only")
    graph: Literal["auto", "fused", "traced"] = Field(
        "auto", description="fused: the decoder built from onnxruntime's fused ops (GroupQueryAttention with "
        "rotary, SkipSimplifiedLayerNormalization, packed q|k|v); traced: torch.onnx's graph of the model; "
        "auto: fused where the architecture allows it (Llama, Mistral, Qwen2, MiniCPM text models)")

    @model_validator(mode="after")
    def _check(self):
        if self.block_size not in (16, 32, 64, 128, 256):
            raise ValueError("block_size must be 16, 32, 64, 128 or 256")
        return self

    def level(self, vision: bool = False) -> int:
        """The accuracy level the graph is written with. auto: 4, timed against 0 after writing; MiniCPM-V
        decoders (not timed) 0."""
        if self.accuracy_level == "auto":
            return 0 if vision else 4
        return self.accuracy_level

    @property
    def matmul_nbits(self) -> bool:
        """Whether the graph's linears are MatMulNBits (not a float graph, not onnxruntime's dynamic int8)."""
        return self.bits != 32 and not (self.bits == 8 and self.int8 == "dynamic")


def write_onnx(state, folder: Path, config: OnnxConfig) -> dict:
    """Write model.onnx + model.onnx.data (+ genai_config.json and tokenizer files) into `folder`; return
    the path counts. Streamed, except for onnxruntime's dynamic int8, which quantizes a whole float graph."""
    from .decoder import write_fused_graph
    from .genai import write_genai_files

    folder.mkdir(parents=True, exist_ok=True)
    embeds = state.vision is not None  # MiniCPM-V: the decoder takes inputs_embeds from embedding.onnx
    if embeds and not config.matmul_nbits and config.bits != 32:
        raise CompressError("onnx: int8 'dynamic' is not available for MiniCPM-V models (use MatMulNBits int8)")
    fused = uses_fused_graph(state, config)
    table_bits = None if config.embeddings == "float" or embeds else int(config.embeddings.removeprefix("int"))
    if config.matmul_nbits:
        scheme = QuantScheme(bits=config.bits, group_size=config.block_size, symmetric=True)
        weights, paths = export_weights(
            state, scheme, lambda q: q.scheme.bits >= config.bits and fits_matmul_nbits(q, config.block_size))
        if fused:
            write_fused_graph(state, folder, weights, config.block_size, config.level(embeds), table_bits)
        else:
            write_graph(state, folder, weights, config.block_size, config.level(embeds), embeds, table_bits)
    elif config.bits == 32:
        if fused:
            write_fused_graph(state, folder, {}, config.block_size)
        else:
            write_graph(state, folder, {}, config.block_size, embeds=embeds)
        paths = {"float": len(state.linear_names())}
    else:  # int8: dynamic
        from onnxruntime.quantization import QuantType, quantize_dynamic

        float_folder = folder / ".float"
        float_folder.mkdir()
        write_graph(state, float_folder, {}, config.block_size)
        quantize_dynamic(str(float_folder / "model.onnx"), str(folder / "model.onnx"), weight_type=QuantType.QInt8,
                         op_types_to_quantize=["MatMul"], extra_options={"MatMulConstBOnly": True})
        shutil.rmtree(float_folder)
        paths = {"dynamic int8 (onnxruntime)": len(state.linear_names())}
    if embeds:
        from .vision import write_vision_graphs

        write_vision_graphs(state, folder, int8=config.vision == "int8")
    write_genai_files(state, folder, fused=fused)
    return paths


def uses_fused_graph(state, config: OnnxConfig) -> bool:
    """Whether the decoder is built from fused ops (else traced); `fused` on an architecture that cannot be
    is an error naming why."""
    from .decoder import unfused_reason

    if config.graph == "traced" or not (config.matmul_nbits or config.bits == 32):
        return False
    reason = unfused_reason(state)
    if reason and config.graph == "fused":
        raise CompressError(f"onnx: graph 'fused' is not available for this model: {reason} (use graph: traced)")
    return reason is None


LEVEL_PROMPT, LEVEL_STEPS = 32, 24


LEVEL_MARGIN = 1.15  # level 4 is tried first only when this much faster than 0 (timings are noisy)


def _measured_level(path: Path, state, config: OnnxConfig, ctx: RunContext, kind: str):
    """(runner, metrics, record) at the configured accuracy level; with `auto`, levels 4 and 0 are timed on
    this machine and the faster one that passes the stage's gate is kept (the file is rewritten to it)."""
    desc = f"evaluate onnx {kind} in onnxruntime"
    if config.accuracy_level != "auto" or not config.matmul_nbits:
        runner = OnnxRunner(path, state.config)
        return runner, ctx.evaluator.measure(runner, desc=desc), {"chosen": config.level()}
    prompt = ctx.evaluator.windows[:1, :LEVEL_PROMPT].numpy()
    speed = {}
    for level in (4, 0):
        set_accuracy_level(path, level)
        speed[level] = round(decode_tokens_per_s(OnnxRunner(path, state.config), prompt, LEVEL_STEPS), 2)
    measured = {}
    order = [4, 0] if speed[4] >= LEVEL_MARGIN * speed[0] else [0, 4]  # exact unless 4 is clearly faster
    for level in order:
        set_accuracy_level(path, level)
        runner = OnnxRunner(path, state.config)
        metrics = ctx.evaluator.measure(runner, desc=f"{desc}, accuracy_level {level}")
        measured[level] = metrics.as_dict()
        if config.gate is None or not config.gate.failures(metrics):
            break
    record = {"chosen": level, "decode_tokens_per_s": speed, "measured": sorted(measured),
              "rule": f"4 if at least {LEVEL_MARGIN}x as fast as 0 on this machine and within the stage's gate, else 0"}
    return runner, metrics, record


@register_stage("onnx", OnnxConfig, "export an ONNX decoder with KV cache (MatMulNBits) and measure it in onnxruntime",
                transforms=False, whole_model=lambda c: None if c.matmul_nbits or c.bits == 32 else 3, exports=True)
def export_onnx(config: OnnxConfig, state, ctx: RunContext) -> StageOutcome:
    kind = {4: "int4", 8: "int8", 32: "fp32"}[config.bits]
    folder = ctx.out_dir / (config.folder or f"onnx-{kind}")
    if folder.exists():
        shutil.rmtree(folder)
    paths = write_onnx(state, folder, config)
    graph = "fused" if uses_fused_graph(state, config) else "traced"
    if state.vision is not None:
        from .vision import OnnxVisionRunner

        runner = OnnxVisionRunner(folder, state)
        metrics = ctx.evaluator.measure(runner, desc=f"evaluate onnx {kind} in onnxruntime")
        level = {"chosen": config.level(vision=True)}
    else:
        runner, metrics, level = _measured_level(folder / "model.onnx", state, config, ctx, kind)
    smoke = None if state.vision is not None else smoke_test(state.tokenizer, runner, f"{folder.name} in onnxruntime, greedy")
    size = sum(p.stat().st_size for p in folder.glob("model.onnx*"))
    params = state.parameter_count(vision=False)  # the file holds the LLM
    kv = kv_cache_bytes(state.config, config.context)
    path_text = ", ".join(f"{v} {k}" for k, v in paths.items() if v)
    table = config.embeddings if config.matmul_nbits and state.vision is None else "float"
    level_text = f", accuracy level {level['chosen']}" if config.matmul_nbits else ""
    details = {
        "summary": f"{folder.name}/model.onnx(.data), {size * 8 / params:.2f} bits/weight, {path_text}, "
                   f"{table} table{level_text}, {graph} graph, in onnxruntime",
        "graph": graph,
        "bits": config.bits, "block_size": config.block_size,
        "int8": config.int8 if config.bits == 8 else None,
        "accuracy_level": level["chosen"] if config.matmul_nbits else None,
        **({"accuracy_level_choice": level} if len(level) > 1 else {}),
        "linears": paths,
        "embeddings": table,
        "bits_per_weight": round(size * 8 / params, 3),
        "ram_estimate": {"weights_bytes": size, "kv_cache_bytes": kv, "context_tokens": config.context, "total_bytes": size + kv},
        "max_context": json.loads((folder / "genai_config.json").read_text())["model"]["context_length"],
        "measured": "in onnxruntime (CPUExecutionProvider)",
        **({"smoke_test": smoke} if smoke else {}),
    }
    if state.vision is not None:
        vision_bytes = sum(p.stat().st_size for p in folder.glob("vision.onnx*"))
        details["vision"] = {"weights": config.vision, "bytes": vision_bytes,
                             "embedding_bytes": sum(p.stat().st_size for p in folder.glob("embedding.onnx*"))}
        details["summary"] += f" + vision.onnx {config.vision} ({vision_bytes / 2**20:.1f} MiB) + embedding.onnx"
    artifacts = [artifact_entry(ctx.out_dir, p, f"ONNX {kind}" if p.name.startswith("model.onnx") else
                                "ONNX runtime config", config.bits if p.name.startswith("model.onnx") else None)
                 for p in sorted(folder.iterdir()) if p.is_file()]
    return StageOutcome(state, metrics, details, artifacts)
