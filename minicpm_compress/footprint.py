"""What a compressed model costs on a device: weight bytes at their stored width, plus the KV cache."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .errors import ResourceError
from .models import architectures

if TYPE_CHECKING:
    from .quant.qweight import QuantizedWeight
    from .state import ModelState

DEFAULT_CONTEXT = 2048


def quantized_bytes(q: "QuantizedWeight") -> int:
    """Packed codes plus scales and zero points as the scheme stores them (`QuantScheme.bits_per_weight`)."""
    rows, cols = q.shape
    return int(q.packed.numel() + rows * cols * (q.scheme.bits_per_weight(cols) - q.scheme.bits) / 8)


def kv_cache_bytes(config, context: int = DEFAULT_CONTEXT) -> int:
    """Keys and values of every layer for `context` tokens, in float16."""
    head_dim = architectures.head_dim(config)
    return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * context * 2


def memory_estimate(state: "ModelState", context: int = DEFAULT_CONTEXT) -> dict:
    """Bytes of weights (quantized linears as stored, everything else float16) and of a float16 KV cache."""
    quantized_params = {f"{name}.weight" for name in state.qweights}
    other = sum(torch.Size(state.weights.shape(n)).numel() * 2 for n in state.weights.names() if n not in quantized_params)
    weights = sum(quantized_bytes(q) for q in state.qweights.values()) + other
    kv = kv_cache_bytes(state.config, context)
    return {
        "weights_bytes": weights,
        "kv_cache_bytes": kv,
        "context_tokens": context,
        "total_bytes": weights + kv,
        "assumes": "quantized linears packed at their bit width with float16 scales; other weights and the KV cache in float16",
    }


GIB = 1 << 30
PROCESS_BASE_BYTES = 1 << 30  # python, torch, transformers and friends, measured ~0.9 GB here


def _numel(state: "ModelState", prefix: str) -> int:
    return sum(torch.Size(state.weights.shape(n)).numel() for n in state.weights.names() if n.startswith(prefix))


def quantized_output_bytes(state: "ModelState", config) -> int:
    """Bytes of the quantized weights a quantizing stage (a config that is a `QuantScheme`) makes: every
    decoder linear at its scheme's stored bits per weight, with scales (a bit budget's `target_bits` where
    it asks for more); 0 for any other stage."""
    from .quant.qweight import QuantScheme

    if not isinstance(config, QuantScheme):
        return 0
    total = 0.0
    for name in state.linear_names():
        rows, cols = state.weights.shape(f"{name}.weight")
        bits = max(config.bits_per_weight(cols), getattr(config, "target_bits", None) or 0)
        total += rows * cols * bits / 8
    return int(total)


def stage_memory(state: "ModelState", whole_model: float | None, data, calibrates: bool = False,
                 config=None, layer_groups: int | None = None) -> dict:
    """Estimated peak memory of a stage on `state`, with what it is made of.

    Every stage holds the packed quantized weights and is measured afterwards: one decoder layer at a
    time (float32, plus a dequantized copy and temporaries), the output head as stored, the hidden states
    of every held-out window at one layer and one batch of logits. A calibrating stage adds its samples'
    activations and the Gram matrices of one layer; a whole-model stage the float32 model that many times.
    The quantized weights are the larger of those held now and those a quantizing `config` will make.
    A stage converting the model in `layer_groups` apart from its measurement (Core ML in chunks) peaks in
    whichever phase needs more: the measurement, or one group's float32 weights and the converter's two
    copies of them (the embedding table, in float16, when that is larger); `phase` then names it.
    """
    from .models.architectures import layer_prefix

    c = state.config
    qbytes = sum(quantized_bytes(q) for q in state.qweights.values())
    linear_params = sum(torch.Size(state.weights.shape(f"{n}.weight")).numel() for n in state.linear_names())
    windows = -(-data.eval_tokens // data.eval_window)
    batch = min(data.eval_batch_size, windows)
    parts = {
        "one layer float32 × 3": _numel(state, layer_prefix(0) + ".") * 4 * 3,
        "output head": c.vocab_size * c.hidden_size * 4,
        "held-out activations and logits": data.eval_tokens * c.hidden_size * 4 * 3
        + batch * data.eval_window * c.vocab_size * 4 * 4,
    }
    if calibrates:
        parts["calibration activations, Gram matrices, search temporaries"] = (
            data.calibration_samples * data.sequence_length * c.hidden_size * 4 * 2
            + (c.intermediate_size**2 + 3 * c.hidden_size**2) * 8
            + 2 * c.intermediate_size * c.hidden_size * 4 * 4)  # gate+up candidates: ~4 float32 copies
    if whole_model is not None:
        parts["float32 model × %g" % whole_model] = int(state.parameter_count() * 4 * whole_model)
    parts["quantized weights (packed)"] = max(qbytes, quantized_output_bytes(state, config), linear_params // 2)
    parts["process"] = PROCESS_BASE_BYTES
    estimate = {"bytes": sum(parts.values()), "parts": parts}
    if layer_groups:
        per_group = -(-state.num_layers // layer_groups)
        package = max(_numel(state, layer_prefix(0) + ".") * per_group * 4, c.vocab_size * c.hidden_size * 2)
        converting = {f"one package ({per_group} layers) float32 × 3": package * 3,
                      "quantized weights (packed)": parts["quantized weights (packed)"], "process": PROCESS_BASE_BYTES}
        phases = {"measuring": estimate,
                  "converting": {"bytes": sum(converting.values()), "parts": converting}}
        phase = max(phases, key=lambda k: phases[k]["bytes"])
        estimate = {**phases[phase], "phase": phase}
    return estimate


def available_memory() -> int:
    import psutil

    return int(psutil.virtual_memory().available)


def _stored_bits(config) -> int:
    """The widest weight an exporter's config asks for (GGUF types by name; K-quants up to 6 bits)."""
    bits = getattr(config, "bits", None)
    if bits is not None:
        return int(bits)
    kind = str(getattr(config, "type", "") or "")
    return {"F32": 32, "F16": 16, "Q8_0": 8}.get(kind, 6 if kind else 16)


def disk_estimate(state: "ModelState", config) -> int:
    """Upper estimate of the bytes an exporter writes: decoder linears at the config's bits (plus ~10% for
    scales), every other LLM weight (embedding, head, norms) as float32, and a MiniCPM-V vision half as float32."""
    bits = _stored_bits(config)
    linear = sum(torch.Size(state.weights.shape(n)).numel() for n in state.weights.names()
                 if n.startswith("model.layers.") and len(state.weights.shape(n)) == 2)
    other = _numel(state, "") - linear
    vision = state.vision.parameter_count() if state.vision is not None else 0
    return int(linear * bits / 8 * 1.1 + (other + vision) * 4)


def check_memory(name: str, estimate: dict, enforce: bool, hint: str = "") -> None:
    """Refuse a stage whose estimated peak exceeds the memory available now (unless told not to); `hint`
    names a setting of the stage that needs less."""
    available = available_memory()
    if enforce and estimate["bytes"] > available:
        biggest = max(estimate["parts"], key=estimate["parts"].get)
        raise ResourceError(
            f"stage '{name}' needs about {estimate['bytes'] / GIB:.1f} GiB (mostly {biggest}), "
            f"{available / GIB:.1f} GiB is available; {hint}use a machine with more memory or pass --no-memory-check"
        )


def check_disk(name: str, needed: int, folder: Path, enforce: bool) -> None:
    """Refuse an exporter whose artifact would not fit on the output folder's file system."""
    free = shutil.disk_usage(folder).free
    if enforce and needed > free:
        raise ResourceError(f"stage '{name}' writes up to about {needed / GIB:.2f} GiB into {folder.parent}, "
                            f"which has {free / GIB:.2f} GiB free; free some space or pass --no-memory-check")
