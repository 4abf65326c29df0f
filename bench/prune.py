"""Structured pruning: held-out quality against the share of decoder-layer parameters removed, per method
and per way of choosing, side by side; then healing of the largest FFN cut.

    .venv/bin/python bench/prune.py [--model qwen2.5-0.5b] [--levels 0.1,0.2,0.3] [--methods ffn,heads,layers]
        [--variants cut-random,cut-activation,refit-activation,reconstruction] [--layer-heal-steps 8,32]
        [--heal-steps 40] > prune.json

A level is the fraction of the decoder layers' parameters to remove (embeddings and head are never
pruned); each row also says what that is as a share of all parameters. Variants:
  cut-random / cut-activation   the cut-only path (`refit: false`): seeded random or activation-energy scores
  refit-activation              the default: activation-energy scores, then the least-squares refit, layer by layer
  reconstruction                the units whose removal leaves the least error after the refit
  reconstruction-drift          the same, each refit aimed at the unpruned model's own hidden states
                                (`correct_drift: true`: it also corrects the drift of the layers before)
For layers (block influence, or random): cut-random, cut-activation, and refit-activation (the default:
every kept layer's down_proj refit towards the unpruned model's stream after the cut). The default
variant's largest FFN cut is then healed and measured again, with the tokens and wall time each took:
block-wise (`heal_layers`, streamed) at each of --layer-heal-steps steps per layer, and the last of those
followed by --heal-steps of end-to-end distillation (`heal`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

VARIANTS = {"cut-random": {"importance": "random", "refit": False},
            "cut-activation": {"importance": "activation", "refit": False},
            "refit-activation": {"importance": "activation", "refit": True},
            "reconstruction": {"importance": "reconstruction", "refit": True},
            "reconstruction-drift": {"importance": "reconstruction", "refit": True, "correct_drift": True}}
HEALED_VARIANT = "refit-activation"  # the prune stage's default
LAYER_VARIANTS = {"cut-random": {"importance": "random", "refit": False},
                  "cut-activation": {"importance": "activation", "refit": False},
                  "refit-activation": {"importance": "activation", "refit": True}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="minicpm-smollm2")
    parser.add_argument("--levels", default="0.1,0.2,0.3", help="fractions of the decoder-layer parameters to remove")
    parser.add_argument("--methods", default="ffn,heads,layers")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--calibration-samples", type=int, default=32)
    parser.add_argument("--layer-heal-steps", default="", help="steps per layer of block-wise healing, e.g. 8,32")
    parser.add_argument("--heal-steps", type=int, default=0, help="end-to-end healing steps after the last of those")
    parser.add_argument("--heal-lr", type=float, default=5e-5)
    parser.add_argument("--partial", default=None, help="also rewrite this JSON file after every row (a run "
                        "stopped early keeps what it measured)")
    args = parser.parse_args()

    import torch

    from minicpm_compress.data.textsets import evaluation_windows
    from minicpm_compress.errors import CompressError
    from minicpm_compress.evaluate.evaluator import Evaluator
    from minicpm_compress.models.architectures import decoder_layers
    from minicpm_compress.prune.stage import PruneConfig, apply_prune, parameter_count
    from minicpm_compress.recipe import build_recipe
    from minicpm_compress.resolve import resolve_model
    from minicpm_compress.stages import RunContext
    from minicpm_compress.state import ModelState, load_checkpoint

    source = resolve_model(args.model)
    model, tokenizer = load_checkpoint(source.checkpoint)
    total = parameter_count(model)
    decoder = sum(p.numel() for layer in decoder_layers(model) for p in layer.parameters())
    recipe = build_recipe(model=args.model, stages=[{"heal": {}}])
    evaluator = Evaluator.against(model, evaluation_windows(tokenizer, ["austen-heldout"], args.eval_tokens, 512))
    results = {"model": args.model, "parameters": total, "decoder_layer_parameters": decoder,
               "eval_tokens": args.eval_tokens, "calibration_samples": args.calibration_samples,
               "sequence_length": recipe.data.sequence_length, "torch_threads": torch.get_num_threads(),
               "rows": []}

    def prune(method, level, variant):
        settings = (LAYER_VARIANTS if method == "layers" else VARIANTS)[variant]
        config = PruneConfig(method=method, target_params=1 - level * decoder / total,
                             calibration_samples=args.calibration_samples, **settings)
        t = time.perf_counter()
        outcome = apply_prune(config, ModelState.of(model, tokenizer, source), RunContext(recipe))
        return outcome.state.model, outcome.details, time.perf_counter() - t

    def save(row: dict) -> None:
        if row not in results["rows"]:
            results["rows"].append(row)
        if args.partial:
            Path(args.partial).write_text(json.dumps(results, indent=2))

    levels = [float(x) for x in args.levels.split(",")]
    for method in args.methods.split(","):
        variants = [v for v in args.variants.split(",")
                    if method != "layers" or v in LAYER_VARIANTS]
        for level in levels:
            for variant in variants:
                row = {"method": method, "level": level, "variant": variant}
                try:
                    pruned, details, wall = prune(method, level, variant)
                except CompressError as e:
                    save({**row, "error": str(e)})
                    continue
                removed = details["parameters_before"] - details["parameters_after"]
                row.update({"decoder_removed": round(removed / decoder, 4), "all_removed": round(removed / total, 4),
                            "units_after": details["units_after"], "prune_wall_s": round(wall, 1),
                            "pruned": evaluator.measure(pruned).as_dict()})
                print(f"{method} {level} {variant}: {row['pruned']['ppl_increase']:+.1%} ({wall:.0f} s)", file=sys.stderr)
                save(row)
                if method == "ffn" and level == max(levels) and variant == HEALED_VARIANT:
                    row["healing"] = heal(pruned, model, tokenizer, source, recipe, args, evaluator)
                    save(row)
    print(json.dumps(results, indent=2))


def heal(pruned, reference, tokenizer, source, recipe, args, evaluator) -> list[dict]:
    """Block-wise healing at each step count, the last one then healed end to end; each measured."""
    from minicpm_compress.stages import RunContext
    from minicpm_compress.state import ModelState
    from minicpm_compress.train.heal import HealConfig, apply_heal
    from minicpm_compress.train.layer_heal import LayerHealConfig, apply_layer_heal

    rows, state = [], None
    for steps in [int(x) for x in args.layer_heal_steps.split(",") if x]:
        ctx = RunContext(recipe, reference=ModelState.of(reference, tokenizer, source))
        out = apply_layer_heal(LayerHealConfig(steps=steps), ModelState.of(pruned, tokenizer, source), ctx)
        state = out.state
        rows.append({**evaluator.measure(state.model).as_dict(), "healing": "block-wise", "steps_per_layer": steps,
                     "healing_tokens": out.details["tokens"], "wall_s": out.details["wall_s"]})
        print(f"  block-wise {steps} steps/layer: {rows[-1]['ppl_increase']:+.1%} ({rows[-1]['wall_s']:.0f} s)",
              file=sys.stderr)
    if args.heal_steps:
        config = HealConfig(steps=args.heal_steps, lr=args.heal_lr, batch_size=2, sequence_length=256, samples=128)
        start = state.model if state is not None else pruned
        t = time.perf_counter()
        out = apply_heal(config, ModelState.of(start, tokenizer, source), RunContext(recipe, reference_model=reference))
        rows.append({**evaluator.measure(out.state.model).as_dict(),
                     "healing": "end-to-end" + (" after block-wise" if state is not None else ""),
                     "steps": args.heal_steps, "healing_tokens": args.heal_steps * 2 * 256,
                     "wall_s": round(time.perf_counter() - t, 1)})
        print(f"  end-to-end {args.heal_steps} steps: {rows[-1]['ppl_increase']:+.1%} ({rows[-1]['wall_s']:.0f} s)",
              file=sys.stderr)
    return rows


if __name__ == "__main__":
    main()
