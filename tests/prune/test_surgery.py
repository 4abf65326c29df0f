"""Cutting structures whose contribution is zero must not change the model's function."""


import pytest
import torch

from minicpm_compress.models.checkpoint import save_checkpoint
from minicpm_compress.state import load_checkpoint
from minicpm_compress.prune.surgery import keep_ffn_channels, keep_head_groups, keep_layers

from ..conftest import tiny_model

IDS = torch.randint(0, 49152, (2, 12), generator=torch.Generator().manual_seed(0))


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("model_type", ["llama", "minicpm", "qwen2"])
def test_dropping_silent_ffn_channels_keeps_the_function(model_type):
    model = tiny_model(model_type, num_hidden_layers=3)
    dropped = torch.tensor([3, 17, 50, 99])
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.down_proj.weight[:, dropped] = 0
    keep = [torch.tensor([i for i in range(160) if i not in dropped.tolist()])] * 3
    pruned = keep_ffn_channels(model, keep)
    assert pruned.config.intermediate_size == 156 and pruned.model.layers[2].mlp.up_proj.weight.shape == (156, 64)
    torch.testing.assert_close(_logits(pruned), _logits(model), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("model_type", ["llama", "minicpm", "qwen2", "qwen3"])
def test_dropping_a_silent_kv_head_group_keeps_the_function(model_type):
    model = tiny_model(model_type, num_attention_heads=8, num_key_value_heads=4, head_dim=16)  # 2 q heads per group
    with torch.no_grad():  # groups 1 and 3 = query heads 2, 3, 6, 7 = o_proj columns 32..63, 96..127
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[:, 32:64] = 0
            layer.self_attn.o_proj.weight[:, 96:128] = 0
    pruned = keep_head_groups(model, [torch.tensor([0, 2])] * 2)
    c = pruned.config
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (4, 2, 16)
    assert pruned.model.layers[0].self_attn.q_proj.weight.shape == (64, 64)
    assert pruned.model.layers[0].self_attn.k_proj.weight.shape == (32, 64)
    torch.testing.assert_close(_logits(pruned), _logits(model), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("model_type", ["llama", "minicpm"])
def test_dropping_an_identity_layer_keeps_the_function_and_minicpm_residual_scale(model_type):
    model = tiny_model(model_type, num_hidden_layers=4)
    with torch.no_grad():  # layer 2 adds nothing to the residual stream
        model.model.layers[2].self_attn.o_proj.weight.zero_()
        model.model.layers[2].mlp.down_proj.weight.zero_()
    pruned = keep_layers(model, [0, 1, 3])
    assert pruned.config.num_hidden_layers == 3 and len(pruned.model.layers) == 3
    assert torch.equal(pruned.model.layers[2].mlp.up_proj.weight, model.model.layers[3].mlp.up_proj.weight)
    if model_type == "minicpm":
        from minicpm_compress.models.minicpm import mup_scales

        assert mup_scales(pruned.config)[1] == pytest.approx(mup_scales(model.config)[1], rel=1e-12)
    torch.testing.assert_close(_logits(pruned), _logits(model), atol=1e-5, rtol=1e-5)


def test_a_pruned_checkpoint_reloads_with_its_shapes_in_transformers_and_our_loader(tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM

    model = tiny_model("llama", num_attention_heads=8, num_key_value_heads=4, head_dim=16)
    pruned = keep_head_groups(keep_ffn_channels(model, [torch.arange(0, 160, 2)] * 2), [torch.tensor([1])] * 2)
    save_checkpoint(pruned, tokenizer, tmp_path / "p")
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "p").eval()
    ours, _ = load_checkpoint(tmp_path / "p")
    for loaded in (theirs, ours):
        assert loaded.model.layers[1].mlp.down_proj.weight.shape == (64, 80)
        assert loaded.model.layers[1].self_attn.q_proj.weight.shape == (32, 64)
        torch.testing.assert_close(_logits(loaded), _logits(pruned), atol=1e-5, rtol=1e-5)


def test_a_pruned_minicpm_computes_in_llama_cpp_like_in_torch(tmp_path, tokenizer):
    """Fewer layers (scale_depth adjusted), narrower FFN, and head_dim no longer hidden / heads."""
    from minicpm_compress.export.gguf.llama_cpp import LlamaCppRunner
    from minicpm_compress.export.gguf.writer import write_gguf
    from minicpm_compress.models.source import ModelSource
    from minicpm_compress.state import ModelState

    model = tiny_model("minicpm", num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=4, head_dim=16)
    pruned = keep_layers(model, [0, 2])
    pruned = keep_ffn_channels(pruned, [torch.arange(64, 160)] * 2)
    pruned = keep_head_groups(pruned, [torch.tensor([2])] * 2)  # 2 heads × 16 = 32 ≠ hidden 64
    save_checkpoint(pruned, tokenizer, tmp_path / "p")
    loaded, tok = load_checkpoint(tmp_path / "p")
    write_gguf(ModelState.of(loaded, tok, ModelSource("p", tmp_path / "p", "p")), tmp_path / "p.gguf", "F32")
    runner = LlamaCppRunner(tmp_path / "p.gguf", 12)
    try:
        ours = runner.logits(IDS)
    finally:
        runner.close()
    assert (ours - _logits(pruned)).abs().max().item() < 1e-2


@pytest.mark.parametrize("model_type", ["minicpm", "qwen2"])
def test_a_pruned_checkpoint_computes_in_onnxruntime_like_in_torch(tmp_path, tokenizer, model_type):
    """Fewer layers, a narrower FFN and fewer KV groups (head_dim × heads no longer the hidden size), in the
    fused float graph: onnxruntime computes what torch computes."""
    from minicpm_compress.export.onnx.runner import OnnxRunner
    from minicpm_compress.export.onnx.stage import OnnxConfig, write_onnx
    from minicpm_compress.models.source import ModelSource
    from minicpm_compress.state import ModelState

    model = tiny_model(model_type, num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=4, head_dim=16)
    pruned = keep_head_groups(keep_ffn_channels(keep_layers(model, [0, 2]), [torch.arange(64, 160)] * 2),
                              [torch.tensor([2])] * 2)
    save_checkpoint(pruned, tokenizer, tmp_path / "p")
    loaded, tok = load_checkpoint(tmp_path / "p")
    state = ModelState.of(loaded, tok, ModelSource("p", tmp_path / "p", "p"))
    write_onnx(state, tmp_path / "onnx", OnnxConfig(bits=32, accuracy_level=0, embeddings="float"))
    ours = OnnxRunner(tmp_path / "onnx" / "model.onnx", state.config).logits(IDS)
    assert (ours - _logits(pruned)).abs().max().item() < 1e-3
