"""AWQ vs RTN on the built-in models: held-out perplexity/KLD/top-1, AWQ wall time and peak memory.

    .venv/bin/python bench/awq.py [--eval-tokens 32768] [--calibration-samples 128] > awq.json

Each AWQ run happens in its own process so its peak RSS can be read (ru_maxrss) and compared with a
process that only loads the model and calibration data. Settings avoid the weights' native grid
(int4 g32 asymmetric is lossless for these models, see README).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import subprocess
import sys
import time

SETTINGS = {
    "w4-g128-asym": {"bits": 4, "group_size": 128, "symmetric": False},
    "w4-g128-sym": {"bits": 4, "group_size": 128, "symmetric": True},
    "w4-perchannel-sym": {"bits": 4, "group_size": None, "symmetric": True},
}
MODELS = ("smollm2-135m", "minicpm-smollm2")


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def one(model_name: str, setting: str, eval_tokens: int, samples: int, baseline_only: bool) -> dict:
    """Runs in a child process: RTN and AWQ for one (model, setting), or only the loading baseline."""
    import torch

    from minicpm_compress.evaluate.evaluator import Evaluator
    from minicpm_compress.data.textsets import evaluation_windows
    from minicpm_compress.models.builtin import builtin_path
    from minicpm_compress.models.checkpoint import load_checkpoint
    from minicpm_compress.models.source import resolve_model
    from minicpm_compress.quant.awq import AWQConfig, apply_awq
    from minicpm_compress.quant.rtn import RTNConfig, apply_rtn
    from minicpm_compress.recipe import build_recipe
    from minicpm_compress.stages import RunContext
    from minicpm_compress.state import ModelState

    model, tokenizer = load_checkpoint(builtin_path(model_name))
    recipe = build_recipe(model=model_name, data={"calibration_samples": samples}, stages=[{"awq": {}}])
    if baseline_only:
        from minicpm_compress.data.textsets import calibration_samples

        d = recipe.data
        calibration_samples(tokenizer, d.calibration_sources(), d.calibration_samples,
                            d.sequence_length, recipe.seed)
        return {"peak_rss_mib": round(_peak_mib(), 1)}
    source = resolve_model(model_name)
    awq_state = ModelState.of(copy.deepcopy(model), tokenizer, source)
    before = _peak_mib()
    start = time.perf_counter()
    apply_awq(AWQConfig(**SETTINGS[setting]), awq_state, RunContext(recipe))
    awq_s = time.perf_counter() - start
    peak = _peak_mib()
    rtn_state = ModelState.of(model, tokenizer, source)
    apply_rtn(RTNConfig(**SETTINGS[setting]), rtn_state, None)
    windows = evaluation_windows(tokenizer, ["austen-heldout"], eval_tokens, 512)
    evaluator = Evaluator.against(model, windows)
    rtn = evaluator.measure(rtn_state.evaluated_model()).as_dict()
    awq = evaluator.measure(awq_state.evaluated_model()).as_dict()
    gap_removed = 1 - awq["ppl_increase"] / rtn["ppl_increase"] if rtn["ppl_increase"] > 0 else None
    return {"fp_ppl": rtn["ref_ppl"], "rtn": rtn, "awq": awq, "awq_removes_of_rtn_increase": gap_removed,
            "awq_wall_s": round(awq_s, 1), "peak_rss_mib": round(peak, 1), "rss_before_awq_mib": round(before, 1),
            "torch_threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--eval-tokens", type=int, default=32768)
    parser.add_argument("--calibration-samples", type=int, default=128)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "SETTING"), help=argparse.SUPPRESS)
    parser.add_argument("--baseline", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(*args.one, args.eval_tokens, args.calibration_samples, args.baseline)))
        return

    def child(*extra) -> dict:
        cmd = [sys.executable, __file__, "--eval-tokens", str(args.eval_tokens),
               "--calibration-samples", str(args.calibration_samples), *extra]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, env={**os.environ,
                             "MINICPM_COMPRESS_PROGRESS": "0"}).stdout
        return json.loads(out.strip().splitlines()[-1])

    results = {"machine": f"{os.cpu_count()} CPUs", "eval_tokens": args.eval_tokens,
               "calibration": f"{args.calibration_samples} x 512 tokens", "models": {},
               "llm_compressor": "not run: see the closing note of issue 3 (needs transformers 5.15-5.17 in a "
                                 "separate environment and a pin_memory patch on CPU)"}
    for model in args.models.split(","):
        entry = {"baseline_peak_rss_mib": child("--one", model, "w4-g128-asym", "--baseline")["peak_rss_mib"]}
        for setting in args.settings.split(","):
            entry[setting] = child("--one", model, setting)
            print(f"{model} {setting}: {json.dumps(entry[setting])}", file=sys.stderr)
        results["models"][model] = entry
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
