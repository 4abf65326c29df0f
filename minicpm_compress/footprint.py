"""What a compressed model costs on a device: weight bytes at their stored width, plus the KV cache."""

from __future__ import annotations

import torch

from .quant.qweight import QuantizedWeight

DEFAULT_CONTEXT = 2048


def quantized_bytes(q: QuantizedWeight) -> int:
    """Packed codes, float16 scales, and zero points (packed integers or float16 offsets)."""
    groups = q.scales.numel()
    zeros = 0 if q.zeros is None else (groups * 2 if q.scheme.zero_point == "float" else groups * q.scheme.bits / 8)
    return int(q.codes.numel() * q.scheme.bits / 8 + groups * 2 + zeros)


def kv_cache_bytes(config, context: int = DEFAULT_CONTEXT) -> int:
    """Keys and values of every layer for `context` tokens, in float16."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * context * 2


def memory_estimate(model: torch.nn.Module, qweights: dict[str, QuantizedWeight],
                    context: int = DEFAULT_CONTEXT) -> dict:
    """Bytes of weights (quantized linears as stored, everything else float16) and of a float16 KV cache."""
    quantized_params = {f"{name}.weight" for name in qweights}
    seen, other = set(), 0
    for name, p in model.named_parameters():  # named_parameters yields tied tensors once
        if name not in quantized_params and id(p) not in seen:
            seen.add(id(p))
            other += p.numel() * 2
    weights = sum(quantized_bytes(q) for q in qweights.values()) + other
    kv = kv_cache_bytes(model.config, context)
    return {
        "weights_bytes": weights,
        "kv_cache_bytes": kv,
        "context_tokens": context,
        "total_bytes": weights + kv,
        "assumes": "quantized linears packed at their bit width with float16 scales; other weights and the KV cache in float16",
    }
