import copy

import pytest
import torch

from minicpm_compress.data.textsets import evaluation_windows
from minicpm_compress.errors import CompressError
from minicpm_compress.models.source import ModelSource
from minicpm_compress.prune.surgery import keep_ffn_channels, keep_layers
from minicpm_compress.recipe import build_recipe
from minicpm_compress.stages import RunContext
from minicpm_compress.state import ModelState
from minicpm_compress.train.layer_heal import LayerHealConfig, apply_layer_heal

from ..conftest import tiny_model
from .test_heal import _kl

SOURCE = ModelSource("tiny", None, "tiny")


def _heal(pruned, teacher, tokenizer, **settings):
    state = ModelState.of(pruned, tokenizer, SOURCE)
    recipe = build_recipe(model="minicpm-smollm2", stages=[{"heal_layers": {}}])
    ctx = RunContext(recipe, reference=ModelState.of(teacher, tokenizer, SOURCE))
    config = LayerHealConfig(**{"steps": 40, "batch_size": 4, "sequence_length": 32, "samples": 32, "lr": 3e-3,
                                **settings})
    return apply_layer_heal(config, state, ctx)


@pytest.mark.parametrize("model_type", ["llama", "minicpm"])
def test_each_layer_is_brought_back_towards_the_reference_layer(model_type, tokenizer):
    teacher = tiny_model(model_type)
    pruned = keep_ffn_channels(teacher, [torch.arange(0, 160, 2)] * 2)
    untouched = copy.deepcopy(pruned)
    outcome = _heal(pruned, teacher, tokenizer)
    d = outcome.details
    # measured (llama): 0.435 → 0.294 and 0.557 → 0.427
    assert all(after < 0.8 * before for before, after in zip(d["relative_error_before"], d["relative_error_after"]))
    healed = outcome.state.model
    held_out = evaluation_windows(tokenizer, ["austen-heldout"], 128, 32)
    assert _kl(healed, teacher, held_out) < 0.9 * _kl(untouched, teacher, held_out)  # llama 29.9 vs 34.4
    assert healed.config.intermediate_size == 80  # the pruned shape is kept
    assert torch.equal(healed.model.embed_tokens.weight, untouched.model.embed_tokens.weight)
    assert d["tokens"] == 40 * 4 * 32 and d["training_tokens_distinct"] == 32 * 32


def test_healing_streams_one_layer_at_a_time(tokenizer, monkeypatch):
    """Neither model is ever built whole, and no more than one layer's parameters are materialised at once."""
    teacher = tiny_model("llama", num_hidden_layers=3)
    pruned = keep_ffn_channels(teacher, [torch.arange(0, 160, 2)] * 3)
    layer_size = sum(p.numel() for p in teacher.model.layers[0].parameters())
    largest = []
    materialise = ModelState.modules

    def counting(self, *prefixes, quantized=False):
        context = materialise(self, *prefixes, quantized=quantized)

        class Count:
            def __enter__(_):
                model = context.__enter__()
                largest.append(sum(p.numel() for p in model.parameters() if p.device.type != "meta"))
                return model

            def __exit__(_, *exc):
                return context.__exit__(*exc)

        return Count()

    def refuse(self, quantized=False):
        raise AssertionError("heal_layers built a whole model")

    monkeypatch.setattr(ModelState, "modules", counting)
    monkeypatch.setattr(ModelState, "materialize", refuse)
    outcome = _heal(pruned, teacher, tokenizer, steps=2)
    embedding = teacher.model.embed_tokens.weight.numel()
    assert len(largest) == 2 + 2 * 3  # two embeddings (the streams' first inputs), then each layer of both
    assert max(largest) <= max(layer_size, embedding)
    assert outcome.state.weights.overrides  # what was trained is held as changed weights


def test_layers_that_do_not_correspond_are_refused(tokenizer):
    teacher = tiny_model("llama", num_hidden_layers=3)
    with pytest.raises(CompressError, match=r"one to one \(2 against 3\)"):
        _heal(keep_layers(teacher, [0, 2]), teacher, tokenizer, steps=1)
