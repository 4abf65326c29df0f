"""ONNX on the default model: file sizes, CPU decode tokens/s and held-out accuracy in onnxruntime.

    .venv/bin/python bench/onnx_export.py [--eval-tokens 4096] [--decode-tokens 64] > onnx.json

Variants: fp32; int8 weight-only MatMulNBits (our RTN int8 per-channel codes); int8 dynamic
(onnxruntime's quantize_dynamic); int4 MatMulNBits (our RTN int4 g32 symmetric codes); the MatMulNBits
variants at accuracy_level 0 (exact) and 4 (int8 activations inside the matmul: faster, no longer exact),
with the embedding table (and tied head) as float32, int8 or int4 blocks. Each is measured
against the float model, and the MatMulNBits ones also against the gated torch model they came from
(the lossless check). Decode speed: batch 1, a 64-token prompt, then one token at a time with the cache.
"""

from __future__ import annotations

import argparse
import copy
import json
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
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="minicpm-smollm2")
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args()

    import onnxruntime
    import torch

    from minicpm_compress.data.textsets import evaluation_windows
    from minicpm_compress.evaluate.evaluator import Evaluator
    from minicpm_compress.export.onnx import OnnxConfig, OnnxRunner, decode_tokens_per_s, write_onnx
    from minicpm_compress.models.architectures import quantizable_linears
    from minicpm_compress.models.checkpoint import load_checkpoint
    from minicpm_compress.models.source import resolve_model
    from minicpm_compress.quant.qweight import QuantScheme, quantize
    from minicpm_compress.state import ModelState

    source = resolve_model(args.model)
    model, tokenizer = load_checkpoint(source.checkpoint)
    windows = evaluation_windows(tokenizer, ["austen-heldout"], args.eval_tokens, 512)
    against_float = Evaluator.against(model, windows)
    prompt = windows[:1, :64].numpy()
    results = {"model": args.model, "eval_tokens": args.eval_tokens, "decode_tokens": args.decode_tokens,
               "onnxruntime": onnxruntime.__version__, "threads": torch.get_num_threads(), "variants": {}}
    for name in args.variants.split(","):
        settings, scheme = VARIANTS[name]
        state = ModelState.of(copy.deepcopy(model), tokenizer, source)
        if scheme:
            s = QuantScheme(**scheme)
            state.qweights = {n: quantize(l.weight, s) for n, l in quantizable_linears(state.model).items()}
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            paths = write_onnx(state, Path(tmp) / name, OnnxConfig(**settings))
            export_s = time.perf_counter() - start
            runner = OnnxRunner(Path(tmp) / name / "model.onnx", state.model.config)
            row = {"linears": paths, "export_s": round(export_s, 1),
                   "bytes": sum(p.stat().st_size for p in (Path(tmp) / name).glob("model.onnx*")),
                   "decode_tokens_per_s": round(decode_tokens_per_s(runner, prompt, args.decode_tokens), 2),
                   "vs_float": against_float.measure(runner).as_dict()}
            if scheme:
                gated = Evaluator.against(state.evaluated_model(), windows)
                row["vs_gated_torch"] = gated.measure(runner).as_dict()
            del runner
        results["variants"][name] = row
        print(f"{name}: {row['bytes'] / 1e6:.1f} MB, {row['decode_tokens_per_s']} tok/s", file=__import__("sys").stderr)
    fp32 = results["variants"].get("fp32", {}).get("decode_tokens_per_s")
    if fp32:
        results["speedup_vs_fp32"] = {k: round(v["decode_tokens_per_s"] / fp32, 2)
                                      for k, v in results["variants"].items()}
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
