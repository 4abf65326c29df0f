"""MiniCPM 1/2/4 (`model_type: minicpm`) implemented on top of transformers' Llama classes.

MiniCPM is Llama-shaped with muP scalings:
  * input embeddings are multiplied by `scale_emb`;
  * each residual branch (attention output, MLP output) is multiplied by
    `scale_depth / sqrt(num_hidden_layers)`;
  * logits are computed from the final hidden state divided by `hidden_size / dim_model_base`.

Real checkpoints ship this as remote code; here it is part of the package, so MiniCPM checkpoints
load without executing anything from the checkpoint. The state-dict names are Llama's.
"""

from __future__ import annotations

import math

import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import (
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaModel,
    LlamaRMSNorm,
)


class MiniCPMConfig(LlamaConfig):
    model_type = "minicpm"

    def __init__(
        self,
        scale_emb: float = 1.0,
        scale_depth: float = 1.0,
        dim_model_base: int | None = None,
        use_mup: bool = True,
        **kwargs,
    ):
        self.scale_emb = float(scale_emb)
        self.scale_depth = float(scale_depth)
        self.dim_model_base = dim_model_base
        self.use_mup = bool(use_mup)
        super().__init__(**kwargs)


def input_scale(config) -> float:
    """What a model multiplies its token embeddings by before the first layer: MiniCPM's scale_emb, else 1
    (MiniCPM-V's image rows enter after it, unscaled)."""
    return mup_scales(config)[0] if config.model_type == "minicpm" else 1.0


def mup_scales(config) -> tuple[float, float, float]:
    """(embedding scale, residual-branch scale, logit divisor) of a MiniCPM config; (1, 1, 1) if muP is off."""
    if not getattr(config, "use_mup", True):
        return 1.0, 1.0, 1.0
    residual = config.scale_depth / math.sqrt(config.num_hidden_layers)
    divisor = config.hidden_size / config.dim_model_base if config.dim_model_base else 1.0
    return config.scale_emb, residual, divisor


class MiniCPMDecoderLayer(LlamaDecoderLayer):
    def __init__(self, config: MiniCPMConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.residual_scale = mup_scales(config)[1]

    def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_values=None,
                use_cache=False, position_embeddings=None, **kwargs):
        residual = hidden_states
        hidden_states, _ = self.self_attn(
            hidden_states=self.input_layernorm(hidden_states),
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
            position_embeddings=position_embeddings,
            **kwargs,
        )
        hidden_states = residual + hidden_states * self.residual_scale
        residual = hidden_states
        hidden_states = self.mlp(self.post_attention_layernorm(hidden_states))
        return residual + hidden_states * self.residual_scale


class MiniCPMFinalNorm(LlamaRMSNorm):
    """The final RMSNorm followed by MiniCPM's logit divisor (keeps the state-dict key `model.norm.weight`)."""

    def __init__(self, hidden_size: int, eps: float, divisor: float):
        super().__init__(hidden_size, eps=eps)
        self.logit_divisor = divisor

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return super().forward(hidden_states) / self.logit_divisor


class MiniCPMModel(LlamaModel):
    config_class = MiniCPMConfig

    def __init__(self, config: MiniCPMConfig):
        super().__init__(config)
        self.layers = torch.nn.ModuleList(
            MiniCPMDecoderLayer(config, i) for i in range(config.num_hidden_layers)
        )
        self.norm = MiniCPMFinalNorm(config.hidden_size, config.rms_norm_eps, mup_scales(config)[2])
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, **kwargs):
        if inputs_embeds is None and input_ids is not None:
            inputs_embeds = self.embed_tokens(input_ids) * mup_scales(self.config)[0]
            input_ids = None
        return super().forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )


class MiniCPMForCausalLM(LlamaForCausalLM):
    config_class = MiniCPMConfig

    def __init__(self, config: MiniCPMConfig):
        super().__init__(config)
        self.model = MiniCPMModel(config)
        self.post_init()


def _register() -> None:
    """Make `AutoConfig` / `AutoModelForCausalLM` know `minicpm` (no code is taken from checkpoints)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        AutoConfig.register("minicpm", MiniCPMConfig)
        AutoModelForCausalLM.register(MiniCPMConfig, MiniCPMForCausalLM)
    except ValueError:  # already registered
        pass


_register()
