import copy

import pytest
import torch

from minicpm_compress.errors import CompressError
from minicpm_compress.models.source import ModelSource
from minicpm_compress.prune.stage import PruneConfig, apply_prune, parameter_count
from minicpm_compress.recipe import build_recipe
from minicpm_compress.stages import RunContext
from minicpm_compress.state import ModelState

from ..conftest import tiny_model

IDS = torch.randint(0, 49152, (2, 12), generator=torch.Generator().manual_seed(0))


def _prune(model, tokenizer, **settings):
    state = ModelState.of(model, tokenizer, ModelSource("tiny", None, "tiny"))
    recipe = build_recipe(model="minicpm-smollm2", data={"sequence_length": 64}, stages=[{"prune": settings}])
    outcome = apply_prune(PruneConfig(calibration_samples=4, **settings), state, RunContext(recipe))
    return outcome.state.model, outcome.details


@pytest.mark.parametrize("method", ["ffn", "heads", "layers"])
def test_ratio_zero_is_the_identity(method, tokenizer):
    model = tiny_model("minicpm")
    before = copy.deepcopy(model)
    pruned, details = _prune(model, tokenizer, method=method, ratio=0.0)
    assert details["parameters_after"] == details["parameters_before"] == parameter_count(before)
    with torch.no_grad():
        assert torch.equal(pruned(IDS).logits, before(IDS).logits)


@pytest.mark.parametrize("importance", ["activation", "magnitude"])
def test_cut_only_removes_the_channels_that_contribute_least(importance, tokenizer):
    model = tiny_model("llama")
    quiet = torch.arange(0, 160, 5)[:32]  # 32 scattered channels whose output is nearly nothing
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.down_proj.weight[:, quiet] *= 1e-3
    pruned, details = _prune(model, tokenizer, method="ffn", ratio=0.2, multiple_of=32, importance=importance,
                             refit=False)
    assert details["units_after"] == 128 and pruned.config.intermediate_size == 128
    kept_columns = {tuple(c.tolist()) for c in pruned.model.layers[0].mlp.down_proj.weight.T}
    loud = [i for i in range(160) if i not in quiet.tolist()]
    assert kept_columns == {tuple(model.model.layers[0].mlp.down_proj.weight[:, i].tolist()) for i in loud}
    assert details["parameters_before"] - details["parameters_after"] == 2 * 32 * 3 * 64


def _with_copies(model, method: str):
    """Each layer's second half of FFN channels (or of KV-head groups) a copy of its first half: what a
    copy carried can be carried by its original with doubled output columns, so removing the copies and
    refitting loses almost nothing, while cutting any unit loses its share outright."""
    with torch.no_grad():
        for layer in model.model.layers:
            if method == "ffn":
                half = model.config.intermediate_size // 2
                for linear in (layer.mlp.gate_proj, layer.mlp.up_proj):
                    linear.weight[half:] = linear.weight[:half]
            else:
                for name in ("q_proj", "k_proj", "v_proj"):
                    weight = getattr(layer.self_attn, name).weight
                    half = weight.shape[0] // 2  # q heads are ordered by group: the first half are groups 0-1
                    weight[half:] = weight[:half]
    return model


@pytest.mark.parametrize("method", ["ffn", "heads"])
def test_refit_pruning_keeps_the_model_closer_than_cutting(method, tokenizer):
    """The layer walk's choice and refit against the cut-only path at the same size, on the model's logits."""
    model = _with_copies(tiny_model("llama", num_attention_heads=8, num_key_value_heads=4, head_dim=16), method)
    amount = {"ffn": dict(ratio=0.5, multiple_of=16), "heads": dict(ratio=0.5)}[method]
    with torch.no_grad():
        reference = model(IDS).logits
        errors = {}
        for settings in ({"importance": "activation", "refit": False}, {}, {"importance": "reconstruction"}):
            pruned, details = _prune(copy.deepcopy(model), tokenizer, method=method, **amount, **settings)
            errors[tuple(settings.items())] = (pruned(IDS).logits - reference).pow(2).mean().item()
            assert details["parameters_after"] < details["parameters_before"]
    cut, activation_refit, reconstruction = errors.values()
    # the energy score cannot see that a unit is a copy; the error left after the refit can
    assert reconstruction < 0.05 * min(cut, activation_refit)
    assert details["refit"] is True and details["importance"] == "reconstruction"
    assert PruneConfig(ratio=0.1).importance == "activation"  # the default: best on qwen2.5-0.5b
    assert len(details["relative_output_error"]) == 2 and all(0 <= e < 0.01 for e in details["relative_output_error"])


def test_reconstruction_scores_need_the_refit():
    with pytest.raises(ValueError, match="needs refit: true"):
        PruneConfig(ratio=0.1, importance="reconstruction", refit=False)
    for settings in ({"refit": False}, {"method": "layers"}):
        with pytest.raises(ValueError, match="correct_drift changes"):
            PruneConfig(ratio=0.1, importance="activation", correct_drift=True, **settings)


def test_the_layer_that_changes_the_hidden_state_least_is_removed(tokenizer):
    model = tiny_model("minicpm", num_hidden_layers=4)
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight.mul_(1e-3)
        model.model.layers[1].mlp.down_proj.weight.mul_(1e-3)
    pruned, details = _prune(model, tokenizer, method="layers", ratio=0.25)
    assert details["removed_layers"] == [1] and pruned.config.num_hidden_layers == 3
    assert min(details["block_influence"]) == details["block_influence"][1]


@pytest.mark.parametrize("arch", ["llama", "minicpm"])
def test_the_layers_refit_brings_the_stream_back_towards_the_unpruned_model(arch, tokenizer):
    """Layer 1 removed: layers 2 and 3's down_proj, refit towards the unpruned model's stream, take over what
    it added, as far as a linear map can; on the calibration tokens the final stream comes closer than
    after the cut alone, and layer 0 (before the gap) is left as it was."""
    model = tiny_model(arch, num_hidden_layers=4)
    with torch.no_grad():
        for linear in (model.model.layers[1].self_attn.o_proj, model.model.layers[1].mlp.down_proj):
            linear.weight.mul_(0.3)
    state = ModelState.of(model, tokenizer, ModelSource("tiny", None, "tiny"))
    recipe = build_recipe(model="minicpm-smollm2", data={"sequence_length": 64}, stages=[{"prune": {"ratio": 0.25}}])
    samples = RunContext(recipe).calibration(state, 4)

    def final_stream(m):
        seen = []
        handle = m.model.norm.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
        with torch.no_grad():
            m(samples)
        handle.remove()
        return seen[0]

    reference = final_stream(model)
    distances = {}
    for refit in (False, True):
        pruned, details = _prune(copy.deepcopy(model), tokenizer, method="layers", ratio=0.25, refit=refit)
        assert details["removed_layers"] == [1] and details["refit"] is refit
        distances[refit] = ((final_stream(pruned) - reference).pow(2).sum() / reference.pow(2).sum()).item()
        layers = pruned.model.layers
        assert torch.equal(layers[0].mlp.down_proj.weight, model.model.layers[0].mlp.down_proj.weight)
        assert torch.equal(layers[2].mlp.down_proj.weight, model.model.layers[3].mlp.down_proj.weight) is not refit
    assert details["stream_distance_after_refit"][-1] == pytest.approx(distances[True], rel=1e-3)
    print(f"{arch}: final stream distance {distances[False]:.4f} (cut) -> {distances[True]:.4f} (refit)")
    assert distances[True] < 0.8 * distances[False]


def test_target_params_reaches_the_target_with_whole_kv_groups(tokenizer):
    model = tiny_model("llama", num_attention_heads=8, num_key_value_heads=4, head_dim=16)
    pruned, details = _prune(model, tokenizer, method="heads", target_params=0.99)
    # the 49152 × 64 embedding dominates: 1% of all parameters is 3 of the 4 groups (12,288 parameters each)
    assert details["parameters_kept"] <= 0.99 and details["units_after"] == 1
    assert (pruned.config.num_key_value_heads, pruned.config.num_attention_heads) == (1, 2)
    assert details["parameters_before"] - details["parameters_after"] == 3 * 12288


@pytest.mark.parametrize("settings, message", [
    ({"method": "ffn", "ratio": 1.0}, "ratio 1.0 would remove all 160 FFN channels per layer"),
    ({"method": "layers", "target_params": 0.1}, "method 'layers' can remove at most"),
    ({"method": "heads", "ratio": 0.9}, "would remove all 2 KV-head groups per layer"),
])
def test_amounts_that_would_remove_everything_are_refused(settings, message, tokenizer):
    with pytest.raises(CompressError, match=message):
        _prune(tiny_model("llama"), tokenizer, **settings)


def test_quantized_models_are_not_pruned(tokenizer):
    from minicpm_compress.quant.qweight import QuantScheme, quantize

    model = tiny_model("llama")
    state = ModelState.of(model, tokenizer, ModelSource("tiny", None, "tiny"),
                       {"x": quantize(torch.randn(4, 32), QuantScheme(group_size=32))})
    recipe = build_recipe(model="minicpm-smollm2", stages=[{"prune": {"ratio": 0.1}}])
    with pytest.raises(CompressError, match="prune before rtn/awq/qat"):
        apply_prune(PruneConfig(ratio=0.1), state, RunContext(recipe))
