import copy

import pytest
import torch

from minicpm_compress.models.source import ModelSource
from minicpm_compress.prune.reconstruct import prune_layerwise
from minicpm_compress.prune.surgery import keep_ffn_channels, keep_head_groups
from minicpm_compress.state import ModelState

from ..conftest import tiny_model

SAMPLES = torch.randint(0, 1000, (8, 32), generator=torch.Generator().manual_seed(1))


def _final_stream(model) -> torch.Tensor:
    """The residual stream after the last layer (the final norm's input) on SAMPLES."""
    seen = []
    handle = model.model.norm.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    try:
        with torch.no_grad():
            model(SAMPLES)
    finally:
        handle.remove()
    return seen[0]


@pytest.mark.parametrize("arch", ["llama", "minicpm"])  # MiniCPM scales each branch by scale_depth/√L
@pytest.mark.parametrize("method", ["ffn", "heads"])
def test_correcting_drift_brings_the_stream_back_towards_the_unpruned_model(arch, method):
    """Two layers, units chosen by activation scores: layer 0 sees the same inputs either way, so the drift
    target changes nothing there; layer 1's refit then minimises the distance to the unpruned model's
    own stream on the calibration tokens, which the plain refit (aimed at the unpruned layer applied to
    the pruned stream) does not."""
    model = tiny_model(arch, num_attention_heads=8, num_key_value_heads=4, head_dim=16, num_hidden_layers=2)
    reference = _final_stream(model)
    errors, results = {}, {}
    for drift in (False, True):
        pruned = copy.deepcopy(model)
        state = ModelState.of(pruned, None, ModelSource("tiny", None, "tiny"))
        kept = 80 if method == "ffn" else 2
        result = prune_layerwise(state, SAMPLES, method, kept, "activation", 4, 0, correct_drift=drift)
        pruned = (keep_ffn_channels if method == "ffn" else keep_head_groups)(pruned, result.keep, result.weights)
        errors[drift] = ((_final_stream(pruned) - reference).pow(2).sum() / reference.pow(2).sum()).item()
        results[drift] = result
    assert torch.allclose(results[True].weights[0], results[False].weights[0], rtol=1e-5, atol=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(results[True].keep, results[False].keep))
    print(f"{arch} {method}: stream error {errors[False]:.4f} -> {errors[True]:.4f}")
    assert errors[True] < 0.9 * errors[False]
