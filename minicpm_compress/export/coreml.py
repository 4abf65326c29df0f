"""Core ML export: a stateful (iOS 18 / macOS 15) decoder mlpackage whose linears hold our quantized codes.

The program comes from coremltools' torch converter (mlprogram) applied to the model
itself behind a small wrapper, so MiniCPM's muP scalings are in the graph:

  inputs   input_ids [1, S] int32, causal_mask [1, 1, S, P+S] float16 (0 = attend, -1e4 = masked)
  states   key_cache, value_cache [layers, 1, kv_heads, context, head_dim] float16 (Core ML states)
  output   logits [1, S, vocab] (float16, or float32 with float32 compute)

Compute precision: float16 (what the Neural Engine runs) only when a range check on calibration text
passes: no linear output at or above float16's 65,504 and no RMSNorm input at or above 256 (the norm
squares it). A model that fails it is first rewritten to fit float16 with the same function
(float16_fit.py: the residual stream and MLP inner values shifted by powers of two, norms that square
nothing above 1); if it still does not fit: float32 (CPU/GPU), or an error if float16 was asked for.

The cache length P is the mask's last dimension minus S, so an app prefills a prompt (S = prompt
length, P = 0) and then decodes one token at a time (S = 1) against the same state. The explicit mask
keeps transformers' mask code out of the traced graph.

Weights (recorded per path in the manifest):
  * lossless: every decoder linear whose quantized weight fits (same bits; symmetric or integer zero
    points; any group size) becomes a `constexpr_blockwise_shift_scale` holding **our** codes, scales
    and zero points (block = gcd(group, row); a group spanning several blocks repeats its scale);
  * requantized: other linears are quantized by the project's quantizer (RTN) first, to int4 blocks of
    `block_size` or int8 per channel (symmetric).
The token embedding (and an untied lm_head) is quantized here to int8 per row unless `embeddings:
float`; norms stay float.

Checked on Linux without a Mac: the saved mlpackage is read back (spec + weight blob), its blockwise
constants dequantized, loaded into the torch model and evaluated ("weights read back"), and every
quantized weight must equal our codes × scales exactly. Core ML predictions need macOS.
"""

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
from typing import Literal

import numpy as np
import torch
from pydantic import Field, model_validator
from transformers.cache_utils import Cache

from ..errors import CompressError
from ..footprint import DEFAULT_CONTEXT, kv_cache_bytes
from ..manifest import artifact_entry
from ..quant.qweight import QuantizedWeight, QuantScheme, quantize_rows
from ..stages import RunContext, StageConfig, StageOutcome, register_stage
from .float16_fit import simulate_float16
from .weights import export_weights

PACKAGE_NAME = "model.mlpackage"
QUANTIZED_OP = "constexpr_blockwise_shift_scale"
MASKED = -1e4  # float16-safe "do not attend" value for causal masks
FLOAT16_MAX = 65504.0
SQUARE_LIMIT = 256.0  # RMSNorm squares its input: in float16, x * x overflows once |x| reaches this


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class _StateSliceCache(Cache):
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
        shape = (c.num_hidden_layers, 1, c.num_key_value_heads, context, _head_dim(c))
        self.register_buffer("key_cache", torch.zeros(shape))
        self.register_buffer("value_cache", torch.zeros(shape))

    def forward(self, input_ids: torch.Tensor, causal_mask: torch.Tensor, image_embeds: torch.Tensor | None = None,
                image_mask: torch.Tensor | None = None) -> torch.Tensor:
        end = causal_mask.shape[-1]
        past = end - input_ids.shape[-1]
        positions = torch.arange(past, end).unsqueeze(0)
        cache = _StateSliceCache(self.key_cache, self.value_cache, past, end)
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


# --- coremltools on this stack -------------------------------------------------------------------------

_COMPAT_DONE = False


def _coremltools():
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
        from coremltools.converters.mil.frontend.torch.torch_op_registry import register_torch_op

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
    ct = _coremltools()
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
    ct = _coremltools()
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


# --- our codes as Core ML blockwise constants ---------------------------------------------------------------

def fits_coreml(q: QuantizedWeight, bits: int) -> bool:
    """Whether q is carried as it is in a `bits`-bit package (int8 linears a bit budget kept stay int8)."""
    s = q.scheme
    return s.bits in (4, 8) and s.bits >= bits and s.super_block is None and (s.symmetric or s.zero_point == "int")


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


# --- writing and reading mlpackages --------------------------------------------------------------------------

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
    ct = _coremltools()
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
    ct = _coremltools()
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


def activation_peaks(model: torch.nn.Module, ids: torch.Tensor, batch_size: int = 4) -> dict[str, dict]:
    """The largest |value| entering any RMSNorm, leaving any linear, and leaving k_proj/v_proj (what the
    float16 KV-cache states hold) over `ids`, each with its module's name."""
    return module_peaks(model, lambda: [model(chunk) for chunk in ids.split(batch_size)])


def module_peaks(model: torch.nn.Module, run) -> dict[str, dict]:
    """While `run()` feeds `model`: the largest |output| of any linear or convolution, of k_proj/v_proj, and
    the largest value a norm squares (|input| for RMSNorm, |input − mean| for LayerNorm), with module names."""
    from .float16_fit import module_maxima

    maxima = module_maxima(model, run)

    def largest(values) -> dict:
        peak, name = max(values, default=(0.0, None))
        return {"module": name, "peak": round(peak, 3)}

    return {
        "norm_input": largest((v["input"], n) for n, v in maxima.items() if "output" not in v),
        "linear_output": largest((v["output"], n) for n, v in maxima.items() if "output" in v),
        "kv_output": largest((v["output"], n) for n, v in maxima.items() if n.endswith(("k_proj", "v_proj"))),
    }


def float16_overflow(peaks: dict[str, dict]) -> str | None:
    """Why float16 compute would overflow on these activations (naming the module), or None."""
    linear, norm = peaks["linear_output"], peaks["norm_input"]
    if linear["peak"] >= FLOAT16_MAX:
        return f"'{linear['module']}' outputs values up to {linear['peak']:.0f} (float16 max {FLOAT16_MAX:.0f})"
    if norm["peak"] >= SQUARE_LIMIT:
        return (f"'{norm['module']}' squares inputs up to {norm['peak']:.0f} "
                f"(float16 x*x overflows from {SQUARE_LIMIT:.0f})")
    return None


SIMULATED_WINDOWS = 2  # held-out windows run in float16 (torch) against the float32 read-back model


def fit_float16(state, samples: torch.Tensor, problem: str):
    """(fit, the refitted float model, what still overflows) for a model whose activations overflow float16:
    see float16_fit.py. The fit is kept only if the rewritten model's values, measured again on the same
    calibration text, all fit (None, None, problem otherwise)."""
    from .float16_fit import apply_fit, module_maxima, overflow, plan_fit

    model = state.evaluated_model()
    fit = plan_fit(module_maxima(model, lambda: [model(chunk) for chunk in samples.split(4)]),
                   state.config.num_hidden_layers)
    if fit.blocking:
        return fit, None, f"{problem}; no power-of-two rewrite fits it: {fit.blocking}"
    fitted = apply_fit(model, fit)
    after = module_maxima(fitted, lambda: [fitted(chunk) for chunk in samples.split(4)])
    fit.largest_after = max((max(v.values()), name) for name, v in after.items())
    left = overflow(after, squares=False)
    if left:
        return fit, None, f"{problem}; after the float16 rewrite still {left}"
    return fit, apply_fit(state.model, fit), None


def embedding_matrices(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Module name → weight of the token embedding, and of the lm_head when it is not tied to it."""
    found = {}
    for module in (model.get_input_embeddings(), model.get_output_embeddings()):
        if module is not None and all(module.weight is not w for w in found.values()):
            found[next(n for n, m in model.named_modules() if m is module)] = module.weight
    return found


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


@register_stage("coreml", CoreMLConfig, "export a stateful Core ML mlpackage (iOS 18) with blockwise int4/int8 weights",
                transforms=False, whole_model=lambda c: 3 if c.chunks == 1 else None, exports=True,
                layer_groups=lambda c: c.chunks if c.chunks > 1 else None)
def export_coreml(config: CoreMLConfig, state, ctx: RunContext) -> StageOutcome:
    from . import coreml_chunks as chunked

    kind = f"int{config.bits}"
    folder = ctx.out_dir / (config.folder or f"coreml-{kind}")
    if folder.exists():
        shutil.rmtree(folder)
    samples = ctx.calibration(state, n_samples=8, images=False)
    peaks = (activation_peaks(state.evaluated_model(), samples) if config.chunks == 1
             else chunked.streamed_peaks(state, samples))
    problem = original = float16_overflow(peaks)
    fit = fitted = None
    if problem and config.precision != "float32" and config.chunks == 1 and state.vision is None:
        fit, fitted, problem = fit_float16(state, samples, problem)  # problem: None once the rewrite fits
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
        from ..models.minicpm import input_scale

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
        from .coreml_vision import export_vision

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
        "spec_version": max(_coremltools().utils.load_spec(str(p)).specificationVersion for p in packages),
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
