"""ONNX export: a decoder with KV-cache inputs/outputs, int4/int8 weights as MatMulNBits, run in onnxruntime.

Two graph builders, one weight layout:
  * fused (onnx_decoder.py, the default for Llama, Mistral and MiniCPM text models): the decoder built
    directly from onnxruntime's fused decoder ops, as onnxruntime-genai's own model builder lays it out;
  * traced (here): `torch.onnx.export(dynamo=True)` of the model itself (MiniCPM's muP scalings are in its
    forward, hence in the graph), traced without weights (zero-strided stand-ins) and wrapped so the
    cache is flat tensors; for every other architecture and MiniCPM-V's decoder on inputs_embeds:

  input_ids, attention_mask, [position_ids], past_key_values.N.key/value  →  logits, present.N.key/value

with dynamic batch, sequence and past lengths; the names are the ones onnxruntime-genai expects.

Weights (recorded per path in the manifest):
  * lossless: every decoder linear whose quantized weight fits MatMulNBits (int4 or int8; symmetric or
    integer zero points; a group size that is a multiple of the block size, or per-channel) becomes a
    `com.microsoft.MatMulNBits` node holding **our** codes, float16-exact scales and zero points;
  * requantized: linears without such weights are quantized by the project's quantizer (RTN) to the
    requested bits and block size first;
  * dynamic int8 (`int8: dynamic`): onnxruntime's `quantize_dynamic` instead (its own int8 weights and
    run-time activation quantization), on the traced graph; not lossless, measured like the rest.
Weights are streamed into model.onnx.data one tensor at a time (in the traced graph the Transpose the
exporter puts on a linear's weight is replaced by MatMulNBits or folded into the stored tensor), so an 8B
model never has to fit in memory as a graph.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from ..errors import CompressError
from ..evaluate.greedy import smoke_test
from ..footprint import DEFAULT_CONTEXT, kv_cache_bytes
from ..manifest import artifact_entry
from ..quant.qweight import QuantizedWeight, QuantScheme
from ..stages import RunContext, StageConfig, StageOutcome, register_stage
from .weights import export_weights

MS_DOMAIN = "com.microsoft"


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class _FlatCacheDecoder(torch.nn.Module):
    """The model with its KV cache as flat tensors (what ONNX graphs and onnxruntime-genai use); with `embeds`
    its first input is inputs_embeds (MiniCPM-V: an embedding graph puts the image rows in)."""

    def __init__(self, model: torch.nn.Module, embeds: bool = False):
        super().__init__()
        self.model = model
        self.layers = model.config.num_hidden_layers
        self.embeds = embeds

    def forward(self, tokens, attention_mask, position_ids, *past):
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        for i in range(self.layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        first = {"inputs_embeds" if self.embeds else "input_ids": tokens}
        out = self.model(**first, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=cache, use_cache=True)
        flat = []
        for layer in out.past_key_values.layers:
            flat += [layer.keys, layer.values]
        return (out.logits, *flat)


def io_names(layers: int, embeds: bool = False) -> tuple[list[str], list[str]]:
    cache = [f"{{}}.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
    first = "inputs_embeds" if embeds else "input_ids"
    inputs = [first, "attention_mask", "position_ids"] + [c.format("past_key_values") for c in cache]
    return inputs, ["logits"] + [c.format("present") for c in cache]


DATA_NAME = "model.onnx.data"


def traced_graph(state, embeds: bool = False):
    """The decoder graph (onnx_ir) of `state`'s architecture, traced without its weights (taking
    inputs_embeds instead of input_ids if `embeds`).

    The model is built on the meta device and every parameter becomes a zero-strided view of one float,
    so the exporter sees real shapes and no weight memory is used; the weights are streamed in later.
    """
    from ..state import _set_param, build_skeleton

    c = state.config
    model = build_skeleton(c, state.arch)
    for name, p in list(model.named_parameters(remove_duplicate=False)):
        _set_param(model, name, torch.zeros(1).expand(p.shape), requires_grad=False)
    if state.tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    layers, kv, head_dim = c.num_hidden_layers, c.num_key_value_heads, _head_dim(c)
    batch, past_len, seq = 2, 3, 4
    ids = torch.zeros(batch, seq, c.hidden_size) if embeds else torch.zeros(batch, seq, dtype=torch.long)
    mask = torch.ones(batch, past_len + seq, dtype=torch.long)
    positions = torch.arange(past_len, past_len + seq).expand(batch, seq)
    past = tuple(torch.zeros(batch, kv, past_len, head_dim) for _ in range(2 * layers))
    dyn = torch.export.Dim.DYNAMIC
    shapes = ({0: dyn, 1: dyn}, {0: dyn, 1: dyn}, {0: dyn, 1: dyn}, tuple({0: dyn, 2: dyn} for _ in past))
    inputs, outputs = io_names(layers, embeds)
    try:
        program = torch.onnx.export(_FlatCacheDecoder(model, embeds), (ids, mask, positions, *past), dynamo=True,
                                    dynamic_shapes=shapes, input_names=inputs, output_names=outputs,
                                    optimize=False, verbose=False)
    except Exception as e:  # the exporter's errors are pages long; the first line names the op
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CompressError(f"onnx: torch.onnx.export failed: {first}") from None
    return program.model


class _ExternalData:
    """Tensors appended one at a time to the graph's external data file (64-byte aligned)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.file = open(folder / DATA_NAME, "wb")

    def tensor(self, array: np.ndarray, name: str):
        import onnx_ir as ir

        array = np.ascontiguousarray(array)
        pad = -self.file.tell() % 64
        self.file.write(bytes(pad))
        offset = self.file.tell()
        self.file.write(array.tobytes())
        return ir.ExternalTensor(DATA_NAME, offset, array.nbytes, ir.DataType.from_numpy(array.dtype),
                                 shape=ir.Shape(array.shape), name=name, base_dir=str(self.folder))

    def close(self) -> None:
        self.file.close()


def _sole_transpose(value):
    """The Transpose node that is `value`'s only use, if so."""
    uses = list(value.uses())
    if len(uses) == 1 and uses[0].node.op_type == "Transpose" and list(uses[0].node.attributes["perm"].value) == [1, 0]:
        return uses[0].node
    return None


def _initializer(graph, data: _ExternalData, name: str, array: np.ndarray):
    """A weight streamed into the external data file and registered as an initializer."""
    import onnx_ir as ir

    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                     const_value=data.tensor(array, name))
    graph.register_initializer(value)
    return value


def _to_matmul_nbits(graph, matmul, transpose, packed: list, shape: tuple[int, int], bits: int, block_size: int,
                     accuracy_level: int, name: str) -> None:
    """Replace `matmul` (and the Transpose feeding it the weight) by MatMulNBits on the `packed` inputs."""
    import onnx_ir as ir

    node = ir.Node(MS_DOMAIN, "MatMulNBits", [matmul.inputs[0], *packed], attributes={
        "K": ir.AttrInt64("K", shape[1]), "N": ir.AttrInt64("N", shape[0]), "bits": ir.AttrInt64("bits", bits),
        "block_size": ir.AttrInt64("block_size", block_size),
        "accuracy_level": ir.AttrInt64("accuracy_level", accuracy_level)}, name=f"{name}.MatMulNBits")
    graph.insert_before(matmul, node)
    ir.convenience.replace_all_uses_with(matmul.outputs[0], node.outputs[0], replace_graph_outputs=True)
    node.outputs[0].name, node.outputs[0].shape, node.outputs[0].type = (
        matmul.outputs[0].name, matmul.outputs[0].shape, matmul.outputs[0].type)
    graph.remove([matmul, transpose], safe=True)


class NodeList:
    """Nodes made for one place of `graph` (the caller inserts `nodes`); small constants become initializers."""

    def __init__(self, graph):
        self.graph, self.nodes = graph, []

    def add(self, node) -> None:
        self.nodes.append(node)

    def op(self, op_type: str, inputs: list, name: str, domain: str = "", outputs: int = 1, **attributes):
        """A new node's output value (a list of them if `outputs` > 1), named `name`/output_i."""
        import onnx_ir as ir

        node = ir.node(op_type, inputs, attributes=attributes, domain=domain, num_outputs=outputs, name=name)
        for i, value in enumerate(node.outputs):
            value.name = f"{name}/output_{i}"
        self.add(node)
        return node.outputs[0] if outputs == 1 else list(node.outputs)

    def const(self, name: str, array: np.ndarray):
        """A small constant, kept inside model.onnx."""
        import onnx_ir as ir

        value = ir.Value(name=name, const_value=ir.tensor(array, name=name))
        self.graph.register_initializer(value)
        return value


def block_lookup(ops: NodeList, name: str, table: dict, ids, shape: tuple[int, int], bits: int, block_size: int):
    """Rows [batch, seq, cols] of a table stored as MatMulNBits blocks (`table`: B, scales and, for
    asymmetric blocks, gather_zero_points [rows, blocks, 1]), looked up by GatherBlockQuantized: the
    embedding reads the same codes a tied head's MatMulNBits reads."""
    rows, cols = shape
    blocks = -(-cols // block_size)
    shape3 = ops.const(f"{name}.scales_shape", np.array([rows, blocks, 1], np.int64))
    per_block = ops.op("Reshape", [table["scales"], shape3], f"{name}/scales3")
    zeros = [table["gather_zero_points"]] if "gather_zero_points" in table else []
    looked_up = ops.op("GatherBlockQuantized", [table["B"], ids, per_block, *zeros], f"{name}/GatherBlockQuantized",
                       domain=MS_DOMAIN, bits=bits, block_size=block_size, gather_axis=0, quantize_axis=2)
    flat = ops.const(f"{name}.rows_shape", np.array([0, 0, -1], np.int64))
    out = ops.op("Reshape", [looked_up, flat], f"{name}/rows")
    if blocks * block_size != cols:  # padded blocks: keep the first `cols` values of each row
        bounds = [ops.const(f"{name}.slice_{n}", np.array([v], np.int64)) for n, v in (("start", 0), ("end", cols),
                                                                                          ("axis", -1))]
        out = ops.op("Slice", [out, *bounds], f"{name}/Slice")
    return out


TABLE_CLIP_GRID, TABLE_MAX_SHRINK = 20, 0.5


def table_blocks(table: torch.Tensor, bits: int, block_size: int, rows_per_chunk: int = 8192) -> QuantizedWeight:
    """A token table (or untied head) [vocab, hidden], in any float dtype, as `bits` blocks of `block_size`:
    int8 symmetric, int4 with integer zero points (half the squared error of symmetric int4 blocks on the
    built-in tables, for 4 more bits per block). Each block's range is clipped where that lowers its squared
    rounding error (the project's clip search with an identity Gram: a table's rows are looked up, not
    multiplied by known activations). Quantized `rows_per_chunk` rows at a time."""
    from ..quant.awq import search_clip
    from ..quant.qweight import quantize_rows

    scheme = QuantScheme(bits=bits, group_size=block_size, symmetric=bits == 8)
    eye = torch.eye(table.shape[1])
    return quantize_rows(table, scheme, rows_per_chunk,
                         clip=lambda rows: search_clip(rows, eye, scheme, TABLE_CLIP_GRID, TABLE_MAX_SHRINK))


def table_arrays(q: QuantizedWeight, block_size: int) -> dict[str, np.ndarray]:
    """A table's MatMulNBits inputs, plus its zero points one per byte [rows, blocks, 1] for
    GatherBlockQuantized (MatMulNBits packs two per byte) when the blocks are asymmetric."""
    arrays = pack_matmul_nbits(q, block_size)
    if not q.scheme.symmetric:
        arrays["gather_zero_points"] = np.ascontiguousarray(q.zeros.numpy().astype(np.uint8)[:, :, None])
    return arrays


def _quantize_embeddings(graph, data: _ExternalData, state, bits: int, block_size: int, accuracy_level: int) -> None:
    """The token embedding as GatherBlockQuantized and the output head as MatMulNBits, both on int4/int8
    blocks (`table_blocks`, `block_size` per block along the hidden size). A tied head reads the
    embedding's own codes and scales: one copy in the file."""
    import onnx_ir as ir

    for key in ("model.model.embed_tokens.weight", "model.lm_head.weight"):  # the table, and an untied head
        value = graph.initializers.get(key)
        if value is None:
            continue
        uses = [u.node for u in value.uses()]
        gathers = [n for n in uses if n.op_type == "Gather"]
        heads = [(t, [u.node for u in t.outputs[0].uses()]) for t in uses
                 if t.op_type == "Transpose" and list(t.attributes["perm"].value) == [1, 0]]
        heads = [(t, after[0]) for t, after in heads if len(after) == 1 and after[0].op_type == "MatMul"]
        if len(gathers) + len(heads) != len(uses):
            raise CompressError(f"onnx: '{key}' has uses other than a lookup and the output head in the traced graph")
        parameter = key.removeprefix("model.")
        source = state.head_name() if parameter == "lm_head.weight" else parameter
        q = table_blocks(state.weights.get(source, dtype=None), bits, block_size)
        rows, cols = q.shape
        arrays = table_arrays(q, block_size)
        if not gathers:  # an untied head: MatMulNBits only
            arrays.pop("gather_zero_points", None)
        table = {part: _initializer(graph, data, f"{key}.{part}", array) for part, array in arrays.items()}
        for gather in gathers:
            ops = NodeList(graph)
            last = block_lookup(ops, key, table, gather.inputs[1], (rows, cols), bits, block_size)
            for node in ops.nodes:
                graph.insert_before(gather, node)
            ir.convenience.replace_all_uses_with(gather.outputs[0], last)
            last.name, last.shape, last.type = gather.outputs[0].name, gather.outputs[0].shape, gather.outputs[0].type
            graph.remove(gather, safe=True)
        for transpose, matmul in heads:
            _to_matmul_nbits(graph, matmul, transpose, [table[p] for p in ("B", "scales", "zero_points") if p in table],
                             (rows, cols), bits, block_size, accuracy_level, parameter)
        del graph.initializers[key]


def write_graph(state, folder: Path, weights: dict[str, QuantizedWeight], block_size: int,
                accuracy_level: int = 0, embeds: bool = False, embedding_bits: int | None = None) -> int:
    """model.onnx + model.onnx.data in `folder`: the traced graph, each linear in `weights` as a
    MatMulNBits node holding our codes, the token embedding and output head as `embedding_bits` blocks
    (None: float32), every other parameter as float32, written one tensor at a time.
    Returns how many linears became MatMulNBits."""
    import onnx_ir as ir

    model = traced_graph(state, embeds)
    graph = model.graph
    data = _ExternalData(folder)
    replaced = 0
    try:
        for name, q in weights.items():
            value = graph.initializers.get(f"model.{name}.weight")
            transpose = _sole_transpose(value) if value is not None else None
            matmuls = [u.node for u in transpose.outputs[0].uses()] if transpose is not None else []
            if len(matmuls) != 1 or matmuls[0].op_type != "MatMul":
                raise CompressError(f"onnx: no MatMul reading the weight of '{name}' in the traced graph")
            packed = [_initializer(graph, data, f"{name}.{part}", array)
                      for part, array in pack_matmul_nbits(q, block_size).items()]
            _to_matmul_nbits(graph, matmuls[0], transpose, packed, q.shape, q.scheme.bits, block_size,
                             accuracy_level, name)
            del graph.initializers[value.name]
            replaced += 1
        if embedding_bits:
            _quantize_embeddings(graph, data, state, embedding_bits, block_size, accuracy_level)
        for key, value in list(graph.initializers.items()):
            parameter = key.removeprefix("model.")
            if not key.startswith("model.") or parameter not in state.weights and parameter != "lm_head.weight":
                continue  # buffers and constants the exporter lifted: small, kept inline
            source = state.head_name() if parameter == "lm_head.weight" else parameter
            array = state.tensor(source).numpy()
            transpose = _sole_transpose(value)
            if transpose is not None:  # store the transposed weight rather than transposing at run time
                folded = ir.Value(name=f"{key}.T", shape=ir.Shape(array.shape[::-1]), type=value.type,
                                  const_value=data.tensor(array.T, f"{key}.T"))
                graph.register_initializer(folded)
                ir.convenience.replace_all_uses_with(transpose.outputs[0], folded)
                graph.remove(transpose, safe=True)
                del graph.initializers[key]
            else:
                value.const_value = data.tensor(array, key)
            del array
    finally:
        data.close()
    if MS_DOMAIN not in model.opset_imports:
        model.opset_imports[MS_DOMAIN] = 1
    for node in graph:  # the exporter's stack traces: kilobytes per node, and paths of this machine
        node.metadata_props.clear()
        node.doc_string = None
    ir.save(model, str(folder / "model.onnx"))
    return replaced


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
    return (s.bits in (4, 8) and s.super_block is None and (s.symmetric or s.zero_point == "int")
            and (s.group_size is None or s.group_size % block_size == 0))


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


class OnnxRunner:
    """Next-token logits from onnxruntime: the whole window as one prefill with an empty cache."""

    name = "onnxruntime"

    def __init__(self, path: Path, config):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.layers, self.kv, self.head_dim = config.num_hidden_layers, config.num_key_value_heads, _head_dim(config)
        self.inputs = {i.name for i in self.session.get_inputs()}  # a graph without position_ids derives them

    def feeds(self, input_ids: np.ndarray, past: list[np.ndarray] | None, past_len: int,
              first: str = "input_ids") -> dict:
        """The decoder's inputs; `first` names the first one (input_ids, or inputs_embeds [B, S, D])."""
        batch, seq = input_ids.shape[:2]
        inputs, _ = io_names(self.layers)
        if past is None:
            past = [np.zeros((batch, self.kv, 0, self.head_dim), np.float32)] * (2 * self.layers)
        feeds = {
            first: input_ids.astype(np.int64 if first == "input_ids" else np.float32),
            "attention_mask": np.ones((batch, past_len + seq), np.int64),
            "position_ids": np.broadcast_to(np.arange(past_len, past_len + seq), (batch, seq)).astype(np.int64),
            **dict(zip(inputs[3:], past)),
        }
        return {k: v for k, v in feeds.items() if k in self.inputs}

    def run(self, input_ids: np.ndarray, past: list[np.ndarray] | None = None, past_len: int = 0):
        """(logits, present key/values) for `input_ids` after a cache of `past_len` tokens."""
        out = self.session.run(None, self.feeds(input_ids, past, past_len))
        return out[0], out[1:]

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.run(input_ids.numpy())[0]).float()

    def greedy(self, prompt_ids: list[int], steps: int) -> list[int]:
        """Greedy decoding as onnxruntime-genai does it: the prompt in one pass, then one token per pass."""
        logits, cache = self.run(np.array([prompt_ids]))
        out = []
        for i in range(steps):
            out.append(int(logits[0, -1].argmax()))
            if i + 1 < steps:
                logits, cache = self.run(np.array([out[-1:]]), cache, len(prompt_ids) + i)
        return out


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
        "auto: fused where the architecture allows it (Llama, Mistral, MiniCPM text models)")

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
    from .onnx_decoder import write_fused_graph
    from .onnx_genai import write_genai_files

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
        from .onnx_vision import write_vision_graphs

        write_vision_graphs(state, folder, int8=config.vision == "int8")
    write_genai_files(state, folder, fused=fused)
    return paths


def uses_fused_graph(state, config: OnnxConfig) -> bool:
    """Whether the decoder is built from fused ops (else traced); `fused` on an architecture that cannot be
    is an error naming why."""
    from .onnx_decoder import unfused_reason

    if config.graph == "traced" or not (config.matmul_nbits or config.bits == 32):
        return False
    reason = unfused_reason(state)
    if reason and config.graph == "fused":
        raise CompressError(f"onnx: graph 'fused' is not available for this model: {reason} (use graph: traced)")
    return reason is None


def set_accuracy_level(path: Path, level: int) -> None:
    """Rewrite every MatMulNBits node's accuracy_level in model.onnx (the weights, in model.onnx.data, stay)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    for node in model.graph.node:
        for attribute in node.attribute:
            if node.op_type == "MatMulNBits" and attribute.name == "accuracy_level":
                attribute.i = level
    tmp = path.with_name(path.name + ".tmp")
    onnx.save(model, str(tmp))
    tmp.replace(path)


def decode_tokens_per_s(runner: "OnnxRunner", prompt: np.ndarray, steps: int) -> float:
    """Greedy decoding speed after a prefill of `prompt` [1, n], one token at a time with the cache."""
    import time

    logits, cache = runner.run(prompt)
    token = np.array([[int(logits[0, -1].argmax())]])
    start = time.perf_counter()
    for i in range(steps):
        logits, cache = runner.run(token, cache, prompt.shape[1] + i)
        token = np.array([[int(logits[0, -1].argmax())]])
    return steps / (time.perf_counter() - start)


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
        from .onnx_vision import OnnxVisionRunner

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
