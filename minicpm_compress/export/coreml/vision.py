"""MiniCPM-V's vision half as a Core ML mlpackage: one image piece → `query_num` LLM-width rows.

  inputs   pixel_values [1, 3, h·14, w·14] float16 (normalised), patch_positions [h·w] int32,
           key_positions [h·w, D] float16 (both from the shared preprocessing, as in the ONNX graph)
  output   image_features [query_num, D]

The resampler's queries do not depend on the image, so they enter the package already through ln_q and
the attention's query projection (one constant); everything else keeps its own weights. Compute is
float16 when a range check on the calibration images passes (no linear output at or above float16's
maximum, no LayerNorm input deviating from its mean by 256 or more), float32 otherwise.

Checked on Linux without a Mac: every weight of the exported module is found in the saved package (by
value, float16), loaded back into the module and run in torch; the image rows it makes are compared
(cosine) with the reference's, and the LLM is measured on them.
"""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path

import numpy as np
import torch

from ...errors import CompressError
from .float16_fit import float16_overflow, module_peaks
from .program import convert_program, import_coremltools, read_program, save_package

VISION_PACKAGE = "vision.mlpackage"


class VisionEncoder(torch.nn.Module):
    """The vision half with the resampler's attention written out (and its image-independent query side
    precomputed), as converted to Core ML."""

    def __init__(self, vision):
        super().__init__()
        r = vision.resampler
        width = r.width
        self.vpm = copy.deepcopy(vision.vpm)
        self.kv_proj = copy.deepcopy(r.kv_proj)
        self.ln_kv, self.ln_post = copy.deepcopy(r.ln_kv), copy.deepcopy(r.ln_post)
        w, b = r.attn.in_proj_weight.detach(), r.attn.in_proj_bias.detach()
        with torch.no_grad():
            queries = torch.nn.functional.linear(r.ln_q(r.query), w[:width], b[:width])
        heads = r.attn.num_heads  # stored per head, [heads, query_num, head_dim]: the constant the package holds
        self.queries = torch.nn.Parameter(queries.view(-1, heads, width // heads).transpose(0, 1).contiguous(),
                                          requires_grad=False)
        self.k_proj, self.v_proj = torch.nn.Linear(width, width), torch.nn.Linear(width, width)
        self.out_proj = torch.nn.Linear(width, width)
        self.proj = torch.nn.Linear(width, width, bias=False)
        with torch.no_grad():
            self.k_proj.weight.copy_(w[width : 2 * width]), self.k_proj.bias.copy_(b[width : 2 * width])
            self.v_proj.weight.copy_(w[2 * width :]), self.v_proj.bias.copy_(b[2 * width :])
            self.out_proj.weight.copy_(r.attn.out_proj.weight), self.out_proj.bias.copy_(r.attn.out_proj.bias)
            self.proj.weight.copy_(r.proj.T)
        self.heads = r.attn.num_heads

    def forward(self, pixel_values, patch_positions, key_positions):
        x = self.ln_kv(self.kv_proj(self.vpm(pixel_values[0], patch_positions)))[0]  # [n, width]
        n, width = x.shape
        d = width // self.heads
        q = self.queries
        k = self.k_proj(x + key_positions).view(n, self.heads, d).transpose(0, 1)
        v = self.v_proj(x).view(n, self.heads, d).transpose(0, 1)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(0, 1).reshape(-1, width)
        return self.proj(self.ln_post(self.out_proj(out)))


def encoder_inputs(settings, pieces) -> list[tuple]:
    """(pixel_values, patch_positions, key_positions) for each image piece."""
    from ...models.minicpmv import patch_positions, sincos_2d

    out = []
    for piece in pieces:
        h, w = piece.shape[1] // settings.patch_size, piece.shape[2] // settings.patch_size
        out.append((piece.unsqueeze(0), patch_positions(h, w, settings.vision.buckets).to(torch.int32),
                    sincos_2d(settings.llm_width, h, w)))
    return out


def write_vision_package(state, folder: Path, precision: str, calibration_pieces) -> Path:
    ct = import_coremltools()
    settings = state.vision.settings
    encoder = VisionEncoder(state.vision.model()).eval()
    example = encoder_inputs(settings, calibration_pieces[:1])[0]
    side = settings.vision.buckets * settings.patch_size
    h, w = ct.RangeDim(settings.patch_size, side, default=example[0].shape[2]), ct.RangeDim(settings.patch_size, side, default=example[0].shape[3])
    n = ct.RangeDim(1, settings.vision.buckets**2, default=example[1].shape[0])
    inputs = [ct.TensorType(name="pixel_values", shape=(1, 3, h, w), dtype=np.float16),
              ct.TensorType(name="patch_positions", shape=(n,), dtype=np.int32),
              ct.TensorType(name="key_positions", shape=(n, settings.llm_width), dtype=np.float16)]
    prog = convert_program(encoder, example, inputs, [], [ct.TensorType(name="image_features")], precision)
    path = folder / VISION_PACKAGE
    metadata = {"producer": "minicpm-compress", "minicpmv_version": settings.version, "precision": precision,
                "query_num": str(settings.query_num), "patch_size": str(settings.patch_size),
                "scale_resolution": str(settings.scale_resolution), "image_mean": "0.5,0.5,0.5", "image_std": "0.5,0.5,0.5"}
    save_package(prog, path, f"MiniCPM-V {settings.version} vision encoder (SigLIP + resampler), one image piece",
                 metadata, precision)
    return path


def _key(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array, dtype=np.float16).tobytes()).hexdigest()


def read_back_encoder(path: Path, encoder: VisionEncoder) -> VisionEncoder:
    """A copy of `encoder` whose every weight is the package's constant of the same value (float16, possibly
    stored transposed); a weight missing from the package is an error naming it."""
    prog = read_program(path)
    stored = {}
    for op in prog.functions["main"].operations:
        if op.op_type == "const" and getattr(op.outputs[0].val, "ndim", 0) >= 1:
            value = np.asarray(op.outputs[0].val)
            stored.setdefault((value.shape, _key(value)), value)
            if value.ndim == 2:
                stored.setdefault((value.T.shape, _key(value.T)), value.T)
    out = copy.deepcopy(encoder)
    with torch.no_grad():
        for name, p in out.named_parameters():
            array = p.detach().numpy()
            found = stored.get((array.shape, _key(array)))
            if found is None:
                raise CompressError(f"coreml: {path.name} holds no constant equal to '{name}' (float16)")
            p.copy_(torch.from_numpy(np.asarray(found, dtype=np.float32)))
    return out.eval()


def export_vision(state, folder: Path, precision: str, ctx) -> tuple[list[torch.Tensor], dict]:
    """Write vision.mlpackage into `folder` and read it back: (image features of the evaluator's windows
    from the read-back encoder, details for the manifest)."""
    from ...data.images import preprocess, read_images

    settings = state.vision.settings
    pieces = [p for _, a in read_images(ctx.recipe.data.calibration_images)
              for p in preprocess(a, settings.scale_resolution, settings.patch_size, settings.max_slice_nums,
                                  settings.slice_mode).pieces]
    encoder = VisionEncoder(state.vision.model()).eval()
    inputs = encoder_inputs(settings, pieces)
    peaks = module_peaks(encoder, lambda: [encoder(*args) for args in inputs])
    problem = float16_overflow(peaks)
    if precision == "auto":
        precision = "float32" if problem else "float16"
    elif precision == "float16" and problem:
        raise CompressError(f"coreml: float16 vision compute would overflow: {problem}; use precision float32 (or auto)")
    path = write_vision_package(state, folder, precision, pieces)
    read_back = read_back_encoder(path, encoder) if precision == "float16" else encoder
    windows = ctx.evaluator.windows
    done: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        for image in windows.images:
            if id(image) not in done:
                done[id(image)] = torch.cat([read_back(*args) for args in encoder_inputs(settings, image.pieces)])
    features = [done[id(image)] for image in windows.images]
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return features, {"precision": precision, "bytes": size, "float16_check": {**peaks, "overflow": problem},
                      "measured": "weights read back from vision.mlpackage, run in torch (float32)"}
