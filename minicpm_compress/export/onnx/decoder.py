"""The decoder graph built directly from onnxruntime's fused decoder ops, one layer after another.

The traced graph (onnx.traced_graph) spells attention out in dozens of small ops per layer: the rotary
angles, the causal mask, the cache concatenation, the softmax. This builder writes the graph a runtime
team would, the layout onnxruntime-genai's own model builder produces:

  input_ids ─ GatherBlockQuantized (or Gather) ─ [× scale_emb]
  per layer:  SimplifiedLayerNormalization (layer 0) / SkipSimplifiedLayerNormalization (the residual add
              fused with the next norm) ─ MatMulNBits q|k|v (one node when the three share a layout)
              ─ GroupQueryAttention (rotary inside, from cos/sin tables of the model's own rotary
              embedding; past and present may share one buffer) ─ o_proj ─ [× residual scale]
              (a linear's bias, as Qwen2's q/k/v have, is an Add after its MatMulNBits)
              ─ SkipSimplifiedLayerNormalization ─ gate, up ─ SiLU·up ─ down ─ [× residual scale]
  final:      SkipSimplifiedLayerNormalization ─ [÷ logit divisor] ─ head (MatMulNBits on the table's codes)

MiniCPM's muP scalings are Mul/Div nodes in the order torch applies them, so the graph computes the
model's function; the bracketed nodes exist only for MiniCPM. Inputs are input_ids, attention_mask and the
past key/values (GroupQueryAttention derives positions from the mask); outputs logits and present
key/values, under the names onnxruntime-genai expects. Weights stream into model.onnx.data one tensor at a
time, as in the traced writer.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ...models import architectures
from ...models.minicpm import mup_scales
from ...quant.qweight import QuantizedWeight
from .graph import (
    MS_DOMAIN,
    ExternalData,
    NodeList,
    block_lookup,
    initializer,
    pack_matmul_nbits,
    table_arrays,
    table_blocks,
)

FUSED_ARCHITECTURES = ("llama", "mistral", "minicpm", "qwen2")
# onnxruntime's own ops the fused graph uses (besides MatMulNBits / GatherBlockQuantized)
FUSED_OPS = ("GroupQueryAttention", "SkipSimplifiedLayerNormalization", "SimplifiedLayerNormalization")
OPSET = 21


def rotary_length(config) -> int:
    """Positions the graph's cos/sin tables cover: the model's max_position_embeddings, or LongRoPE's
    original length when that is shorter (past it the model switches to its long factors)."""
    length = int(getattr(config, "max_position_embeddings", 2048) or 2048)
    rope = getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type")) == "longrope" and rope.get("original_max_position_embeddings"):
        length = min(length, int(rope["original_max_position_embeddings"]))
    return length


def unfused_reason(state) -> str | None:
    """Why `state`'s decoder cannot be written with the fused ops (None: it can)."""
    c = state.config
    if state.vision is not None:
        return "MiniCPM-V decoders take inputs_embeds"
    if c.model_type not in FUSED_ARCHITECTURES:
        return f"model_type '{c.model_type}' (fused graphs: {', '.join(FUSED_ARCHITECTURES)})"
    if getattr(c, "hidden_act", "silu") != "silu":
        return f"activation '{c.hidden_act}'"
    window = getattr(c, "sliding_window", None) if getattr(c, "use_sliding_window", True) else None
    if window is not None and window < rotary_length(c):
        return "sliding-window attention"
    return None


def rotary_tables(state, length: int) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin [length, head_dim / 2] from the model's own rotary embedding (its scaling included)."""
    rotary = state.skeleton().model.rotary_emb
    positions = torch.arange(length)[None]
    with torch.no_grad():
        cos, sin = rotary(torch.zeros(1, dtype=torch.float32), positions)
    half = cos.shape[-1] // 2
    return cos[0, :, :half].float().numpy(), sin[0, :, :half].float().numpy()


def _typed(name: str, dtype, dims: list):
    import onnx_ir as ir

    return ir.Value(name=name, shape=ir.Shape(dims), type=ir.TensorType(dtype))


class _Graph(NodeList):
    """The graph under construction: nodes appended in order, weights streamed to the data file."""

    def __init__(self, folder: Path, accuracy_level: int, block_size: int):
        import onnx_ir as ir

        super().__init__(ir.Graph([], [], nodes=[], opset_imports={"": OPSET, MS_DOMAIN: 1}, name="decoder"))
        self.data = ExternalData(folder)
        self.accuracy_level, self.block_size = accuracy_level, block_size

    def add(self, node) -> None:
        self.graph.append(node)

    def weight(self, name: str, array: np.ndarray):
        """A tensor streamed into model.onnx.data."""
        return initializer(self.graph, self.data, name, array)

    def scalar(self, x, name: str, op: str, factor: float):
        """x · factor or x / factor with a float32 scalar (skipped when it is 1)."""
        if factor == 1.0:
            return x
        return self.op(op, [x, self.const(f"{name}/factor", np.array(factor, np.float32))], name)

    def nbits(self, x, name: str, packed: dict[str, np.ndarray], rows: int, cols: int, bits: int):
        """MatMulNBits on packed blocks already in the file, or given as arrays to stream."""
        parts = [p if not isinstance(p, np.ndarray) else self.weight(f"{name}.{part}", p) for part, p in packed.items()]
        return self.op("MatMulNBits", [x, *parts], f"{name}/MatMulNBits", domain=MS_DOMAIN, K=cols, N=rows,
                       bits=bits, block_size=self.block_size, accuracy_level=self.accuracy_level)

    def linear(self, x, name: str, q: QuantizedWeight | None, weight: torch.Tensor | None = None):
        """x Wᵀ: MatMulNBits on `q`'s codes, or a float MatMul on the stored transpose of `weight`."""
        if q is not None:
            return self.nbits(x, name, pack_matmul_nbits(q, self.block_size), *q.shape, q.scheme.bits)
        return self.op("MatMul", [x, self.weight(f"{name}.weight.T", np.ascontiguousarray(weight.numpy().T))],
                       f"{name}/MatMul")


def _packable(qs: list[QuantizedWeight | None]) -> bool:
    """q, k and v can be one MatMulNBits node: the same bits and zero-point layout."""
    if any(q is None for q in qs):
        return False
    return len({(q.scheme.bits, q.scheme.symmetric) for q in qs}) == 1


def _packed_qkv(qs: list[QuantizedWeight], block_size: int) -> dict[str, np.ndarray]:
    parts = [pack_matmul_nbits(q, block_size) for q in qs]
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


def _embedding_and_head(g: _Graph, state, ids, embedding_bits: int | None):
    """(the embedded rows [B, S, hidden], a function x → logits). With `embedding_bits` the table is
    blocks read by GatherBlockQuantized and a tied head is MatMulNBits on the same codes (an untied head
    gets its own blocks); without, both are float."""
    table_name = "model.embed_tokens.weight"
    if not embedding_bits:
        table = g.weight(table_name, state.tensor(table_name).numpy())
        rows = g.op("Gather", [table, ids], "/model/embed_tokens/Gather")
        if state.tied:  # x · tableᵀ on the one stored table
            return rows, lambda x: g.op("FusedMatMul", [x, table], "/lm_head/FusedMatMul", domain=MS_DOMAIN, transB=1,
                                        alpha=1.0)
        return rows, lambda x: g.linear(x, "lm_head", None, state.tensor(state.head_name()))
    q = table_blocks(state.weights.get(table_name, dtype=None), embedding_bits, g.block_size)
    table = {part: g.weight(f"{table_name}.{part}", array) for part, array in table_arrays(q, g.block_size).items()}
    rows = block_lookup(g, "/model/embed_tokens", table, ids, q.shape, embedding_bits, g.block_size)
    if state.tied:
        head = {p: table[p] for p in ("B", "scales", "zero_points") if p in table}
        return rows, lambda x: g.nbits(x, "lm_head", head, *q.shape, embedding_bits)

    def untied_head(x):  # read when the graph reaches it, not held while the layers are written
        return g.linear(x, "lm_head", table_blocks(state.weights.get(state.head_name(), dtype=None), embedding_bits,
                                                   g.block_size))
    return rows, untied_head


def _attention_lengths(g: _Graph, mask):
    """GroupQueryAttention's per-row lengths less one (int32 [batch]) and total length (int32 scalar),
    from the attention mask."""
    import onnx_ir as ir

    one = g.const("/model/constants/one", np.array([1], np.int64))
    total = g.op("ReduceSum", [mask, one], "/model/attn_mask/ReduceSum", keepdims=0)
    seqlens_k = g.op("Cast", [g.op("Sub", [total, one], "/model/attn_mask/Sub")], "/model/attn_mask/seqlens_k",
                     to=ir.DataType.INT32)
    width = g.op("Gather", [g.op("Shape", [mask], "/model/attn_mask/Shape"),
                            g.const("/model/constants/index_one", np.array(1, np.int64))], "/model/attn_mask/Gather",
                 axis=0)
    return seqlens_k, g.op("Cast", [width], "/model/attn_mask/total_seq_len", to=ir.DataType.INT32)


def write_fused_graph(state, folder: Path, weights, block_size: int, accuracy_level: int = 0,
                      embedding_bits: int | None = None) -> int:
    """model.onnx + model.onnx.data in `folder` built from the fused decoder ops (see the module docstring).
    `weights`: name → QuantizedWeight for MatMulNBits linears (empty: a float graph). Returns how many
    decoder linears became MatMulNBits (q, k and v packed into one node still count as three)."""
    import onnx_ir as ir

    c = state.config
    layers, heads, kv = c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads
    head_dim = architectures.head_dim(c)
    emb_scale, residual_scale, divisor = mup_scales(c) if state.arch.mup else (1.0, 1.0, 1.0)
    eps = float(c.rms_norm_eps)
    f32, i64 = ir.DataType.FLOAT, ir.DataType.INT64
    g = _Graph(folder, accuracy_level, block_size)
    graph = g.graph
    ids = _typed("input_ids", i64, ["batch_size", "sequence_length"])
    mask = _typed("attention_mask", i64, ["batch_size", "total_sequence_length"])
    graph.inputs.extend([ids, mask])
    cache_dims = ["batch_size", kv, "past_sequence_length", head_dim]
    past = [_typed(f"past_key_values.{i}.{kind}", f32, cache_dims) for i in range(layers) for kind in ("key", "value")]
    graph.inputs.extend(past)
    replaced, presents = 0, []
    try:
        seqlens_k, total_len = _attention_lengths(g, mask)
        cos, sin = rotary_tables(state, rotary_length(c))
        cos, sin = g.weight("cos_cache", cos), g.weight("sin_cache", sin)

        embedded, head = _embedding_and_head(g, state, ids, embedding_bits)
        hidden = g.scalar(embedded, "/model/embed_tokens/scale_emb", "Mul", emb_scale)
        branch, residual = None, hidden

        def norm(weight_name: str, name: str):
            """The RMSNorm of the residual stream, fused with adding the previous branch when there is one."""
            nonlocal branch, residual
            gamma = g.weight(weight_name, state.tensor(weight_name).numpy())
            if branch is None:
                return g.op("SimplifiedLayerNormalization", [residual, gamma], f"{name}/SimplifiedLayerNorm",
                            axis=-1, epsilon=eps, stash_type=1)
            out = g.op("SkipSimplifiedLayerNormalization", [branch, residual, gamma], f"{name}/SkipLayerNorm",
                       domain=MS_DOMAIN, outputs=4, epsilon=eps)
            residual = out[3]
            return out[0]

        def biased(y, names: list[str], rows: list[int], node: str):
            """y + the linears' biases (concatenated, zeros for one without) when any of them has one."""
            if not any(f"{n}.bias" in state.weights for n in names):
                return y
            bias = np.concatenate([state.tensor(f"{n}.bias").numpy() if f"{n}.bias" in state.weights
                                   else np.zeros(r, np.float32) for n, r in zip(names, rows)])
            return g.op("Add", [y, g.weight(f"{node}.bias", bias)], f"/{node}/Add")

        def lin(x, name: str):
            nonlocal replaced
            q = weights.get(name) if weights else None
            replaced += q is not None
            weight = None if q is not None else state.tensor(f"{name}.weight")
            y = g.linear(x, name, q, weight)
            return biased(y, [name], [q.shape[0] if q is not None else weight.shape[0]], name)

        for i in range(layers):
            prefix = f"model.layers.{i}"
            x = norm(f"{prefix}.input_layernorm.weight", f"/model/layers.{i}/input_layernorm")
            names = [f"{prefix}.self_attn.{p}_proj" for p in "qkv"]
            qs = [weights.get(n) if weights else None for n in names]
            if _packable(qs):
                rows = sum(q.shape[0] for q in qs)
                packed = g.nbits(x, f"{prefix}.self_attn.qkv_proj", _packed_qkv(qs, block_size), rows, c.hidden_size,
                                 qs[0].scheme.bits)
                qkv = [biased(packed, names, [q.shape[0] for q in qs], f"{prefix}.self_attn.qkv_proj"), None, None]
                replaced += 3
            else:
                qkv = [lin(x, n) for n in names]
            attn, present_k, present_v = g.op(
                "GroupQueryAttention", [*qkv, past[2 * i], past[2 * i + 1], seqlens_k, total_len, cos, sin],
                f"/model/layers.{i}/attn/GroupQueryAttention", domain=MS_DOMAIN, outputs=3, num_heads=heads,
                kv_num_heads=kv, scale=float(head_dim ** -0.5), do_rotary=1, rotary_interleaved=0,
                local_window_size=-1)
            for value, kind in ((present_k, "key"), (present_v, "value")):
                presents.append(value)
                value.name = f"present.{i}.{kind}"
                value.shape = ir.Shape(["batch_size", kv, "total_sequence_length", head_dim])
                value.type = ir.TensorType(f32)
            branch = g.scalar(lin(attn, f"{prefix}.self_attn.o_proj"), f"/model/layers.{i}/attn/residual_scale", "Mul",
                              residual_scale)
            x = norm(f"{prefix}.post_attention_layernorm.weight", f"/model/layers.{i}/post_attention_layernorm")
            gate = lin(x, f"{prefix}.mlp.gate_proj")
            silu = g.op("Mul", [gate, g.op("Sigmoid", [gate], f"/model/layers.{i}/mlp/Sigmoid")],
                        f"/model/layers.{i}/mlp/SiLU")
            up = lin(x, f"{prefix}.mlp.up_proj")
            inner = g.op("Mul", [silu, up], f"/model/layers.{i}/mlp/Mul")
            branch = g.scalar(lin(inner, f"{prefix}.mlp.down_proj"), f"/model/layers.{i}/mlp/residual_scale", "Mul",
                              residual_scale)
        out = g.scalar(norm("model.norm.weight", "/model/norm"), "/model/norm/logit_divisor", "Div", divisor)
        logits = head(out)
        logits.name = "logits"
        logits.shape, logits.type = ir.Shape(["batch_size", "sequence_length", c.vocab_size]), ir.TensorType(f32)
        graph.outputs.extend([logits, *presents])
    finally:
        g.data.close()
    for node in graph:  # SkipSimplifiedLayerNormalization's mean and inv_std_var are not needed
        if node.op_type == "SkipSimplifiedLayerNormalization":
            for unused in node.outputs[1:3]:
                unused.name = ""
    model = ir.Model(graph, ir_version=10, producer_name="minicpm-compress")
    ir.save(model, str(folder / "model.onnx"))
    return replaced
