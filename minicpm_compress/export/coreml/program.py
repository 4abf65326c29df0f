"""The Core ML program of a decoder: the stateful wrapper coremltools converts, our codes put into its
blockwise constants, the package saved byte-identically, and read back (its constants and the torch model
they make) to check and measure it on Linux."""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from transformers.cache_utils import Cache

from ...errors import CompressError
from ...models.architectures import head_dim
from ...quant.qweight import QuantizedWeight

PACKAGE_NAME = "model.mlpackage"


QUANTIZED_OP = "constexpr_blockwise_shift_scale"


MASKED = -1e4  # float16-safe "do not attend" value for causal masks


class StateSliceCache(Cache):
    """A transformers cache that writes each layer's new keys/values into the wrapper's state buffers."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, past: int, end: int):
        self.keys, self.values, self.past, self.end = keys, values, past, end
        self.layers = []

    def update(self, key_states, value_states, layer_idx, cache_kwargs=None):
        self.keys[layer_idx, :, :, self.past:self.end] = key_states
        self.values[layer_idx, :, :, self.past:self.end] = value_states
        return self.keys[layer_idx, :, :, :self.end], self.values[layer_idx, :, :, :self.end]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.past

    def get_mask_sizes(self, *args, **kwargs) -> tuple[int, int]:
        return self.end, 0


class StatefulDecoder(torch.nn.Module):
    """(input_ids, causal_mask) → logits, with the KV cache held in two registered buffers (Core ML states).

    With `embed_scale` (MiniCPM-V) it also takes image_embeds [1, S, D] and image_mask [1, S, 1]: token
    embeddings are scaled by `embed_scale` (the LLM's muP scale, applied here since the model then runs on
    embeddings) and where the mask is 1 the image row replaces them as it is; one package holds the
    embedding table for its lookups and for the (tied) output head.
    """

    def __init__(self, model: torch.nn.Module, context: int, embed_scale: float | None = None):
        super().__init__()
        self.model = model
        self.embed_scale = embed_scale
        c = model.config
        shape = (c.num_hidden_layers, 1, c.num_key_value_heads, context, head_dim(c))
        self.register_buffer("key_cache", torch.zeros(shape))
        self.register_buffer("value_cache", torch.zeros(shape))

    def forward(self, input_ids: torch.Tensor, causal_mask: torch.Tensor, image_embeds: torch.Tensor | None = None,
                image_mask: torch.Tensor | None = None) -> torch.Tensor:
        end = causal_mask.shape[-1]
        past = end - input_ids.shape[-1]
        positions = torch.arange(past, end).unsqueeze(0)
        cache = StateSliceCache(self.key_cache, self.value_cache, past, end)
        tokens = {"input_ids": input_ids}
        if self.embed_scale is not None:
            embeds = self.model.get_input_embeddings()(input_ids) * self.embed_scale
            tokens = {"inputs_embeds": embeds * (1 - image_mask) + image_embeds * image_mask}
        out = self.model(**tokens, attention_mask=causal_mask, position_ids=positions,
                         cache_position=positions[0], past_key_values=cache, use_cache=True)
        return out.logits


def causal_mask(seq: int, past: int = 0) -> torch.Tensor:
    """The additive mask for `seq` new tokens after `past` cached ones: [1, 1, seq, past + seq]."""
    mask = torch.full((seq, past + seq), MASKED)
    return torch.triu(mask, diagonal=past + 1)[None, None]


_COMPAT_DONE = False


def import_coremltools():
    """Import coremltools and fix its int()/bool() converters for numpy >= 2.3 (once).

    coremltools 9.0 folds `int(tensor)` with `int(array)`, which numpy 2.3 rejects for 1-element arrays
    ("only 0-dimensional arrays can be converted to Python scalars"); the fix takes the element first.
    """
    global _COMPAT_DONE
    # its import warns that torch 2.13 is untested and, off macOS, that the prediction library is missing
    logging.getLogger("coremltools").setLevel(logging.ERROR)
    import coremltools as ct

    if not _COMPAT_DONE:
        from coremltools.converters.mil import Builder as mb
        from coremltools.converters.mil.frontend.torch import ops
        from coremltools.converters.mil.frontend.torch.torch_op_registry import (
            register_torch_op,
        )

        def scalar_cast(dtype, dtype_name):
            def convert(context, node):
                x = ops._get_inputs(context, node, expected=1)[0]
                if x.can_be_folded_to_const() and not isinstance(x.val, dtype):
                    value = dtype(np.asarray(x.val).reshape(-1)[0])
                    context.add(mb.const(val=value, name=node.name), node.name)
                else:
                    ops._cast(context, node, dtype, dtype_name)
            return convert

        register_torch_op(scalar_cast(int, "int32"), torch_alias=["int"], override=True)
        register_torch_op(scalar_cast(bool, "bool"), torch_alias=["bool"], override=True)
        _COMPAT_DONE = True
    return ct


def _conversion_error(e: Exception) -> CompressError:
    """One line naming the torch op coremltools could not convert (its messages are pages long)."""
    text = str(e).strip()
    op = re.search(r"op '([^']+)'", text) or re.search(r"convert function for op '?([\w.:]+)", text)
    first = text.splitlines()[0] if text else type(e).__name__
    if op:
        return CompressError(f"coreml: coremltools cannot convert op '{op.group(1)}': {first}")
    return CompressError(f"coreml: conversion failed: {first}")


def convert_program(module: torch.nn.Module, example: tuple, inputs: list, states: list, outputs: list,
                    precision: str = "float16"):
    """Trace `module` and convert it to an iOS 18 MIL program computing in `precision` (not yet serialized)."""
    ct = import_coremltools()
    from coremltools.converters.mil import Builder as mb

    mb.name_count.clear()  # op names come from a process-wide counter: start every conversion like the first
    try:
        with torch.no_grad():
            traced = torch.jit.trace(module.eval(), example)
        return ct.convert(traced, inputs=inputs, outputs=outputs, states=states or None,
                          minimum_deployment_target=ct.target.iOS18, compute_precision=_precision(ct, precision),
                          convert_to="milinternal")
    except CompressError:
        raise
    except Exception as e:  # noqa: BLE001 - coremltools raises bare RuntimeError/ValueError/NotImplementedError
        raise _conversion_error(e) from None


def _precision(ct, precision: str):
    return {"float16": ct.precision.FLOAT16, "float32": ct.precision.FLOAT32}[precision]


def decoder_program(model: torch.nn.Module, context: int, precision: str = "float16", embed_scale: float | None = None):
    """The stateful decoder of `model` as a MIL program with KV-cache states of `context` tokens (taking image
    rows too when `embed_scale` is given: MiniCPM-V)."""
    ct = import_coremltools()
    wrapper = StatefulDecoder(model.eval(), context, embed_scale)
    seq, end = ct.RangeDim(1, context, default=1), ct.RangeDim(1, context, default=1)
    example = (torch.zeros(1, 4, dtype=torch.int32), causal_mask(4, 2).to(torch.float32))
    states = [ct.StateType(wrapped_type=ct.TensorType(shape=tuple(wrapper.key_cache.shape), dtype=np.float16),
                           name=name) for name in ("key_cache", "value_cache")]
    inputs = [ct.TensorType(name="input_ids", shape=(1, seq), dtype=np.int32),
              ct.TensorType(name="causal_mask", shape=(1, 1, seq, end), dtype=np.float16)]
    if embed_scale is not None:
        width = model.config.hidden_size
        example += (torch.zeros(1, 4, width), torch.zeros(1, 4, 1))
        inputs += [ct.TensorType(name="image_embeds", shape=(1, seq, width), dtype=np.float16),
                   ct.TensorType(name="image_mask", shape=(1, seq, 1), dtype=np.float16)]
    logits = ct.TensorType(name="logits", dtype=np.float16 if precision == "float16" else np.float32)
    return convert_program(wrapper, example, inputs, states, [logits], precision)


def fits_coreml(q: QuantizedWeight, bits: int) -> bool:
    """Whether q is carried as it is in a `bits`-bit package (int8 linears a bit budget kept stay int8)."""
    s = q.scheme
    return (s.bits in (4, 8) and s.bits >= bits and s.super_block is None and s.codebook is None
            and (s.symmetric or s.zero_point == "int"))


def blockwise_constants(q: QuantizedWeight, scale_dtype=np.float16) -> dict[str, np.ndarray]:
    """data / scale / offset for constexpr_blockwise_shift_scale: scale · (data − offset) = q.dequantize().

    Core ML blocks must divide the row, so the block is gcd(group, row); a group holding several blocks
    repeats its scale (e.g. groups of 128 on 576-wide rows become blocks of 64, exactly).
    """
    from coremltools.converters.mil.mil import types

    if not fits_coreml(q, q.scheme.bits):
        raise ValueError(f"{q.scheme.describe()} has no Core ML blockwise form (float zero points)")
    bits, symmetric = q.scheme.bits, q.scheme.symmetric
    cols = q.shape[1]
    block = math.gcd(min(q.group_size, cols), cols)
    which = (np.arange(cols // block) * block) // q.group_size  # the group each block lies in
    builtin = {(4, True): types.int4, (4, False): types.uint4, (8, True): types.int8, (8, False): types.uint8}
    dtype = types.nptype_from_builtin(builtin[bits, symmetric])
    out = {"data": q.codes.numpy().astype(dtype), "scale": q.scales.numpy()[:, which].astype(scale_dtype)}
    if not symmetric:
        out["offset"] = q.zeros.numpy()[:, which].astype(dtype)
    return out


def constant_name(linear: str) -> str:
    """The name of the blockwise constant holding `linear`'s weight (the saved program allows no dots)."""
    return linear.replace(".", "_") + "_weight_quantized"


def _weight_key(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array, dtype=np.float16).tobytes()).hexdigest()


def quantize_constants(prog, weights: dict[str, tuple[torch.Tensor, QuantizedWeight]]) -> int:
    """Swap each weight constant equal to a weight in `weights` for our blockwise constant, in place.

    Constants are matched by value (the converter names them after module paths, but nothing should
    depend on that); every use of the constant is rewired, so a tied embedding serves its gather and lm_head.
    """
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil.passes.pass_registry import PASS_REGISTRY
    from coremltools.converters.mil.mil.scope import ScopeInfo, ScopeSource

    by_value = {_weight_key(w.detach().numpy()): name for name, (w, _) in weights.items()}
    replaced = {}
    func = prog.functions["main"]
    with func:
        for op in list(func.find_ops(op_type="const")):
            value = op.outputs[0].val
            name = by_value.get(_weight_key(value)) if getattr(value, "ndim", 0) == 2 else None
            if name is None:
                continue
            if name not in replaced:
                scopes = [ScopeInfo(source=k, data=v) for k, v in op.scopes.items()
                          if k != ScopeSource.COREMLTOOLS_GRAPH_PASS]  # keep the module names
                with mb.scope(*scopes):
                    replaced[name] = mb.constexpr_blockwise_shift_scale(
                        **blockwise_constants(weights[name][1], value.dtype), name=constant_name(name), before_op=op)
            op.enclosing_block.replace_uses_of_var_after_op(anchor_op=replaced[name].op, old_var=op.outputs[0],
                                                            new_var=replaced[name], no_check_var_types=True)
    missing = sorted(set(weights) - set(replaced))
    if missing:
        raise CompressError(f"coreml: no constant with the weight of '{missing[0]}' in the converted program "
                            f"({len(missing)} weights unmatched)")
    PASS_REGISTRY["common::dead_code_elimination"](prog)
    return len(replaced)


def _make_deterministic(package: Path) -> None:
    """Same program, same bytes: no conversion date, map fields in key order, item ids from their paths.

    coremltools stamps the date into the metadata, serializes protobuf maps in no fixed order and names
    the package's items with random UUIDs.
    """
    from coremltools.proto import Model_pb2

    spec_path = package / "Data" / "com.apple.CoreML" / "model.mlmodel"
    spec = Model_pb2.Model()
    spec.ParseFromString(spec_path.read_bytes())
    spec.description.metadata.userDefined.pop("com.github.apple.coremltools.conversion_date", None)
    spec_path.write_bytes(spec.SerializeToString(deterministic=True))

    manifest_path = package / "Manifest.json"
    manifest = json.loads(manifest_path.read_text())
    renamed = {}
    for old, item in manifest["itemInfoEntries"].items():
        digest = hashlib.sha256(item["path"].encode()).hexdigest().upper()
        renamed[old] = f"{digest[:8]}-{digest[8:12]}-{digest[12:16]}-{digest[16:20]}-{digest[20:32]}"
    manifest["itemInfoEntries"] = {renamed[k]: v for k, v in manifest["itemInfoEntries"].items()}
    manifest["rootModelIdentifier"] = renamed[manifest["rootModelIdentifier"]]
    manifest_path.write_text(json.dumps(manifest, indent=4, sort_keys=True) + "\n")  # as Core ML itself writes it


def save_package(prog, path: Path, description: str, metadata: dict[str, str], precision: str = "float16") -> None:
    ct = import_coremltools()
    try:
        mlmodel = ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS18,
                             compute_precision=_precision(ct, precision), pass_pipeline=ct.PassPipeline.EMPTY,
                             skip_model_load=True)
    except Exception as e:  # noqa: BLE001
        raise _conversion_error(e) from None
    mlmodel.short_description = description
    mlmodel.user_defined_metadata.update(metadata)
    if path.exists():
        shutil.rmtree(path)
    mlmodel.save(str(path))
    _make_deterministic(path)


def read_program(path: Path):
    """The saved package's MIL program, constants and weight blob included (works without macOS)."""
    ct = import_coremltools()
    from coremltools.converters.mil.frontend.milproto.load import load

    mlmodel = ct.models.MLModel(str(path), skip_model_load=True)
    spec = mlmodel.get_spec()
    return load(spec, spec.specificationVersion, file_weights_dir=mlmodel.weights_dir)


def op_counts(prog) -> dict[str, int]:
    ops = {}
    for op in prog.functions["main"].operations:
        ops[op.op_type] = ops.get(op.op_type, 0) + 1
    return ops


def read_back_constants(prog) -> Iterator[tuple[str, torch.Tensor]]:
    """(op name, the constant dequantized in float32) for every blockwise constant of a program, one at a time."""
    for op in prog.functions["main"].operations:
        if op.op_type == QUANTIZED_OP:
            data = op.data.val.astype(np.float32)
            scale = op.scale.val.astype(np.float32)
            offset = op.offset.val.astype(np.float32) if op.offset is not None else np.zeros_like(scale)
            blocks = [d // s for d, s in zip(data.shape, scale.shape)]
            expand = lambda t: np.repeat(np.repeat(t, blocks[0], 0), blocks[1], 1)  # noqa: E731
            yield op.name, torch.from_numpy(expand(scale) * (data - expand(offset)))


def read_back_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Every blockwise constant in the package dequantized in float32 (by op name), and the op counts."""
    prog = read_program(path)
    return dict(read_back_constants(prog)), op_counts(prog)


def embedding_matrices(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Module name → weight of the token embedding, and of the lm_head when it is not tied to it."""
    found = {}
    for module in (model.get_input_embeddings(), model.get_output_embeddings()):
        if module is not None and all(module.weight is not w for w in found.values()):
            found[next(n for n, m in model.named_modules() if m is module)] = module.weight
    return found


def read_back_model(model: torch.nn.Module, stored: dict[str, torch.Tensor],
                    weights_expected: dict[str, QuantizedWeight], package: Path) -> torch.nn.Module:
    """A copy of `model` holding the weights read back; every one must equal our dequantized weight."""
    missing = sorted(n for n in weights_expected if constant_name(n) not in stored)
    if missing:
        raise CompressError(f"coreml: {package.name} has no quantized weight for '{missing[0]}'")
    model = copy.deepcopy(model)
    with torch.no_grad():
        for name, q in weights_expected.items():
            weight = stored[constant_name(name)]
            if not torch.equal(weight, q.dequantize()):
                raise CompressError(f"coreml: weight of '{name}' read back from {package.name} differs from "
                                    "the quantized weight written")
            model.get_submodule(name).weight.copy_(weight)
    return model.eval()
