"""MiniCPM-V in llama.cpp: the LLM GGUF plus the mmproj GGUF, images through mtmd, against the gated torch model."""

import numpy as np
import pytest
from PIL import Image

from minicpm_compress.data.images import read_images
from minicpm_compress.pipeline import run_recipe
from minicpm_compress.recipe import build_recipe


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """One held-out square (no resizing anywhere) and one 600 × 400 photo that both sides slice into 2 × 1."""
    folder = tmp_path_factory.mktemp("images")
    held = dict(read_images("skimage-heldout"))
    Image.fromarray(held["camera"]).save(folder / "a-camera.png")
    Image.fromarray(dict(read_images("skimage-calib"))["coffee"]).save(folder / "b-coffee.png")
    return folder


@pytest.mark.slow
def test_llama_cpp_with_mmproj_measures_like_the_gated_model(tmp_path, image_folder):
    recipe = build_recipe(
        name="vlm", model="minicpmv-smollm2",
        data={"eval_tokens": 1024, "eval_window": 512, "evaluation_images": str(image_folder)},
        stages=[{"rtn": {"bits": 8, "group_size": 32, "symmetric": True}},
                {"gguf": {"type": "F32", "mmproj_type": "F32"}},
                {"gguf": {"type": "Q8_0", "mmproj_type": "F16"}},
                {"gguf": {"type": "Q8_0", "mmproj_type": "Q4_0", "file": "q4-vision.gguf"}}],
    )
    record = run_recipe(recipe, tmp_path / "out")
    _load, rtn, f32, q8, q4 = record.stages
    assert rtn.metrics.image_cosine == pytest.approx(1.0)  # LLM-only stage: the vision half is untouched
    # float files: llama.cpp's own slicing, resizing and vision graph give the reference's image rows (the
    # sliced photo is resized by llama.cpp's bicubic, not PIL's), and the text after the images scores alike
    assert f32.metrics.image_cosine > 0.999 and f32.metrics.kld < 1e-3 and f32.metrics.top1 > 0.99
    # Q8_0 holds the int8 group-32 codes exactly; llama.cpp's int8 activations add what they add without
    # images (text-only Q8_0 of the same weights: KLD +0.003 over torch)
    assert q8.details["tensors"] == {"lossless": 210, "requantized": 0, "float": 0}
    assert q8.metrics.image_cosine > 0.999 and q8.metrics.kld < rtn.metrics.kld + 0.006 and q8.metrics.top1 > 0.92
    # int4 vision weights cost image-feature accuracy, visibly
    assert q4.metrics.image_cosine < q8.metrics.image_cosine - 0.005
    assert q4.details["mmproj"]["tensors"]["Q4_0"] == 4 * 6 + 6
    assert q4.details["mmproj"]["bytes"] < 0.7 * q8.details["mmproj"]["bytes"]  # position tables stay F32
    assert (tmp_path / "out" / "mmproj-F16.gguf").is_file() and (tmp_path / "out" / "mmproj-Q4_0.gguf").is_file()


@pytest.mark.parametrize("version, image_id", [("2.6", False), ("2.6", True), ("4.5", False)])
def test_qwen_layouts_in_llama_cpp(version, image_id, tmp_path, vlm_tokenizer):
    """MiniCPM-V 2.6 (Qwen2 LLM, llama.cpp arch qwen2) and 4.5 (Qwen3): LLM GGUF + mmproj on tiny configs,
    448² held-out images sliced 3 × 3 at the tiny 112-pixel slice size (llama.cpp slices up to 9 pieces, as
    the config now says), float files: llama.cpp computes what torch computes. With `use_image_id` (real 2.6
    checkpoints) mtmd leaves `<image_id>0</image_id>` out: it goes in the text before the image marker, as
    an app sends it (it used to stop with 'llama.cpp lays out image … that differ from the prompt's block')."""
    from ...conftest import write_tiny_vlm

    folder = write_tiny_vlm(tmp_path / version, version, vlm_tokenizer, use_image_id=image_id, max_slice_nums=9)
    recipe = build_recipe(name="t", model=str(folder), data={"eval_tokens": 1024, "eval_window": 256},
                          stages=[{"gguf": {"type": "F32", "mmproj_type": "F32"}}])
    _load, gguf = run_recipe(recipe, tmp_path / "out").stages
    assert gguf.metrics.kld < 1e-3 and gguf.metrics.top1 > 0.99 and gguf.metrics.image_cosine > 0.9999
    assert gguf.details["mmproj"]["image_prefix"] == ("<image_id>0</image_id>" if image_id else "")
