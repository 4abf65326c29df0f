"""Structured pruning on the default model: held-out perplexity against parameter reduction.

    .venv/bin/python bench/prune.py [--levels 0.1,0.2,0.3] [--heal-steps 60] [--eval-tokens 8192] > prune.json

For each method (FFN channels, KV-head groups, layers) and each reduction level: prune with
activation-aware scores and with the seeded random baseline at the same size, measure; then heal the
activation-pruned model at the largest reachable level (and the random FFN twin) and measure again. Scores are
computed once per importance and reused for every level. Finally, the recipe prune → heal → awq → gguf
runs through the real pipeline at the largest FFN level: sizes and llama.cpp-measured metrics.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="minicpm-smollm2")
    parser.add_argument("--levels", default="0.1,0.2,0.3", help="fractions of the parameters to remove")
    parser.add_argument("--methods", default="ffn,heads,layers")
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--score-samples", type=int, default=32)
    parser.add_argument("--heal-steps", type=int, default=40)
    parser.add_argument("--heal-lr", type=float, default=5e-5)
    parser.add_argument("--skip-pipeline", action="store_true")
    args = parser.parse_args()

    import torch

    from minicpm_compress.data.textsets import calibration_samples, evaluation_windows
    from minicpm_compress.errors import CompressError
    from minicpm_compress.evaluate.evaluator import Evaluator
    from minicpm_compress.state import load_checkpoint
    from minicpm_compress.resolve import resolve_model
    from minicpm_compress.pipeline import run_recipe
    from minicpm_compress.prune.scores import measure
    from minicpm_compress.prune.stage import PruneConfig, prune_model
    from minicpm_compress.recipe import build_recipe
    from minicpm_compress.stages import RunContext
    from minicpm_compress.state import ModelState
    from minicpm_compress.train.heal import HealConfig, apply_heal

    source = resolve_model(args.model)
    model, tokenizer = load_checkpoint(source.checkpoint)
    recipe = build_recipe(model=args.model, stages=[{"heal": {}}])
    data = recipe.data
    samples = calibration_samples(tokenizer, data.calibration_sources(), args.score_samples,
                                  data.sequence_length, recipe.seed)
    evaluator = Evaluator.against(model, evaluation_windows(tokenizer, ["austen-heldout"], args.eval_tokens, 512))
    levels = [float(x) for x in args.levels.split(",")]
    results = {"model": args.model, "eval_tokens": args.eval_tokens, "score_samples": args.score_samples,
               "heal": {"steps": args.heal_steps, "lr": args.heal_lr, "batch_size": 2, "sequence_length": 256},
               "torch_threads": torch.get_num_threads(), "rows": []}
    start = time.perf_counter()
    scores = {imp: measure(model, samples, imp, 8, recipe.seed) for imp in ("activation", "random")}
    results["scoring_wall_s"] = round(time.perf_counter() - start, 1)

    def heal(pruned):
        state = ModelState.of(copy.deepcopy(pruned), tokenizer, source)
        config = HealConfig(steps=args.heal_steps, lr=args.heal_lr, batch_size=2, sequence_length=256, samples=128)
        t = time.perf_counter()
        out = apply_heal(config, state, RunContext(recipe, reference_model=model))
        return out.state.model, out.details, time.perf_counter() - t

    for method in args.methods.split(","):
        for level in levels:
            for importance in ("activation", "random"):
                config = PruneConfig(method=method, target_params=1 - level, importance=importance)
                try:
                    pruned, details = prune_model(model, config, scores[importance])
                except CompressError as e:
                    results["rows"].append({"method": method, "level": level, "importance": importance,
                                            "error": str(e)})
                    continue
                row = {"method": method, "level": level, "importance": importance,
                       "parameters_kept": details["parameters_kept"], "units_after": details["units_after"],
                       "pruned": evaluator.measure(pruned).as_dict()}
                at_largest = level == max(levels) or method == "heads"  # heads: only 10% is reachable
                if at_largest and (importance == "activation" or method == "ffn"):
                    healed, log, wall = heal(pruned)
                    row["healed"] = evaluator.measure(healed).as_dict()
                    row["heal_wall_s"] = round(wall, 1)
                    row["heal_tokens_per_s"] = log["tokens_per_s"]
                print(f"{method} {level} {importance}: {row['pruned']['ppl_increase']:+.1%}"
                      + (f" healed {row['healed']['ppl_increase']:+.1%}" if "healed" in row else ""), file=sys.stderr)
                results["rows"].append(row)

    if not args.skip_pipeline:
        chain = build_recipe(
            name="bench-prune-chain", model=args.model, data={"eval_tokens": args.eval_tokens},
            stages=[{"prune": {"method": "ffn", "target_params": 1 - max(levels)}},
                    {"heal": {"steps": args.heal_steps, "lr": args.heal_lr, "batch_size": 2}},
                    {"awq": {"bits": 4, "group_size": 32, "symmetric": True}},
                    {"gguf": {"type": "Q4_0"}}],
        )
        stages = {}
        with tempfile.TemporaryDirectory() as tmp:
            run_recipe(chain, Path(tmp) / "out", on_stage=lambda r: stages.setdefault(
                f"{r.index}-{r.name}", {**r.metrics.as_dict(), "wall_s": round(r.wall_s, 1),
                                       "artifacts": r.artifacts, "details": r.details}))
        results["prune_heal_awq_gguf"] = stages
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
