"""MiniCPM-V in onnxruntime: vision, embedding and decoder graphs against the gated torch model."""

import json

import pytest
import torch

from minicpm_compress.layerwise import image_features
from minicpm_compress.pipeline import run_recipe
from minicpm_compress.recipe import build_recipe

from ...conftest import write_tiny_vlm


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
def test_onnx_graphs_float_and_int8_vision(tmp_path):
    recipe = build_recipe(name="vlm-onnx", model="minicpmv-smollm2", data={"eval_tokens": 1024, "eval_window": 512},
                          stages=[{"rtn": {"bits": 4, "group_size": 32, "symmetric": True}},
                                  {"onnx": {"bits": 32}}, {"onnx": {"bits": 4, "vision": "int8", "folder": "v8"}}])
    record = run_recipe(recipe, tmp_path / "out")
    _load, rtn, fp32, vision8 = record.stages
    # a float graph: the float model's numbers, image rows included
    assert fp32.metrics.image_cosine > 0.9999 and fp32.metrics.kld < 1e-4 and fp32.metrics.top1 > 0.995
    # int4 codes as MatMulNBits and int8 vision weights: smaller, image rows slightly off
    assert vision8.details["linears"] == {"lossless": 210, "requantized": 0}
    assert vision8.details["vision"]["bytes"] < 0.6 * fp32.details["vision"]["bytes"]
    assert 0.99 < vision8.metrics.image_cosine < fp32.metrics.image_cosine
    assert abs(vision8.metrics.kld - rtn.metrics.kld) < 0.01
    config = json.loads((tmp_path / "out/onnx-fp32/genai_config.json").read_text())["model"]
    assert config["vision"]["filename"] == "vision.onnx" and config["embedding"]["filename"] == "embedding.onnx"
    assert config["decoder"]["inputs"]["inputs_embeds"] == "inputs_embeds"


@pytest.mark.parametrize("version", ["2.6", "4.5"])
def test_qwen_layouts_export_to_onnx(version, tmp_path, vlm_tokenizer):
    """MiniCPM-V 2.6 (Qwen2 LLM) and 4.5 (Qwen3 LLM) layouts, tiny: the three graphs compute what torch does."""
    folder = write_tiny_vlm(tmp_path / version, version, vlm_tokenizer)
    recipe = build_recipe(name="t", model=str(folder), data={"eval_tokens": 1024, "eval_window": 256},
                          stages=[{"rtn": {"bits": 4, "group_size": 32, "symmetric": True}}, {"onnx": {"bits": 4}}])
    _load, rtn, onnx = run_recipe(recipe, tmp_path / "out").stages
    assert onnx.details["linears"] == {"lossless": 14, "requantized": 0}
    assert abs(onnx.metrics.kld - rtn.metrics.kld) < 1e-4 and onnx.metrics.image_cosine > 0.9999
