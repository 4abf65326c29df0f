"""ExecuTorch next to GGUF and ONNX, all three holding the same int4 codes: size, held-out accuracy in each
runtime, and decode speed in one interleaved run.

    .venv/bin/python bench/executorch_export.py [--models minicpm-smollm2,qwen2.5-0.5b] [--eval-tokens 2048] \
        [--rounds 3] [--decode-tokens 32] > executorch.json

Per model, one recipe: RTN int4 g32 symmetric with bfloat16 scales (positive, bfloat16-exact: what XNNPACK
holds exactly; GGUF Q4_0 and ONNX MatMulNBits hold them exactly too), then `gguf` Q4_0, `onnx` int4 and
`executorch` int4, each measured by the package's evaluator in its own runtime (the stage rows of the
manifest). Decode speed: batch 1, a 32-token prompt, then --decode-tokens tokens one at a time with each
runtime's cache, full-vocabulary logits every step in all three; the median of --rounds rounds, each round
timing every runtime once, so drift in the machine's speed falls on all alike.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = [
    {"rtn": {"bits": 4, "group_size": 32, "symmetric": True, "scale_dtype": "bfloat16"}},
    {"gguf": {"type": "Q4_0"}},
    {"onnx": {"bits": 4}},
    {"executorch": {"bits": 4}},
]


def decode_speed(runner, prompt: list[int], steps: int) -> float:
    """Tokens per second of `steps` cached decode steps: greedy(prompt, 1 + steps) less greedy(prompt, 1)."""
    start = time.perf_counter()
    runner.greedy(prompt, 1)
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    runner.greedy(prompt, 1 + steps)
    return steps / (time.perf_counter() - start - prefill)


def one_model(model: str, args) -> dict:
    from minicpm_compress.builtin import builtin_path
    from minicpm_compress.export.executorch.runner import ExecuTorchRunner
    from minicpm_compress.export.gguf.llama_cpp import LlamaCppRunner
    from minicpm_compress.export.onnx.runner import OnnxRunner
    from minicpm_compress.models.checkpoint import load_tokenizer, supported_config
    from minicpm_compress.pipeline import run_recipe
    from minicpm_compress.recipe import build_recipe

    out = ROOT / "out" / f"bench-executorch-{model}"
    recipe = build_recipe(model=model, data={"eval_tokens": args.eval_tokens}, seed=0, stages=STAGES)
    start = time.perf_counter()
    record = run_recipe(recipe, out, overwrite=True)
    manifest = json.loads((out / "manifest.json").read_text())
    rows = {}
    for stage in record.stages[1:]:
        files = [a for a in manifest["artifacts"] if a.get("stage") == stage.index]
        rows[stage.name] = {**stage.metrics.as_dict(), "wall_s": round(stage.wall_s, 1),
                            "bytes": sum(a["bytes"] for a in files if a["bits"]),
                            "bits_per_weight": stage.details.get("bits_per_weight"),
                            "linears": stage.details.get("linears") or stage.details.get("paths")}
    rows["executorch"]["against_torch"] = record.stages[-1].details["against_torch"]
    config = supported_config(builtin_path(model))
    tokenizer = load_tokenizer(out / "executorch-int4")
    prompt = tokenizer("The history of the printing press begins in the fifteenth century, when "
                       "Johannes Gutenberg " * 3)["input_ids"][:32]
    gguf = next(a["path"] for a in manifest["artifacts"] if a["path"].endswith(".gguf"))
    context = record.stages[-1].details["context"]
    runners = {"llama.cpp Q4_0": LlamaCppRunner(out / gguf, 128),
               "onnxruntime int4": OnnxRunner(out / "onnx-int4/model.onnx", config),
               "ExecuTorch int4 (XNNPACK)": ExecuTorchRunner(out / "executorch-int4/model.pte", context)}
    speeds = {name: [] for name in runners}
    for _ in range(args.rounds):
        for name, runner in runners.items():
            speeds[name].append(round(decode_speed(runner, prompt, args.decode_tokens), 2))
    return {"rows": rows, "decode_tokens_per_s": {k: statistics.median(v) for k, v in speeds.items()},
            "decode_runs": speeds, "total_wall_s": round(time.perf_counter() - start, 1)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="minicpm-smollm2,qwen2.5-0.5b")
    parser.add_argument("--eval-tokens", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--decode-tokens", type=int, default=32)
    args = parser.parse_args()
    results = {"machine": f"{os.cpu_count()} CPUs, no GPU", "recipe": STAGES, "eval_tokens": args.eval_tokens,
               "decode": f"32-token prompt, {args.decode_tokens} tokens, median of {args.rounds} interleaved rounds",
               "models": {}}
    for model in args.models.split(","):
        results["models"][model] = one_model(model, args)
        print(json.dumps({model: results["models"][model]}), file=sys.stderr, flush=True)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
