"""Memory estimates: a quantizing stage's estimate counts the weights it will hold, scales included."""

import pytest
import torch

from minicpm_compress.footprint import quantized_output_bytes, stage_memory
from minicpm_compress.models.source import ModelSource
from minicpm_compress.quant.qweight import quantize
from minicpm_compress.quant.rtn import RTNConfig
from minicpm_compress.recipe import DataConfig
from minicpm_compress.state import ModelState

from .conftest import WIDE, tiny_model


def _held_bytes(q) -> int:
    """What a quantized weight really holds in memory: packed codes, scales, zero points (or K factors)."""
    parts = [q.packed]
    if q.scheme.super_block:
        parts += [t for f in q.k_factors if f is not None for t in f]
    else:
        parts += [q.scales.to(torch.float16)] + ([] if q.zeros is None else [q.zeros.to(torch.float16)
                                                                             if q.zeros.is_floating_point() else q.zeros])
    return sum(t.numel() * t.element_size() for t in parts)


@pytest.mark.parametrize("settings", [dict(layout="Q4_K"), dict(layout="Q6_K"), dict(layout="Q4_0"),
                                      dict(bits=4, group_size=128), dict(bits=8, group_size=None, symmetric=True)],
                         ids=str)
def test_a_quantizing_stage_estimates_the_weights_it_will_hold(tokenizer, settings):
    model = tiny_model("llama", **WIDE)
    state = ModelState.of(model, tokenizer, ModelSource("tiny", None, "tiny"))
    config = RTNConfig(**settings)
    held = sum(_held_bytes(quantize(state.tensor(f"{n}.weight"), config)) for n in state.linear_names())
    estimate = quantized_output_bytes(state, config)
    assert 0.95 * held <= estimate <= 1.05 * held, (estimate, held)
    part = stage_memory(state, None, DataConfig(), config=config)["parts"]["quantized weights (packed)"]
    assert part == max(estimate, sum(state.tensor(f"{n}.weight").numel() for n in state.linear_names()) // 2)


def test_k_grid_weights_are_estimated_above_plain_int4_codes(tokenizer):
    state = ModelState.of(tiny_model("llama", **WIDE), tokenizer, ModelSource("tiny", None, "tiny"))
    codes_only = sum(state.tensor(f"{n}.weight").numel() for n in state.linear_names()) // 2
    assert quantized_output_bytes(state, RTNConfig(layout="Q4_K")) > 1.1 * codes_only
    assert quantized_output_bytes(state, object()) == 0  # not a quantizing stage


def test_core_ml_in_chunks_peaks_in_its_larger_phase_not_in_both_at_once(tokenizer):
    """8B shapes on the meta device: converting a package apart from measuring is not counted on top of it."""
    from minicpm_compress.export.coreml.stage import CoreMLConfig
    from minicpm_compress.models.architectures import ARCHITECTURES
    from minicpm_compress.stages import STAGES

    from .conftest import tiny_config

    config = tiny_config("llama", hidden_size=4096, intermediate_size=16384, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=2, vocab_size=73448)
    with torch.device("meta"):
        model = ARCHITECTURES["llama"].model_class(config)
    state = ModelState.of(model, tokenizer, ModelSource("8b-shaped", None, "8b-shaped"))
    data, stage = DataConfig(eval_tokens=512), STAGES["coreml"]
    measuring = stage_memory(state, None, data)
    layer = sum(p.numel() for p in model.model.layers[0].parameters()) * 4
    for chunks, phase, package in ((16, "converting", 2 * layer), (32, "measuring", layer)):
        c = CoreMLConfig(chunks=chunks)
        estimate = stage_memory(state, stage.memory_multiple(c), data, config=c, layer_groups=stage.groups(c))
        assert estimate["phase"] == phase
        converting = 3 * package + measuring["parts"]["quantized weights (packed)"] + measuring["parts"]["process"]
        assert estimate["bytes"] == max(converting, measuring["bytes"])
        assert estimate["bytes"] < stage_memory(state, 3 / chunks, data)["bytes"]  # the sum of both phases
    whole = CoreMLConfig(chunks=1)
    assert stage.groups(whole) is None and "phase" not in stage_memory(state, stage.memory_multiple(whole), data)
