import math

import pytest
import torch

from minicpm_compress.builtin.smollm2 import minicpm_from_llama
from minicpm_compress.state import load_checkpoint
from minicpm_compress.models.minicpm import MiniCPMForCausalLM

from ..conftest import tiny_model


def _manual_minicpm_logits(model: MiniCPMForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    """MiniCPM's forward written out from its definition, using the model's own sub-modules."""
    c = model.config
    inner = model.model
    h = inner.embed_tokens(ids) * c.scale_emb
    pos = torch.arange(ids.shape[1]).unsqueeze(0)
    cos_sin = inner.rotary_emb(h, position_ids=pos)
    mask = torch.full((ids.shape[1], ids.shape[1]), float("-inf")).triu(1)[None, None]
    residual_scale = c.scale_depth / math.sqrt(c.num_hidden_layers)
    for layer in inner.layers:
        attn, _ = layer.self_attn(layer.input_layernorm(h), attention_mask=mask, position_embeddings=cos_sin)
        h = h + attn * residual_scale
        h = h + layer.mlp(layer.post_attention_layernorm(h)) * residual_scale
    normed = torch.nn.functional.rms_norm(h, (c.hidden_size,), inner.norm.weight, c.rms_norm_eps)
    return model.lm_head(normed / (c.hidden_size / c.dim_model_base))


def test_minicpm_forward_applies_mup_scalings_as_defined():
    model = tiny_model("minicpm")
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    with torch.no_grad():
        ours = model(ids).logits
        manual = _manual_minicpm_logits(model, ids)
    torch.testing.assert_close(ours, manual, atol=1e-5, rtol=1e-5)


def test_minicpm_scalings_change_the_function():
    """Guard against a forward that ignores the constants: other constants, other logits."""
    a, b = tiny_model("minicpm"), tiny_model("minicpm", scale_depth=3.0)
    ids = torch.randint(0, 49152, (1, 8))
    with torch.no_grad():
        assert (a(ids).logits - b(ids).logits).abs().max() > 1e-2


def test_minicpm_from_llama_keeps_the_function_on_a_tiny_model():
    llama = tiny_model("llama")
    converted = minicpm_from_llama(llama, scale_emb=12.0, scale_depth=1.4, dim_model_base=16)
    ids = torch.randint(0, 49152, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(converted(ids).logits, llama(ids).logits, atol=1e-4, rtol=1e-4)
    assert converted.config.tie_word_embeddings


def test_builtin_minicpm_equals_smollm2_within_1e4(smollm2_path, minicpm_path, tokenizer):
    llama, _ = load_checkpoint(smollm2_path)
    minicpm, _ = load_checkpoint(minicpm_path)
    assert isinstance(minicpm, MiniCPMForCausalLM)
    assert minicpm.config.scale_emb == 8.0 and minicpm.config.dim_model_base == 256
    text = "It is a truth universally acknowledged, that a single man in possession of a good fortune 床前明月光"
    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        a, b = llama(ids).logits, minicpm(ids).logits
    assert (a - b).abs().max().item() <= 1e-4
    assert torch.equal(a.argmax(-1), b.argmax(-1))


@pytest.mark.parametrize("model_type", ["llama", "minicpm"])
def test_widened_model_computes_the_same_logits(model_type):
    """minicpmv-smollm2's LLM is minicpm-smollm2 widened: zero channels, rescaled norms, repeated KV heads."""
    from minicpm_compress.builtin.vlm import widen

    model = tiny_model(model_type)  # hidden 64, 4 heads of 16, 2 KV heads
    wide = widen(model, 128)
    assert wide.config.hidden_size == 128 and wide.config.num_attention_heads == 8 == wide.config.num_key_value_heads
    ids = torch.randint(0, 1000, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(wide(ids).logits, model(ids).logits, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="cannot widen"):
        widen(model, 120)
