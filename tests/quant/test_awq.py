import copy

import pytest
import torch

from minicpm_compress.errors import CompressError
from minicpm_compress.layerwise import InputStatistics, first_layer_inputs, run_layer
from minicpm_compress.models.architectures import ARCHITECTURES, decoder_layers
from minicpm_compress.models.source import ModelSource
from minicpm_compress.pipeline import run_recipe
from minicpm_compress.quant.awq import AWQConfig, _fold, apply_awq, search_scales
from minicpm_compress.quant.output_error import output_error
from minicpm_compress.quant.qweight import QuantScheme, quantize
from minicpm_compress.recipe import build_recipe
from minicpm_compress.stages import RunContext
from minicpm_compress.state import ModelState

from ..conftest import tiny_model


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_gram_output_error_equals_the_direct_sum():
    torch.manual_seed(0)
    x, w = torch.randn(300, 40), torch.randn(24, 40)
    delta = w - quantize(w, QuantScheme(bits=4, group_size=8)).dequantize()
    direct = ((x @ delta.T) ** 2).sum()
    torch.testing.assert_close(output_error(delta, x.T @ x), direct, rtol=1e-4, atol=0)


@pytest.mark.parametrize("model_type", ["llama", "minicpm", "qwen3"])
def test_folding_any_scales_leaves_the_float_function_unchanged(model_type):
    model = tiny_model(model_type, num_attention_heads=4, num_key_value_heads=4)  # no GQA: v→o is foldable too
    before = copy.deepcopy(model)
    ids = torch.randint(0, 49152, (2, 16))
    torch.manual_seed(1)
    for layer in decoder_layers(model):
        for group in ARCHITECTURES[model_type].scaling_groups:
            linears = [layer.get_submodule(n) for n in group.linears]
            _fold(layer.get_submodule(group.prev), linears, torch.rand(linears[0].in_features) * 4 + 0.1)
    assert not torch.equal(model.model.layers[0].mlp.down_proj.weight, before.model.layers[0].mlp.down_proj.weight)
    torch.testing.assert_close(_logits(model, ids), _logits(before, ids), atol=2e-4, rtol=1e-4)


def _tiny_state(model_type, tokenizer):
    model = tiny_model(model_type)
    return ModelState.of(model, tokenizer, ModelSource("tiny", None, "tiny"))


@pytest.mark.parametrize("model_type", ["llama", "minicpm"])
def test_awq_stage_keeps_the_float_function_and_quantizes_every_linear(model_type, tokenizer):
    state = _tiny_state(model_type, tokenizer)
    original = copy.deepcopy(state.model)
    recipe = build_recipe(model="minicpm-smollm2", data={"calibration_samples": 4, "sequence_length": 64},
                          stages=[{"awq": {"group_size": 32}}])
    outcome = apply_awq(AWQConfig(group_size=32), state, RunContext(recipe))
    ids = torch.randint(0, 49152, (2, 16))
    # the scales were folded into the float model: same function before quantization
    torch.testing.assert_close(_logits(state.model, ids), _logits(original, ids), atol=2e-4, rtol=1e-4)
    assert len(state.qweights) == 2 * 7 and outcome.details["scaling_groups"] == 2 * 3  # v→o skipped (GQA)
    assert outcome.details["skipped_groups"] == ["self_attn.v_proj→self_attn.o_proj"]
    assert any(not torch.equal(a, b) for a, b in zip(state.model.parameters(), original.parameters()))


def test_scale_search_never_does_worse_than_no_scaling():
    torch.manual_seed(0)
    x = torch.randn(512, 64) * torch.linspace(0.1, 8, 64)  # outlier channels, as in real activations
    w = torch.randn(96, 64)
    gram = x.T @ x
    scheme = QuantScheme(bits=4, group_size=32, symmetric=True)
    scales, alpha, gain = search_scales(w, gram, x.abs().mean(0), scheme, grid=20)
    plain = output_error(w - quantize(w, scheme).dequantize(), gram)
    scaled = output_error(w - quantize(w * scales, scheme).dequantize() / scales, gram)
    assert scaled < plain and alpha >= 0
    assert gain == pytest.approx(1 - (scaled / plain).item(), abs=1e-4)


def test_mixed_precision_keeps_the_worst_linears_at_int8(tokenizer):
    state = _tiny_state("llama", tokenizer)
    recipe = build_recipe(model="minicpm-smollm2", data={"calibration_samples": 4, "sequence_length": 64},
                          stages=[{"awq": {}}])
    outcome = apply_awq(AWQConfig(group_size=32, int8_linears=3), state, RunContext(recipe))
    int8 = outcome.details["int8_linears"]
    assert len(int8) == 3 and all(state.qweights[n].scheme.bits == 8 for n in int8)
    assert sum(q.scheme.bits == 4 for q in state.qweights.values()) == 14 - 3
    with pytest.raises(ValueError, match="bits: 4 only"):
        AWQConfig(bits=8, int8_linears=1)


def test_layer_statistics_see_the_minicpm_embedding_scale(tokenizer):
    model = tiny_model("minicpm")
    samples = torch.randint(0, 49152, (2, 8))
    inputs = first_layer_inputs(model, samples, batch_size=1)
    expected = model.model.embed_tokens(samples) * model.config.scale_emb
    torch.testing.assert_close(torch.cat(inputs.hidden), expected)
    stats = InputStatistics({"q": decoder_layers(model)[0].self_attn.q_proj})
    out = run_layer(decoder_layers(model)[0], inputs)
    stats.close()
    assert stats.tokens["q"] == 16 and out.hidden[0].shape == (1, 8, 64)


def test_bad_calibration_input_is_refused(tmp_path, tokenizer):
    state = _tiny_state("llama", tokenizer)
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "short.txt").write_text("A few words only.")
    for name, message in (("empty.txt", "empty.txt: contains no text"),
                          ("short.txt", "short.txt' has .* tokens, fewer than the 2048 needed")):
        recipe = build_recipe(model="minicpm-smollm2", data={"calibration": [str(tmp_path / name)],
                              "calibration_samples": 4, "sequence_length": 512}, stages=[{"awq": {}}])
        with pytest.raises(CompressError, match=message):
            apply_awq(AWQConfig(), state, RunContext(recipe))


def test_block_objective_scores_scales_by_the_blocks_output(tokenizer):
    """AutoAWQ's objective: q/k/v scales by the attention output, gate/up by the MLP's; the identity is a candidate,
    so the chosen scales never do worse, and scoring leaves the layer's weights as they were."""
    from minicpm_compress.quant.awq import BlockCalls, search_scales_by_block

    model = tiny_model("llama")
    layer = decoder_layers(model)[0]
    inputs = first_layer_inputs(model, torch.randint(0, 49152, (4, 32)), batch_size=2)
    calls = BlockCalls(layer.mlp, max_tokens=64)  # the first of two batches
    stats = InputStatistics({"gate": layer.mlp.gate_proj})
    run_layer(layer, inputs)
    calls.close()
    stats.close()
    assert calls.tokens == 64 and len(calls.calls) == 1
    before = layer.mlp.gate_proj.weight.clone()
    scheme = QuantScheme(bits=4, group_size=32)
    linears = [layer.mlp.gate_proj, layer.mlp.up_proj]
    assert calls.error(linears, [l.weight for l in linears]) == 0  # the float weights reproduce the outputs
    scales, alpha, gain = search_scales_by_block(linears, calls, stats.mean_abs("gate"), scheme, grid=10)
    assert torch.equal(layer.mlp.gate_proj.weight, before) and 0 <= gain < 1
    plain = calls.error(linears, [quantize(l.weight, scheme).dequantize() for l in linears])
    scaled = calls.error(linears, [quantize(l.weight * scales, scheme).dequantize() / scales for l in linears])
    assert scaled == pytest.approx((1 - gain) * plain, rel=1e-4)


def test_awq_with_the_block_objective_keeps_the_float_function(tokenizer):
    state = _tiny_state("minicpm", tokenizer)
    original = copy.deepcopy(state.model)
    recipe = build_recipe(model="minicpm-smollm2", data={"calibration_samples": 4, "sequence_length": 64},
                          stages=[{"awq": {}}])
    outcome = apply_awq(AWQConfig(group_size=32, objective="block", block_tokens=128), state, RunContext(recipe))
    ids = torch.randint(0, 49152, (2, 16))
    torch.testing.assert_close(_logits(state.model, ids), _logits(original, ids), atol=2e-4, rtol=1e-4)
    assert len(state.qweights) == 14 and outcome.details["mean_error_reduction"] >= 0
