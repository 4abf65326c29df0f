"""GGUF int4 files measured in llama.cpp against the float model: ours (AWQ codes copied into Q4_0
blocks) vs llama.cpp's own Q4_0 and Q4_K_M made from the F16 file of the same model. Prints JSON.

    .venv/bin/python bench/gguf_int4.py [--eval-tokens 32768] [--calibration-samples 128]

Also reports how well llama.cpp agrees with the gated torch model on our lossless file.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="minicpm-smollm2")
    parser.add_argument("--eval-tokens", type=int, default=32768)
    parser.add_argument("--calibration-samples", type=int, default=128)
    args = parser.parse_args()
    os.environ.setdefault("MINICPM_COMPRESS_PROGRESS", "0")

    from minicpm_compress.data.textsets import evaluation_windows
    from minicpm_compress.evaluate.evaluator import Evaluator
    from minicpm_compress.export.gguf.llama_cpp import LlamaCppRunner
    from minicpm_compress.export.gguf.llama_cpp import llama_cpp_quantize
    from minicpm_compress.export.gguf.writer import write_gguf
    from minicpm_compress.builtin import builtin_path
    from minicpm_compress.state import load_checkpoint
    from minicpm_compress.resolve import resolve_model
    from minicpm_compress.quant.awq import AWQConfig, apply_awq
    from minicpm_compress.recipe import build_recipe
    from minicpm_compress.stages import RunContext
    from minicpm_compress.state import ModelState

    model, tokenizer = load_checkpoint(builtin_path(args.model))
    windows = evaluation_windows(tokenizer, ["austen-heldout"], args.eval_tokens, 512)
    evaluator = Evaluator.against(model, windows)
    source = resolve_model(args.model)
    float_state = ModelState.of(model, tokenizer, source)
    awq_state = ModelState.of(copy.deepcopy(model), tokenizer, source)
    recipe = build_recipe(model=args.model, data={"calibration_samples": args.calibration_samples},
                          stages=[{"awq": {}}])
    start = time.perf_counter()
    apply_awq(AWQConfig(bits=4, group_size=32, symmetric=True), awq_state, RunContext(recipe))
    awq_s = time.perf_counter() - start

    def measure(path: Path, against=evaluator) -> dict:
        runner = LlamaCppRunner(path, 512)
        try:
            m = against.measure(runner)
        finally:
            runner.close()
        return {**m.as_dict(), "bytes": path.stat().st_size}

    results = {"model": args.model, "eval_tokens": args.eval_tokens, "awq_wall_s": round(awq_s, 1), "files": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = write_gguf(awq_state, tmp / "ours-awq-Q4_0.gguf", "Q4_0")
        results["files"]["ours AWQ g32 sym -> Q4_0 (codes copied)"] = {**measure(tmp / "ours-awq-Q4_0.gguf"),
                                                                        "tensors": paths}
        write_gguf(float_state, tmp / "f16.gguf", "F16")
        results["files"]["F16"] = measure(tmp / "f16.gguf")
        for t in ("Q4_0", "Q4_K_M"):
            llama_cpp_quantize(tmp / "f16.gguf", tmp / f"llama-{t}.gguf", t)
            results["files"][f"llama.cpp {t} from F16"] = measure(tmp / f"llama-{t}.gguf")
        gated = Evaluator.against(awq_state.evaluated_model(), windows)
        agreement = measure(tmp / "ours-awq-Q4_0.gguf", gated)
        results["llama_cpp_vs_gated_torch_on_lossless_file"] = {
            "top1": agreement["top1"], "kld": agreement["kld"],
            "note": "llama.cpp quantizes activations to 8 bits in quantized matmuls; an F32 file agrees at ~99.95%"}
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
