"""RTN accuracy across settings on the built-in models, on the default held-out set. Prints JSON.

    .venv/bin/python bench/rtn_settings.py [--eval-tokens 32768] [--models minicpm-smollm2,smollm2-135m]

The int4 g32 asym-float row is the grid the built-in weights already sit on (lossless by construction);
the other rows are where methods can be compared.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

from minicpm_compress.data.textsets import evaluation_windows
from minicpm_compress.evaluate.evaluator import Evaluator
from minicpm_compress.builtin import builtin_path
from minicpm_compress.state import load_checkpoint
from minicpm_compress.quant.qweight import QuantScheme
from minicpm_compress.quant.rtn import RTNConfig, apply_rtn
from minicpm_compress.resolve import resolve_model
from minicpm_compress.state import ModelState

SCHEMES = [
    QuantScheme(bits=8, group_size=None, symmetric=True),
    QuantScheme(bits=4, group_size=32, zero_point="float"),
    QuantScheme(bits=4, group_size=128),
    QuantScheme(bits=4, group_size=128, symmetric=True),
    QuantScheme(bits=4, group_size=None, symmetric=True),
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--eval-tokens", type=int, default=32768)
    parser.add_argument("--models", default="minicpm-smollm2,smollm2-135m")
    args = parser.parse_args()
    os.environ.setdefault("MINICPM_COMPRESS_PROGRESS", "0")
    results = {"machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                           "processor": platform.processor() or platform.machine()},
               "eval_tokens": args.eval_tokens, "models": {}}
    for name in args.models.split(","):
        model, tokenizer = load_checkpoint(builtin_path(name))
        windows = evaluation_windows(tokenizer, ["austen-heldout"], args.eval_tokens, 512)
        start = time.perf_counter()
        evaluator = Evaluator.against(model, windows)
        ref_s = time.perf_counter() - start
        rows = []
        for scheme in SCHEMES:
            state = ModelState.of(model, tokenizer, resolve_model(name))
            start = time.perf_counter()
            apply_rtn(RTNConfig(**scheme.model_dump()), state, None)
            quant_s = time.perf_counter() - start
            start = time.perf_counter()
            metrics = evaluator.measure(state.evaluated_model())
            rows.append({"scheme": scheme.describe(), **metrics.as_dict(), "quantize_s": round(quant_s, 2),
                         "evaluate_s": round(time.perf_counter() - start, 1)})
        results["models"][name] = {"fp_ppl": round(evaluator.reference.ppl, 4), "reference_s": round(ref_s, 1),
                                   "rtn": rows}
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
