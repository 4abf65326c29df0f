"""Core ML on the default model: package sizes, conversion time, and held-out accuracy of the weights read back.

    .venv/bin/python bench/coreml_export.py [--eval-tokens 4096] > coreml.json

Variants (RTN codes from the project's quantizer, as a recipe would hand them over): int4 g32 sym; int4
g128 asym (576-wide rows: blocks of 64 with repeated scales); int8 per-channel sym; and int4 g32 sym with an
unquantized embedding instead of int8. Each package is read back (spec + weight blob), its weights checked
against the codes written and measured in torch against the float model and against the gated torch
model the codes came from. Also recorded: the float16 range check the stage uses to choose the compute
precision (the largest activation entering an RMSNorm and leaving a linear, on calibration text).
Predictions on a device need macOS; none are made here.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = {
    "int4-g32-sym": ({"bits": 4}, {"bits": 4, "group_size": 32, "symmetric": True}),
    "int4-g128-asym": ({"bits": 4}, {"bits": 4, "group_size": 128, "symmetric": False}),
    "int8-per-channel": ({"bits": 8}, {"bits": 8, "group_size": None, "symmetric": True}),
    "int4-g32-sym-float-embedding": ({"bits": 4, "embeddings": "float"}, {"bits": 4, "group_size": 32, "symmetric": True}),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="minicpm-smollm2")
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args()

    import coremltools

    from minicpm_compress.data.textsets import calibration_samples, evaluation_windows
    from minicpm_compress.evaluate.evaluator import Evaluator
    from minicpm_compress.export.coreml import (
        PACKAGE_NAME,
        CoreMLConfig,
        activation_peaks,
        float16_overflow,
        read_back_model,
        read_back_weights,
        write_coreml,
    )
    from minicpm_compress.models.architectures import quantizable_linears
    from minicpm_compress.models.checkpoint import load_checkpoint, untied_state_dict
    from minicpm_compress.models.source import resolve_model
    from minicpm_compress.quant.qweight import QuantScheme, quantize
    from minicpm_compress.state import ModelState

    source = resolve_model(args.model)
    model, tokenizer = load_checkpoint(source.checkpoint)
    windows = evaluation_windows(tokenizer, ["austen-heldout"], args.eval_tokens, 512)
    against_float = Evaluator.against(model, windows)
    peaks = activation_peaks(model, calibration_samples(tokenizer, [("austen-calib", 1.0)], 8, 512, 0))
    problem = float16_overflow(peaks)
    precision = "float32" if problem else "float16"
    params = sum(p.numel() for p in untied_state_dict(model).values())
    results = {"model": args.model, "eval_tokens": args.eval_tokens, "coremltools": coremltools.__version__,
               "float16_check": {**peaks, "overflow": problem}, "precision": precision, "variants": {}}
    for name in args.variants.split(","):
        settings, scheme = VARIANTS[name]
        state = ModelState.of(copy.deepcopy(model), tokenizer, source)
        s = QuantScheme(**scheme)
        state.qweights = {n: quantize(l.weight, s) for n, l in quantizable_linears(state.model).items()}
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            weights, paths = write_coreml(state, Path(tmp) / name, CoreMLConfig(**settings), precision)
            export_s = time.perf_counter() - start
            package = Path(tmp) / name / PACKAGE_NAME
            stored, ops = read_back_weights(package)
            read_back = read_back_model(state.model, stored, weights, package)  # raises unless exact
            size = sum(p.stat().st_size for p in package.rglob("*") if p.is_file())
            row = {"linears": paths, "export_s": round(export_s, 1), "bytes": size,
                   "bits_per_weight": round(size * 8 / params, 3), "quantized_constants": ops["constexpr_blockwise_shift_scale"],
                   "vs_float": against_float.measure(read_back).as_dict(),
                   "vs_gated_torch": Evaluator.against(state.evaluated_model(), windows).measure(read_back).as_dict()}
        results["variants"][name] = row
        print(f"{name}: {size / 1e6:.1f} MB, {row['bits_per_weight']} bits/weight, {row['export_s']} s",
              file=sys.stderr)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
