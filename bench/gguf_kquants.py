"""GGUF K-quants: llama.cpp's own Q3_K_M / Q4_K_M / Q5_K_M (from the float model, without and with an
importance matrix computed on our calibration text) against our calibrated codes on the K-quant grids,
copied into the file. Everything is measured in llama.cpp itself, on the same held-out windows.

    .venv/bin/python bench/gguf_kquants.py [--models minicpm-smollm2,smollm2-135m] [--eval-tokens 32768] \
        [--calibration-samples 128] [--rows ...] [--sizes-from earlier.json] > gguf-kquants.json

Each row prints to stderr as it completes; the JSON (one object per row: file size, bits per weight,
Δppl, KLD and top-1 against the float model, wall time) goes to stdout at the end.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROWS = {
    # name: stages (the last one is the gguf export measured in llama.cpp)
    "llama.cpp Q3_K_M": [{"gguf": {"type": "Q3_K_M", "imatrix": False}}],
    "llama.cpp Q3_K_M + imatrix": [{"gguf": {"type": "Q3_K_M"}}],
    "llama.cpp Q4_K_M": [{"gguf": {"type": "Q4_K_M", "imatrix": False}}],
    "llama.cpp Q4_K_M + imatrix": [{"gguf": {"type": "Q4_K_M"}}],
    "llama.cpp Q5_K_M": [{"gguf": {"type": "Q5_K_M", "imatrix": False}}],
    "llama.cpp Q5_K_M + imatrix": [{"gguf": {"type": "Q5_K_M"}}],
    "ours RTN Q4_K": [{"rtn": {"layout": "Q4_K"}}, {"gguf": {"type": "Q4_K"}}],
    "ours GPTQ act-order Q4_K": [{"gptq": {"layout": "Q4_K", "act_order": True}}, {"gguf": {"type": "Q4_K"}}],
    "ours AWQ→GPTQ Q4_K": [{"awq": {"layout": "Q4_K"}}, {"gptq": {"layout": "Q4_K", "act_order": True}},
                           {"gguf": {"type": "Q4_K"}}],
    "ours GPTQ act-order Q5_K": [{"gptq": {"layout": "Q5_K", "act_order": True}}, {"gguf": {"type": "Q5_K"}}],
    # 4.5 bits on two grids: Q4_0's evenly spaced levels and IQ4_NL's non-linear ones (the type llama.cpp's
    # Q3_K mixtures take for rows that do not split into 256-wide super-blocks)
    "ours RTN Q4_0": [{"rtn": {"layout": "Q4_0"}}, {"gguf": {"type": "Q4_0"}}],
    "ours RTN IQ4_NL": [{"rtn": {"layout": "IQ4_NL"}}, {"gguf": {"type": "IQ4_NL"}}],
    "ours GPTQ IQ4_NL": [{"gptq": {"layout": "IQ4_NL"}}, {"gguf": {"type": "IQ4_NL"}}],
    # type auto at 0.9x the size of llama.cpp's file (measured in this run, or read from --sizes-from)
    "ours auto at 0.9× Q3_K_M": [{"gguf": {"type": "auto", "target_size": "0.9 Q3_K_M"}}],
    "ours auto at 0.9× Q4_K_M": [{"gguf": {"type": "auto", "target_size": "0.9 Q4_K_M"}}],
    "ours auto at 0.9× Q5_K_M": [{"gguf": {"type": "auto", "target_size": "0.9 Q5_K_M"}}],
}


def resolve_targets(stages: list[dict], model: str, sizes: dict) -> list[dict]:
    """'0.9 Q4_K_M' as a target size: 0.9 × the bytes of llama.cpp's Q4_K_M file of `model`."""
    out = []
    for stage in stages:
        (name, settings), = stage.items()
        target = settings.get("target_size")
        if isinstance(target, str) and " " in target:
            ratio, type_name = target.split()
            key = (model, f"llama.cpp {type_name}")
            if key not in sizes:
                raise SystemExit(f"no size for {key}: run that row first or pass --sizes-from")
            settings = {**settings, "target_size": int(float(ratio) * sizes[key])}
        out.append({name: settings})
    return out


def run_row(model: str, name: str, args, sizes: dict) -> dict:
    from minicpm_compress.pipeline import run_recipe
    from minicpm_compress.recipe import build_recipe

    data = {"calibration_samples": args.calibration_samples, "eval_tokens": args.eval_tokens}
    recipe = build_recipe(model=model, data=data, seed=0, stages=resolve_targets(ROWS[name], model, sizes))
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        record = run_recipe(recipe, Path(tmp) / "out")
        wall = time.perf_counter() - start
    gguf = record.stages[-1]
    m = gguf.metrics
    file = next(a for a in gguf.artifacts if a["path"].endswith(".gguf") and a["path"] != "imatrix.gguf")
    return {
        "model": model, "row": name, "file_bytes": file["bytes"], "file_mib": round(file["bytes"] / 2**20, 2),
        "bits_per_weight": gguf.details["bits_per_weight"], "ppl": round(m.ppl, 4), "ppl_increase": round(m.ppl_increase, 5),
        "kld": round(m.kld, 5), "top1": round(m.top1, 5), "tokens": m.tokens, "tensors": gguf.details["tensors"],
        "wall_s": round(wall, 1),
        **({"types": gguf.details["mixture"]["types"], "target_bytes": gguf.details["mixture"]["target_bytes"]}
           if "mixture" in gguf.details else {}),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="minicpm-smollm2,smollm2-135m")
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--eval-tokens", type=int, default=32768)
    parser.add_argument("--calibration-samples", type=int, default=128)
    parser.add_argument("--sizes-from", type=Path, help="an earlier results JSON: llama.cpp file sizes for the auto rows")
    args = parser.parse_args()
    sizes = {}
    if args.sizes_from:
        sizes = {(r["model"], r["row"]): r["file_bytes"] for r in json.loads(args.sizes_from.read_text())["rows"]}
    rows = []
    for model in args.models.split(","):
        for name in args.rows.split(","):
            row = run_row(model, name, args, sizes)
            print(json.dumps(row), file=sys.stderr, flush=True)
            sizes[(model, name)] = row["file_bytes"]
            rows.append(row)
    json.dump({"benchmark": "gguf_kquants", "eval_tokens": args.eval_tokens,
               "calibration_samples": args.calibration_samples, "rows": rows}, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
