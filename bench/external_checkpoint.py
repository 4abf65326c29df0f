"""What bench/llmcompressor_run.py and bench/gptqmodel_run.py hand back, in their own environments (torch and
safetensors only): another tool's quantized weights as a plain float checkpoint beside the original's config
and tokenizer, and one JSON line for the benchmark."""

from __future__ import annotations

import json
import resource
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file


def write(checkpoint: str, out: str, tensors: dict[str, torch.Tensor], wall: float, quantized: list[str]) -> None:
    """OUT/model.safetensors: every tensor of CHECKPOINT's, those `tensors` names replaced (float32; names the
    checkpoint lacks, e.g. a tied head, ignored), the checkpoint's other files copied. Every linear in `quantized`
    must be one of the checkpoint's (`NAME.weight`). Then prints {"wall_s", "quantized_linears", "peak_rss_mib"}."""
    src, out = Path(checkpoint), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with safe_open(str(src / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
        foreign = sorted(name for name in quantized if f"{name}.weight" not in keys)
        if foreign:
            raise SystemExit(f"quantized linears the checkpoint does not have: {foreign[:3]}")
        merged = {k: tensors[k] if k in tensors else f.get_tensor(k) for k in keys}
    save_file({k: v.detach().contiguous().to(torch.float32) for k, v in merged.items()}, str(out / "model.safetensors"))
    for path in src.iterdir():
        if path.name != "model.safetensors" and path.is_file():
            shutil.copy(path, out / path.name)
    print(json.dumps({"wall_s": round(wall, 1), "quantized_linears": len(quantized),
                      "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}))
