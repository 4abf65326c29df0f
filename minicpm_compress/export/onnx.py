"""ONNX export: a decoder with KV-cache inputs/outputs, int4/int8 weights as MatMulNBits, run in onnxruntime.

The graph comes from `torch.onnx.export(dynamo=True)` of the model itself (MiniCPM's muP scalings are
in its forward, hence in the graph), wrapped so the cache is flat tensors:

  input_ids, attention_mask, position_ids, past_key_values.N.key/value  →  logits, present.N.key/value

with dynamic batch, sequence and past lengths; the names are the ones onnxruntime-genai expects.

Weights (recorded per path in the manifest):
  * lossless: every decoder linear whose quantized weight fits MatMulNBits (int4 or int8; symmetric or
    integer zero points; a group size that is a multiple of the block size, or per-channel) becomes a
    `com.microsoft.MatMulNBits` node holding **our** codes, float16-exact scales and zero points;
  * requantized: linears without such weights are quantized by the project's quantizer (RTN) to the
    requested bits and block size first;
  * dynamic int8 (`int8: dynamic`): onnxruntime's `quantize_dynamic` instead (its own int8 weights and
    run-time activation quantization); not lossless, measured like the rest.
MatMul nodes are matched to linears by their weight values (the exporter renames and transposes
initializers), so nothing depends on exporter naming.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from ..errors import CompressError
from ..footprint import DEFAULT_CONTEXT, kv_cache_bytes
from ..manifest import artifact_entry
from ..models.architectures import quantizable_linears
from ..models.checkpoint import untied_state_dict
from ..quant.qweight import QuantizedWeight, QuantScheme
from ..stages import RunContext, StageConfig, StageOutcome, register_stage
from .weights import export_weights

MS_DOMAIN = "com.microsoft"


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class _FlatCacheDecoder(torch.nn.Module):
    """The model with its KV cache as flat tensors (what ONNX graphs and onnxruntime-genai use)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.layers = model.config.num_hidden_layers

    def forward(self, input_ids, attention_mask, position_ids, *past):
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        for i in range(self.layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=cache, use_cache=True)
        flat = []
        for layer in out.past_key_values.layers:
            flat += [layer.keys, layer.values]
        return (out.logits, *flat)


def io_names(layers: int) -> tuple[list[str], list[str]]:
    cache = [f"{{}}.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
    inputs = ["input_ids", "attention_mask", "position_ids"] + [c.format("past_key_values") for c in cache]
    return inputs, ["logits"] + [c.format("present") for c in cache]


def export_float(model: torch.nn.Module, path: Path) -> None:
    """Write the float32 decoder graph with KV cache to `path` (weights inline)."""
    c = model.config
    layers, kv, head_dim = c.num_hidden_layers, c.num_key_value_heads, _head_dim(c)
    batch, past_len, seq = 2, 3, 4
    ids = torch.zeros(batch, seq, dtype=torch.long)
    mask = torch.ones(batch, past_len + seq, dtype=torch.long)
    positions = torch.arange(past_len, past_len + seq).expand(batch, seq)
    past = tuple(torch.zeros(batch, kv, past_len, head_dim) for _ in range(2 * layers))
    dyn = torch.export.Dim.DYNAMIC
    shapes = ({0: dyn, 1: dyn}, {0: dyn, 1: dyn}, {0: dyn, 1: dyn}, tuple({0: dyn, 2: dyn} for _ in past))
    inputs, outputs = io_names(layers)
    try:
        program = torch.onnx.export(_FlatCacheDecoder(model.eval()), (ids, mask, positions, *past), dynamo=True,
                                    dynamic_shapes=shapes, input_names=inputs, output_names=outputs,
                                    optimize=True, verbose=False)
    except Exception as e:  # the exporter's errors are pages long; the first line names the op
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CompressError(f"onnx: torch.onnx.export failed: {first}") from None
    program.save(str(path))


def _unsigned_codes(q: QuantizedWeight) -> np.ndarray:
    codes = q.codes.to(torch.int32)
    if q.scheme.symmetric:
        codes = codes + 2 ** (q.scheme.bits - 1)  # MatMulNBits' default zero point
    return codes.numpy().astype(np.uint8)


def _pack_nibbles(values: np.ndarray) -> np.ndarray:
    """uint8 values < 16, last axis even → two per byte, the first in the low nibble."""
    return (values[..., 0::2] | (values[..., 1::2] << 4)).astype(np.uint8)


def fits_matmul_nbits(q: QuantizedWeight, block_size: int) -> bool:
    s = q.scheme
    return (s.symmetric or s.zero_point == "int") and (s.group_size is None or s.group_size % block_size == 0)


def pack_matmul_nbits(q: QuantizedWeight, block_size: int) -> dict[str, np.ndarray]:
    """MatMulNBits inputs for one linear: B [N, blocks, block·bits/8], scales [N·blocks], zero_points."""
    if not fits_matmul_nbits(q, block_size):
        raise ValueError(f"{q.scheme.describe()} does not fit MatMulNBits blocks of {block_size}")
    n, k = q.shape
    bits = q.scheme.bits
    blocks = -(-k // block_size)
    codes = _unsigned_codes(q)
    pad_value = 2 ** (bits - 1) if q.scheme.symmetric else 0
    codes = np.pad(codes, ((0, 0), (0, blocks * block_size - k)), constant_values=pad_value)
    group = q.group_size
    which = (np.arange(blocks) * block_size) // group  # the group each block lies in
    packed = codes.reshape(n, blocks, block_size)
    if bits == 4:
        packed = _pack_nibbles(packed)
    out = {"B": np.ascontiguousarray(packed),
           "scales": np.ascontiguousarray(q.scales.numpy()[:, which].astype(np.float32).reshape(-1))}
    if not q.scheme.symmetric:
        zeros = q.zeros.numpy().astype(np.uint8)[:, which]
        if bits == 4:
            zeros = _pack_nibbles(np.pad(zeros, ((0, 0), (0, blocks % 2))))
        out["zero_points"] = np.ascontiguousarray(zeros.reshape(-1))
    return out


def _key(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array, dtype=np.float32).tobytes()).hexdigest()


def to_matmul_nbits(path: Path, weights: dict[str, tuple[torch.Tensor, QuantizedWeight]], block_size: int,
                    accuracy_level: int = 0) -> int:
    """Replace the MatMul of every linear in `weights` (name → (float weight, quantized weight)) in place.

    accuracy_level is MatMulNBits' lowest allowed compute precision: 0 leaves it to onnxruntime (float
    activations on CPU), 4 lets it quantize activations to int8 (faster, no longer exact).
    """
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    by_value = {_key(w.detach().T.contiguous().numpy()): name for name, (w, _) in weights.items()}
    initializers = {init.name: init for init in graph.initializer}
    replaced, nodes = {}, []
    for node in graph.node:
        init = initializers.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
        name = by_value.get(_key(numpy_helper.to_array(init))) if init is not None and len(init.dims) == 2 else None
        if name is None or name in replaced:
            nodes.append(node)
            continue
        weight, q = weights[name]
        packed = pack_matmul_nbits(q, block_size)
        for part, array in packed.items():
            graph.initializer.append(numpy_helper.from_array(array, f"{name}.{part}"))
        nodes.append(helper.make_node(
            "MatMulNBits", [node.input[0], *(f"{name}.{part}" for part in packed)], list(node.output),
            name=f"{name}.MatMulNBits", domain=MS_DOMAIN, K=weight.shape[1], N=weight.shape[0],
            bits=q.scheme.bits, block_size=block_size, accuracy_level=accuracy_level,
        ))
        replaced[name] = node.input[1]
    missing = sorted(set(weights) - set(replaced))
    if missing:
        raise CompressError(f"onnx: no MatMul with the weight of '{missing[0]}' in the exported graph "
                            f"({len(missing)} linears unmatched)")
    used = {i for n in nodes for i in n.input}
    kept = [init for init in graph.initializer if init.name in used]
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.initializer[:]
    graph.initializer.extend(kept)
    if not any(op.domain == MS_DOMAIN for op in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    onnx.save(model, str(path))
    return len(replaced)


class OnnxRunner:
    """Next-token logits from onnxruntime: the whole window as one prefill with an empty cache."""

    name = "onnxruntime"

    def __init__(self, path: Path, config):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.layers, self.kv, self.head_dim = config.num_hidden_layers, config.num_key_value_heads, _head_dim(config)

    def feeds(self, input_ids: np.ndarray, past: list[np.ndarray] | None, past_len: int) -> dict:
        batch, seq = input_ids.shape
        inputs, _ = io_names(self.layers)
        if past is None:
            past = [np.zeros((batch, self.kv, 0, self.head_dim), np.float32)] * (2 * self.layers)
        return {
            "input_ids": input_ids.astype(np.int64),
            "attention_mask": np.ones((batch, past_len + seq), np.int64),
            "position_ids": np.broadcast_to(np.arange(past_len, past_len + seq), (batch, seq)).astype(np.int64),
            **dict(zip(inputs[3:], past)),
        }

    def run(self, input_ids: np.ndarray, past: list[np.ndarray] | None = None, past_len: int = 0):
        """(logits, present key/values) for `input_ids` after a cache of `past_len` tokens."""
        out = self.session.run(None, self.feeds(input_ids, past, past_len))
        return out[0], out[1:]

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.run(input_ids.numpy())[0]).float()


class OnnxConfig(StageConfig):
    bits: Literal[4, 8, 32] = Field(4, description="4 or 8 (MatMulNBits), or 32 for a float graph")
    block_size: int = Field(32, description="MatMulNBits block size (a power of two, 16-256)")
    int8: Literal["matmulnbits", "dynamic"] = Field(
        "matmulnbits", description="bits 8: weight-only MatMulNBits, or onnxruntime's dynamic quantization"
    )
    accuracy_level: Literal[0, 1, 2, 3, 4] = Field(
        0, description="MatMulNBits compute precision: 0 float activations (exact), 4 int8 activations (faster)"
    )
    folder: str | None = Field(None, description="folder in the output (default onnx-int4 / onnx-int8 / onnx-fp32)")
    context: int = Field(DEFAULT_CONTEXT, ge=16, description="context length for the RAM estimate")

    @model_validator(mode="after")
    def _check(self):
        if self.block_size not in (16, 32, 64, 128, 256):
            raise ValueError("block_size must be 16, 32, 64, 128 or 256")
        return self

    @property
    def matmul_nbits(self) -> bool:
        """Whether the graph's linears are MatMulNBits (not a float graph, not onnxruntime's dynamic int8)."""
        return self.bits != 32 and not (self.bits == 8 and self.int8 == "dynamic")


def write_onnx(state, folder: Path, config: OnnxConfig) -> dict:
    """Write model.onnx (+ genai_config.json and tokenizer files) into `folder`; return the path counts."""
    from .onnx_genai import write_genai_files

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    export_float(state.model, path)
    if config.matmul_nbits:
        scheme = QuantScheme(bits=config.bits, group_size=config.block_size, symmetric=True)
        weights, paths = export_weights(
            state, scheme, lambda q: q.scheme.bits == config.bits and fits_matmul_nbits(q, config.block_size))
        to_matmul_nbits(path, weights, config.block_size, config.accuracy_level)
    elif config.bits == 32:
        paths = {"float": len(quantizable_linears(state.model))}
    else:  # int8: dynamic
        from onnxruntime.quantization import QuantType, quantize_dynamic

        dynamic = folder / ".model.dynamic.onnx"
        quantize_dynamic(str(path), str(dynamic), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"],
                         extra_options={"MatMulConstBOnly": True})
        dynamic.replace(path)
        paths = {"dynamic int8 (onnxruntime)": len(quantizable_linears(state.model))}
    write_genai_files(state, folder)
    return paths


@register_stage("onnx", OnnxConfig, "export an ONNX decoder with KV cache (MatMulNBits) and measure it in onnxruntime",
                transforms=False)
def export_onnx(config: OnnxConfig, state, ctx: RunContext) -> StageOutcome:
    kind = {4: "int4", 8: "int8", 32: "fp32"}[config.bits]
    folder = ctx.out_dir / (config.folder or f"onnx-{kind}")
    if folder.exists():
        shutil.rmtree(folder)
    paths = write_onnx(state, folder, config)
    runner = OnnxRunner(folder / "model.onnx", state.model.config)
    metrics = ctx.evaluator.measure(runner, desc=f"evaluate onnx {kind} in onnxruntime")
    size = (folder / "model.onnx").stat().st_size
    params = sum(p.numel() for p in untied_state_dict(state.model).values())
    kv = kv_cache_bytes(state.model.config, config.context)
    path_text = ", ".join(f"{v} {k}" for k, v in paths.items() if v)
    details = {
        "summary": f"{folder.name}/model.onnx, {size * 8 / params:.2f} bits/weight, {path_text}, in onnxruntime",
        "bits": config.bits, "block_size": config.block_size,
        "int8": config.int8 if config.bits == 8 else None,
        "accuracy_level": config.accuracy_level if config.matmul_nbits else None,
        "linears": paths,
        "bits_per_weight": round(size * 8 / params, 3),
        "ram_estimate": {"weights_bytes": size, "kv_cache_bytes": kv, "context_tokens": config.context, "total_bytes": size + kv},
        "measured": "in onnxruntime (CPUExecutionProvider)",
    }
    artifacts = [artifact_entry(ctx.out_dir, p, f"ONNX {kind}" if p.suffix == ".onnx" else "ONNX runtime config",
                                config.bits if p.suffix == ".onnx" else None)
                 for p in sorted(folder.iterdir()) if p.is_file()]
    return StageOutcome(state, metrics, details, artifacts)
