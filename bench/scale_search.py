"""Scale searches on fixed real layers: the output error each choice of scales leaves, against min–max.

    .venv/bin/python bench/scale_search.py [--model qwen2.5-0.5b] [--layers 4,8,16] [--samples 16] > out.json

For every linear of the chosen decoder layers (fed the float model's own hidden states on the calibration
text) and every grid, the relative output error tr(ΔGΔᵀ)/tr(WGWᵀ) over the calibration tokens (G: the
Gram matrix of the linear's inputs) of:
  * min–max: the group's range on the codes (`quantize`);
  * clip: AWQ's clip search, a shrink ratio per (row, group) minimising the error through G's diagonal
    blocks (what the awq and gptq stages use);
  * weighted: the importance-weighted search (`quant/scale_search.py`), diag(G) as the importance;
  * both: per group (per super-block on a K grid) the better of the two through G's diagonal block.
Rows print to stderr as they complete; the JSON goes to stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

GRIDS = ["Q4_0", "IQ4_NL", "Q4_1", "Q5_0", "Q5_1", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "w4-g128-asym", "w4-g128-sym"]


def scheme_of(name: str):
    from minicpm_compress.quant.qweight import QuantScheme

    if name.startswith("w4-g128"):
        return QuantScheme(bits=4, group_size=128, symmetric=name.endswith("-sym"))
    return QuantScheme(layout=name)


def main() -> None:
    from minicpm_compress.data.textsets import calibration_samples
    from minicpm_compress.layerwise import layer_grams, run_layer, state_layer_inputs
    from minicpm_compress.quant.scale_search import SEARCHES, search_params
    from minicpm_compress.quant.output_error import relative_error
    from minicpm_compress.quant.qweight import encode, quantize
    from minicpm_compress.recipe import DataConfig
    from minicpm_compress.resolve import resolve_model
    from minicpm_compress.state import ModelState

    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="qwen2.5-0.5b")
    parser.add_argument("--layers", default="4,8,16")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--grids", default=",".join(GRIDS))
    args = parser.parse_args()
    layers = sorted(int(i) for i in args.layers.split(","))
    state = ModelState.open(resolve_model(args.model))
    data = DataConfig()
    samples = calibration_samples(state.tokenizer, data.calibration_sources(), args.samples, data.sequence_length, 0)
    rows = []
    began = time.perf_counter()
    with torch.inference_mode(), state.computing_in(torch.float32):
        inputs = state_layer_inputs(state, samples, 8)
        for index in range(layers[-1] + 1):
            with state.layer(index) as layer:
                if index in layers:
                    grams, outputs = layer_grams(layer, state.arch, inputs)
                    for name in state.arch.linears:
                        weight = layer.get_submodule(name).weight.detach().float()
                        gram = grams[name].float()
                        for grid in args.grids.split(","):
                            scheme = scheme_of(grid).fitting(weight.shape[1])
                            errors = {"min_max": relative_error(weight, quantize(weight, scheme).dequantize(), gram)}
                            for how in SEARCHES:
                                params = search_params(weight, scheme, gram, how)
                                errors[how] = relative_error(weight, encode(weight, *params, scheme).dequantize(), gram)
                            row = {"layer": index, "linear": name, "grid": grid, "held_as": scheme.describe(),
                                   **{k: round(v, 7) for k, v in errors.items()}}
                            rows.append(row)
                            print(json.dumps(row), file=sys.stderr, flush=True)
                else:
                    outputs = run_layer(layer, inputs)
            inputs = outputs
    summary = {}
    for grid in args.grids.split(","):
        mine = [r for r in rows if r["grid"] == grid]
        base = sum(r["min_max"] for r in mine)  # 0 where the weights are already on the grid (SmolLM2 and Q4_1)
        summary[grid] = {k: round(sum(r[k] for r in mine) / base, 4) if base > 0 else None
                         for k in SEARCHES}
    print(json.dumps({"model": args.model, "layers": layers, "calibration_samples": args.samples,
                      "tokens": args.samples * data.sequence_length, "wall_s": round(time.perf_counter() - began, 1),
                      "summary_error_vs_min_max": summary, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
