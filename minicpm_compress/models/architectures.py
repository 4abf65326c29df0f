"""One table of the decoder architectures the tool understands.

Adding an architecture is adding an entry: its config and model classes, and the names of the
linears inside a decoder layer with the operation that feeds each group of them (the scaling groups
that activation-aware methods fold scales into).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM
from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

from .minicpm import MiniCPMConfig, MiniCPMForCausalLM


def head_dim(config) -> int:
    """Width of one attention head: the config's `head_dim` where it sets one (Qwen3, pruned heads), else
    hidden / heads."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


@dataclass(frozen=True)
class ScalingGroup:
    """Linears that read the output of `prev` (a norm or a linear), named relative to the decoder layer."""

    prev: str
    linears: tuple[str, ...]


LLAMA_LINEARS = (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
)
LLAMA_SCALING_GROUPS = (
    ScalingGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ScalingGroup("self_attn.v_proj", ("self_attn.o_proj",)),
    ScalingGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    ScalingGroup("mlp.up_proj", ("mlp.down_proj",)),
)


@dataclass(frozen=True)
class Architecture:
    model_type: str
    config_class: type
    model_class: type
    linears: tuple[str, ...] = LLAMA_LINEARS
    scaling_groups: tuple[ScalingGroup, ...] = LLAMA_SCALING_GROUPS
    mup: bool = False  # MiniCPM's embedding / residual / logit scalings


ARCHITECTURES: dict[str, Architecture] = {
    a.model_type: a
    for a in (
        Architecture("llama", LlamaConfig, LlamaForCausalLM),
        Architecture("mistral", MistralConfig, MistralForCausalLM),
        Architecture("qwen2", Qwen2Config, Qwen2ForCausalLM),
        Architecture("qwen3", Qwen3Config, Qwen3ForCausalLM),
        Architecture("minicpm", MiniCPMConfig, MiniCPMForCausalLM, mup=True),
    )
}


def architecture_of(model_or_config) -> Architecture:
    config = getattr(model_or_config, "config", model_or_config)
    try:
        return ARCHITECTURES[config.model_type]
    except KeyError:
        from ..errors import CompressError

        raise CompressError(
            f"model_type '{config.model_type}' is not supported (supported: {', '.join(sorted(ARCHITECTURES))})"
        ) from None


LAYERS_PATH = "model.layers"


def layer_prefix(index: int) -> str:
    """Parameter-path prefix of decoder layer `index`."""
    return f"{LAYERS_PATH}.{index}"


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    return model.get_submodule(LAYERS_PATH)


def quantizable_linears(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """Full parameter-path prefix (e.g. `model.layers.3.mlp.up_proj`) → the decoder-layer linear."""
    arch = architecture_of(model)
    found = {}
    for i, layer in enumerate(decoder_layers(model)):
        for name in arch.linears:
            found[f"{layer_prefix(i)}.{name}"] = layer.get_submodule(name)
    return found
