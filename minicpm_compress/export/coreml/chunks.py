"""Core ML for models too large to convert whole: the decoder as a chain of packages, built one at a time.

`chunks: N` writes
  embed.mlpackage        input_ids [1, S] int32 (+ image_embeds, image_mask for MiniCPM-V) → hidden [1, S, D]
  layers-K.mlpackage     hidden, causal_mask → hidden, for N consecutive groups of decoder layers, each
                         holding the KV-cache states of its own layers ([its layers, 1, kv_heads, context,
                         head_dim] float16)
  head.mlpackage         hidden → logits (final norm and output head)
An app runs them in order for every prefill or decode step (the mask is the same input for every layer
package). Converting needs one package's float32 weights at a time (with coremltools' working copies
about 3× that), never the whole model.

Checked as the single package is, without a Mac: every quantized constant read back from each package
must equal our dequantized weight exactly, and the embedding (and head) read back from its package
replaces the state's; the evaluator then walks that state layer by layer, so what is measured is the
weights the packages hold. The float16 range check walks the layers too.
"""

from __future__ import annotations

import gc
from collections import ChainMap
from collections.abc import Mapping

import torch

from ...errors import CompressError
from ...layerwise import run_layer, state_layer_inputs
from ...models.architectures import head_dim, layer_prefix
from ...quant.qweight import QuantizedWeight, QuantScheme, quantize_rows
from ..weights import export_weights
from .float16_fit import module_peaks
from .program import (
    QUANTIZED_OP,
    StateSliceCache,
    causal_mask,
    constant_name,
    convert_program,
    fits_coreml,
    import_coremltools,
    op_counts,
    quantize_constants,
    read_back_constants,
    read_program,
    save_package,
)


def layer_groups(layers: int, chunks: int) -> list[range]:
    """`chunks` runs of consecutive layers, as even as possible (earlier runs one longer)."""
    if not 1 <= chunks <= layers:
        raise CompressError(f"coreml: chunks must be between 1 and the {layers} decoder layers, not {chunks}")
    size, extra = divmod(layers, chunks)
    out, start = [], 0
    for k in range(chunks):
        end = start + size + (1 if k < extra else 0)
        out.append(range(start, end))
        start = end
    return out


class _OffsetCache(StateSliceCache):
    """The state cache of a package holding layers first, first+1, …: layer i writes row i − first."""

    def __init__(self, keys, values, past: int, end: int, first: int):
        super().__init__(keys, values, past, end)
        self.first = first

    def update(self, key_states, value_states, layer_idx, cache_kwargs=None):
        return super().update(key_states, value_states, layer_idx - self.first, cache_kwargs)


class LayersChunk(torch.nn.Module):
    """Decoder layers `layers` of `model`: (hidden [1, S, D], causal_mask) → hidden, their KV cache as states."""

    def __init__(self, model: torch.nn.Module, layers: range, context: int):
        super().__init__()
        c = model.config
        self.layers = torch.nn.ModuleList(model.model.layers[i] for i in layers)
        self.rotary = model.model.rotary_emb
        self.first = layers.start
        shape = (len(layers), 1, c.num_key_value_heads, context, head_dim(c))
        self.register_buffer("key_cache", torch.zeros(shape))
        self.register_buffer("value_cache", torch.zeros(shape))

    def forward(self, hidden: torch.Tensor, causal_mask: torch.Tensor) -> torch.Tensor:
        end = causal_mask.shape[-1]
        past = end - hidden.shape[1]
        positions = torch.arange(past, end).unsqueeze(0)
        rotary = self.rotary(hidden, positions)
        cache = _OffsetCache(self.key_cache, self.value_cache, past, end, self.first)
        for layer in self.layers:
            out = layer(hidden, attention_mask=causal_mask, position_ids=positions, past_key_values=cache,
                        use_cache=True, cache_position=positions[0], position_embeddings=rotary)
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden


class EmbedChunk(torch.nn.Module):
    """input_ids → the first layer's input (times MiniCPM's embedding scale; image rows put in where
    image_mask is 1, for MiniCPM-V)."""

    def __init__(self, embed: torch.nn.Module, scale: float, images: bool):
        super().__init__()
        self.embed, self.scale, self.images = embed, scale, images

    def forward(self, input_ids, image_embeds=None, image_mask=None):
        hidden = self.embed(input_ids) * self.scale
        if self.images:
            hidden = hidden * (1 - image_mask) + image_embeds * image_mask
        return hidden


class HeadChunk(torch.nn.Module):
    def __init__(self, norm: torch.nn.Module, head: torch.nn.Module):
        super().__init__()
        self.norm, self.head = norm, head

    def forward(self, hidden):
        return self.head(self.norm(hidden).to(self.head.weight.dtype))


def streamed_peaks(state, samples: torch.Tensor, batch_size: int = 4) -> dict[str, dict]:
    """The float16 range check's peaks (as coreml.activation_peaks), one layer materialised at a time."""
    peaks = {kind: {"module": None, "peak": 0.0} for kind in ("norm_input", "linear_output", "kv_output")}

    def merge(found: dict, prefix: str) -> None:
        for kind, p in found.items():
            if p["peak"] > peaks[kind]["peak"]:
                peaks[kind] = {"module": f"{prefix}.{p['module']}", "peak": p["peak"]}

    inputs = state_layer_inputs(state, samples, batch_size)
    for i in range(state.num_layers):
        with state.layer(i, quantized=True) as layer:
            result = {}
            merge(module_peaks(layer, lambda: result.setdefault("next", run_layer(layer, inputs))), layer_prefix(i))
            inputs = result["next"]
    with state.modules("model.norm") as model:
        merge(module_peaks(model.model, lambda: [model.model.norm(h) for h in inputs.hidden]), "model")
    return peaks


def _convert(module, example, inputs, states, outputs, precision, weights, path, description, metadata):
    prog = convert_program(module, example, inputs, states, outputs, precision)
    if weights:
        quantize_constants(prog, weights)
    save_package(prog, path, description, metadata, precision)


def write_chunks(state, folder, config, precision: str, embed_scale: float, images: bool):
    """Write embed / layers-K / head packages; return (our quantized weights per linear, path counts,
    float tensors to take from the packages when measuring: the int8 embedding / head read back)."""
    import numpy as np

    ct = import_coremltools()
    c = state.config
    width, context = c.hidden_size, config.context
    quantized, paths = export_weights(state, config.requantize_scheme(), lambda q: fits_coreml(q, config.bits))
    seq, end = ct.RangeDim(1, context, default=1), ct.RangeDim(1, context, default=1)
    mask = ct.TensorType(name="causal_mask", shape=(1, 1, seq, end), dtype=np.float16)
    hidden_in = ct.TensorType(name="hidden", shape=(1, seq, width), dtype=np.float16)
    hidden_out = ct.TensorType(name="hidden_out")
    base = {"producer": "minicpm-compress", "architecture": c.model_type, "bits": str(config.bits),
            "precision": precision, "context": str(context)}
    folder.mkdir(parents=True, exist_ok=True)
    int8 = QuantScheme(bits=8, group_size=None, symmetric=True)
    read_back_tensors = {}

    groups = layer_groups(state.num_layers, config.chunks)
    for k, layers in enumerate(groups):
        with state.modules(*[layer_prefix(i) for i in layers]) as model:
            chunk = LayersChunk(model, layers, context).eval()
            weights = {name: (model.get_submodule(name).weight, q) for name, q in quantized.items()
                       if int(name.split(".")[2]) in layers}
            states = [ct.StateType(wrapped_type=ct.TensorType(shape=tuple(chunk.key_cache.shape), dtype=np.float16),
                                   name=n) for n in ("key_cache", "value_cache")]
            _convert(chunk, (torch.zeros(1, 4, width), causal_mask(4, 2)), [hidden_in, mask], states, [hidden_out],
                     precision, weights, folder / f"layers-{k}.mlpackage",
                     f"{c.model_type} decoder layers {layers.start}-{layers.stop - 1} of {state.num_layers}",
                     {**base, "layers": f"{layers.start}-{layers.stop - 1}", "chunk": f"{k + 1} of {len(groups)}"})
        gc.collect()  # the converter's copies of this package's weights go before the next one's are made

    embed_name, head_name = "model.embed_tokens", "lm_head"
    emb_weights, head_weights = {}, {}
    with state.modules(embed_name) as model:  # embedding and head one after the other: each is vocab × hidden
        embed = model.get_submodule(embed_name)
        if config.embeddings == "int8":
            emb_weights[embed_name] = quantize_rows(embed.weight, int8)
            paths["embedding int8 per row"] = 1
        ids = ct.TensorType(name="input_ids", shape=(1, seq), dtype=np.int32)
        inputs, example = [ids], (torch.zeros(1, 4, dtype=torch.int32),)
        if images:
            inputs += [ct.TensorType(name="image_embeds", shape=(1, seq, width), dtype=np.float16),
                       ct.TensorType(name="image_mask", shape=(1, seq, 1), dtype=np.float16)]
            example += (torch.zeros(1, 4, width), torch.zeros(1, 4, 1))
        if emb_weights:  # the table is replaced by its int8 constant: trace it in float16 (half the converter's
            embed.half()  # copies), the float32 table released; constants are matched by their float16 values
            emb_weights = {embed_name: (embed.weight, emb_weights[embed_name])}
            example = tuple(x.half() if x.is_floating_point() else x for x in example)
        _convert(EmbedChunk(embed, embed_scale, images).eval(), example, inputs, [],
                 [ct.TensorType(name="hidden_out")], precision, emb_weights, folder / "embed.mlpackage",
                 f"{c.model_type} token embedding", base)
    emb_weights = {name: (None, q) for name, (_, q) in emb_weights.items()}  # release the float table
    gc.collect()
    with state.modules("model.norm", head_name) as model:
        head = model.get_submodule(head_name)
        if config.embeddings == "int8":
            head_weights[head_name] = emb_weights[embed_name][1] if state.tied else quantize_rows(head.weight, int8)
        logits = ct.TensorType(name="logits", dtype=np.float16 if precision == "float16" else np.float32)
        example = (torch.zeros(1, 4, width),)
        if head_weights:  # as the embedding: the float table only has to be found, then it is replaced
            head.half()
            head_weights = {head_name: (head.weight, head_weights[head_name])}
            example = (example[0].half(),)
        _convert(HeadChunk(model.model.norm, head).eval(), example, [hidden_in], [], [logits],
                 precision, head_weights, folder / "head.mlpackage", f"{c.model_type} final norm and output head", base)
    for name, (_, q) in {**emb_weights, **head_weights}.items():
        read_back_tensors[name] = q
    return quantized, paths, read_back_tensors


def read_back_chunks(folder, quantized: Mapping, embeddings: dict, tied: bool) -> tuple[dict, dict[str, int]]:
    """Check every package's quantized constants against our weights, one package at a time; return the
    int8 embedding / head tables the packages hold (module name → quantized weight, equal to what was read
    back) and the op counts over all packages."""
    # names only: each of our weights is read (`quantized` may read them from the input folder) when compared
    expected = {constant_name(name): name for name in [*quantized, *embeddings]}
    seen, tables, ops = set(), {}, {}
    for package in sorted(folder.glob("*.mlpackage")):
        if package.name == "vision.mlpackage":
            continue
        prog = read_program(package)
        for op, n in op_counts(prog).items():
            ops[op] = ops.get(op, 0) + n
        for constant, weight in read_back_constants(prog):  # one constant in float32 at a time
            if constant not in expected:
                continue
            name = expected[constant]
            q = embeddings[name] if name in embeddings else quantized[name]
            if not torch.equal(weight, q.dequantize()):
                raise CompressError(f"coreml: weight of '{name}' read back from {package.name} differs from the one written")
            seen.add(name)
            if name == "model.embed_tokens" or (name == "lm_head" and not tied):
                tables[name] = q  # kept packed (a 73k-row table is 1.2 GB in float32); `weight` is its value
        del prog
    missing = sorted((set(quantized) | set(embeddings)) - seen)
    if missing:
        raise CompressError(f"coreml: no package in {folder.name} holds the quantized weight of '{missing[0]}'")
    return tables, ops


def with_tables(state, tables: dict[str, QuantizedWeight]):
    """A view of `state` evaluated with `tables` (module name → quantized weight: the embedding / head
    read back) as well as its quantized linears; each is dequantized only while it is used."""
    import copy

    view = copy.copy(state)
    view.qweights = ChainMap(tables, state.qweights)  # the state's weights still read on use, not copied
    view._skeleton, view._model = None, None
    return view


__all__ = ["layer_groups", "streamed_peaks", "write_chunks", "read_back_chunks", "with_tables", "QUANTIZED_OP"]
