import pytest
import torch

from minicpm_compress.export.coreml.float16_fit import LIMIT, Float16Fit, apply_fit, module_maxima, overflow, plan_fit, simulate_float16

from ...conftest import tiny_model

IDS = torch.randint(0, 49152, (2, 12), generator=torch.Generator().manual_seed(0))


def massive(model_type: str):
    """A tiny model with a massive activation: layer 0's down_proj writes one residual channel ~1e6."""
    model = tiny_model(model_type)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[5, :] *= 3e4
        model.model.layers[1].mlp.up_proj.weight[:4, :] *= 3e4  # and layer 1 MLP inner values ~1e5
    return model


@pytest.mark.parametrize("model_type", ["llama", "minicpm", "qwen3"])
def test_the_rewrite_computes_the_same_function(model_type):
    model = tiny_model(model_type)
    with torch.no_grad():
        ref = model(IDS).logits
        out = apply_fit(model, Float16Fit(3, {0: 2, 1: 5}))(IDS).logits
    assert (out - ref).abs().max() < 1e-5 * ref.abs().max()


@pytest.mark.parametrize("model_type", ["llama", "minicpm", "qwen3"])
def test_a_model_that_overflows_float16_runs_in_float16_after_the_rewrite(model_type):
    model = massive(model_type)
    maxima = module_maxima(model, lambda: model(IDS))
    assert "down_proj' output reaches" in overflow(maxima, squares=True) or "norm" in overflow(maxima, squares=True)
    fit = plan_fit(maxima, 2)
    assert fit.stream_shift > 0 and fit.mlp_shifts.get(1, 0) > 0 and fit.blocking is None
    fitted = apply_fit(model, fit)
    after = module_maxima(fitted, lambda: fitted(IDS))
    assert overflow(after, squares=False) is None and max(max(v.values()) for v in after.values()) < 4 * LIMIT
    with torch.no_grad():
        ref = model(IDS).logits
        assert (fitted(IDS).logits - ref).abs().max() < 1e-5 * ref.abs().max()  # float32: the same function
        as_is = model.half()(IDS).logits.float()
        rewritten = fitted.half()(IDS).logits.float()
    assert not torch.isfinite(as_is).all()  # float16 as it was: inf / nan
    # float16's own rounding (values far below the massive channel keep fewer bits): close, same argmax
    assert torch.isfinite(rewritten).all() and (rewritten - ref).abs().max() < 0.03 * ref.abs().max()
    assert (rewritten.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9
    # the exporter's record of the same, through the project's evaluator
    assert simulate_float16(massive(model_type), IDS)["finite"] is False
    simulated = simulate_float16(apply_fit(massive(model_type), fit), IDS)
    assert simulated["finite"] and simulated["kld"] < 1e-3 and simulated["tokens"] == IDS.numel() - IDS.shape[0]


def test_values_no_power_of_two_can_move_are_named():
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.gate_proj.weight.mul_(1e5)  # SiLU's input: not linear, cannot be shifted
    fit = plan_fit(module_maxima(model, lambda: model(IDS)), 2)
    assert fit.blocking.startswith("'model.layers.1.mlp.gate_proj' outputs values up to")
