"""Core ML on the default model: package sizes, conversion time, and held-out accuracy of the weights read back.

    .venv/bin/python bench/coreml_export.py [--eval-tokens 4096] > coreml.json

Variants (RTN codes from the project's quantizer, as a recipe would hand them over): int4 g32 sym; int4
g128 asym (576-wide rows: blocks of 64 with repeated scales); int8 per-channel sym; and int4 g32 sym with an
unquantized embedding instead of int8. Each package is read back (spec + weight blob), its weights checked
against the codes written and measured in torch against the float model and against the gated torch
model the codes came from. The compute precision is chosen as the stage does: the float16 range check on
calibration text, and where it fails the power-of-two float16 rewrite (export/coreml/float16_fit.py); a float16
package's read-back model is also run in float16 (torch) on 8 held-out windows (`float16_simulation`).
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
    from minicpm_compress.export.coreml.program import PACKAGE_NAME, read_back_model, read_back_weights
    from minicpm_compress.export.coreml.stage import CoreMLConfig, write_coreml
    from minicpm_compress.export.coreml.float16_fit import activation_maxima, fit_float16, float16_overflow, peaks_of
    from minicpm_compress.export.coreml.float16_fit import simulate_float16
    from minicpm_compress.models.architectures import quantizable_linears
    from minicpm_compress.models.checkpoint import untied_state_dict
    from minicpm_compress.state import load_checkpoint
    from minicpm_compress.resolve import resolve_model
    from minicpm_compress.quant.qweight import QuantScheme, quantize
    from minicpm_compress.state import ModelState

    source = resolve_model(args.model)
    model, tokenizer = load_checkpoint(source.checkpoint)
    windows = evaluation_windows(tokenizer, ["austen-heldout"], args.eval_tokens, 512)
    against_float = Evaluator.against(model, windows)
    samples = calibration_samples(tokenizer, [("austen-calib", 1.0)], 8, 512, 0)
    params = sum(p.numel() for p in untied_state_dict(model).values())
    results = {"model": args.model, "eval_tokens": args.eval_tokens, "coremltools": coremltools.__version__,
               "variants": {}}
    for name in args.variants.split(","):
        settings, scheme = VARIANTS[name]
        state = ModelState.of(copy.deepcopy(model), tokenizer, source)
        s = QuantScheme(**scheme)
        state.qweights = {n: quantize(lin.weight, s) for n, lin in quantizable_linears(state.model).items()}
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            # the stage's precision choice: the range check, then the float16 rewrite where it fails
            maxima = activation_maxima(state.evaluated_model(), samples)
            peaks = peaks_of(maxima)
            problem = original = float16_overflow(peaks)
            fit = fitted = None
            if problem:
                fit, fitted, problem = fit_float16(state, samples, problem, maxima)
            precision = "float32" if problem else "float16"
            factors = fit.weight_factors(model.config.num_hidden_layers) if fitted is not None else None
            weights, paths = write_coreml(state, Path(tmp) / name, CoreMLConfig(**settings), precision, None,
                                          fitted, factors)
            export_s = time.perf_counter() - start
            package = Path(tmp) / name / PACKAGE_NAME
            stored, ops = read_back_weights(package)
            read_back = read_back_model(fitted if fitted is not None else state.model, stored, weights, package)
            size = sum(p.stat().st_size for p in package.rglob("*") if p.is_file())
            row = {"linears": paths, "precision": precision, "float16_check": {**peaks, "overflow": original},
                   **({"float16_fit": fit.describe()} if fit is not None else {}),
                   "export_s": round(export_s, 1), "bytes": size,
                   "bits_per_weight": round(size * 8 / params, 3), "quantized_constants": ops["constexpr_blockwise_shift_scale"],
                   "vs_float": against_float.measure(read_back).as_dict(),
                   "vs_gated_torch": Evaluator.against(state.evaluated_model(), windows).measure(read_back).as_dict()}
            if precision == "float16":
                row["float16_simulation"] = simulate_float16(read_back, windows[:8])
        results["variants"][name] = row
        print(f"{name}: {size / 1e6:.1f} MB, {precision}, {row['bits_per_weight']} bits/weight, {row['export_s']} s",
              file=sys.stderr)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
