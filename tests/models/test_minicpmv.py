"""MiniCPM-V checkpoints: the 2.6 / 4.0 / 4.5 layouts load with their real key names, and image prompts
through the streamed state equal a direct forward with the image rows scattered into the embeddings."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from minicpm_compress.data.prompts import image_prompts
from minicpm_compress.errors import CompressError
from minicpm_compress.evaluate.runners import StreamedRunner
from minicpm_compress.models.minicpm import mup_scales
from minicpm_compress.models.minicpmv import LLM_TYPES
from minicpm_compress.resolve import resolve_model
from minicpm_compress.state import ModelState

from ..conftest import write_tiny_vlm


def _images():
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (84, 112, 3), dtype=np.uint8)  # under 112²: one piece
    large = rng.integers(0, 256, (200, 310, 3), dtype=np.uint8)  # sliced
    return [("small", small), ("large", large)]


@pytest.mark.parametrize("version", ["2.6", "4.0", "4.5"])
def test_layouts_load_under_their_real_key_names(version, tmp_path, vlm_tokenizer):
    folder = write_tiny_vlm(tmp_path / version, version, vlm_tokenizer)
    state = ModelState.open(resolve_model(str(folder)))
    assert state.config.model_type == LLM_TYPES[version]
    assert state.vision.settings.version == version and state.vision.settings.query_num == 16
    assert all(n.startswith(("vpm.", "resampler.")) for n in state.vision.names())
    assert not any(n.startswith(("llm.", "vpm.", "resampler.")) for n in state.weights.names())
    saved = load_file(str(folder / "model.safetensors"))
    torch.testing.assert_close(state.tensor("model.layers.1.mlp.up_proj.weight"), saved["llm.model.layers.1.mlp.up_proj.weight"])
    torch.testing.assert_close(state.vision.tensor("resampler.query"), saved["resampler.query"])
    assert state.parameter_count() == sum(t.numel() for t in saved.values())


@pytest.mark.parametrize("version", ["2.6", "4.0", "4.5"])
def test_image_prompts_equal_a_direct_forward_with_scattered_image_rows(version, tmp_path, vlm_tokenizer):
    folder = write_tiny_vlm(tmp_path / version, version, vlm_tokenizer)
    state = ModelState.open(resolve_model(str(folder)))
    windows = torch.randint(0, 49152, (3, 200), generator=torch.Generator().manual_seed(0))
    prompts = image_prompts(state.tokenizer, state.vision.settings, _images(), windows)
    assert prompts.images[1].grid is not None  # the large image is sliced
    assert prompts.slots.sum(1).tolist() == [16, 16 * (1 + len(prompts.images[1].pieces) - 1), 16]
    with_features = state.vision.features(prompts)
    streamed = StreamedRunner(state, quantized=False).logits(with_features)

    model = state.materialize()
    with torch.no_grad():
        embeds = model.model.embed_tokens(prompts.ids)
        if state.config.model_type == "minicpm":
            embeds = embeds * mup_scales(state.config)[0]  # the resampler rows are not scaled
        embeds[prompts.slots] = torch.cat(with_features.features)
        direct = model(inputs_embeds=embeds, use_cache=False).logits
    torch.testing.assert_close(streamed, direct, atol=2e-4, rtol=1e-4)
    # the image changes what follows it: a different image gives different next-token logits
    swapped = state.vision.features(image_prompts(state.tokenizer, state.vision.settings, _images()[::-1], windows))
    other = StreamedRunner(state, quantized=False).logits(swapped)
    scored = prompts.scored[0]
    assert (other[0, :-1][scored] - streamed[0, :-1][scored]).abs().max() > 1e-3


def test_image_block_layout(tmp_path, vlm_tokenizer):
    folder = write_tiny_vlm(tmp_path / "v", "2.6", vlm_tokenizer, use_image_id=True)
    state = ModelState.open(resolve_model(str(folder)))
    prompts = image_prompts(state.tokenizer, state.vision.settings, _images()[1:], torch.zeros(1, 300, dtype=torch.long))
    text = state.tokenizer.decode(prompts.ids[0][~prompts.slots[0]][:40])
    cols, rows = prompts.images[0].grid
    expected = ("<image_id>0</image_id><image></image>" + "\n".join(["<slice></slice>" * cols] * rows) + "\n")
    assert text.startswith(expected)
    first_text = int(prompts.slots[0].nonzero().max()) + 3  # after the last slot: </slice>, the newline
    assert prompts.scored[0].nonzero().min().item() == first_text - 1


def test_vision_tensors_are_checked_by_name(tmp_path, vlm_tokenizer):
    folder = write_tiny_vlm(tmp_path / "v", "4.5", vlm_tokenizer)
    tensors = load_file(str(folder / "model.safetensors"))
    del tensors["resampler.query"]
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(CompressError, match="missing tensor 'resampler.query'"):
        ModelState.open(resolve_model(str(folder)))
    tensors["resampler.query"] = torch.zeros(3, 128)
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(CompressError, match=r"'resampler.query' has shape \(3, 128\), config expects \(16, 128\)"):
        ModelState.open(resolve_model(str(folder)))
    config = json.loads((folder / "config.json").read_text())
    config["version"] = 3.0
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CompressError, match="version 3.0 is not supported"):
        ModelState.open(resolve_model(str(folder)))
