"""ONNX on the default model: file sizes, CPU decode tokens/s and held-out accuracy in onnxruntime.

    .venv/bin/python bench/onnx_export.py [--model smollm2-135m] [--eval-tokens 4096] [--decode-tokens 64] > onnx.json

Variants: fp32; int8 weight-only MatMulNBits (our RTN int8 per-channel codes); int8 dynamic
(onnxruntime's quantize_dynamic); int4 MatMulNBits (our RTN int4 g32 symmetric codes); the MatMulNBits
variants at accuracy_level 0 (exact) and 4 (int8 activations inside the matmul: faster, no longer exact),
with the embedding table (and tied head) as float32, int8 or int4 blocks; every variant is the fused
decoder graph (GroupQueryAttention, SkipSimplifiedLayerNormalization) except the `-traced` ones, which
keep torch.onnx's graph of the model. Each is measured
against the float model, and the MatMulNBits ones also against the gated torch model they came from
(the lossless check). Decode speed: batch 1, a 64-token prompt, then 64 tokens one at a time with the
cache, timed twice: through onnxruntime-genai's generator (what an app runs; the comparable number: the
median of --repeats rounds, each round timing every variant once, so drift in the machine's speed falls
on all rows alike) and once through this project's plain onnxruntime loop. `genai-builder-int4`
(Llama checkpoints: `--model smollm2-135m`) runs onnxruntime-genai's own model builder (int4, CPU) on the same checkpoint.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

FLOAT_TABLE = {"embeddings": "float"}
INT8 = {"bits": 8, "group_size": None, "symmetric": True}
INT4 = {"bits": 4, "group_size": 32, "symmetric": True}
VARIANTS = {  # exporter settings, and the RTN scheme of the gated torch model (None: float)
    "fp32": ({"bits": 32}, None),
    "int8-matmulnbits": ({"bits": 8, "accuracy_level": 0, **FLOAT_TABLE}, INT8),
    "int8-dynamic": ({"bits": 8, "int8": "dynamic"}, None),
    "int8-matmulnbits-acc4": ({"bits": 8, "accuracy_level": 4, **FLOAT_TABLE}, INT8),
    "int8-matmulnbits-acc4-table8": ({"bits": 8, "accuracy_level": 4, "embeddings": "int8"}, INT8),
    "int4-matmulnbits": ({"bits": 4, "accuracy_level": 0, **FLOAT_TABLE}, INT4),
    "int4-matmulnbits-acc4": ({"bits": 4, "accuracy_level": 4, **FLOAT_TABLE}, INT4),
    "int4-matmulnbits-table8": ({"bits": 4, "accuracy_level": 0, "embeddings": "int8"}, INT4),
    "int4-matmulnbits-acc4-table8": ({"bits": 4, "accuracy_level": 4, "embeddings": "int8"}, INT4),
    "int4-matmulnbits-acc4-table4": ({"bits": 4, "accuracy_level": 4, "embeddings": "int4"}, INT4),
    # the same settings with torch.onnx's traced graph instead of the fused decoder (the graph before it)
    "fp32-traced": ({"bits": 32, "graph": "traced"}, None),
    "int4-matmulnbits-acc4-table8-traced": ({"bits": 4, "accuracy_level": 4, "embeddings": "int8", "graph": "traced"},
                                            INT4),
}


BUILDER = "genai-builder-int4"  # onnxruntime-genai's own model builder, int4 for CPU (Llama checkpoints)


def genai_decode_speed(folder: Path, prompt: list[int], steps: int, repeats: int = 1) -> list[float]:
    """Greedy decoding tokens/s through onnxruntime-genai (what an app runs), `repeats` times on one loaded
    model: prefill `prompt`, then time `steps` generated tokens."""
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    speeds = []
    for _ in range(repeats):
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(prompt) + steps, do_sample=False)
        generator = og.Generator(model, params)
        generator.append_tokens(prompt)
        start = time.perf_counter()
        for _ in range(steps):
            generator.generate_next_token()
        speeds.append(steps / (time.perf_counter() - start))
        del generator
    return speeds


def run_builder(checkpoint: Path, out: Path) -> None:
    """onnxruntime_genai.models.builder on a copy of the checkpoint folder (it needs `architectures`)."""
    import subprocess
    import sys

    hf = out.parent / "hf"
    hf.mkdir()
    for f in checkpoint.iterdir():
        (hf / f.name).symlink_to(f.resolve())
    config = json.loads((checkpoint / "config.json").read_text())
    config["architectures"] = config.get("architectures") or [{"llama": "LlamaForCausalLM"}[config["model_type"]]]
    (hf / "config.json").unlink()
    (hf / "config.json").write_text(json.dumps(config))
    done = subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(out),
                           "-p", "int4", "-e", "cpu", "-c", str(out.parent / "cache")], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"onnxruntime-genai builder failed: {done.stderr[-2000:]}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="minicpm-smollm2")
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--variants", default=None,
                        help="comma-separated; default: every variant, and the builder's for Llama checkpoints")
    parser.add_argument("--repeats", type=int, default=5,
                        help="rounds of genai decode timings over all variants (the median is reported)")
    args = parser.parse_args()

    import onnxruntime
    import onnxruntime_genai
    import torch

    from minicpm_compress.data.textsets import evaluation_windows
    from minicpm_compress.evaluate.evaluator import Evaluator
    from minicpm_compress.export.onnx.stage import OnnxConfig, write_onnx
    from minicpm_compress.export.onnx.runner import OnnxRunner, decode_tokens_per_s
    from minicpm_compress.models.architectures import quantizable_linears
    from minicpm_compress.state import load_checkpoint
    from minicpm_compress.resolve import resolve_model
    from minicpm_compress.quant.qweight import QuantScheme, quantize
    from minicpm_compress.state import ModelState

    source = resolve_model(args.model)
    model, tokenizer = load_checkpoint(source.checkpoint)
    windows = evaluation_windows(tokenizer, ["austen-heldout"], args.eval_tokens, 512)
    against_float = Evaluator.against(model, windows)
    prompt = windows[:1, :64].numpy()
    results = {"model": args.model, "eval_tokens": args.eval_tokens, "decode_tokens": args.decode_tokens,
               "genai_repeats": args.repeats,
               "onnxruntime": onnxruntime.__version__, "onnxruntime_genai": onnxruntime_genai.__version__,
               "threads": torch.get_num_threads(), "variants": {}}
    llama = json.loads((source.checkpoint / "config.json").read_text())["model_type"] == "llama"
    names = args.variants.split(",") if args.variants else list(VARIANTS) + ([BUILDER] if llama else [])
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:  # export and accuracy, one variant after another
            folder = Path(tmp) / name
            start = time.perf_counter()
            gated = None
            if name == BUILDER:
                run_builder(source.checkpoint, folder)
                row = {"linears": "onnxruntime-genai builder int4 (its RTN, accuracy_level 4, int4 table)"}
            else:
                settings, scheme = VARIANTS[name]
                state = ModelState.of(copy.deepcopy(model), tokenizer, source)
                if scheme:
                    s = QuantScheme(**scheme)
                    state.qweights = {n: quantize(lin.weight, s) for n, lin in quantizable_linears(state.model).items()}
                    gated = state.evaluated_model()
                row = {"linears": write_onnx(state, folder, OnnxConfig(**settings))}
            row["export_s"] = round(time.perf_counter() - start, 1)
            runner = OnnxRunner(folder / "model.onnx", model.config)
            row["bytes"] = sum(p.stat().st_size for p in folder.glob("model.onnx*"))
            if name != BUILDER:  # the builder's file is timed through onnxruntime-genai only
                row["decode_tokens_per_s"] = round(decode_tokens_per_s(runner, prompt, args.decode_tokens), 2)
            row["vs_float"] = against_float.measure(runner).as_dict()  # whole windows: no cached steps
            if gated is not None:
                row["vs_gated_torch"] = Evaluator.against(gated, windows).measure(runner).as_dict()
            del runner, gated
            results["variants"][name] = row
            print(f"{name}: {row['bytes'] / 1e6:.1f} MB, KLD {row['vs_float']['kld']:.4f}", file=sys.stderr)
        # decode speed in interleaved rounds (every variant once per round), so drift in the machine's speed
        # falls on all rows alike; the median of the rounds is reported
        for _ in range(args.repeats):
            for name in names:
                speed = genai_decode_speed(Path(tmp) / name, prompt[0].tolist(), args.decode_tokens)[0]
                results["variants"][name].setdefault("genai_decode_tokens_per_s_runs", []).append(round(speed, 2))
        for name in names:
            row = results["variants"][name]
            row["genai_decode_tokens_per_s"] = round(statistics.median(row["genai_decode_tokens_per_s_runs"]), 2)
            print(f"{name}: genai {row['genai_decode_tokens_per_s']} tok/s", file=sys.stderr)
    base = results["variants"].get("fp32", {}).get("genai_decode_tokens_per_s")
    if base:
        results["genai_speedup_vs_fp32"] = {k: round(v["genai_decode_tokens_per_s"] / base, 2)
                                            for k, v in results["variants"].items()}
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
