"""QAT vs FP, RTN and AWQ on the default model: held-out perplexity/KLD/top-1, steps and wall time.

    .venv/bin/python bench/qat.py [--steps 150] [--eval-tokens 16384] > qat.json

Two recipes run through the real pipeline: int4 g128 symmetric (rtn → awq → qat, QAT starting from
AWQ's scales and folded weights) and int8 per-channel symmetric (rtn → qat). Every stage is measured
by the pipeline's one evaluator against the full-precision model.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

SCHEMES = {
    "w4-g128-sym": ({"bits": 4, "group_size": 128, "symmetric": True}, ["rtn", "awq", "qat"]),
    "w8-perchannel-sym": ({"bits": 8, "group_size": None, "symmetric": True}, ["rtn", "qat"]),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="minicpm-smollm2")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--sequence-length", type=int, default=256)
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--schemes", default=",".join(SCHEMES))
    args = parser.parse_args()

    import torch

    from minicpm_compress.pipeline import run_recipe
    from minicpm_compress.recipe import build_recipe

    training = {"steps": args.steps, "batch_size": args.batch_size, "sequence_length": args.sequence_length,
                "samples": 128}
    results = {"model": args.model, "eval_tokens": args.eval_tokens, "training": training,
               "torch_threads": torch.get_num_threads(), "schemes": {}}
    for name in args.schemes.split(","):
        scheme, stages = SCHEMES[name]
        recipe = build_recipe(
            name=f"bench-qat-{name}", model=args.model, data={"eval_tokens": args.eval_tokens},
            stages=[{s: {**scheme, **(training if s == "qat" else {})}} for s in stages],
        )
        rows = {}

        def record(r):
            rows[r.name] = {**r.metrics.as_dict(), "wall_s": round(r.wall_s, 1),
                            **({"training": r.details} if r.name == "qat" else {})}
            print(f"{name} {r.name}: ppl {r.metrics.ppl:.3f} ({r.metrics.ppl_increase:+.2%})", file=sys.stderr)

        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            run_recipe(recipe, Path(tmp) / "out", on_stage=record)
        rtn_gap = rows["rtn"]["ppl_increase"]
        rows["fp_ppl"] = rows["load"]["ppl"]
        rows["qat_closes_of_rtn_gap"] = round(1 - rows["qat"]["ppl_increase"] / rtn_gap, 4) if rtn_gap > 0 else None
        rows["total_wall_s"] = round(time.perf_counter() - start, 1)
        results["schemes"][name] = rows
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
