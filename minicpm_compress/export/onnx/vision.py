"""MiniCPM-V in ONNX: three graphs in the layout of onnxruntime-genai's vision models, run in onnxruntime.

  vision.onnx     pixel_values [1, 3, h·14, w·14], patch_positions [h·w] (int64), key_positions [h·w, D]
                  → image_features [64, D]: one image piece (overview or slice) through SigLIP + resampler
  embedding.onnx  input_ids [B, S], image_features [N, D] → inputs_embeds [B, S, D]: token embeddings (times
                  MiniCPM's embedding scale) with the image rows put, in order, where input_ids holds the
                  image placeholder id
  model.onnx      the decoder of export/onnx.py taking inputs_embeds (same MatMulNBits weights, KV cache)

The two position inputs of the vision graph are what `models.minicpmv` computes for an h × w patch grid
(navit's bucketed patch positions and the resampler's 2-D sin-cos key embedding): apps compute them with
the image preprocessing, as llama.cpp's mtmd does. onnxruntime-genai has no MiniCPM-V model type, so
genai_config.json describes the three graphs for app code rather than for genai's own processor.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ...devices import cpu_threads
from ...errors import CompressError
from ...models.minicpm import input_scale
from ...models.minicpmv import patch_positions, sincos_2d

VISION_NAME = "vision.onnx"
EMBEDDING_NAME = "embedding.onnx"


class _VisionGraph(torch.nn.Module):
    def __init__(self, vision):
        super().__init__()
        self.vision = vision

    def forward(self, pixel_values, patch_positions, key_positions):
        x = self.vision.vpm(pixel_values[0], patch_positions)
        return self.vision.resampler(x, 0, 0, key_positions)


class _EmbeddingGraph(torch.nn.Module):
    def __init__(self, weight: torch.Tensor, scale: float, placeholder: int):
        super().__init__()
        self.weight = torch.nn.Parameter(weight, requires_grad=False)
        self.scale = scale
        self.placeholder = placeholder

    def forward(self, input_ids, image_features):
        embeds = torch.nn.functional.embedding(input_ids, self.weight) * self.scale
        mask = input_ids == self.placeholder
        index = (torch.cumsum(mask.reshape(-1).to(torch.int64), 0) - 1).clamp(min=0)
        picked = image_features.index_select(0, index.clamp(max=image_features.shape[0] - 1)).reshape(embeds.shape)
        return torch.where(mask.unsqueeze(-1), picked, embeds)


def placeholder_id(tokenizer) -> int:
    return tokenizer.unk_token_id if tokenizer.unk_token_id is not None else 0


def _export(module, args, path: Path, inputs: list[str], outputs: list[str], shapes) -> None:
    try:
        program = torch.onnx.export(module, args, dynamo=True, dynamic_shapes=shapes, input_names=inputs,
                                    output_names=outputs, optimize=True, verbose=False)
    except Exception as e:  # the exporter's errors are pages long; the first line names the op
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CompressError(f"onnx: torch.onnx.export failed for {path.name}: {first}") from None
    for node in program.model.graph:  # stack traces: kilobytes per node, and paths of this machine
        node.metadata_props.clear()
        node.doc_string = None
    program.save(str(path), external_data=True)


def write_vision_graphs(state, folder: Path, int8: bool = False) -> None:
    """vision.onnx and embedding.onnx (+ their .data files) for a MiniCPM-V state; `int8`: the vision
    graph's MatMuls quantized by onnxruntime (dynamic int8)."""
    vision = state.vision.model()
    s = state.vision.settings
    dyn = torch.export.Dim.DYNAMIC
    p = s.patch_size
    h, w = 3, 4
    target = folder / (f".{VISION_NAME}" if int8 else VISION_NAME)
    _export(_VisionGraph(vision), (torch.zeros(1, 3, h * p, w * p), patch_positions(h, w, s.vision.buckets),
                                   sincos_2d(s.llm_width, h, w)),
            target, ["pixel_values", "patch_positions", "key_positions"], ["image_features"],
            ({2: dyn, 3: dyn}, {0: dyn}, {0: dyn}))
    if int8:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(str(target), str(folder / VISION_NAME), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"],
                         extra_options={"MatMulConstBOnly": True}, use_external_data_format=True)
        for leftover in folder.glob(f".{VISION_NAME}*"):
            leftover.unlink()
    embed = state.tensor("model.embed_tokens.weight")
    module = _EmbeddingGraph(embed, input_scale(state.config), placeholder_id(state.tokenizer))
    _export(module, (torch.zeros(2, 5, dtype=torch.long), torch.zeros(3, embed.shape[1])), folder / EMBEDDING_NAME,
            ["input_ids", "image_features"], ["inputs_embeds"], ({0: dyn, 1: dyn}, {0: dyn}))


def genai_vision_sections(state) -> dict:
    """The vision and embedding sections of genai_config.json (the decoder section takes inputs_embeds)."""
    s = state.vision.settings
    return {
        "vision": {"filename": VISION_NAME, "inputs": {"pixel_values": "pixel_values", "patch_positions":
                   "patch_positions", "key_positions": "key_positions"}, "outputs": {"image_features": "image_features"},
                   "minicpmv": {"version": s.version, "query_num": s.query_num, "scale_resolution": s.scale_resolution,
                                "patch_size": s.patch_size, "max_slice_nums": s.max_slice_nums,
                                "image_mean": [0.5] * 3, "image_std": [0.5] * 3}},
        "embedding": {"filename": EMBEDDING_NAME, "inputs": {"input_ids": "input_ids", "image_features": "image_features"},
                      "outputs": {"inputs_embeds": "inputs_embeds"}, "image_token_id": placeholder_id(state.tokenizer)},
    }


class OnnxVisionRunner:
    """Next-token logits of image prompts from the three graphs in onnxruntime (each window one prefill);
    the image rows the vision graph makes are compared (cosine) with the reference's."""

    name = "onnxruntime"

    def __init__(self, folder: Path, state):
        import onnxruntime as ort

        from .runner import OnnxRunner

        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads = cpu_threads()
        self.vision = ort.InferenceSession(str(folder / VISION_NAME), options, providers=["CPUExecutionProvider"])
        self.embedding = ort.InferenceSession(str(folder / EMBEDDING_NAME), options, providers=["CPUExecutionProvider"])
        self.decoder = OnnxRunner(folder / "model.onnx", state.config)
        self.settings = state.vision.settings
        self._cosines: list[float] = []
        self._cache: dict[int, np.ndarray] = {}

    @property
    def image_cosine(self) -> float | None:
        return float(np.mean(self._cosines)) if self._cosines else None

    def image_features(self, image) -> np.ndarray:
        """[pieces · query_num, D] for one preprocessed image."""
        if id(image) not in self._cache:
            rows = []
            p, buckets = self.settings.patch_size, self.settings.vision.buckets
            for piece in image.pieces:
                h, w = piece.shape[1] // p, piece.shape[2] // p
                rows.append(self.vision.run(None, {
                    "pixel_values": piece.unsqueeze(0).numpy(),
                    "patch_positions": patch_positions(h, w, buckets).numpy(),
                    "key_positions": sincos_2d(self.settings.llm_width, h, w).numpy()})[0])
            self._cache[id(image)] = np.concatenate(rows)
        return self._cache[id(image)]

    def embeds(self, prompts, row: int) -> np.ndarray:
        features = self.image_features(prompts.images[row])
        if prompts.features is not None:
            ref = prompts.features[row].double()
            self._cosines.append(torch.nn.functional.cosine_similarity(
                torch.from_numpy(features).double(), ref, dim=-1).mean().item())
        return self.embedding.run(None, {"input_ids": prompts.ids[row : row + 1].numpy(),
                                         "image_features": features})[0]

    def logits(self, prompts) -> torch.Tensor:
        rows = []
        for r in range(len(prompts)):
            rows.append(self.decoder.session.run(None, self.decoder.feeds(self.embeds(prompts, r), None, 0,
                                                                          first="inputs_embeds"))[0][0])
        return torch.from_numpy(np.stack(rows)).float()

    def generate(self, prompts, row: int, tokens: int) -> list[int]:
        """Greedy continuation of one image prompt, as an app runs it: the prompt prefilled with its image rows,
        then one token at a time through embedding.onnx and the decoder's KV cache."""
        run, feeds = self.decoder.session.run, self.decoder.feeds
        length = prompts.ids.shape[1]
        logits, past = (lambda out: (out[0], out[1:]))(run(None, feeds(self.embeds(prompts, row), None, 0, first="inputs_embeds")))
        out = []
        no_image = np.zeros((1, self.settings.llm_width), np.float32)  # never picked: no placeholder in a sampled token
        for step in range(tokens):
            out.append(int(logits[0, -1].argmax()))
            embeds = self.embedding.run(None, {"input_ids": np.array([[out[-1]]], np.int64), "image_features": no_image})[0]
            result = run(None, feeds(embeds, past, length + step, first="inputs_embeds"))
            logits, past = result[0], result[1:]
        return out
