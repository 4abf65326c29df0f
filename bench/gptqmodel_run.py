"""Runs inside the throwaway GPTQModel environment that bench/int4_methods.py creates (not this package's).

    python bench/gptqmodel_run.py CHECKPOINT CALIBRATION.safetensors OUT BITS GROUP {sym|asym}

Quantizes CHECKPOINT with GPTQModel's GPTQ (no act-order) on the given calibration token ids, saves its GPTQ
checkpoint, reads that checkpoint back with GPTQModel's torch kernels and writes OUT: a plain float checkpoint
whose linears hold the weights the GPTQ checkpoint dequantizes to (config and tokenizer copied), so
minicpm-compress's own evaluator measures it. Prints one JSON line: wall seconds of `quantize` and the
process's peak RSS.
"""

from __future__ import annotations

import json
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file


def main() -> None:
    checkpoint, calibration, out, bits, group, kind = sys.argv[1:7]
    from gptqmodel import BACKEND, GPTQModel, QuantizeConfig
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear

    config = QuantizeConfig(bits=int(bits), group_size=int(group), sym=kind == "sym", desc_act=False)
    ids = load_file(calibration)["input_ids"]
    samples = [{"input_ids": row.tolist(), "attention_mask": [1] * len(row)} for row in ids]
    model = GPTQModel.load(checkpoint, config, device="cpu", dtype=torch.float32)
    start = time.perf_counter()
    model.quantize(samples, batch_size=1)
    wall = time.perf_counter() - start
    with tempfile.TemporaryDirectory(prefix="gptqmodel-", dir=Path(out).parent) as saved:
        model.save(saved)
        del model
        back = GPTQModel.load(saved, backend=BACKEND.TORCH, device="cpu")
        tensors, quantized = {}, 0
        with torch.no_grad():
            for name, module in back.model.named_modules():
                if isinstance(module, BaseQuantLinear):
                    tensors[f"{name}.weight"] = module.dequantize_weight().T.to(torch.float32)
                    quantized += 1
    src, out = Path(checkpoint), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with safe_open(str(src / "model.safetensors"), "pt") as f:
        original = {k: f.get_tensor(k) for k in f.keys()}
    missing = [k for k in tensors if k not in original]
    if missing:
        raise SystemExit(f"GPTQModel's linears are not the checkpoint's: {missing[:3]}")
    save_file({k: tensors.get(k, v).contiguous().to(torch.float32) for k, v in original.items()},
              str(out / "model.safetensors"))
    for path in src.iterdir():
        if path.name != "model.safetensors" and path.is_file():
            shutil.copy(path, out / path.name)
    print(json.dumps({"wall_s": round(wall, 1), "quantized_linears": quantized,
                      "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}))


if __name__ == "__main__":
    main()
