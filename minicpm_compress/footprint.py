"""What a compressed model costs on a device: weight bytes at their stored width, plus the KV cache."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .quant.qweight import QuantizedWeight

if TYPE_CHECKING:
    from .state import ModelState

DEFAULT_CONTEXT = 2048


def quantized_bytes(q: QuantizedWeight) -> int:
    """Packed codes, float16 scales, and zero points (packed integers or float16 offsets)."""
    groups = q.scales.numel()
    zeros = 0 if q.zeros is None else (groups * 2 if q.scheme.zero_point == "float" else groups * q.scheme.bits / 8)
    return int(q.packed.numel() + groups * 2 + zeros)


def kv_cache_bytes(config, context: int = DEFAULT_CONTEXT) -> int:
    """Keys and values of every layer for `context` tokens, in float16."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
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
