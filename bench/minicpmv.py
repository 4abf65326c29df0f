"""MiniCPM-V: LLM and vision compression, measured in torch, llama.cpp, onnxruntime and (read back in torch)
Core ML on text that follows held-out images; time to first token for one image. Prints JSON.

    .venv/bin/python bench/minicpmv.py [--model minicpmv-qwen2.5] [--eval-tokens 16384] \
        [--calibration-samples 128] [--out out/bench-minicpmv]

minicpmv-smollm2 (the default, fast) has a seeded vision tower; minicpmv-qwen2.5 (the benchmark VLM) has a
pretrained LLM and the trained DINOv2 tower mapped onto MiniCPM-V's, but a seeded resampler the LLM has never
seen. On either, image-feature cosines and the LLM's response to image rows are real measurements; visual
understanding is not measured.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from types import SimpleNamespace


def ttft(run, repeats: int = 3) -> float:
    """Median seconds of `run()` (one image prompt to its first token) after one warm-up."""
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return round(statistics.median(times), 3)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="minicpmv-smollm2")
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--calibration-samples", type=int, default=128)
    parser.add_argument("--out", default="out/bench-minicpmv")
    parser.add_argument("--reuse-output", action="store_true",
                        help="take the stage rows from an earlier run's manifest in --out instead of running the recipe")
    args = parser.parse_args()
    os.environ.setdefault("MINICPM_COMPRESS_PROGRESS", "0")

    import torch

    from minicpm_compress.data.images import read_images
    from minicpm_compress.data.prompts import image_prompts
    from minicpm_compress.data.textsets import evaluation_windows
    from minicpm_compress.data.prompts import image_id_text
    from minicpm_compress.evaluate.evaluator import Evaluator
    from minicpm_compress.evaluate.metrics import Metrics
    from minicpm_compress.export.gguf.mmproj import MtmdRunner
    from minicpm_compress.export.onnx.vision import OnnxVisionRunner
    from minicpm_compress.models.minicpm import input_scale
    from minicpm_compress.resolve import resolve_model
    from minicpm_compress.pipeline import run_recipe
    from minicpm_compress.recipe import build_recipe
    from minicpm_compress.state import ModelState

    out = Path(args.out)
    stages = [
        {"rtn": {"bits": 4, "group_size": 32, "symmetric": True}},
        {"awq": {"bits": 4, "group_size": 32, "symmetric": True}},
        {"gguf": {"type": "Q4_0", "mmproj_type": "F16"}},
        {"gguf": {"type": "Q4_0", "mmproj_type": "Q8_0", "file": "model-Q4_0-b.gguf"}},
        {"gguf": {"type": "Q4_0", "mmproj_type": "Q4_0", "file": "model-Q4_0-c.gguf"}},
        {"onnx": {"bits": 4}},
        {"onnx": {"bits": 4, "vision": "int8", "folder": "onnx-int4-vision-int8"}},
        {"coreml": {}},
    ]
    recipe = build_recipe(name="bench-minicpmv", model=args.model, stages=stages,
                          data={"eval_tokens": args.eval_tokens, "calibration_samples": args.calibration_samples})
    start = time.perf_counter()
    if args.reuse_output and (out / "manifest.json").is_file():
        stages = json.loads((out / "manifest.json").read_text())["stages"]
        record = SimpleNamespace(stages=[SimpleNamespace(metrics=Metrics(**{k: s["metrics"][k] for k in (
            "ppl", "kld", "top1", "ref_ppl", "tokens", "image_cosine")}), details=s.get("details", {}),
            wall_s=s.get("wall_s") or 0.0) for s in stages])
    else:
        record = run_recipe(recipe, out, overwrite=True)
    rows = {}
    labels = ["float", "RTN int4 g32 sym", "AWQ int4 g32 sym (image+text calibration)",
              "GGUF Q4_0 + mmproj F16 (llama.cpp)", "GGUF Q4_0 + mmproj Q8_0 (llama.cpp)",
              "GGUF Q4_0 + mmproj Q4_0 (llama.cpp)", "ONNX int4 + vision float32 (onnxruntime)",
              "ONNX int4 + vision int8 (onnxruntime)", "Core ML int4 + vision.mlpackage (read back, torch)"]
    for label, s in zip(labels, record.stages):
        row = {**s.metrics.as_dict(), "wall_s": round(s.wall_s, 1)}
        if "mmproj" in s.details:
            row["llm_file_bytes"] = (out / s.details["file"]).stat().st_size
            row["mmproj_bytes"] = s.details["mmproj"]["bytes"]
        if "vision" in s.details and "bytes" in s.details["vision"]:
            row["vision_bytes"] = s.details["vision"]["bytes"]
            if "precision" in s.details["vision"]:
                row["vision_precision"] = s.details["vision"]["precision"]
        rows[label] = row

    # the runtimes against the gated torch model (AWQ int4), as the text-only paths are measured
    state = ModelState.open(resolve_model(str(out)))
    data = recipe.data
    windows = evaluation_windows(state.tokenizer, data.evaluation, data.eval_tokens, data.eval_window)
    prompts = state.vision.features(image_prompts(state.tokenizer, state.vision.settings,
                                                  read_images(data.evaluation_images), windows))
    gated = Evaluator.against(state.evaluated_model(), prompts)
    agreement = {}
    llama = MtmdRunner(out / "model-Q4_0.gguf", out / "mmproj-F16.gguf", data.eval_window, input_scale(state.config),
                       image_id_text(state.vision.settings))  # `<image_id>i</image_id>` as text, as an app sends it
    try:
        m = gated.measure(llama)
        agreement["llama.cpp GGUF Q4_0 (AWQ codes copied) + mmproj F16"] = {"kld": m.kld, "top1": m.top1,
                                                                            "image_cosine": m.image_cosine}
        one = prompts[:1]
        short = one.__class__(one.ids[:, :80], one.slots[:, :80], one.scored[:, :79], one.images, one.names, one.rgb,
                              one.features)
        llama_ttft = ttft(lambda: (llama._cache.clear(), llama.generate(short, 0, 1)))
    finally:
        llama.close()
    onnx = OnnxVisionRunner(out / "onnx-int4", state)
    m = gated.measure(onnx)
    agreement["onnxruntime int4 (MatMulNBits, our codes) + vision float32"] = {"kld": m.kld, "top1": m.top1,
                                                                               "image_cosine": m.image_cosine}
    onnx_ttft = ttft(lambda: (onnx._cache.clear(), onnx.generate(short, 0, 1)))
    results = {
        "model": args.model, "eval_tokens": args.eval_tokens, "scored_tokens": rows["float"]["tokens"],
        "calibration_samples": args.calibration_samples, "wall_s": round(time.perf_counter() - start, 1),
        "against_float": rows,
        "runtimes_against_gated_torch": agreement,
        "time_to_first_token_s": {
            "prompt": "one 448 x 448 held-out image (64 image rows) + text, 80 tokens; CPU, this machine",
            "llama.cpp (mtmd encode + prefill + 1 token)": llama_ttft,
            "onnxruntime (vision + embedding + prefill)": onnx_ttft,
            "threads": torch.get_num_threads(),
        },
        "note": "cosines and text-after-image metrics are real; visual understanding is not measured (seeded "
                "resampler, and on minicpmv-smollm2 a seeded tower)",
    }
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
