"""The traced graph builder: `torch.onnx.export(dynamo=True)` of the model itself (MiniCPM's muP scalings are
in its forward, hence in the graph), traced without weights (zero-strided stand-ins) and wrapped so the
cache is flat tensors; each linear's Transpose → MatMul is then replaced by MatMulNBits holding our codes.
Used for every architecture the fused builder (decoder.py) does not take, and MiniCPM-V's decoder."""

from __future__ import annotations

from pathlib import Path

import torch

from ...errors import CompressError
from ...models import architectures
from ...quant.qweight import QuantizedWeight
from .graph import (
    MS_DOMAIN,
    ExternalData,
    NodeList,
    block_lookup,
    initializer,
    io_names,
    pack_matmul_nbits,
    table_arrays,
    table_blocks,
)


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


def traced_graph(state, embeds: bool = False):
    """The decoder graph (onnx_ir) of `state`'s architecture, traced without its weights (taking
    inputs_embeds instead of input_ids if `embeds`).

    The model is built on the meta device and every parameter becomes a zero-strided view of one float,
    so the exporter sees real shapes and no weight memory is used; the weights are streamed in later.
    """
    from ...state import build_skeleton, set_param

    c = state.config
    model = build_skeleton(c, state.arch)
    for name, p in list(model.named_parameters(remove_duplicate=False)):
        set_param(model, name, torch.zeros(1).expand(p.shape), requires_grad=False)
    if state.tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    layers, kv, head_dim = c.num_hidden_layers, c.num_key_value_heads, architectures.head_dim(c)
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


def _sole_transpose(value):
    """The Transpose node that is `value`'s only use, if so."""
    uses = list(value.uses())
    if len(uses) == 1 and uses[0].node.op_type == "Transpose" and list(uses[0].node.attributes["perm"].value) == [1, 0]:
        return uses[0].node
    return None


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


def _quantize_embeddings(graph, data: ExternalData, state, bits: int, block_size: int, accuracy_level: int) -> None:
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
        table = {part: initializer(graph, data, f"{key}.{part}", array) for part, array in arrays.items()}
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
    data = ExternalData(folder)
    replaced = 0
    try:
        for name, q in weights.items():
            value = graph.initializers.get(f"model.{name}.weight")
            transpose = _sole_transpose(value) if value is not None else None
            matmuls = [u.node for u in transpose.outputs[0].uses()] if transpose is not None else []
            if len(matmuls) != 1 or matmuls[0].op_type != "MatMul":
                raise CompressError(f"onnx: no MatMul reading the weight of '{name}' in the traced graph")
            packed = [initializer(graph, data, f"{name}.{part}", array)
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
