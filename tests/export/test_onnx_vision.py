"""MiniCPM-V in onnxruntime: vision, embedding and decoder graphs against the gated torch model."""

import json

import numpy as np
import pytest
import torch

from minicpm_compress.data.images import read_images
from minicpm_compress.data.prompts import image_prompts
from minicpm_compress.data.textsets import evaluation_windows
from minicpm_compress.export.onnx_vision import OnnxVisionRunner
from minicpm_compress.layerwise import image_features
from minicpm_compress.pipeline import run_recipe
from minicpm_compress.recipe import build_recipe


def torch_greedy(model, prompts, tokens: int) -> list[int]:
    """Greedy continuation in torch (the whole window re-run each step; image rows injected at layer 0)."""
    ids = prompts.ids[:1]
    out = []
    for _ in range(tokens):
        batch = prompts[:1]
        batch.ids = ids
        batch.slots = torch.cat([prompts.slots[:1], torch.zeros(1, ids.shape[1] - prompts.slots.shape[1], dtype=torch.bool)], 1)
        with torch.inference_mode(), image_features(model, batch) as x:
            logits = model(input_ids=x, use_cache=False).logits
        out.append(int(logits[0, -1].argmax()))
        ids = torch.cat([ids, torch.tensor([[out[-1]]])], 1)
    return out


@pytest.mark.slow
def test_onnx_graphs_measure_and_generate_like_the_gated_model(tmp_path):
    recipe = build_recipe(name="vlm-onnx", model="minicpmv-smollm2", data={"eval_tokens": 2048, "eval_window": 512},
                          stages=[{"rtn": {"bits": 4, "group_size": 32, "symmetric": True}},
                                  {"onnx": {"bits": 4}}, {"onnx": {"bits": 4, "vision": "int8", "folder": "v8"}}])
    record = run_recipe(recipe, tmp_path / "out")
    _load, rtn, onnx4, vision8 = record.stages
    # our int4 codes as MatMulNBits, float vision: the same numbers as torch, image rows included
    assert onnx4.details["linears"] == {"lossless": 210, "requantized": 0}
    assert onnx4.metrics.image_cosine > 0.9999
    assert abs(onnx4.metrics.kld - rtn.metrics.kld) < 2e-3 and abs(onnx4.metrics.ppl - rtn.metrics.ppl) / rtn.metrics.ppl < 2e-3
    # int8 vision weights: smaller, image rows slightly off
    assert vision8.details["vision"]["bytes"] < 0.6 * onnx4.details["vision"]["bytes"]
    assert 0.99 < vision8.metrics.image_cosine < onnx4.metrics.image_cosine
    config = json.loads((tmp_path / "out/onnx-int4/genai_config.json").read_text())["model"]
    assert config["vision"]["filename"] == "vision.onnx" and config["embedding"]["filename"] == "embedding.onnx"
    assert config["decoder"]["inputs"]["inputs_embeds"] == "inputs_embeds"

    # an app's run: image + prompt → the gated torch model's greedy tokens
    from minicpm_compress.models.source import resolve_model
    from minicpm_compress.state import ModelState

    state = ModelState.open(resolve_model(str(tmp_path / "out")))
    windows = evaluation_windows(state.tokenizer, ["austen-heldout"], 256, 128)
    prompts = state.vision.features(image_prompts(state.tokenizer, state.vision.settings,
                                                  read_images("skimage-heldout")[:1], windows[:1]))
    expected = torch_greedy(state.evaluated_model(), prompts, 8)
    runner = OnnxVisionRunner(tmp_path / "out/onnx-int4", state)
    assert runner.generate(prompts, 0, 8) == expected
