"""Runs inside the throwaway GPTQModel environment that bench/int4_methods.py creates (not this package's).

    python bench/gptqmodel_run.py CHECKPOINT CALIBRATION.safetensors OUT BITS GROUP {sym|asym}

Quantizes CHECKPOINT with GPTQModel's GPTQ (no act-order) on the given calibration token ids, saves its GPTQ
checkpoint, reads that checkpoint back with GPTQModel's torch kernels and writes OUT: a plain float checkpoint
whose linears hold the weights the GPTQ checkpoint dequantizes to (config and tokenizer copied), so
minicpm-compress's own evaluator measures it. Prints one JSON line: wall seconds of `quantize` and the
process's peak RSS.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

import external_checkpoint  # bench/, beside this script


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
        tensors = {}
        with torch.no_grad():
            for name, module in back.model.named_modules():
                if isinstance(module, BaseQuantLinear):
                    tensors[f"{name}.weight"] = module.dequantize_weight().T.to(torch.float32)
    external_checkpoint.write(checkpoint, out, tensors, wall, [name.removesuffix(".weight") for name in tensors])


if __name__ == "__main__":
    main()
