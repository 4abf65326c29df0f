"""Cut structures out of a decoder model: a new, smaller model of the same class and standard config.

The result is an ordinary dense checkpoint: every layer keeps the same FFN width and head counts
(config.json stays standard), head_dim is written explicitly once heads are removed, and MiniCPM's
`scale_depth` is adjusted when layers are dropped so every remaining residual branch keeps its scale
`scale_depth / sqrt(num_hidden_layers)`.
"""

from __future__ import annotations

import copy
import math

import torch

from ..models import architectures
from ..models.architectures import architecture_of


def _rebuild(model: torch.nn.Module, updates: dict, tensors: dict[str, torch.Tensor]) -> torch.nn.Module:
    config = copy.deepcopy(model.config)
    for key, value in updates.items():
        setattr(config, key, value)
    smaller = architecture_of(config).model_class(config).eval()
    missing, unexpected = smaller.load_state_dict(tensors, strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"pruned state dict does not fit: missing {missing}, unexpected {unexpected}")
    if config.tie_word_embeddings:
        smaller.tie_weights()
    return smaller


def keep_ffn_channels(model: torch.nn.Module, keep: list[torch.Tensor],
                      down: list[torch.Tensor] | None = None) -> torch.nn.Module:
    """Keep, in layer i, the intermediate channels `keep[i]` (equal counts in every layer); `down[i]`, when
    given, replaces down_proj's kept columns (a refit)."""
    tensors = model.state_dict()
    for i, index in enumerate(keep):
        p = f"model.layers.{i}.mlp."
        for name in ("gate_proj", "up_proj"):
            for kind in ("weight", "bias"):
                if f"{p}{name}.{kind}" in tensors:
                    tensors[f"{p}{name}.{kind}"] = tensors[f"{p}{name}.{kind}"][index]
        tensors[f"{p}down_proj.weight"] = tensors[f"{p}down_proj.weight"][:, index] if down is None else down[i]
    return _rebuild(model, {"intermediate_size": len(keep[0])}, tensors)


def keep_head_groups(model: torch.nn.Module, keep: list[torch.Tensor],
                     o: list[torch.Tensor] | None = None) -> torch.nn.Module:
    """Keep, in layer i, the KV-head groups `keep[i]` with their query heads; head_dim is unchanged. `o[i]`,
    when given, replaces o_proj's kept columns (a refit)."""
    c = model.config
    heads, kv = c.num_attention_heads, c.num_key_value_heads
    head_dim = architectures.head_dim(c)
    per_group = heads // kv
    tensors = model.state_dict()
    for i, groups in enumerate(keep):
        p = f"model.layers.{i}.self_attn."
        q_heads = (groups.unsqueeze(1) * per_group + torch.arange(per_group)).reshape(-1)
        q_rows = (q_heads.unsqueeze(1) * head_dim + torch.arange(head_dim)).reshape(-1)
        kv_rows = (groups.unsqueeze(1) * head_dim + torch.arange(head_dim)).reshape(-1)
        for name, rows in (("q_proj", q_rows), ("k_proj", kv_rows), ("v_proj", kv_rows)):
            for kind in ("weight", "bias"):
                if f"{p}{name}.{kind}" in tensors:
                    tensors[f"{p}{name}.{kind}"] = tensors[f"{p}{name}.{kind}"][rows]
        tensors[f"{p}o_proj.weight"] = tensors[f"{p}o_proj.weight"][:, q_rows] if o is None else o[i]
    kept = len(keep[0])
    return _rebuild(model, {"num_attention_heads": kept * per_group, "num_key_value_heads": kept,
                            "head_dim": head_dim}, tensors)


def keep_layers(model: torch.nn.Module, keep: list[int]) -> torch.nn.Module:
    """Keep the decoder layers `keep` (in order), renumbered from 0."""
    c = model.config
    tensors = {}
    for key, value in model.state_dict().items():
        if key.startswith("model.layers."):
            index, rest = key.removeprefix("model.layers.").split(".", 1)
            if int(index) in keep:
                tensors[f"model.layers.{keep.index(int(index))}.{rest}"] = value
        else:
            tensors[key] = value
    updates = {"num_hidden_layers": len(keep)}
    if hasattr(c, "scale_depth"):  # MiniCPM: keep the residual scale scale_depth / sqrt(L)
        updates["scale_depth"] = c.scale_depth * math.sqrt(len(keep) / c.num_hidden_layers)
    for key in ("layer_types",):  # per-layer lists (sliding-window layouts)
        value = getattr(c, key, None)
        if isinstance(value, list) and len(value) == c.num_hidden_layers:
            updates[key] = [value[i] for i in keep]
    return _rebuild(model, updates, tensors)
