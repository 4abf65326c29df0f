"""Pieces both ONNX graph builders use: the file's input/output names, external data written a tensor at a
time, MatMulNBits packing of our codes, and the embedding table as quantized blocks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ...quant.qweight import QuantizedWeight, QuantScheme

MS_DOMAIN = "com.microsoft"


def io_names(layers: int, embeds: bool = False) -> tuple[list[str], list[str]]:
    cache = [f"{{}}.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
    first = "inputs_embeds" if embeds else "input_ids"
    inputs = [first, "attention_mask", "position_ids"] + [c.format("past_key_values") for c in cache]
    return inputs, ["logits"] + [c.format("present") for c in cache]


DATA_NAME = "model.onnx.data"


class ExternalData:
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


def initializer(graph, data: ExternalData, name: str, array: np.ndarray):
    """A weight streamed into the external data file and registered as an initializer."""
    import onnx_ir as ir

    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                     const_value=data.tensor(array, name))
    graph.register_initializer(value)
    return value


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
    from ...quant.scale_search import search_clip
    from ...quant.qweight import quantize_rows

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
    return (s.bits in (4, 8) and s.super_block is None and s.codebook is None
            and (s.symmetric or s.zero_point == "int")
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
